"""Routed-expert engine: decode GB/s vs measured read bandwidth, and prefill tokens/s.

    python bench/bench_moe.py [--layers 4] [--experts 64] [--d 2048] [--f 1024] [--k 6]
                              [--threads 2] [--runs 7] [--prefill 512]
                              [--token-sweep 1,2,3,7,16,64,513] [--thread-sweep 1,2]

Decode: one token per call, fresh random routing every call, layers visited round-robin so
the active experts are never in cache (layers x experts x 3 matrices >> L3). Effective GB/s
counts the bytes of the experts each call reads. The read bandwidth is measured in the same
run with a streaming sum; kernel and probe runs are interleaved; figures are medians.
Prefill: T tokens in one call vs the same tokens as T single-token calls, and the tile kernels
(native/gemm.h) vs the per-row dot loops they replace (same run, interleaved). Sweeps over token
counts (tails of the tiles, few tokens per expert) and thread counts on request.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchlib import add_expert_args  # noqa: E402
from quantdata import random_rows  # noqa: E402

from hybrid import _native  # noqa: E402
from hybrid.backends.experts import ExpertEngine  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_expert_args(ap)
    ap.add_argument("--types", default="Q4_K,Q4_K,Q6_K", help="gate,up,down GGML types")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--token-sweep", default="", help="token counts to time batched vs single steps, e.g. 1,2,3,7,16,64,513")
    ap.add_argument("--thread-sweep", default="", help="thread counts to time prefill T=--prefill with, e.g. 1,2")
    ap.add_argument("--spin-us", type=int, default=2000,
                    help="idle workers' spin before sleeping (the runtime's decode setting)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    E, D, F, K = args.experts, args.d, args.f, args.k
    types = [QT[t] for t in args.types.split(",")]
    engine = ExpertEngine(D, max_tokens=max(args.prefill, 1), max_k=K, threads=args.threads)
    engine._eng.spin_us = args.spin_us
    layers, per_expert = [], 0
    for _ in range(args.layers):
        g = random_rows(types[0], E * F, D, rng)
        u = random_rows(types[1], E * F, D, rng)
        d = random_rows(types[2], E * D, F, rng)
        per_expert = (g.nbytes + u.nbytes + d.nbytes) // E
        layers.append((engine.add_layer(E, g, types[0], u, types[1], d, types[2]), (g, u, d)))
    total = per_expert * E * args.layers
    probe = np.ones(max(total, 256 << 20), np.uint8)
    print(f"isa {_native.isa()}; threads {args.threads}; {args.layers} layers x {E} experts "
          f"({'/'.join(t.name for t in types)}, D={D}, F={F}) = {total / 2**30:.2f} GiB; K={K}; "
          f"{per_expert * K / 1e6:.1f} MB of experts per token per layer; median of {args.runs} runs")

    def decode_run():
        xs = torch.from_numpy(rng.standard_normal((args.steps, 1, D)).astype(np.float32))
        ids = torch.from_numpy(np.stack([rng.choice(E, K, replace=False) for _ in range(args.steps)])[:, None])
        w = torch.from_numpy(rng.random((args.steps, 1, K)).astype(np.float32))
        xs, ids, w = list(xs), list(ids), list(w)  # the tensors a model would pass, made beforehand
        t0 = time.perf_counter()
        for s in range(args.steps):
            layers[s % len(layers)][0](xs[s], ids[s], w[s])
        dt = time.perf_counter() - t0
        return args.steps * K * per_expert / dt

    def read_run():
        t0 = time.perf_counter()
        _native.stream_read(probe, args.threads)
        return probe.nbytes / (time.perf_counter() - t0)

    decode_run()
    dec, bw = [], []
    for _ in range(args.runs):
        dec.append(decode_run())
        bw.append(read_run())
    dec_gbs, bw_gbs = statistics.median(dec) / 1e9, statistics.median(bw) / 1e9
    # each decode run next to its probe run: the median of those ratios is the steadier
    # figure when the machine's speed drifts between runs
    paired = statistics.median(d / b for d, b in zip(dec, bw))
    print(f"decode: {dec_gbs:.1f} GB/s of expert bytes, read bandwidth {bw_gbs:.1f} GB/s, "
          f"ratio {dec_gbs / bw_gbs:.2f} (median of per-run ratios {paired:.2f}); "
          f"{1e3 * per_expert * K / (dec_gbs * 1e9):.2f} ms per layer-token")

    if args.prefill > 1:
        T = args.prefill
        print(f"prefill T={T}: " + prefill_line(layers, T, D, E, K, rng, max(3, args.runs // 2)))
    if args.token_sweep:  # tails: no token count may be slower than its tokens as single steps
        for T in (int(v) for v in args.token_sweep.split(",")):
            print(f"  T={T:5d}: " + prefill_line(layers, T, D, E, K, rng, args.runs))
    engine.close()
    if args.thread_sweep:  # a serial phase would flatten the curve; T fixed at --prefill
        base = None
        for n in (int(v) for v in args.thread_sweep.split(",")):
            eng = ExpertEngine(D, max_tokens=max(args.prefill, 1), max_k=K, threads=n)
            ls = [(eng.add_layer(E, g, types[0], u, types[1], d, types[2]), None) for _, (g, u, d) in layers]
            tps = prefill_rates(ls, args.prefill, D, E, K, rng, args.runs, singles=False)[0]
            base = base or tps
            print(f"  threads {n:3d}: prefill T={args.prefill} {tps:.0f} tokens/s per layer, {tps / base:.2f}x "
                  f"the first count")
            eng.close()


def prefill_rates(layers, T, D, E, K, rng, runs, singles=True):
    """Median tokens/s of T tokens in one call with the tile kernels, with the per-row dot loops
    (set_prefill_tiles(False)), and (singles) as T one-token calls; runs interleaved, each at
    least 256 tokens through the layers in turn (a small T alone would find its experts cached
    and time too briefly on a shared machine). Also the median of per-run tiles / loops ratios."""
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    ids = torch.from_numpy(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]))
    w = torch.from_numpy(rng.random((T, K)).astype(np.float32))
    reps = max(1, 256 // T)

    def rate(call):
        t0 = time.perf_counter()
        for i in range(reps):
            call(layers[i % len(layers)][0])
        return reps * T / (time.perf_counter() - t0)

    def singles_call(layer):
        for t in range(T):
            layer(x[t:t + 1], ids[t:t + 1], w[t:t + 1])

    tiles, loops, single = [], [], []
    try:
        for _ in range(runs):
            for on, out in ((True, tiles), (False, loops)):
                _native.set_prefill_tiles(on)
                out.append(rate(lambda layer: layer(x, ids, w)))
            _native.set_prefill_tiles(True)
            if singles:
                single.append(rate(singles_call))
    finally:
        _native.set_prefill_tiles(True)
    med = statistics.median
    return (med(tiles), med(loops), med(single) if singles else None, med(a / b for a, b in zip(tiles, loops)))


def prefill_line(layers, T, D, E, K, rng, runs):
    tiles, loops, single, ratio = prefill_rates(layers, T, D, E, K, rng, runs)
    return (f"{tiles:.0f} tokens/s per layer batched (tiles) vs {single:.0f} as T=1 steps: {tiles / single:.1f}x; "
            f"per-row dot loops {loops:.0f}: tiles {ratio:.2f}x")


if __name__ == "__main__":
    main()
