"""Decode-shaped (T=1) quantized matmul: effective GB/s of weight bytes vs measured read bandwidth.

    python bench/bench_matmul.py [--mib 512] [--threads 2] [--runs 7] [--types Q4_K,Q6_K,...]
    python bench/bench_matmul.py --tokens 8 --types IQ2_XXS   # a prefill shape: T tokens a call
    python bench/bench_matmul.py --cached --types IQ1_S       # compute only: ns per block, 1 thread

Weights are random valid GGML blocks, far larger than the last-level cache, so every run
streams them from DRAM. --cached instead times 256 rows that stay in L2 on one thread (best of
the runs, 10 calls each): the kernel's compute cost per 256 weights, the figure to compare
when a type is compute-bound (the lattice IQ types), steadier than DRAM runs on a busy machine. The read bandwidth is measured in the same process with a plain
streaming sum over a buffer of the same size; runs of the probe and of each kernel are
interleaved and each figure is the median, since these machines are shared and noisy.
"""

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchlib import timed  # noqa: E402
from quantdata import random_rows  # noqa: E402

from hybrid import _native  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="weight matrix size per type (MiB)")
    ap.add_argument("--k", type=int, default=4096, help="row length K")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--types", default="Q4_K,Q6_K,Q5_K,Q8_0,Q4_0,Q5_0,BF16")
    ap.add_argument("--isas", default=",".join(_native.available_isas()[1:]) or "scalar")
    ap.add_argument("--tokens", type=int, default=1,
                    help="activation rows per call (T); GB/s stays weight bytes per call, so T > 1 "
                         "shows how far unpacking a block once for several tokens goes")
    ap.add_argument("--cached", action="store_true", help="compute only: ns per 256 weights, weights in L2")
    args = ap.parse_args(argv)
    if args.cached:
        return cached(args)

    rng = np.random.default_rng(0)
    nbytes = args.mib << 20
    probe = np.ones(nbytes, np.uint8)
    x = rng.standard_normal((args.tokens, args.k)).astype(np.float32)
    print(f"cpu: {_native.cpu_features()}; threads {args.threads}; weights {args.mib} MiB per type; "
          f"K={args.k}; T={args.tokens}; median of {args.runs} runs")
    print(f"{'type':6} {'isa':7} {'GB/s':>7} {'read GB/s':>10} {'ratio':>6}")
    for name in args.types.split(","):
        qtype = QT[name]
        row = len(random_rows(qtype, 1, args.k, rng)[0])
        n_rows = nbytes // row
        w = random_rows(qtype, n_rows, args.k, rng)
        for isa in args.isas.split(","):
            _native.set_isa(isa)
            out = np.empty((args.tokens, n_rows), np.float32)
            _native.matmul(w, int(qtype), x, out=out, threads=args.threads)  # warm up page tables
            bw, kt = [], []
            for _ in range(args.runs):
                bw.append(nbytes / timed(lambda: _native.stream_read(probe, args.threads)))
                kt.append(w.nbytes / timed(lambda: _native.matmul(w, int(qtype), x, out=out, threads=args.threads)))
            gbs, read = statistics.median(kt) / 1e9, statistics.median(bw) / 1e9
            print(f"{name:6} {isa:7} {gbs:7.2f} {read:10.1f} {gbs / read:6.3f}", flush=True)


def cached(args):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.tokens, args.k)).astype(np.float32)
    print(f"cpu: {_native.cpu_features()}; 1 thread; 256 rows of K={args.k} (in L2); T={args.tokens}; "
          f"best of {args.runs} runs")
    print(f"{'type':7} {'isa':7} {'ns/256 w/token':>15}")
    for name in args.types.split(","):
        qtype = QT[name]
        w = random_rows(qtype, 256, args.k, rng)
        out = np.empty((args.tokens, 256), np.float32)
        for isa in args.isas.split(","):
            _native.set_isa(isa)
            _native.matmul(w, int(qtype), x, out=out, threads=1)
            best = min(timed(lambda: [_native.matmul(w, int(qtype), x, out=out, threads=1) for _ in range(10)])
                       for _ in range(args.runs)) / 10
            print(f"{name:7} {isa:7} {best / (256 * args.k // 256 * args.tokens) * 1e9:15.1f}", flush=True)


if __name__ == "__main__":
    main()
