"""OpenAI-compatible server: `hybrid-run MODEL --serve` driven by the official `openai`
client (models, chat non-stream and stream, completions, 4xx errors, still serving after),
plus in-process checks with a scripted runtime: reasoning_content, one request at a time,
503 on a full queue, a closed stream cancels its generation."""

import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from hybrid.runtime.engine import GenerationStats
from subproc import NEUTRAL_CWD, hybrid_env

import fastapi  # noqa: E402,F401  (test extra)
import uvicorn  # noqa: E402,F401
import httpx  # noqa: E402



# ----------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def served(tiny_q4km, tmp_path_factory):
    """`hybrid-run MODEL --serve --port 0` in a subprocess (default host); yields its base URL."""
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    log = open(log_path, "w+")
    env = hybrid_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybrid.app.cli", str(tiny_q4km), "--serve",   # default --host
         "--port", "0", "--device", "cpu", "--ctx", "256", "--max-tokens", "16"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=NEUTRAL_CWD)
    try:
        url = None
        deadline = time.time() + 180
        while time.time() < deadline and url is None:
            if proc.poll() is not None:
                break
            log.seek(0)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log.read())
            if m:
                url = m.group(1)
            else:
                time.sleep(0.2)
        if url is None:
            log.seek(0)
            pytest.fail(f"the server did not start; its output:\n{log.read()[-3000:]}")
        while time.time() < deadline:               # the socket listens before uvicorn serves
            try:
                if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(served):
    import openai
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", timeout=120, max_retries=0)


def test_models_chat_stream_and_completions_with_the_openai_client(client):
    models = client.models.list().data
    assert len(models) == 1
    mid = models[0].id
    assert mid.startswith("tiny-deepseek2")

    msgs = [{"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model=mid, messages=msgs, max_tokens=10, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens > 3 and r.usage.total_tokens == r.usage.prompt_tokens + 10
    full = (getattr(choice.message, "reasoning_content", None) or "", choice.message.content or "")
    assert full[0] or full[1]

    # the stream carries the same text at temperature 0 (R1's thinking as reasoning_content)
    stream = client.chat.completions.create(model=mid, messages=msgs, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    think, answer, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            think.append(getattr(d, "reasoning_content", None) or "")
            answer.append(d.content or "")
            finish = c.finish_reason or finish
    assert ("".join(think), "".join(answer)) == full
    assert finish == "length" and usage.completion_tokens == 10

    c = client.completions.create(model=mid, prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 5
    again = client.completions.create(model=mid, prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert again.choices[0].text == c.choices[0].text
    # stop strings end the text before the stop
    cut = c.choices[0].text[2:4]
    if cut.strip():
        stopped = client.completions.create(model=mid, prompt="The quick brown fox", max_tokens=5,
                                            temperature=0, stop=[cut])
        assert stopped.choices[0].finish_reason == "stop"
        assert cut not in stopped.choices[0].text


def test_bad_requests_get_openai_style_4xx_and_the_server_keeps_serving(client, served):
    import openai

    mid = client.models.list().data[0].id
    ok = {"model": mid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(**{**ok, "model": "gpt-4o"})
    assert "gpt-4o" in str(e.value) and mid in str(e.value)

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**ok, "max_tokens": -5})
    assert "max_tokens" in str(e.value)

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**ok, "messages": [{"role": "user", "content": "word " * 400}]})
    assert "context length is 256 tokens" in str(e.value)
    assert e.value.code == "context_length_exceeded"

    r = httpx.post(f"{served}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]

    r = httpx.post(f"{served}/v1/chat/completions", json={"model": mid}, timeout=60)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{served}/v1/completions", json={**ok, "prompt": "x", "temperature": 9}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"

    # still serving, and /health says so
    r = client.chat.completions.create(**ok)
    assert r.usage.completion_tokens == 4
    h = httpx.get(f"{served}/health", timeout=30).json()
    assert h["status"] == "ok" and h["model"] == mid


def test_binds_to_loopback_by_default():
    from hybrid.app.cli import build_parser

    a = build_parser().parse_args(["m.gguf", "--serve"])
    assert a.host == "127.0.0.1"


def test_served_on_loopback_by_default(served):
    """End to end (the README's claim): `--serve` without --host listens on 127.0.0.1 only."""
    import psutil

    port = int(served.rsplit(":", 1)[1])
    listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening == ["127.0.0.1"], listening


# ----------------------------------------------------------------------------- in process




class ScriptedRuntime:
    """Byte tokens; replies with a fixed text one character per token, optionally blocking on
    a gate first; records how many generations ran at once."""

    def __init__(self, reply, ctx=512, delay=0.0):
        self.reply, self.ctx, self.delay = reply, ctx, delay
        self.n_vocab = 256
        self.gate = threading.Event()
        self.gate.set()
        self.active = self.max_active = 0
        self.tokens_made = []
        self.last_stats = None

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant><think>\n"

    def tokenize(self, text, add_bos=None):
        return list(text.encode())

    def generate_tokens(self, prompt, *, max_tokens=256, stop=None, **kw):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        made = 0
        try:
            self.gate.wait(30)
            st = GenerationStats(prompt_tokens=len(prompt), prefill_s=0.001, finish_reason="length")
            self.last_stats = st
            for i, ch in enumerate(self.reply[:max_tokens]):
                if self.delay:
                    time.sleep(self.delay)
                made += 1
                st.completion_tokens += 1
                yield i, ch
            if max_tokens > len(self.reply):
                st.finish_reason = "stop"
            st.decode_s = 0.01
        finally:
            self.tokens_made.append(made)
            self.active -= 1


@pytest.fixture
def run_app():
    """Start create_app(rt) under uvicorn in a thread on a free loopback port."""

    from hybrid.app.server import bind, create_app

    servers = []

    def start(rt, **kw):
        sock = bind("127.0.0.1", 0)
        app = create_app(rt, model="scripted", **kw)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        t.start()
        servers.append((server, t, sock))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        return url

    yield start
    for server, t, sock in servers:
        server.should_exit = True
        t.join(timeout=15)
        sock.close()


def _chat(url, stream=False, **kw):
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
            "stream": stream, **kw}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_reasoning_content_is_split_from_the_answer(run_app):
    url = run_app(ScriptedRuntime("Let me see.</think>\n\nHello there."))
    msg = _chat(url).json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "Hello there.", "reasoning_content": "Let me see."}
    lines = [ln for ln in _chat(url, stream=True).text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    deltas = [json.loads(ln[6:])["choices"][0]["delta"] for ln in lines[:-1]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me see."
    assert "".join(d.get("content") or "" for d in deltas) == "Hello there."

    url = run_app(ScriptedRuntime("Let me see.</think>Hi"), show_think=False)
    assert _chat(url).json()["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}


def test_requests_run_one_at_a_time_and_a_full_queue_answers_503(run_app):
    rt = ScriptedRuntime("abc")
    rt.gate.clear()                                  # the first request holds the worker
    url = run_app(rt, max_queue=2)
    results = []

    def call():
        results.append(_chat(url).status_code)

    def wait_for(queued):   # the server's own account, not a sleep, orders the requests
        deadline = time.time() + 30
        while time.time() < deadline:
            h = httpx.get(f"{url}/health", timeout=10).json()
            if h["busy"] and h["queued"] == queued:
                return
            time.sleep(0.05)
        pytest.fail(f"the server never reported 1 running and {queued} queued: {h}")

    threads = [threading.Thread(target=call) for _ in range(3)]   # 1 running + 2 waiting
    for i, t in enumerate(threads):
        t.start()
        wait_for(i)
    assert rt.active == 1                            # the gate holds the first one
    r = _chat(url)
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    rt.gate.set()
    for t in threads:
        t.join(timeout=60)
    assert results == [200, 200, 200]                # nothing queued was dropped
    assert rt.max_active == 1


def test_closing_a_stream_stops_its_generation(run_app):
    rt = ScriptedRuntime("z" * 2000, delay=0.005)     # ~10 s if nobody stopped it
    url = run_app(rt)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break
    deadline = time.time() + 30
    while not rt.tokens_made and time.time() < deadline:
        time.sleep(0.05)
    assert rt.tokens_made and rt.tokens_made[0] < 2000
    # and the worker is free for the next request
    assert _chat(url, max_tokens=3).json()["usage"]["completion_tokens"] == 3


def test_a_client_that_gives_up_on_a_plain_request_stops_its_generation(run_app):
    rt = ScriptedRuntime("w" * 2000, delay=0.005)     # ~10 s if nobody stopped it
    url = run_app(rt)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)
    deadline = time.time() + 30
    while not rt.tokens_made and time.time() < deadline:
        time.sleep(0.05)
    assert rt.tokens_made and rt.tokens_made[0] < 2000


def test_completions_echo_token_prompts_and_unsupported_fields(run_app):
    url = run_app(ScriptedRuntime("xyz"))
    r = httpx.post(f"{url}/v1/completions", json={"model": "scripted", "prompt": "ab", "echo": True},
                   timeout=60).json()
    assert r["choices"][0]["text"] == "abxyz" and r["usage"]["prompt_tokens"] == 2
    # streamed: the echo first, then the text, a finish reason, the usage chunk, [DONE]
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "scripted", "prompt": "ab", "echo": True, "stream": True,
        "stream_options": {"include_usage": True}})
    lines = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["text"] == "ab"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "abxyz"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 2
    r = httpx.post(f"{url}/v1/completions", json={"model": "scripted", "prompt": [97, 98, 99]}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    r = httpx.post(f"{url}/v1/completions", json={"model": "scripted", "prompt": [97, 999]}, timeout=60)
    assert r.status_code == 400 and "999" in r.json()["error"]["message"]
    r = _chat(url, n=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = _chat(url, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert r.status_code == 400 and "only text" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v2/nothing", timeout=30)
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]


def test_bind_reports_a_busy_port():
    from hybrid.app.server import bind

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(OSError):
            bind("127.0.0.1", s.getsockname()[1])
    finally:
        s.close()
