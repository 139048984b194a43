"""One decode step (T=1) of a qwen3moe-like attention layer: the fused native call
(_native.GQA.decode) against the same arithmetic as separate ops: the native quantized linears
with torch for the norms, RoPE and attention (what a Python attention module does), and all of
it in torch with the weights dequantized to float32 (7x the bytes of Q4_K); and the achieved
GB/s of the fused call's weight reading next to the machine's read bandwidth.

    python bench/bench_gqa.py [--threads 2] [--s 512] [--layers 8] [--calls 300]

Weights are random valid Q4_K blocks; several layers are cycled through so that, as in a
real model, each call streams its weights from DRAM rather than from the last-level cache.
Calls of the two paths are interleaved and each figure is the median over calls, since these
machines are shared and noisy.
"""

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

import hybrid  # noqa: F401  (before torch: its OMP_WAIT_POLICY, or torch's threads spin on the engine's cores)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchlib import timed  # noqa: E402
from quantdata import random_rows  # noqa: E402

from hybrid import _native  # noqa: E402


def make_layer(a, rng):
    D, H, Hkv, Dk, Dv = a.d, a.heads, a.kv_heads, a.head_dim, a.head_dim
    qt = QT[a.type]
    p = dict(D=D, H=H, Hkv=Hkv, Dk=Dk, Dv=Dv, R=Dk, neox=True, eps=1e-6, kq_scale=Dk ** -0.5,
             attn_norm=rng.uniform(0.5, 1.5, D).astype(np.float32),
             q_norm=rng.uniform(0.5, 1.5, Dk).astype(np.float32),
             k_norm=rng.uniform(0.5, 1.5, Dk).astype(np.float32))
    for name, rows, cols in (("q", H * Dk, D), ("k", Hkv * Dk, D), ("v", Hkv * Dv, D), ("o", D, H * Dv)):
        p[name] = (random_rows(qt, rows, cols, rng), int(qt))
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--s", type=int, default=512, help="cached rows before the new token")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8, help="layers cycled through (weights out of cache)")
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    torch.set_num_threads(a.threads)
    eng = _native.MoEEngine([[-1] * a.threads], 1, 1, a.d)
    D, H, Hkv, Dk = a.d, a.heads, a.kv_heads, a.head_dim
    P, pos = a.s + 1, a.s
    layers = [make_layer(a, rng) for _ in range(a.layers)]
    fused = [_native.GQA(p) for p in layers]
    kcs = [rng.standard_normal((P, Hkv, Dk)).astype(np.float32) for _ in layers]
    vcs = [rng.standard_normal((P, Hkv, Dk)).astype(np.float32) for _ in layers]
    theta = np.arange(P)[:, None] * 1e6 ** (-np.arange(0, Dk, 2) / Dk)[None, :]
    rope = np.stack([np.cos(theta), np.sin(theta)], -1).reshape(P, Dk).astype(np.float32)
    cos, sin = (torch.from_numpy(f(theta[pos]).astype(np.float32)) for f in (np.cos, np.sin))
    x = rng.standard_normal((1, D)).astype(np.float32)
    out = np.empty((1, D), np.float32)
    wbytes = sum(layers[0][n][0].nbytes for n in "qkvo")

    # the separate-ops path's buffers, allocated once as a decode step would
    h = np.empty((1, D), np.float32)
    qb, kb, vb = (np.empty((1, n), np.float32) for n in (H * Dk, Hkv * Dk, Hkv * Dk))
    ob = np.empty((1, H * Dk), np.float32)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def neox(t):  # [heads, Dk], all dims rotated
        a0, a1 = t[..., : Dk // 2], t[..., Dk // 2:]
        return torch.cat([a0 * cos - a1 * sin, a0 * sin + a1 * cos], -1)

    def separate(i):
        p, kc, vc = layers[i], torch.from_numpy(kcs[i]), torch.from_numpy(vcs[i])
        _native.rms_norm(x, p["attn_norm"], 1e-6, h)
        for name, y in (("q", qb), ("k", kb), ("v", vb)):
            _native.matmul(p[name][0], p[name][1], h, y, engine=eng)
        q = neox(rms(torch.from_numpy(qb).view(H, Dk), torch.from_numpy(p["q_norm"])))
        kc[pos] = neox(rms(torch.from_numpy(kb).view(Hkv, Dk), torch.from_numpy(p["k_norm"])))
        vc[pos] = torch.from_numpy(vb).view(Hkv, Dk)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.view(1, H, 1, Dk), kc.permute(1, 0, 2).unsqueeze(0), vc.permute(1, 0, 2).unsqueeze(0),
            scale=Dk ** -0.5, enable_gqa=True)
        ob[:] = o.reshape(1, H * Dk).numpy()
        _native.matmul(p["o"][0], p["o"][1], ob, out, engine=eng)

    wf = [{n: torch.from_numpy(_native.dequantize(p[n][0], p[n][1], p[n][0].shape[0] * (D if n != "o" else H * Dk))
                               ).view(p[n][0].shape[0], -1) for n in "qkvo"} for p in layers]
    tx = torch.from_numpy(x)

    def torch_float(i):
        p, w, kc, vc = layers[i], wf[i], torch.from_numpy(kcs[i]), torch.from_numpy(vcs[i])
        hh = rms(tx, torch.from_numpy(p["attn_norm"]))
        q = neox(rms((hh @ w["q"].T).view(H, Dk), torch.from_numpy(p["q_norm"])))
        kc[pos] = neox(rms((hh @ w["k"].T).view(Hkv, Dk), torch.from_numpy(p["k_norm"])))
        vc[pos] = (hh @ w["v"].T).view(Hkv, Dk)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.view(1, H, 1, Dk), kc.permute(1, 0, 2).unsqueeze(0), vc.permute(1, 0, 2).unsqueeze(0),
            scale=Dk ** -0.5, enable_gqa=True)
        return o.reshape(1, H * Dk) @ w["o"].T

    def linears_only(i):  # the weight-reading floor: the four matmuls, nothing else
        p = layers[i]
        for name, y in (("q", qb), ("k", kb), ("v", vb)):
            _native.matmul(p[name][0], p[name][1], h, y, engine=eng)
        _native.matmul(p["o"][0], p["o"][1], ob, out, engine=eng)

    def fused_call(i):
        fused[i].decode(x, pos, kcs[i], vcs[i], rope, out, eng)

    # (label, fn, every how many rounds it runs); rounds interleave the paths, each on
    # another layer than the previous call so no path finds the weights in cache
    paths = [("fused GQA.decode", fused_call, 1), ("native linears + torch ops", separate, 1),
             ("torch ops, float32 weights", torch_float, 4), ("4 native linears only (floor)", linears_only, 1)]
    times = {label: [] for label, _, _ in paths}
    with torch.inference_mode():
        for _, fn, _ in paths:  # warm up: page tables, scratch
            for i in range(a.layers):
                fn(i)
        c = 0
        for r in range(a.calls):
            for label, fn, every in paths:
                if r % every == 0:
                    times[label].append(timed(lambda: fn(c % a.layers)))
                    c += 1
        # the paths compute the same thing (each call rewrites the same cache row)
        separate(0)
        want = out.copy()
        fused_call(0)
        err = float(np.abs(out - want).max() / np.abs(want).max())
    probe = np.ones(64 << 20, np.uint8)
    bw = statistics.median(probe.nbytes / timed(lambda: _native.stream_read(probe, a.threads)) for _ in range(7))
    med = {label: statistics.median(t) for label, t in times.items()}
    tf = med["fused GQA.decode"]
    kv_bytes = 2 * P * Hkv * Dk * 4
    print(f"cpu: {_native.cpu_features()}; isa {_native.isa()}; threads {a.threads}; D={D} H={H} Hkv={Hkv} "
          f"Dk=Dv={Dk} {a.type}; S={a.s}; {a.layers} layers cycled; median of {a.calls} calls")
    print(f"weights {wbytes / 2**20:.2f} MiB/layer, kv cache {kv_bytes / 2**20:.2f} MiB/layer; "
          f"fused vs separate ops: max difference {err:.1e} of the largest output")
    print(f"{'path':34} {'us/call':>8} {'ratio':>6}")
    for label, t in med.items():
        print(f"{label:34} {t * 1e6:8.0f} {t / tf:6.2f}")
    print(f"fused: weights {wbytes / tf / 1e9:.1f} GB/s, weights + kv {(wbytes + kv_bytes) / tf / 1e9:.1f} GB/s; "
          f"read bandwidth {bw / 1e9:.1f} GB/s (ratio {(wbytes + kv_bytes) / tf / bw:.2f})")


if __name__ == "__main__":
    main()
