"""The server under concurrent clients: aggregate generated tokens/s and time to first token
(p50 / p99) at 1, 4 and 16 clients, against a real `hybrid-run MODEL --serve` process on
loopback, and where the time goes at the highest level: the server's engine thread by part
(prefill and decode forwards, sampling, text; from /metrics) and the process's CPU time by
thread (engine, expert/torch workers, the HTTP event loop, the tokenizer pool; from /proc);
then where a batched decode step's time goes (attention per row, the rest per batch) at
T = 1, 4, 16 in this process.

The model is --model, or the fixture builder's `TinyConfig.mid()` deepseek2 (2048 dims, 8
layers, 64 experts of 1024, ~2 GB at Q4_K_M), built on first use into --cache-dir.

    PYTHONPATH=. python bench/bench_serve.py --threads 2
    PYTHONPATH=. python bench/bench_serve.py --model some.gguf --clients 1,4,16 --runs 3

Each client sends --requests streamed /v1/completions one after another (distinct random
prompts of --prompt tokens, so no prefix is shared, up to --max-tokens tokens each, temperature 0; the
tokens counted are those the usage reports). Aggregate tokens/s = all completion tokens
/ wall time of the level; TTFT = request sent -> first text chunk. Medians over --runs.
Plain HTTP (httpx) streams the requests: the `openai` client adds nothing to measure here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

import numpy as np


def _start_server(path, threads, parallel, ctx):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybrid.app.cli", str(path), "--serve", "--port", "0", "--device", "cpu",
         "--threads", str(threads), "--parallel", str(parallel), "--ctx", str(ctx)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        m = re.search(r"at http://[^\s]+:(\d+)/v1", line)
        if m:
            # keep reading its output (the access log), or a full pipe would stall the server
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, f"http://127.0.0.1:{m.group(1)}"
    raise SystemExit(f"the server did not start (exit status {proc.wait()})")


def _one(url, model, prompt, max_tokens):
    """(ttft seconds, completion tokens) of one streamed completion."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, n = None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if ttft is None and c["choices"] and c["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if c.get("usage"):
                n = c["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - t0), n


def _level(url, model, clients, requests, prompts, max_tokens):
    """(aggregate tokens/s, [ttft, ...]) of `clients` clients sending `requests` each
    (prompts: one per request)."""
    def client(c):
        return [_one(url, model, prompts[c * requests + i], max_tokens) for i in range(requests)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        res = [x for xs in pool.map(client, range(clients)) for x in xs]
    wall = time.perf_counter() - t0
    return sum(n for _, n in res) / wall, [t for t, _ in res]


def _scheduler_s(url) -> dict:
    """The server's scheduler_seconds_total by part."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=60).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^hybrid_scheduler_seconds_total\{part="(\w+)"\} (\S+)$', text, re.M)}


THREAD_GROUPS = {"hybrid-engine": "engine thread", "hybrid-tokenize": "tokenizer pool"}


def _thread_cpu(pid) -> dict:
    """CPU seconds (user + system) of process pid's threads, by group: the main thread runs
    the HTTP event loop; the rest are the expert engine's and torch's workers."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue            # a thread that just ended
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick          # utime, stime
        group = ("HTTP event loop (main)" if int(tid) == pid else
                 THREAD_GROUPS.get(comm, "expert / torch workers"))
        out[group] = out.get(group, 0.0) + cpu
    return out


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _add(acc: dict, d: dict) -> None:
    for k, v in d.items():
        acc[k] = acc.get(k, 0.0) + v


def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def _breakdown(path, threads, sizes, ctx, steps=8):
    """(T, attention mode, seconds per decode step, of which attention) at each T, with the
    attention batched (SlotEngine's default) and per row (the fused single-sequence call)."""
    import torch

    import hybrid
    from hybrid.runtime.batch import SlotEngine

    rt = hybrid.load(path, device="cpu", threads=threads, ctx=ctx, parallel=max(sizes))
    eng = SlotEngine(rt)
    spent = {"attention": 0.0}
    import hybrid.runtime.batch as batch

    real_rows = batch.attention_rows

    def timed_rows(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_rows(*a, **kw)
        finally:
            spent["attention"] += time.perf_counter() - t0

    batch.attention_rows = timed_rows
    rows = []
    for T in sizes:
        for mode in (True, False):
            eng.batched_attention = mode
            slots = eng.slots[:T]
            for i, s in enumerate(slots):
                s.truncate(0)
                eng.prefill(s, list(np.random.default_rng(i).integers(3, rt.n_vocab, 16)))
            toks = [5] * T
            eng.decode(slots, toks)                             # warm-up
            times, att = [], []
            for _ in range(steps):
                spent["attention"] = 0.0
                t0 = time.perf_counter()
                lg = eng.decode(slots, toks)
                times.append(time.perf_counter() - t0)
                att.append(spent["attention"])
                toks = [int(x) for x in torch.argmax(lg, -1)]
            rows.append((T, "batched" if mode else "per row", statistics.median(times),
                         statistics.median(att)))
    batch.attention_rows = real_rows
    rt.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF (default: TinyConfig.mid() at Q4_K_M, built on first use)")
    ap.add_argument("--cache-dir", default=os.environ.get("HYBRID_FIXTURE_CACHE", "/tmp/bench-cache"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-breakdown", action="store_true")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.clients.split(",")]
    path = a.model
    if path is None:
        from hybrid.fixtures import TinyConfig, build

        path = build(TinyConfig.mid(), "Q4_K_M", a.cache_dir)
    print(f"model: {path} ({os.path.getsize(path) / 2**30:.2f} GiB), threads {a.threads}; load "
          f"average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus", flush=True)
    ctx = a.prompt + a.max_tokens + 16
    proc, url = _start_server(path, a.threads, max(levels), ctx)
    try:
        import httpx

        model = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
        rng = np.random.default_rng(0)

        def prompts(n):
            # token ids: exactly --prompt tokens, no prefix shared with any other request
            return [rng.integers(3, 300, a.prompt).tolist() for _ in range(n)]

        _one(url, model, prompts(1)[0], 4)                          # warm-up
        results = {c: ([], []) for c in levels}
        top = max(levels)
        parts, cpu, wall = {}, {}, [0.0]        # at the top level, summed over the runs
        for r in range(a.runs):
            for c in levels:
                if c == top:
                    s0, c0, t0 = _scheduler_s(url), _thread_cpu(proc.pid), time.perf_counter()
                tps, ttfts = _level(url, model, c, a.requests, prompts(c * a.requests), a.max_tokens)
                if c == top:
                    wall[0] += time.perf_counter() - t0
                    _add(parts, _delta(_scheduler_s(url), s0))
                    _add(cpu, _delta(_thread_cpu(proc.pid), c0))
                results[c][0].append(tps)
                results[c][1].extend(ttfts)
                print(f"  run {r + 1} clients {c:2d}: {tps:7.2f} tok/s", flush=True)
        metrics = httpx.get(f"{url}/metrics", timeout=60).text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    base = statistics.median(results[levels[0]][0])
    print(f"\n{'clients':>8} {'tok/s (median)':>15} {'x ' + str(levels[0]) + ' client':>11} "
          f"{'TTFT p50':>9} {'TTFT p99':>9}")
    for c in levels:
        tps = statistics.median(results[c][0])
        t = results[c][1]
        print(f"{c:>8} {tps:>15.2f} {tps / base:>11.2f} {_pct(t, 50):>8.2f}s {_pct(t, 99):>8.2f}s")
    steps = re.search(r"^hybrid_decode_steps_total (\S+)$", metrics, re.M)
    gen = re.search(r"^hybrid_generated_tokens_total (\S+)$", metrics, re.M)
    if steps and gen:
        print(f"server: {gen.group(1)} tokens in {steps.group(1)} decode steps")
    w = wall[0]
    busy = sum(parts.values())
    print(f"\nwhere the time goes at {top} clients ({w:.1f} s of wall time over {a.runs} run(s); "
          f"load average now {os.getloadavg()[0]:.2f}, {os.cpu_count()} cpus):")
    print("  engine thread, wall: " + ", ".join(f"{k} {v:.2f} s ({v / w:.0%})" for k, v in parts.items())
          + f", waiting for work {w - busy:.2f} s ({(w - busy) / w:.0%})")
    print(f"  server CPU by thread ({sum(cpu.values()):.2f} s in all, {sum(cpu.values()) / w:.2f} cores): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])))

    if not a.no_breakdown:
        print("\nwhere a decode step's time goes (this process, same threads):")
        print(f"{'T':>4} {'attention':>10} {'step ms':>9} {'attention ms':>13} {'rest ms':>9} "
              f"{'tok/s':>8}")
        for T, mode, step, att in _breakdown(path, a.threads, levels, ctx):
            print(f"{T:>4} {mode:>10} {step * 1e3:>9.1f} {att * 1e3:>13.1f} "
                  f"{(step - att) * 1e3:>9.1f} {T / step:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
