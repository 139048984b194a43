"""Routed-expert engine: decode GB/s vs measured read bandwidth, and prefill tokens/s.

    python bench/bench_moe.py [--layers 4] [--experts 64] [--d 2048] [--f 1024] [--k 6]
                              [--threads 2] [--runs 7] [--prefill 512]

Decode: one token per call, fresh random routing every call, layers visited round-robin so
the active experts are never in cache (layers x experts x 3 matrices >> L3). Effective GB/s
counts the bytes of the experts each call reads. The read bandwidth is measured in the same
run with a streaming sum; kernel and probe runs are interleaved; figures are medians.
Prefill: T tokens in one call vs the same tokens as T single-token calls.
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
        x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
        ids = torch.from_numpy(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]))
        w = torch.from_numpy(rng.random((T, K)).astype(np.float32))
        layer = layers[0][0]
        batched, single = [], []
        for _ in range(max(3, args.runs // 2)):
            t0 = time.perf_counter()
            layer(x, ids, w)
            batched.append(T / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for t in range(T):
                layer(x[t:t + 1], ids[t:t + 1], w[t:t + 1])
            single.append(T / (time.perf_counter() - t0))
        b, s = statistics.median(batched), statistics.median(single)
        print(f"prefill T={T}: {b:.0f} tokens/s per layer batched vs {s:.0f} as T=1 steps: {b / s:.1f}x")
    engine.close()


if __name__ == "__main__":
    main()
