"""MLA attention of one prompt chunk both ways the runtime can take it, per chunk length:
absorbed (queries taken into the latent space; the fused native call NativeMLA, as decode
steps and short chunks run) and decompressed (the cached latents expanded to per-head K and
V once, then the native causal attention of native/flash.h; the last column the same with
torch's attention in query blocks, the path without the native module). The runtime switches
at models.args.mla_decompress_min_tokens, a FLOP count (171 queries for R1's and the mid
model's shapes); this measures where the switch pays on this machine.

    python bench/bench_mla.py [--lengths 32,64,128,171,256,512,1024,2048] [--runs 5]

TinyConfig.mid's first layer (2048 dims, 16 heads, latent 512, Q4_K_M), each chunk at
position 0 (it attends to itself, causally), the paths' calls interleaved, medians.
"""

import argparse
import os
import pathlib
import statistics

import hybrid  # noqa: F401  (before torch: its OMP_WAIT_POLICY)
import torch  # noqa: E402
from benchlib import timed  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="32,64,128,171,256,512,1024,2048")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--cache-dir", default=os.environ.get("HYBRID_FIXTURE_CACHE",
                                                          str(pathlib.Path.home() / ".cache/hybrid-bench")))
    a = ap.parse_args(argv)
    from hybrid.fixtures import TinyConfig, build
    from hybrid.models.args import mla_decompress_min_tokens

    lengths = [int(x) for x in a.lengths.split(",")]
    path = build(TinyConfig.mid(), "Q4_K_M", a.cache_dir)
    torch.set_num_threads(a.threads)
    with hybrid.load(path, device="cpu", threads=a.threads, ctx=max(lengths)) as rt:
        attn, cache, rope = rt.model.blocks[0].attn, rt.cache, rt.model.rope
        ar = rt.args
        switch = mla_decompress_min_tokens(ar.kv_lora_rank, ar.qk_nope_dim, ar.v_head_dim)
        print(f"threads {a.threads}; the runtime decompresses from {switch} queries; "
              f"ms per chunk, median of {a.runs} interleaved runs")
        print(f"{'tokens':>7} {'absorbed':>10} {'decompressed':>13} {'faster':>14} {'torch attention':>16}")
        g = torch.Generator().manual_seed(0)
        for T in lengths:
            x = torch.randn(T, ar.dim, generator=g)
            times = {"absorb": [], "decompress": [], "torch": []}
            native_attention = attn.causal

            def run(mode):
                attn.causal = None if mode == "torch" else native_attention
                try:
                    return attn(x, 0, cache, rope, mode="decompress" if mode == "torch" else mode)
                finally:
                    attn.causal = native_attention

            with torch.inference_mode():
                for mode in times:   # warm-up
                    run(mode)
                for _ in range(a.runs):
                    for mode in times:
                        times[mode].append(timed(lambda: run(mode)))
            ab, de, to = (statistics.median(times[m]) * 1e3 for m in ("absorb", "decompress", "torch"))
            best = "absorbed" if ab < de else "decompressed"
            print(f"{T:7d} {ab:10.2f} {de:13.2f} {best:>9} {max(ab, de) / min(ab, de):4.2f}x "
                  f"{to:10.2f} ({to / de:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
