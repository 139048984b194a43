"""Expert-engine decode GB/s per NUMA mode, as ratios to --numa off, in one run.

    python bench/bench_numa.py [--layers 4] [--threads 2] [--runs 7] [--partitions 2]

Writes a GGUF of random routed experts (default 4 layers x 64 experts of 1024 x 2048,
Q4_K/Q4_K/Q6_K, ~1 GB) to a temporary directory, places it in every mode and decodes one token
per call with fresh random routing, layers round-robin. On a one-node machine distribute and
replicate use `--partitions` logical partitions of the node, so the figures show the cost of
the per-node split itself; the modes should be within noise of each other there.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchlib import add_expert_args  # noqa: E402
from test_numa import write_expert_gguf  # noqa: E402

from hybrid import _native  # noqa: E402
from hybrid.gguf_file import GGUFFile  # noqa: E402
from hybrid.backends.numa import PlacedExperts, node_groups  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_expert_args(ap)
    ap.add_argument("--partitions", type=int, default=2, help="logical partitions when there is one node")
    args = ap.parse_args(argv)

    from placement.hardware import detect

    hw = detect(gpus=False)
    one_node = len(hw.allowed_nodes) <= 1
    print(f"NUMA: {len(hw.numa_nodes)} node(s), allowed {hw.allowed_mems}; cpus {hw.allowed_cpus}; "
          f"isa {_native.isa()}; threads {args.threads}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_expert_gguf(Path(tmp) / "experts.gguf", args.layers, args.experts, args.d, args.f)
        g = GGUFFile(path)
        per_expert = sum(t.n_bytes for t in g.tensors.values()) // (args.layers * args.experts)
        print(f"{args.layers} layers x {args.experts} experts, {per_expert * args.experts * args.layers / 1e9:.2f} GB; "
              f"K={args.k}: {per_expert * args.k / 1e6:.1f} MB read per layer-token; median of {args.runs}")
        setups = {}
        for mode in ("off", "interleave", "distribute", "replicate"):
            parts = args.partitions if (one_node and mode in ("distribute", "replicate")) else None
            groups = node_groups(mode, threads=args.threads, logical_partitions=parts)
            placed = PlacedExperts(g, mode, groups, d_model=args.d, max_tokens=1, max_k=args.k, progress=False)
            layers = [placed.add_layer(i) for i in range(args.layers)]
            placed.load()
            setups[mode] = (placed, layers, groups)

        def decode(layers):
            xs = torch.from_numpy(rng.standard_normal((args.steps, 1, args.d)).astype(np.float32))
            ids = torch.from_numpy(np.stack([rng.choice(args.experts, args.k, replace=False)
                                             for _ in range(args.steps)])[:, None])
            w = torch.ones(args.steps, 1, args.k)
            t0 = time.perf_counter()
            for s in range(args.steps):
                layers[s % len(layers)](xs[s], ids[s], w[s])
            return args.steps * args.k * per_expert / (time.perf_counter() - t0)

        results = {m: [] for m in setups}
        for _ in range(args.runs):  # interleaved: noise hits every mode alike
            for mode, (_, layers, _) in setups.items():
                results[mode].append(decode(layers))
        off = statistics.median(results["off"])
        print(f"{'mode':11} {'groups':>6} {'GB/s':>6} {'vs off':>7}")
        for mode, vals in results.items():
            med = statistics.median(vals)
            print(f"{mode:11} {len(setups[mode][2]):6} {med / 1e9:6.1f} {med / off:7.2f}")
        for placed, _, _ in setups.values():
            placed.close()
        g.close()


if __name__ == "__main__":
    main()
