"""The native grouped-query attention layer (native/gqa.h, _native.GQA) against a float64
numpy reference written here from llama.cpp's graphs (qwen2moe, qwen3moe, glm4-moe, llama):
h = rms_norm(x) * attn_norm; q, k, v = W h (+ bias); optional per-head RMS norms of q and k;
RoPE on the first R dims of each head (NEOX or adjacent pairs); causal attention where query
head h reads kv head h // (H / Hkv); out = Wo concat(heads).

The reference uses the weights dequantized by gguf's numpy code and float activations. With
F32 weights the native matmul keeps its activations float too: only float32 rounding separates
the two, and the bounds are tight enough for any slip. With quantized weights it quantizes
the activations to int8 blocks (Q8_0 with an fp16 scale for 32-blocks, Q8_K for K-quants) as
llama.cpp does; each such dot has a relative error variance of d^2 / (12 sigma^2) (see
test_kernels.py), ~3e-5 for 32-blocks and ~6e-5 for 256-blocks, and the output passes through
two of them (q / k / v, then o), the cache rows through one. The attention is made peaky
(score std ~2) so that a row too many or too few, or the wrong kv head, shows.
"""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from hybrid import _native
from quantdata import _FP16_FIELDS, random_rows

ISAS = ["scalar", "avx2", "avx512"]
# Normalized MSE bounds (out, cache rows) by weight type, ~2x the worst measured over these
# cases. F32 weights keep float activations: only float32 rounding is left (worst measured
# 1.1e-12 / 2e-14), so these cases see any slip. Quantized types: Q8_0 activations for
# 32-blocks (worst 1.8e-4 / 5e-5), Q8_K for K-quants (3.4e-4 / 7e-5).
NMSE_BOUND = {QT.F32: (3e-12, 5e-14),
              QT.Q8_0: (3e-4, 1e-4), QT.Q5_0: (3e-4, 1e-4), QT.Q4_0: (3e-4, 1e-4),
              QT.Q4_K: (6e-4, 1.5e-4), QT.Q5_K: (6e-4, 1.5e-4), QT.Q6_K: (6e-4, 1.5e-4)}

# Letters as in native/gqa.h: D model dim, H query heads, Hkv kv heads, Dk / Dv head dims,
# R rotated dims.
CONFIGS = {
    # H == Hkv (plain multi-head), whole-head NEOX rope
    "mha": dict(D=256, H=4, Hkv=4, Dk=64, Dv=64, R=64, neox=True),
    # qwen2moe: biases, G = 4
    "qwen2moe": dict(D=256, H=8, Hkv=2, Dk=64, Dv=64, R=64, neox=True, bias=True),
    # qwen3moe: q / k norms, G = 8
    "qwen3moe": dict(D=256, H=16, Hkv=2, Dk=64, Dv=64, R=64, neox=True, norms=True),
    # Mixtral-style llama: adjacent-pair rope, G = 8, one kv head
    "llama": dict(D=256, H=8, Hkv=1, Dk=64, Dv=64, R=64, neox=False),
    # glm4moe: partial rope (R = Dk / 2), biases and q / k norms, G = 4
    "glm4moe": dict(D=256, H=8, Hkv=2, Dk=64, Dv=64, R=32, neox=True, bias=True, norms=True),
    # shapes off the kernels' blocking: Dk != Dv, neither a multiple of 16, partial normal rope
    "odd": dict(D=256, H=6, Hkv=3, Dk=40, Dv=16, R=20, neox=False, bias=True, norms=True),
}


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in _native.available_isas():
        pytest.skip(f"this CPU cannot run {request.param} ({_native.cpu_features()})")
    before = _native.isa()
    _native.set_isa(request.param)
    yield request.param
    _native.set_isa(before)


@pytest.fixture(scope="module")
def engine():
    """Three unpinned workers: another pool size than the shared pool's, so other row blocks."""
    return _native.MoEEngine([[-1, -1, -1]], 1, 1, 256)


def rope_table(P, R, base=10000.0):
    """[P, R]: (cos, sin) of pos * base^(-2i/R) for i < R/2, interleaved, as MLA's table."""
    theta = np.arange(P)[:, None] * base ** (-np.arange(0, R, 2) / R)[None, :]
    return np.stack([np.cos(theta), np.sin(theta)], -1).reshape(P, R).astype(np.float32)


def random_weights(qtype, rows, cols, std, rng):
    """uint8 [rows, row_bytes] of weights with entries of about `std`: quantized Gaussians
    where gguf's numpy code can quantize, else random valid blocks with their scales rescaled."""
    if qtype == QT.F32:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32).view(np.uint8)
    if qtype in (QT.Q8_0, QT.Q4_0, QT.Q5_0):
        return gguf_quantize((rng.standard_normal((rows, cols)) * std).astype(np.float32), qtype)
    raw = random_rows(qtype, rows, cols, rng)
    blocks = raw.reshape(rows, -1, GGML_QUANT_SIZES[qtype][1])
    if qtype in (QT.Q4_K, QT.Q5_K):
        # dmin = d * (mean quant): about zero-mean weights, as trained ones are; with random
        # mins the mean of a row is its largest component and every dot cancels it away
        d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)
        blocks[:, :, 2:4] = (d * (7.5 if qtype == QT.Q4_K else 15.5)).astype(np.float16).view(np.uint8)
    f = std / gguf_dequantize(raw, qtype).std()
    for off in _FP16_FIELDS[qtype]:
        d = np.ascontiguousarray(blocks[:, :, off : off + 2]).view(np.float16)
        blocks[:, :, off : off + 2] = (d * f).astype(np.float16).view(np.uint8)
    return raw


def make_layer(cfg, qtype=QT.Q8_0, seed=0):
    """(the GQA params dict, its float64 reference weights)."""
    rng = np.random.default_rng(seed)
    D, H, Hkv, Dk, Dv = (cfg[k] for k in ("D", "H", "Hkv", "Dk", "Dv"))
    p = dict(D=D, H=H, Hkv=Hkv, Dk=Dk, Dv=Dv, R=cfg["R"], neox=cfg["neox"], eps=1e-6,
             kq_scale=1.0 / np.sqrt(Dk), attn_norm=rng.uniform(0.5, 1.5, D).astype(np.float32))
    ref = {"attn_norm": p["attn_norm"].astype(np.float64)}
    # q and k entries of std ~1.5: scores of std ~2 after kq_scale
    shapes = {"q": (H * Dk, D, 1.5), "k": (Hkv * Dk, D, 1.5), "v": (Hkv * Dv, D, 1.0), "o": (D, H * Dv, 1.0)}
    for name, (rows, cols, std) in shapes.items():
        raw = random_weights(qtype, rows, cols, std / np.sqrt(cols), rng)
        p[name] = (raw, int(qtype))
        ref[name] = (raw.view(np.float32) if qtype == QT.F32 else gguf_dequantize(raw, qtype)).astype(np.float64)
    for name, n in (("bq", H * Dk), ("bk", Hkv * Dk), ("bv", Hkv * Dv)):
        p[name] = rng.standard_normal(n).astype(np.float32) * 0.5 if cfg.get("bias") else None
    for name in ("q_norm", "k_norm"):
        p[name] = rng.uniform(1.0, 2.0, Dk).astype(np.float32) if cfg.get("norms") else None
    for name in ("bq", "bk", "bv", "q_norm", "k_norm"):
        ref[name] = None if p[name] is None else p[name].astype(np.float64)
    return p, ref


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rotate(v, cs, R, neox):
    """RoPE on the first R dims of v [T, heads, Dk]; cs [T, R] (cos, sin) pairs."""
    c, s = cs[:, None, 0::2], cs[:, None, 1::2]
    out = v.copy()
    if neox:
        a, b = v[..., : R // 2], v[..., R // 2 : R]
        out[..., : R // 2], out[..., R // 2 : R] = a * c - b * s, a * s + b * c
    else:
        a, b = v[..., 0:R:2], v[..., 1:R:2]
        out[..., 0:R:2], out[..., 1:R:2] = a * c - b * s, a * s + b * c
    return out


def reference(p, W, x, pos0, k_cache, v_cache, rope):
    """float64 (out [T, D], new k rows [T, Hkv, Dk], new v rows [T, Hkv, Dv])."""
    T = x.shape[0]
    H, Hkv, Dk, Dv, R = (p[k] for k in ("H", "Hkv", "Dk", "Dv", "R"))
    h = rms(x.astype(np.float64), W["attn_norm"], p["eps"])
    q, k, v = h @ W["q"].T, h @ W["k"].T, h @ W["v"].T
    for name, y in (("bq", q), ("bk", k), ("bv", v)):
        if W[name] is not None:
            y += W[name]
    q, k, v = q.reshape(T, H, Dk), k.reshape(T, Hkv, Dk), v.reshape(T, Hkv, Dv)
    if W["q_norm"] is not None:
        q = rms(q, W["q_norm"], p["eps"])
    if W["k_norm"] is not None:
        k = rms(k, W["k_norm"], p["eps"])
    cs = rope[pos0 : pos0 + T].astype(np.float64)
    q, k = rotate(q, cs, R, p["neox"]), rotate(k, cs, R, p["neox"])
    kc, vc = k_cache.astype(np.float64), v_cache.astype(np.float64)
    kc[pos0 : pos0 + T], vc[pos0 : pos0 + T] = k, v
    o = np.empty((T, H, Dv))
    G = H // Hkv
    for t in range(T):
        S = pos0 + t + 1
        for hh in range(H):
            sc = kc[:S, hh // G] @ q[t, hh] * p["kq_scale"]
            e = np.exp(sc - sc.max())
            o[t, hh] = e @ vc[:S, hh // G] / e.sum()
    return o.reshape(T, H * Dv) @ W["o"].T, k, v


def nmse(got, want):
    return float(np.mean((got - want) ** 2) / np.mean(want ** 2))


def check_call(gqa, p, W, x, pos0, kc, vc, rope, eng, qtype=QT.Q8_0):
    """One decode call against the reference from the same cache; returns the NMSEs."""
    T = x.shape[0]
    want, k_rows, v_rows = reference(p, W, x, pos0, kc, vc, rope)
    before_k, before_v = kc.copy(), vc.copy()
    out = np.full((T, p["D"]), np.nan, np.float32)
    gqa.decode(x, pos0, kc, vc, rope, out, eng)
    errs = (nmse(out, want), nmse(kc[pos0 : pos0 + T], k_rows), nmse(vc[pos0 : pos0 + T], v_rows))
    bound_out, bound_rows = NMSE_BOUND[qtype]
    assert errs[0] < bound_out, f"pos0={pos0} T={T}: out NMSE {errs[0]:.2e}"
    assert max(errs[1:]) < bound_rows, f"pos0={pos0} T={T}: cache rows NMSE {errs[1]:.2e} / {errs[2]:.2e}"
    # only the new rows were written
    for c, b in ((kc, before_k), (vc, before_v)):
        np.testing.assert_array_equal(c[:pos0], b[:pos0])
        np.testing.assert_array_equal(c[pos0 + T :], b[pos0 + T :])
    return errs


@pytest.mark.parametrize("use_engine", [False, True], ids=["shared-pool", "engine"])
@pytest.mark.parametrize("qtype", [QT.F32, QT.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("name", CONFIGS)
def test_gqa_decode_vs_float64(isa, name, qtype, use_engine, engine):
    cfg = CONFIGS[name]
    p, W = make_layer(cfg, qtype, seed=len(name))
    gqa = _native.GQA(p)
    eng = engine if use_engine else None
    rng = np.random.default_rng(1)
    P = 1100
    rope = rope_table(P, cfg["R"])
    # an existing cache: rows of the scale new ones have (k: ~1.5, v: ~1)
    kc = (rng.standard_normal((P, cfg["Hkv"], cfg["Dk"])) * 1.5).astype(np.float32)
    vc = rng.standard_normal((P, cfg["Hkv"], cfg["Dv"])).astype(np.float32)
    x = lambda T: (rng.standard_normal((T, cfg["D"])) * 2).astype(np.float32)  # noqa: E731
    # a prefill chunk from position 0 (causal inside the chunk), then decode steps and a short
    # chunk on top of it, then a long cache
    for pos0, T in [(0, 37), (37, 1), (38, 1), (39, 4), (1000, 1), (1001, 5)]:
        check_call(gqa, p, W, x(T), pos0, kc, vc, rope, eng, qtype)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_0, QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda t: t.name)
def test_gqa_other_weight_types(isa, qtype):
    cfg = CONFIGS["glm4moe"]
    p, W = make_layer(cfg, qtype, seed=int(qtype))
    gqa = _native.GQA(p)
    rng = np.random.default_rng(2)
    P = 300
    rope = rope_table(P, cfg["R"])
    kc = (rng.standard_normal((P, cfg["Hkv"], cfg["Dk"])) * 1.5).astype(np.float32)
    vc = rng.standard_normal((P, cfg["Hkv"], cfg["Dv"])).astype(np.float32)
    for pos0, T in [(0, 9), (250, 1), (251, 3)]:
        x = (rng.standard_normal((T, cfg["D"])) * 2).astype(np.float32)
        check_call(gqa, p, W, x, pos0, kc, vc, rope, None, qtype)


def test_mixed_weight_types_and_out_aliasing_x():
    """Q4_K_M files mix types (v and o in Q6_K); out may be x itself (the caller's buffer)."""
    cfg = CONFIGS["qwen3moe"]
    p, W = make_layer(cfg, QT.Q4_K, seed=5)
    p6, W6 = make_layer(cfg, QT.Q6_K, seed=6)
    p["v"], W["v"], p["o"], W["o"] = p6["v"], W6["v"], p6["o"], W6["o"]
    gqa = _native.GQA(p)
    rng = np.random.default_rng(3)
    rope = rope_table(64, cfg["R"])
    kc = np.zeros((64, cfg["Hkv"], cfg["Dk"]), np.float32)
    vc = np.zeros((64, cfg["Hkv"], cfg["Dv"]), np.float32)
    x = rng.standard_normal((6, cfg["D"])).astype(np.float32)
    check_call(gqa, p, W, x, 0, kc.copy(), vc.copy(), rope, None, QT.Q4_K)
    out = np.empty_like(x)
    gqa.decode(x, 0, kc, vc, rope, out)
    gqa.decode(x, 0, kc, vc, rope, x)
    np.testing.assert_array_equal(x, out)


def test_same_result_on_every_isa():
    """The SIMD paths differ from the scalar one only in float summation order."""
    cfg = CONFIGS["glm4moe"]
    p, _ = make_layer(cfg, seed=7)
    gqa = _native.GQA(p)
    rng = np.random.default_rng(4)
    rope = rope_table(200, cfg["R"])
    kc0 = rng.standard_normal((200, cfg["Hkv"], cfg["Dk"])).astype(np.float32)
    vc0 = rng.standard_normal((200, cfg["Hkv"], cfg["Dv"])).astype(np.float32)
    x = rng.standard_normal((3, cfg["D"])).astype(np.float32)
    before, outs = _native.isa(), []
    try:
        for name in _native.available_isas():
            _native.set_isa(name)
            kc, vc, out = kc0.copy(), vc0.copy(), np.empty_like(x)
            gqa.decode(x, 150, kc, vc, rope, out)
            outs.append((out, kc[150:153]))
    finally:
        _native.set_isa(before)
    for out, rows in outs[1:]:
        np.testing.assert_allclose(out, outs[0][0], rtol=0, atol=1e-4 * np.abs(outs[0][0]).max())
        np.testing.assert_allclose(rows, outs[0][1], rtol=0, atol=1e-5 * np.abs(outs[0][1]).max())


def test_bad_params_are_refused():
    good, _ = make_layer(CONFIGS["glm4moe"], seed=8)
    _native.GQA(good)

    def refused(match, **change):
        p = dict(good, **change)
        for k in [k for k, v in change.items() if v is KeyError]:
            del p[k]
        with pytest.raises(ValueError, match=match):
            _native.GQA(p)

    refused("positive", Hkv=0)
    refused("positive", Dv=-1)
    refused("multiple of Hkv", Hkv=3)
    refused("R must be even", R=31)
    refused("R must be even", R=66)
    refused(r"q: expected 256 rows", H=4)             # H changed, q no longer fits
    refused(r"o: expected 256 rows of 512", o=good["q"])
    refused(r"k: expected 128 rows of 256 Q8_0", k=(good["k"][0][:64], good["k"][1]))
    refused("not supported", v=(good["v"][0], 34))     # TQ1_0
    refused(r"bq: expected float32 \[512\]", bq=np.zeros(511, np.float32))
    refused(r"k_norm: expected float32 \[64\]", k_norm=np.zeros(128, np.float32))
    refused(r"attn_norm: expected float32 \[256\]", attn_norm=np.zeros(255, np.float32))
    refused("kq_scale", kq_scale=0.0)
    refused("missing 'o'", o=KeyError)
    refused("unknown key 'qnorm'", qnorm=good["q_norm"])
    # 48 elements of Q8_0 are not whole blocks (the row bytes of one block would pass)
    small = dict(good, D=48, attn_norm=np.ones(48, np.float32),
                 q=(np.zeros((512, 34), np.uint8), int(QT.Q8_0)))
    with pytest.raises(ValueError, match="q: rows of 48 elements are not whole Q8_0 blocks"):
        _native.GQA(small)


def test_bad_decode_arguments_are_refused():
    cfg = CONFIGS["glm4moe"]
    p, _ = make_layer(cfg, seed=9)
    gqa = _native.GQA(p)
    P, D = 16, cfg["D"]
    kc = np.zeros((P, 2, 64), np.float32)
    vc = np.zeros((P, 2, 64), np.float32)
    rope = rope_table(P, cfg["R"])
    x, out = np.zeros((2, D), np.float32), np.zeros((2, D), np.float32)
    with pytest.raises(ValueError, match=r"x: expected float32 \[T, 256\]"):
        gqa.decode(np.zeros((2, D + 1), np.float32), 0, kc, vc, rope, out)
    with pytest.raises(ValueError, match=r"k_cache: expected the layer's float32 rows \[P, 2, 64\]"):
        gqa.decode(x, 0, kc.reshape(P, 128), vc, rope, out)
    with pytest.raises(ValueError, match=r"v_cache: expected the layer's float32 rows \[P, 2, 64\]"):
        gqa.decode(x, 0, kc, np.zeros((P, 1, 64), np.float32), rope, out)
    with pytest.raises(ValueError, match="k_cache: positions 15..17 exceed its 16 rows"):
        gqa.decode(x, P - 1, kc, vc, rope, out)
    with pytest.raises(ValueError, match="k_cache: positions"):
        gqa.decode(x, -1, kc, vc, rope, out)
    with pytest.raises(ValueError, match=r"rope: expected float32 \[>= 2, 32\]"):
        gqa.decode(x, 0, kc, vc, rope[:, :30], out)
    with pytest.raises(ValueError, match=r"out: expected float32 \[2, 256\]"):
        gqa.decode(x, 0, kc, vc, rope, np.zeros((1, D), np.float32))
    with pytest.raises(TypeError):   # a float64 cache would be written through a copy
        gqa.decode(x, 0, kc.astype(np.float64), vc, rope, out)
    with pytest.raises(TypeError):   # so would a strided one
        gqa.decode(x, 0, np.zeros((P, 4, 64), np.float32)[:, ::2], vc, rope, out)
    ro = kc.copy()
    ro.flags.writeable = False
    with pytest.raises((ValueError, TypeError)):
        gqa.decode(x, 0, ro, vc, rope, out)
