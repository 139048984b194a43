"""The server: `hybrid-run MODEL --serve` driven by the official `openai` client (models, chat
non-stream and stream, completions, 4xx errors, still serving after), plus in-process checks
over a tiny model: requests beyond the slots queue and a full queue answers 429, the body
limit (413 before reading), the API key, the max-tokens cap, tokenization off the engine
thread, /metrics and the access log, prefix reuse, disconnects, and the Ollama routes."""

import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
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
# create_app over a tiny deepseek2 model under uvicorn in a thread, on a loopback port


@pytest.fixture(scope="module")
def tiny_rt(tiny_q4km):
    import hybrid

    rt = hybrid.load(tiny_q4km, device="cpu", ctx=256, parallel=4)    # run_app's most
    yield rt
    rt.close()


class Gated:
    """A SlotEngine whose forwards wait for `gate` and then `delay` seconds (tests hold the
    engine to line requests up)."""

    def __init__(self, engine, delay=0.0):
        self.engine, self.delay = engine, delay
        self.gate = threading.Event()
        self.gate.set()
        self.slots, self.ctx = engine.slots, engine.ctx

    def _hold(self):
        assert self.gate.wait(60)
        if self.delay:
            time.sleep(self.delay)

    def prefill_many(self, slots, chunks):
        self._hold()
        return self.engine.prefill_many(slots, chunks)

    def decode(self, slots, tokens):
        self._hold()
        return self.engine.decode(slots, tokens)


@pytest.fixture
def run_app(tiny_rt):
    """start(parallel=1, delay=0, **ServeOptions) -> (url, Gated engine, access log lines)."""
    from hybrid.app.server import ServeOptions, bind, create_app
    from hybrid.runtime.batch import SlotEngine

    servers = []

    def start(parallel=1, delay=0.0, system=None, **opts):
        sock = bind("127.0.0.1", 0)
        eng = Gated(SlotEngine(tiny_rt, parallel), delay)
        lines = []
        app = create_app(tiny_rt, model="tiny", options=ServeOptions(**opts),
                         engine=eng, access=lines.append, system=system)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        t.start()
        servers.append((server, t, sock, eng))
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{sock.getsockname()[1]}", eng, lines

    yield start
    for server, t, sock, eng in servers:
        eng.gate.set()
        server.should_exit = True
        t.join(timeout=15)
        sock.close()


def _chat(url, stream=False, headers=None, **kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "temperature": 0, "stream": stream, **kw}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, headers=headers)


def _wait_health(url, pred, what):
    deadline = time.time() + 30
    h = None
    while time.time() < deadline:
        h = httpx.get(f"{url}/health", timeout=10).json()
        if pred(h):
            return h
        time.sleep(0.02)
    pytest.fail(f"the server never reported {what}: {h}")


def _metric(url, name, headers=None) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10, headers=headers).text
    m = re.search(rf"^hybrid_{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"no {name} in /metrics:\n{text}"
    return float(m.group(1))


def test_requests_beyond_the_slots_wait_and_a_full_queue_answers_429(run_app):
    url, eng, _ = run_app(parallel=1, max_queue=2)
    eng.gate.clear()                                 # the first request holds the only slot
    results = []

    def call():
        results.append(_chat(url).status_code)

    threads = [threading.Thread(target=call) for _ in range(3)]   # 1 in the slot + 2 waiting
    for i, t in enumerate(threads):
        t.start()
        _wait_health(url, lambda h, i=i: h["busy"] == 1 and h["queued"] == i, f"1 busy, {i} queued")
    r = _chat(url)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert int(r.headers["retry-after"]) >= 1
    eng.gate.set()
    for t in threads:
        t.join(timeout=60)
    assert results == [200, 200, 200]                # nothing queued was dropped
    assert _chat(url).status_code == 200             # and room again


def test_requests_in_several_slots_are_decoded_together(run_app):
    url, eng, _ = run_app(parallel=4, delay=0.01)
    results = []
    threads = [threading.Thread(target=lambda: results.append(_chat(url, max_tokens=12)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [r.status_code for r in results] == [200] * 4
    assert all(r.json()["usage"]["completion_tokens"] == 12 for r in results)
    assert httpx.get(f"{url}/health", timeout=10).json()["slots"] == 4
    # 4 requests of 12 tokens in fewer steps than one at a time would take
    assert _metric(url, "decode_steps_total") < 4 * 11


def test_a_body_over_the_limit_is_refused_before_it_is_read(run_app):
    url, _, lines = run_app(max_body=2000)
    host, port = url[7:].split(":")
    # a client announcing 200 MB: the answer comes without a byte of the body sent
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 200000000\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):         # the server closes after its answer
            data += chunk
        head = data.decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head
    assert "--max-body" in head
    # a chunked body (no Content-Length) is read up to the limit only
    def chunks():
        for _ in range(100):
            yield b"x" * 1000
    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert _chat(url).status_code == 200            # a body within the limit is served
    assert any('"POST /v1/chat/completions" 413' in ln for ln in lines)


def test_the_api_key_guards_every_route_but_health(run_app):
    url, _, _ = run_app(api_key="s3cret")
    good = {"Authorization": "Bearer s3cret"}
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/api/tags"),
                         ("GET", "/api/version"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("POST", "/api/chat"), ("POST", "/api/generate"),
                         ("GET", "/nowhere")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.request(method, f"{url}{path}", headers=headers, timeout=10, json={})
            assert r.status_code == 401, (method, path, headers, r.status_code)
    assert "api key" in r.json()["error"]["message"].lower() if not path.startswith("/api/") else True
    assert httpx.get(f"{url}/v1/models", headers=good, timeout=10).status_code == 200
    r = _chat(url, headers=good)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_max_tokens_over_the_cap_is_a_400(run_app):
    url, _, _ = run_app(max_tokens_cap=8)
    r = _chat(url, max_tokens=9)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "--max-tokens-cap" in r.json()["error"]["message"]
    assert _chat(url, max_tokens=8).json()["usage"]["completion_tokens"] == 8
    r = httpx.post(f"{url}/api/generate", timeout=30, json={"model": "tiny", "prompt": "x", "stream": False,
                                                            "options": {"num_predict": 50}})
    assert r.status_code == 400 and "num_predict" in r.json()["error"]


def test_prompts_are_tokenized_off_the_engine_thread(run_app, tiny_rt, monkeypatch):
    url, _, _ = run_app(parallel=2)
    seen = []
    real = tiny_rt.tokenize
    slow = threading.Event()           # holds the tokenization of the "huge" prompt

    def spy(text, *a, **kw):
        seen.append(threading.current_thread().name)
        if "HUGE" in text:
            assert slow.wait(60)
        return real(text, *a, **kw)

    monkeypatch.setattr(tiny_rt, "tokenize", spy)
    big = []
    t = threading.Thread(target=lambda: big.append(_chat(url, messages=[
        {"role": "user", "content": "HUGE prompt"}], max_tokens=2)))
    t.start()
    deadline = time.time() + 30
    while not seen and time.time() < deadline:
        time.sleep(0.01)
    # while the big prompt is still being tokenized, a small request is served
    assert _chat(url).status_code == 200
    assert not big
    slow.set()
    t.join(60)
    assert big[0].status_code == 200
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 200
    assert len(seen) == 3 and all(n.startswith("hybrid-tokenize") for n in seen), seen


def test_metrics_and_the_access_log_count_what_was_served(run_app):
    url, _, lines = run_app()
    assert _chat(url, max_tokens=5).status_code == 200
    assert _chat(url, stream=True, max_tokens=4).status_code == 200
    assert _chat(url, model="nope").status_code == 404
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'hybrid_http_requests_total{route="/v1/chat/completions",status="200"} 2' in text
    assert 'hybrid_http_requests_total{route="/v1/chat/completions",status="404"} 1' in text
    assert _metric(url, "generated_tokens_total") == 9
    assert _metric(url, 'time_to_first_token_seconds_count') == 2
    assert _metric(url, 'time_to_first_token_seconds_bucket{le="+Inf"}') == 2
    assert _metric(url, "slots_active") == 0 and _metric(url, "queue_depth") == 0
    assert "# TYPE hybrid_time_to_first_token_seconds histogram" in text
    posts = [ln for ln in lines if '"POST /v1/chat/completions"' in ln]
    assert [ln.split('" ')[1].split()[0] for ln in posts] == ["200", "200", "404"]
    assert all(ln.startswith("127.0.0.1 ") for ln in posts)


def test_a_second_chat_turn_reuses_the_cached_prefix(run_app, tiny_rt):
    url, _, _ = run_app(parallel=2)
    msgs = [{"role": "user", "content": "Tell me about the quick brown fox."}]
    r1 = _chat(url, messages=msgs, max_tokens=6).json()
    reply = r1["choices"][0]["message"]
    before = _metric(url, "prefill_tokens_total")
    msgs2 = msgs + [{"role": "assistant", "content": reply.get("content") or ""},
                    {"role": "user", "content": "And the lazy dog?"}]
    r2 = _chat(url, messages=msgs2, max_tokens=3).json()
    u = r2["usage"]
    cached = u["prompt_tokens_details"]["cached_tokens"]
    # the two rendered prompts share this many tokens (R1's template ends the first with
    # "<think>", which the history of the second does not repeat)
    p1, p2 = (tiny_rt.tokenize(tiny_rt.apply_chat_template(m)) for m in (msgs, msgs2))
    shared = next((i for i, (a, b) in enumerate(zip(p1, p2)) if a != b), min(len(p1), len(p2)))
    assert shared > 8 and cached >= shared
    assert _metric(url, "prefill_tokens_total") - before == u["prompt_tokens"] - cached
    assert _metric(url, "prompt_tokens_cached_total") >= cached


def test_closing_a_stream_frees_its_slot(run_app):
    url, eng, _ = run_app(parallel=1, delay=0.02)    # ~4 s for 200 tokens if nobody stopped it
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    h = _wait_health(url, lambda h: h["busy"] == 0, "the slot freed")
    assert h["served"] == 0
    assert _metric(url, 'requests_total{outcome="cancelled"}') == 1
    assert _metric(url, "generated_tokens_total") < 200
    assert _chat(url, max_tokens=3).json()["usage"]["completion_tokens"] == 3


def test_a_client_that_gives_up_on_a_plain_request_frees_its_slot(run_app):
    url, _, _ = run_app(parallel=1, delay=0.02)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
            "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
    _wait_health(url, lambda h: h["busy"] == 0, "the slot freed")
    assert _metric(url, 'requests_total{outcome="cancelled"}') == 1
    assert _metric(url, "generated_tokens_total") < 200


def test_ollama_chat_generate_tags_and_version(run_app):
    url, _, _ = run_app(parallel=2)
    assert httpx.get(f"{url}/api/version", timeout=10).json()["version"]
    tags = httpx.get(f"{url}/api/tags", timeout=10).json()["models"]
    assert [m["name"] for m in tags] == ["tiny"] and tags[0]["size"] > 0

    msgs = [{"role": "user", "content": "hi"}]
    opts = {"temperature": 0, "num_predict": 7}
    plain = httpx.post(f"{url}/api/chat", timeout=60, json={"model": "tiny", "messages": msgs,
                                                            "stream": False, "options": opts}).json()
    assert plain["done"] is True and plain["eval_count"] == 7 and plain["done_reason"] == "length"
    assert plain["prompt_eval_count"] > 3
    # streamed (the default): NDJSON lines, the same text, a last line with the counts
    r = httpx.post(f"{url}/api/chat", timeout=60, json={"model": "tiny:latest", "messages": msgs,
                                                        "options": opts})
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(ln) for ln in r.text.splitlines()]
    assert all(not ln["done"] for ln in lines[:-1]) and lines[-1]["done"] is True
    assert lines[-1]["eval_count"] == 7
    msg = plain["message"]
    assert "".join(ln["message"].get("thinking", "") for ln in lines[:-1]) == msg.get("thinking", "")
    assert "".join(ln["message"]["content"] for ln in lines[:-1]) == msg["content"]

    g = httpx.post(f"{url}/api/generate", timeout=60, json={"model": "tiny", "prompt": "The quick",
                                                            "raw": True, "stream": False,
                                                            "options": opts}).json()
    assert g["done"] and g["eval_count"] == 7 and g["response"]
    r = httpx.post(f"{url}/api/generate", timeout=60, json={"model": "tiny", "prompt": "The quick",
                                                            "raw": True, "options": opts})
    lines = [json.loads(ln) for ln in r.text.splitlines()]
    assert "".join(ln["response"] for ln in lines[:-1]) == g["response"] and lines[-1]["done"]

    r = httpx.post(f"{url}/api/chat", timeout=60, json={"model": "llama3", "messages": msgs})
    assert r.status_code == 404 and "llama3" in r.json()["error"]


def test_completions_echo_token_prompts_and_unsupported_fields(run_app):
    url, _, _ = run_app()
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "ab", "echo": True, "max_tokens": 3, "temperature": 0})
    plain = r.json()
    assert plain["choices"][0]["text"].startswith("ab") and plain["usage"]["completion_tokens"] == 3
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "ab", "echo": True, "stream": True, "max_tokens": 3, "temperature": 0,
        "stream_options": {"include_usage": True}})
    lines = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["text"] == "ab"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [97, 98, 99]}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": [97, 99999]}, timeout=60)
    assert r.status_code == 400 and "99999" in r.json()["error"]["message"]
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
