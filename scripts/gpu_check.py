"""The GPU check of issue 18, in one call (driven by scripts/gpu-check.sh).

    python scripts/gpu_check.py prepare DIR   # here: fixtures and CPU reference logits into DIR
    python scripts/gpu_check.py run DIR       # the GPU machine: checks, DIR/summary.{json,txt}

prepare builds three fixtures (the tests' tiny deepseek2 model, a mid-size one and a tiny
qwen3moe, Q4_K_M) into DIR/fixtures (the tests' HYBRID_FIXTURE_CACHE there) and saves the CPU
path's logits for them (DIR/ref/<name>.npz: `decode` [T, B] token by token, `prompt` [P, B] of
a long prompt), so the GPU machine needs neither llama-cpp-python nor a CPU reference run.

run writes one line per check into the summary; a check that needs CUDA on a machine without
it says "skipped: no CUDA" on its line. Checks (each against the CPU reference: cosine >= 0.999
at every position and the same argmax):

  cuda-tests        every CUDA test of tests/test_gpu_path.py, test_plan_allocation.py,
                    test_attention_blocks.py, test_qmatvec.py, test_dequant.py
  prompt/<model>    a 40-token prompt's logits at every position, in one GPU chunk (the
                    attention's query blocks on the fused kernels; grouped heads for qwen3moe)
  decode/<model>/<hot>/<mode>   decode with the CPU engine doing the routed experts (hot
                    "none": gpu_experts=[]) and with every third expert hot, as bf16 copies
                    ("third") or in their GGUF blocks ("third-q": the fused Triton kernel), and
                    every expert hot in its blocks ("all-q": no CPU hand-off, one graph),
                    through CUDA graphs, the static segmented step and eager decode
  quantized-graphs  quantized GPU weights (DequantLinear) through CUDA graphs
  prefill-wrap      GPU prefill of a prompt of several GPU chunks (the prefetch ring wraps)
  stats             routing statistics equal under graphs and eager
  sync-after-close  torch.cuda.synchronize() after every runtime closed (a leftover error)
  speed/<model>     decode tok/s with and without overlap / graphs / hot experts (bf16 or
                    blocks), the GPU idle fraction, torch.cuda.max_memory_allocated next to the
                    Plan's numbers
  kernel/...        one MoE layer's hot experts at R1's shapes (D 7168, F 2048, 8 slots, one
                    token): ms per call as bf16 copies vs in their Q4_K/Q6_K blocks (fused), and
                    a 7168 x 7168 Q4_K linear fused vs dequantized: which form wins, measured
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKENS = [5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 120, 9, 33, 200, 18, 77]
PROMPT = 40          # prompt tokens of the prefill check: 5 GPU chunks of 8
MODELS = {
    "tiny": {},      # the tests' TinyConfig(): 3 layers, 16 experts of 256
    "mid": dict(n_embd=512, n_layer=6, ffn=1024, n_expert=16, n_expert_used=4, expert_ffn=256,
                n_head=8),
    "qwen3moe": dict(arch="qwen3moe"),   # GQA attention (grouped query heads), not MLA
}
BOUND = 0.999


def _cfg(name):
    from hybrid.fixtures import GQAConfig, TinyConfig

    kw = dict(MODELS[name])
    arch = kw.pop("arch", None)
    return GQAConfig.of(arch, **kw) if arch else TinyConfig(**kw)


def _prompt(n_vocab, n):
    return [int(x) for x in np.random.default_rng(7).integers(3, n_vocab - 1, n)]


# ------------------------------------------------------------------------------------------ prepare


def prepare(d: pathlib.Path) -> int:
    import hybrid
    from hybrid.fixtures import build

    (d / "ref").mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        path = build(_cfg(name), "Q4_K_M", d / "fixtures")
        with hybrid.load(path, device="cpu", threads=os.cpu_count() or 2, ctx=64) as r:
            dec = r.decode_logits(TOKENS)
            r.reset()
            prompt = r.logits(_prompt(r.n_vocab, PROMPT))
        np.savez_compressed(d / "ref" / f"{name}.npz", decode=dec, prompt=prompt,
                            gguf_name=np.array(path.name))
        print(f"{name}: {path.name} ({path.stat().st_size / 2**20:.1f} MiB), reference logits saved")
    # the tests' fixture of tests/test_gpu_path.py (q4) is "tiny": same file
    return 0


# ------------------------------------------------------------------------------------------ run


class Summary:
    def __init__(self, d: pathlib.Path):
        self.d, self.rows, self.failed = d, [], 0

    def add(self, check: str, status: str, **info):
        self.rows.append(dict(check=check, status=status, **info))
        if status == "FAIL":
            self.failed += 1
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        print(f"{status:8s} {check:40s} {extra}", flush=True)

    def write(self):
        (self.d / "summary.json").write_text(json.dumps(self.rows, indent=1, default=str))
        lines = [f"{r['status']:8s} {r['check']:40s} "
                 + " ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in ("check", "status"))
                 for r in self.rows]
        ok = sum(r["status"] == "ok" for r in self.rows)
        lines.append(f"{ok} ok, {self.failed} FAIL, "
                     f"{sum(r['status'] == 'skipped' for r in self.rows)} skipped")
        (self.d / "summary.txt").write_text("\n".join(lines) + "\n")


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _compare(got, want):
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    same = bool((got.argmax(-1) == want.argmax(-1)).all())
    return float(cos.min()), same


def _plan(path, hot, fmt="bf16", device="cuda:0"):
    """Non-expert weights on the GPU in `fmt`; hot "none": the CPU engine computes every
    routed expert; "third": every third expert of each MoE layer hot on the GPU as bf16
    copies, "third-q" in their GGUF blocks; "all-q": every expert in its blocks (no layer goes
    to the CPU: a decode step is one graph)."""
    from hybrid.gguf_file import GGUFFile
    from hybrid.runtime.loader import MinimalPlan

    g = GGUFFile(str(path))
    try:
        layers = sorted({int(n.split(".")[1]) for n in g.tensors if n.endswith("ffn_gate_exps.weight")})
        E = g.tensors[f"blk.{layers[0]}.ffn_gate_exps.weight"].shape[0]
        n_layer = 1 + max(int(n.split(".")[1]) for n in g.tensors if n.startswith("blk."))
    finally:
        g.close()
    step = 1 if hot == "all-q" else 3
    experts = [list(range(0, E, step)) if (hot != "none" and l in layers) else [] for l in range(n_layer)]
    return MinimalPlan(device=device, gpu_weight_format=fmt, kv_cache_tokens=64,
                       kv_cache_dtype="bf16" if device != "cpu" else "f32", gpu_experts=experts,
                       hot_expert_format="quantized" if hot.endswith("-q") else "bf16")


def _check(s, name, got, want, **info):
    cos, same = _compare(got, want)
    s.add(name, "ok" if cos >= BOUND and same else "FAIL", min_cosine=cos, same_argmax=same, **info)


def run(d: pathlib.Path) -> int:
    import torch

    s = Summary(d)
    cuda = torch.cuda.is_available()
    # GPU_CHECK_STAND_IN=1 without CUDA: the same checks with the CPU as the device (the GPU
    # code paths, graphs as the static step): how the script itself is tested without a GPU
    stand_in = not cuda and os.environ.get("GPU_CHECK_STAND_IN") == "1"
    dev = "cuda:0" if cuda else "cpu"
    s.add("machine", "info", torch=torch.__version__, cuda=cuda, stand_in=stand_in,
          gpu=torch.cuda.get_device_name(0) if cuda else "none")
    env = dict(os.environ, HYBRID_FIXTURE_CACHE=str(d / "fixtures"))
    if not cuda and not stand_in:
        for c in ("cuda-tests", "decode", "prompt", "quantized-graphs", "prefill-wrap", "stats",
                  "sync-after-close", "speed", "kernel"):
            s.add(c, "skipped", why="no CUDA")
        s.write()
        return 0

    import hybrid

    t0 = time.time()
    r = subprocess.run(["true"]) if stand_in else subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
                        "tests/test_gpu_path.py", "tests/test_plan_allocation.py",
                        "tests/test_attention_blocks.py", "tests/test_qmatvec.py",
                        "tests/test_dequant.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if stand_in:
        s.add("cuda-tests", "skipped", why="no CUDA (stand-in run)")
    else:
        tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
        s.add("cuda-tests", "ok" if r.returncode == 0 else "FAIL", result=tail[0],
              s=round(time.time() - t0))
        if r.returncode:
            (d / "cuda-tests.log").write_text(r.stdout + r.stderr)

    refs = {n: np.load(d / "ref" / f"{n}.npz") for n in MODELS}
    paths = {n: d / "fixtures" / str(refs[n]["gguf_name"]) for n in MODELS}
    kw = dict(threads=max(2, (os.cpu_count() or 4) // 2), gpu_paths=True)
    for name in MODELS:
        want = refs[name]["decode"]
        for hot in ("none", "third", "third-q", "all-q"):
            plan = _plan(paths[name], hot, device=dev)
            stats = {}
            for mode in ("graphs", "static", "off"):
                try:
                    with hybrid.load(paths[name], plan=plan, decode_graphs=mode,
                                     record_expert_stats=True, **kw) as rt:
                        got = rt.decode_logits(TOKENS)
                        info = {}
                        if rt.decoder is not None:
                            info = dict(replays=rt.decoder.replays, failed=rt.decoder.failed,
                                        segments=[len(g[0]) for g in rt.decoder.graphs.values()])
                        stats[mode] = rt.expert_stats.counts.clone()
                    _check(s, f"decode/{name}/{hot}/{mode}", got, want, **info)
                except Exception as e:   # one failing variant must not hide the others
                    s.add(f"decode/{name}/{hot}/{mode}", "FAIL", error=f"{type(e).__name__}: {e}")
            if len(stats) == 3:
                eq = all(torch.equal(stats["graphs"], stats[m]) for m in ("static", "off"))
                s.add(f"stats/{name}/{hot}", "ok" if eq else "FAIL", equal=eq)
        try:
            with hybrid.load(paths[name], plan=_plan(paths[name], "none", device=dev), **kw) as rt:
                got = rt.logits(_prompt(rt.n_vocab, PROMPT))
            _check(s, f"prompt/{name}", got, refs[name]["prompt"])
        except Exception as e:
            s.add(f"prompt/{name}", "FAIL", error=f"{type(e).__name__}: {e}")
    name = "mid"
    try:
        with hybrid.load(paths[name], plan=_plan(paths[name], "third", "quantized", device=dev),
                         decode_graphs="graphs", **kw,
                         **(dict(cpu_linears="dequant") if stand_in else {})) as rt:
            got = rt.decode_logits(TOKENS)
            dq = rt.loader.stats["dequant_linears"]
            info = dict(dequant_linears=dq, mode=rt.decoder.mode, replays=rt.decoder.replays,
                        failed=rt.decoder.failed)
        if dq == 0:
            s.add(f"quantized-graphs/{name}", "FAIL", error="no quantized linear was loaded", **info)
        else:
            _check(s, f"quantized-graphs/{name}", got, refs[name]["decode"], **info)
    except Exception as e:
        s.add(f"quantized-graphs/{name}", "FAIL", error=f"{type(e).__name__}: {e}")
    try:
        with hybrid.load(paths[name], plan=_plan(paths[name], "none", device=dev), prefill_chunk=8,
                         gpu_prefill_tokens=8, gpu_prefill_chunk=8, **kw) as rt:
            got = rt.logits(_prompt(rt.n_vocab, PROMPT))
            off = rt.loader.offload
            wraps = sum(1 for e in off.events if e[0] == "prefetch") > len(off.layers)
            info = dict(offload_calls=off.calls, ring_wrapped=wraps)
        _check(s, f"prefill-wrap/{name}", got, refs[name]["prompt"], **info)
    except Exception as e:
        s.add(f"prefill-wrap/{name}", "FAIL", error=f"{type(e).__name__}: {e}")
    try:
        if cuda:
            torch.cuda.synchronize()
        s.add("sync-after-close", "ok" if cuda else "skipped")
    except Exception as e:
        s.add("sync-after-close", "FAIL", error=f"{type(e).__name__}: {e}")
    _speed(s, paths["mid"], kw, dev)
    _kernels(s, dev)
    s.write()
    return 1 if s.failed else 0


def _speed(s, path, kw, dev):
    import torch

    import hybrid
    from placement import plan_for_gguf

    n = 32
    cuda = dev != "cpu"
    variants = [("graphs+overlap, no hot", _plan(path, "none", device=dev), {}),
                ("eager+overlap, no hot", _plan(path, "none", device=dev), dict(decode_graphs="off")),
                ("graphs, every third hot", _plan(path, "third", device=dev), {}),
                ("graphs, every third hot in blocks", _plan(path, "third-q", device=dev), {}),
                ("graphs, every expert hot in blocks", _plan(path, "all-q", device=dev), {}),
                ("graphs, quantized weights", _plan(path, "none", "quantized", device=dev), {})]
    if cuda:
        variants.append(("solver plan, no cache", plan_for_gguf(path, ctx=64, expert_cache=False), {}))
    for label, plan, extra in variants:
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with hybrid.load(path, plan=plan, measure_gpu_idle=True, **extra, **kw) as rt:
                rt.decode_logits(TOKENS[:4])                     # warm-up, captures
                rt.reset()
                t0 = time.perf_counter()
                rt.decode_logits((TOKENS * 4)[:n])
                dt = time.perf_counter() - t0
                idle = rt.gpu_idle()
                pred = plan.predicted_gpu_allocated() if hasattr(plan, "predicted_gpu_allocated") else None
                s.add(f"speed/{label}", "info", tok_s=round(n / dt, 2),
                      idle_fraction=round(idle.get("idle_fraction", float("nan")), 3),
                      max_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                      placed_gpu0=sum(rt.loader.placed_bytes.get("gpu0", {}).values()),
                      plan_predicted=pred)
        except Exception as e:
            s.add(f"speed/{label}", "FAIL", error=f"{type(e).__name__}: {e}")


def _kernels(s, dev):
    """Hot experts as bf16 copies vs in their blocks at R1's expert shapes, and a quantized
    linear fused vs dequantized: ms per call (CUDA events, median of 20 after warm-up)."""
    import torch

    from hybrid.backends import gpu
    from hybrid.backends.torch_experts import TorchExperts

    if dev == "cpu":
        s.add("kernel", "skipped", why="no CUDA (stand-in run)")
        return
    if not gpu.fused_ok(12, dev):
        s.add("kernel", "skipped", why="no Triton on this machine: no fused kernel to measure")
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from quantdata import random_rows

    def ms(fn, n=20):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return float(np.median(times))

    try:
        rng = np.random.default_rng(0)
        E, F_, D, K = 8, 2048, 7168, 8
        g = torch.from_numpy(random_rows(12, E * F_, D, rng).reshape(E, F_, -1)).to(dev)
        u = torch.from_numpy(random_rows(12, E * F_, D, rng).reshape(E, F_, -1)).to(dev)
        d = torch.from_numpy(random_rows(14, E * D, F_, rng).reshape(E, D, -1)).to(dev)
        q = gpu.QuantExperts(g, u, d, (12, 12, 14))
        from hybrid.backends import dequant

        def dense(m, t):
            return dequant.dequantize(m.reshape(-1, m.shape[-1]), t, dtype=torch.bfloat16).view(
                E, m.shape[1], -1)

        b = TorchExperts(dense(g, 12), dense(u, 12), dense(d, 14))
        x = torch.randn(1, D, device=dev)
        ids = torch.arange(K, device=dev).view(1, K) % E
        w = torch.rand(1, K, device=dev)
        tq, tb = ms(lambda: q.static(x, ids, w)), ms(lambda: b.static(x, ids, w))
        cos = torch.nn.functional.cosine_similarity(q.static(x, ids, w), b.static(x, ids, w)).item()
        s.add("kernel/hot-experts-r1-shape", "info", quantized_ms=round(tq, 3), bf16_ms=round(tb, 3),
              quantized_GB_s=round(q.nbytes / tq / 1e6, 1), bf16_GB_s=round(b.nbytes / tb / 1e6, 1),
              bytes_ratio=round(b.nbytes / q.nbytes, 2), cosine=round(cos, 5),
              winner="quantized" if tq <= tb else "bf16")
        lin = gpu.DequantLinear(random_rows(12, D, D, rng), 12, D, dev)
        xl = torch.randn(1, D, device=dev)
        tf = ms(lambda: lin(xl))
        lin.fused = False
        tu = ms(lambda: lin(xl))
        s.add("kernel/q4k-linear-7168", "info", fused_ms=round(tf, 3), dequantize_then_matmul_ms=round(tu, 3))
    except Exception as e:
        s.add("kernel", "FAIL", error=f"{type(e).__name__}: {e}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("prepare", "run"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    d = pathlib.Path(argv[1]).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return prepare(d) if argv[0] == "prepare" else run(d)


if __name__ == "__main__":
    sys.exit(main())
