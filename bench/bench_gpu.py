"""GPU-path benchmarks of issue 8, each against its own baseline measured in the same run:

  decode tok/s   overlap on / off (routed experts submitted before the shared expert, or
                 called synchronously after it), CUDA graphs on / off, hot experts in VRAM
                 (the plan's expert cache: in their GGUF blocks for K-quant models; the same
                 VRAM as bf16 copies) on / off
  prefill tok/s  prompts of 512 and 8192 tokens, GPU prefill (routed experts streamed to the
                 GPU, double-buffered) on / off
  GPU idle       fraction of a decode step the GPU waits for the CPU experts (CUDA events)

    PYTHONPATH=. python bench/bench_gpu.py --model DeepSeek-R1-Q4_K_M-00001-of-00009.gguf
    PYTHONPATH=. python bench/bench_gpu.py            # TinyConfig.mid(), built on first use

The routed experts are computed by the CPU engine in every decode variant except the hot-expert
ones (a plan without the expert cache: on a big GPU the solver would cache every expert of a
small model and the CPU->GPU hand-off would not be measured at all); the hot-expert variants
are the plan's own cache and every third expert hot. The prefill baseline turns GPU prefill
off (gpu_prefill_tokens=0, not the plan's threshold).

Variants are loaded one at a time (a 377 GB model does not fit twice) and runs alternate
between a variant and its baseline where both fit (--interleave). Without CUDA it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

from benchlib import prompt_ids

import hybrid  # noqa: F401  (before torch: passive OpenMP waiting, see hybrid/__init__.py)


def _decode_tok_s(rt, prompt, n):
    rt.reset()
    # token ids in and out (no tokenizer: the GPU machine has no llama-cpp-python)
    toks = [t for t, _ in rt.generate_tokens(prompt, max_tokens=n + 1, temperature=0.0,
                                             stop_at_eos=False, detokenize=False) if t >= 0]
    st = rt.last_stats
    return n / st.decode_s, len(prompt) / st.prefill_s, toks


def _load(path, threads, ctx, **kw):
    t0 = time.perf_counter()
    rt = hybrid.load(path, device="cuda", threads=threads, ctx=ctx, **kw)
    return rt, time.perf_counter() - t0


def _set_overlap(rt, on: bool):
    for b in rt.model.blocks:
        ex = getattr(b.ffn, "experts", None)
        if ex is not None and hasattr(ex, "submit"):
            ex.overlap_shared = on


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF (default: build TinyConfig.mid() at --quant)")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--cache-dir", default=os.environ.get("HYBRID_FIXTURE_CACHE",
                                                          str(pathlib.Path.home() / ".cache/hybrid-bench")))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decode", type=int, default=32, help="tokens per decode run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefill", type=int, nargs="+", default=[512, 8192])
    ap.add_argument("--gpu-prefill-tokens", type=int, default=1024)
    a = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu needs CUDA: torch sees no GPU here, nothing to measure "
              "(run it on a GPU machine)")
        return 0
    path = a.model
    if path is None:
        from hybrid.fixtures import TinyConfig, build

        path = build(TinyConfig.mid(), a.quant, a.cache_dir)
    ctx = max(a.prefill) + a.decode + 16
    print(f"model {path}; {torch.cuda.get_device_name(0)}; threads {a.threads or 'default'}")

    def med(xs):
        return statistics.median(xs)

    import dataclasses

    from placement import plan_for_gguf
    from placement.inventory import from_gguf

    # the CPU engine does every routed expert: what overlap and graphs are about
    cpu_plan = plan_for_gguf(path, ctx=ctx, expert_cache=False)

    # ---- decode: overlap, graphs, idle fraction (one load, switched in place) --------------
    rt, load_s = _load(path, a.threads, ctx, measure_gpu_idle=True, plan=cpu_plan)
    print(f"loaded in {load_s:.1f} s; plan: {rt.plan.n_gpu_experts if hasattr(rt.plan, 'n_gpu_experts') else 0} "
          f"hot experts, GPU weights {getattr(rt.plan, 'gpu_weight_format', '?')}")
    prompt = prompt_ids(rt.n_vocab, 64)
    _decode_tok_s(rt, prompt[:8], 4)   # warm-up, captures the first graphs
    res = {"graphs+overlap": [], "eager+overlap": [], "eager, no overlap": []}
    decoder = rt.decoder
    for _ in range(a.runs):
        rt.decoder = decoder
        _set_overlap(rt, True)
        res["graphs+overlap"].append(_decode_tok_s(rt, prompt, a.decode)[0])
        rt.decoder = None
        res["eager+overlap"].append(_decode_tok_s(rt, prompt, a.decode)[0])
        _set_overlap(rt, False)
        res["eager, no overlap"].append(_decode_tok_s(rt, prompt, a.decode)[0])
    _set_overlap(rt, True)
    rt.decoder = decoder
    if decoder is not None and decoder.failed:
        print(f"  note: graph capture failed ({decoder.failed}); 'graphs' ran eagerly")
    base = med(res["eager, no overlap"])
    for k, v in res.items():
        print(f"decode {k:>18}: {med(v):7.2f} tok/s  ({med(v) / base:.2f}x of no overlap)  runs "
              + " ".join(f"{x:.2f}" for x in v))
    idle = rt.gpu_idle()
    if idle.get("tokens"):
        print(f"GPU idle per decoded token: {idle['idle_ms_per_token']:.2f} ms of "
              f"{idle['step_ms']:.2f} ms ({idle['idle_fraction']:.0%}); eager steps only")
    rt.close()

    # ---- decode: hot experts on / off ------------------------------------------------------
    out = {}
    cached = plan_for_gguf(path, ctx=ctx)
    inv = from_gguf(path)
    moe = set(inv.moe_layers())
    third = [list(range(0, inv.model.n_expert, 3)) if l in moe else []
             for l in range(len(cached.gpu_experts))]
    variants = [("plan's expert cache", cached), ("no expert cache", cpu_plan)]
    if cached.hot_expert_format == "quantized":   # the same VRAM as bf16 copies: ~3x fewer
        variants.insert(1, ("cache as bf16", plan_for_gguf(path, ctx=ctx, hot_format="bf16")))
    if cached.n_gpu_experts >= sum(len(t) for t in third):   # every third fits where the plan's does
        variants.insert(1, ("every third expert hot", dataclasses.replace(cached, gpu_experts=third)))
    for name, plan in variants:
        rt, _ = _load(path, a.threads, ctx, plan=plan)
        _decode_tok_s(rt, prompt[:8], 4)
        out[name] = [_decode_tok_s(rt, prompt, a.decode)[0] for _ in range(a.runs)]
        print(f"decode {name:>22}: {med(out[name]):7.2f} tok/s ({plan.n_gpu_experts} experts cached "
              f"{plan.hot_expert_format if plan.n_gpu_experts else ''})")
        rt.close()
    print(f"  hot experts speed-up: {med(out[variants[0][0]]) / med(out['no expert cache']):.2f}x")

    # ---- prefill: GPU prefill on / off -----------------------------------------------------
    for n in a.prefill:
        pp = {}
        for name, thr in (("GPU prefill", a.gpu_prefill_tokens), ("CPU experts", 0)):
            rt, _ = _load(path, a.threads, ctx, gpu_prefill_tokens=thr)
            p = prompt_ids(rt.n_vocab, n, seed=n)
            _decode_tok_s(rt, p[:16], 1)
            pp[name] = [_decode_tok_s(rt, p, 1)[1] for _ in range(max(1, a.runs - 1))]
            rt.close()
            print(f"prefill {n:>5} {name:>12}: {med(pp[name]):8.1f} tok/s")
        print(f"  prefill {n}: GPU prefill {med(pp['GPU prefill']) / med(pp['CPU experts']):.2f}x "
              f"of CPU experts (threshold {a.gpu_prefill_tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
