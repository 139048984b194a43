"""The server under a crowd, as real processes on loopback: 50 concurrent clients of the
official `openai` client (stream and non-stream mixed) all get 200 and complete answers, the
same text for the same prompt whoever shares the batch; with --max-queue 8 the overflow gets
429s, never a reset; SIGTERM with requests in flight exits cleanly; binding beyond loopback
without a key warns."""

import concurrent.futures
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from subproc import NEUTRAL_CWD, hybrid_env


def _start(model, tmp_path, *args):
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybrid.app.cli", str(model), "--serve", "--port", "0",
         "--device", "cpu", "--ctx", "256", "--threads", "2", *args],
        stdout=log, stderr=subprocess.STDOUT, env=hybrid_env(), cwd=NEUTRAL_CWD)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        log.seek(0)
        m = re.search(r"at (http://[^\s]+):(\d+)/v1", log.read())
        if m:
            url = f"http://127.0.0.1:{m.group(2)}"
            while time.time() < deadline:
                try:
                    if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                        return proc, url, log
                except httpx.HTTPError:
                    time.sleep(0.2)
        time.sleep(0.2)
    log.seek(0)
    proc.kill()
    pytest.fail(f"the server did not start; its output:\n{log.read()[-3000:]}")


def _stop(proc, log):
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_fifty_concurrent_openai_clients_all_get_complete_answers(tiny_q4km, tmp_path):
    import openai

    proc, url, log = _start(tiny_q4km, tmp_path, "--parallel", "8")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0)
        mid = client.models.list().data[0].id
        topics = ["the sea", "a fox", "bread", "rain", "stars"]

        def one(i):
            msgs = [{"role": "user", "content": f"Write about {topics[i % 5]}."}]
            kw = dict(model=mid, messages=msgs, max_tokens=12, temperature=0)
            if i % 2:
                r = client.chat.completions.create(**kw)
                m = r.choices[0].message
                return (i, (getattr(m, "reasoning_content", None) or "") + (m.content or ""),
                        r.choices[0].finish_reason, r.usage.completion_tokens)
            text, finish = "", None
            for chunk in client.chat.completions.create(**kw, stream=True):
                for c in chunk.choices:
                    text += (getattr(c.delta, "reasoning_content", None) or "") + (c.delta.content or "")
                    finish = c.finish_reason or finish
            return i, text, finish, None

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, range(50)))      # any error (a 5xx, a reset) raises
        assert len(results) == 50
        assert all(finish in ("stop", "length") for _, _, finish, _ in results)
        assert all(n in (None, 12) or finish == "stop" for _, _, finish, n in results)
        # batching changes no result: one text per prompt, stream or not, whoever shared the step
        by_topic = {}
        for i, text, _, _ in results:
            by_topic.setdefault(i % 5, set()).add(text)
        assert all(len(texts) == 1 for texts in by_topic.values()), by_topic
        m = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'hybrid_http_requests_total{route="/v1/chat/completions",status="200"} 50' in m
    finally:
        _stop(proc, log)


def test_a_full_queue_answers_429_not_resets_and_sigterm_exits_cleanly(tiny_q4km, tmp_path):
    proc, url, log = _start(tiny_q4km, tmp_path, "--parallel", "1", "--max-queue", "8",
                            "--host", "0.0.0.0")
    try:
        log.seek(0)
        assert "warning: listening on 0.0.0.0 without an API key" in log.read()
        mid = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": mid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64,
                "temperature": 0}

        def one(_):
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
            return r.status_code, r.headers.get("retry-after"), r.json()

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, range(50)))      # a reset would raise here
        codes = [c for c, _, _ in results]
        assert set(codes) == {200, 429}, codes
        assert codes.count(200) >= 9                      # the slot's one and a full queue
        assert all(ra and int(ra) > 0 and j["error"]["code"] == "queue_full"
                   for c, ra, j in results if c == 429)
        assert all(j["usage"]["completion_tokens"] > 0 for c, _, j in results if c == 200)

        # SIGTERM with a stream in flight: the process ends by itself, exit status 0
        stream = httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                              json={**body, "max_tokens": 200, "stream": True})
        r = stream.__enter__()
        next(r.iter_lines())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        stream.__exit__(None, None, None)
        log.seek(0)
        assert "server stopped" in log.read()
    finally:
        _stop(proc, log)
