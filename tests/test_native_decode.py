"""The native pieces of a CPU decode step against the torch paths they replace: the fused
MLA attention (native/mla.h) and the router's expert selection (native/ops.h).

On the CPU every absorbed-mode call (decode steps, short chunks) of a quantized model runs as
one native call; the torch path (MLAttention._absorbed with the same native linears, norms and
Q8_0 head matrices) stays the reference and the GPU's path. Both compute the same dot
products; only the attention's float sums may differ in order, so outputs agree to float
rounding and the cache rows (norm + RoPE, same arithmetic) agree to the last bits.
"""

import numpy as np
import pytest
import torch

import hybrid
from hybrid import _native
from hybrid.backends.native import NativeRouter
from hybrid.runtime.kv_cache import ContextFullError
from hybrid.models.deepseek2 import GATING_SIGMOID, GATING_SOFTMAX, ModelArgs, Router


@pytest.fixture(scope="module", params=["default", "q_lora0", "mla_split"])
def rt(request, tiny_gguf):
    cfg = {"default": {}, "q_lora0": {"q_lora_rank": 0}, "mla_split": {"mla_split": True}}[request.param]
    r = hybrid.load(tiny_gguf("Q4_K_M", **cfg), device="cpu", threads=2)
    yield r
    r.close()


def _both_paths(rt, layer, pos0, T, seed):
    """(fused out, fused cache rows, torch out, torch cache rows) from the same start."""
    attn, cache, rope = rt.model.blocks[layer].attn, rt.cache, rt.model.rope
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        cache.data.copy_(torch.randn(cache.data.shape, generator=g))
        x = torch.randn(T, rt.args.dim, generator=g) * 3
        start = cache.data.clone()
        fused_out = attn(x, pos0, cache, rope, "absorb")
        fused_rows = cache.data[layer].clone()
        cache.data.copy_(start)
        fused, attn.fused = attn.fused, None
        try:
            torch_out = attn(x, pos0, cache, rope, "absorb")
        finally:
            attn.fused = fused
        torch_rows = cache.data[layer].clone()
    return fused_out, fused_rows, torch_out, torch_rows


@pytest.mark.parametrize("pos0,T", [(0, 1), (5, 1), (0, 4), (9, 3)])
def test_fused_attention_equals_the_torch_path(rt, pos0, T):
    assert all(b.attn.fused is not None for b in rt.model.blocks)
    for layer in range(rt.args.n_layer):
        fo, fr, to, tr = _both_paths(rt, layer, pos0, T, seed=layer * 100 + pos0 + T)
        scale = float(to.abs().max())
        assert scale > 0.1
        np.testing.assert_allclose(fo.numpy(), to.numpy(), rtol=0, atol=2e-5 * scale)
        np.testing.assert_allclose(fr.numpy(), tr.numpy(), rtol=1e-6, atol=1e-6)
        # rows of other positions are left alone, the new ones were written
        assert torch.equal(fr[:pos0], tr[:pos0]) and torch.equal(fr[pos0 + T:], tr[pos0 + T:])


def _deq64(g, name):
    import gguf

    info = g.tensors[name]
    w = gguf.quants.dequantize(np.asarray(g.view(name)), gguf.GGMLQuantizationType(info.ggml_type))
    return np.asarray(w, dtype=np.float64).reshape(info.shape)


def reference_attention(g, layer, x, rows, pos0):
    """float64 MLA attention of x [T, D] at positions pos0.. over cache rows [S, C+R] (rows
    below pos0 given; the new ones computed here), from gguf's dequantization of the layer's
    weights with full per-head K/V (no absorption, no Q8_0 head matrices, no hybrid code):
    returns (output [T, D], the layer's rows [pos0+T, C+R])."""
    from test_deepseek2 import _rms, rope_tables

    md, a, p = g.metadata, "deepseek2.", f"blk.{layer}."
    H = md[a + "attention.head_count"]
    R = md[a + "rope.dimension_count"]
    Kh = md.get(a + "attention.key_length_mla", md[a + "attention.key_length"])
    Vh = md.get(a + "attention.value_length_mla", md[a + "attention.value_length"])
    N, C, eps = Kh - R, md[a + "attention.kv_lora_rank"], md[a + "attention.layer_norm_rms_epsilon"]
    T = x.shape[0]
    S = pos0 + T
    cos, sin, kq_scale = rope_tables(md, S)

    def rope(v, pos):  # [..., R] at position pos
        out = v.copy()
        out[..., 0::2] = v[..., 0::2] * cos[pos] - v[..., 1::2] * sin[pos]
        out[..., 1::2] = v[..., 0::2] * sin[pos] + v[..., 1::2] * cos[pos]
        return out

    W = lambda n: _deq64(g, p + n + ".weight")  # noqa: E731
    h = _rms(x, W("attn_norm"), eps)
    if p + "attn_q.weight" in g.tensors:
        q = h @ W("attn_q").T
    else:
        q = _rms(h @ W("attn_q_a").T, W("attn_q_a_norm"), eps) @ W("attn_q_b").T
    q = q.reshape(T, H, Kh)
    kv = h @ W("attn_kv_a_mqa").T
    cache = np.array(rows[:S], dtype=np.float64)
    for t in range(T):
        q[t, :, N:] = rope(q[t, :, N:], pos0 + t)
        cache[pos0 + t, :C] = _rms(kv[t, :C], W("attn_kv_a_norm"), eps)
        cache[pos0 + t, C:] = rope(kv[t, C:], pos0 + t)
    if p + "attn_kv_b.weight" in g.tensors:
        kvb = W("attn_kv_b").reshape(H, N + Vh, C)
        wk, wv = kvb[:, :N], kvb[:, N:]
    else:
        wk = W("attn_k_b").reshape(H, C, N).transpose(0, 2, 1)
        wv = W("attn_v_b").reshape(H, Vh, C)
    lat, kpe = cache[:, :C], cache[:, C:]
    k = np.concatenate([np.einsum("hnc,sc->shn", wk, lat),
                        np.broadcast_to(kpe[:, None, :], (S, H, R))], -1)    # [S, H, Kh]
    v = np.einsum("hvc,sc->shv", wv, lat)                                   # [S, H, V]
    o = np.zeros((T, H, Vh))
    for t in range(T):
        sc = np.einsum("hd,shd->hs", q[t], k[:pos0 + t + 1]) * kq_scale
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o[t] = np.einsum("hs,shv->hv", pr, v[:pos0 + t + 1])
    return o.reshape(T, H * Vh) @ W("attn_output").T, cache


@pytest.mark.parametrize("pos0,T", [(0, 1), (5, 1), (9, 3)])
def test_fused_attention_equals_the_float64_reference(rt, pos0, T):
    """The fused native attention vs an independent float64 MLA built from gguf's
    dequantization of the file (full per-head K/V, no absorption). They differ by the native
    path's rounding: Q8 activations in the quantized matmuls and Q8_0 head matrices (measured
    over the variants: min per-row cosine 0.9995, max error 3% of the output scale; new cache
    rows: cosine >= 0.99994); one head's matrices rotated to the next head, or one cached row
    missed, moves them by far more."""
    for layer in range(rt.args.n_layer):
        fo, fr, _, _ = _both_paths(rt, layer, pos0, T, seed=layer * 100 + pos0 + T)
        g = torch.Generator().manual_seed(layer * 100 + pos0 + T)   # _both_paths' inputs again
        start = torch.randn(rt.cache.data.shape, generator=g)
        x = (torch.randn(T, rt.args.dim, generator=g) * 3).double().numpy()
        want, want_rows = reference_attention(rt.gguf, layer, x, start[layer].double().numpy(), pos0)
        got = fo.double().numpy()
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        err = np.abs(got - want).max() / np.abs(want).max()
        assert cos.min() >= 0.998 and err <= 0.06, \
            f"layer {layer}: min cosine {cos.min():.6f}, max error {err:.2e} of the output scale"
        rows = fr[:pos0 + T].double().numpy()
        assert np.array_equal(rows[:pos0], want_rows[:pos0])     # older rows untouched
        new, ref = rows[pos0:], want_rows[pos0:]
        rcos = (new * ref).sum(-1) / (np.linalg.norm(new, axis=-1) * np.linalg.norm(ref, axis=-1))
        assert rcos.min() >= 0.999, f"layer {layer}: new cache rows, min cosine {rcos.min():.6f}"


def test_fused_attention_is_the_same_on_every_isa(rt):
    before = _native.isa()
    outs = []
    try:
        for isa in _native.available_isas():
            _native.set_isa(isa)
            outs.append(_both_paths(rt, 1, 6, 2, seed=7)[0])
    finally:
        _native.set_isa(before)
    for o in outs[1:]:
        np.testing.assert_allclose(o.numpy(), outs[0].numpy(), rtol=0,
                                   atol=1e-4 * float(outs[0].abs().max()))


def test_decode_through_the_fused_path_matches_full_logits(rt):
    toks = np.random.default_rng(3).integers(3, rt.n_vocab, 12).tolist()
    full, step = rt.logits(toks), rt.decode_logits(toks)
    cos = (full * step).sum(-1) / (np.linalg.norm(full, axis=-1) * np.linalg.norm(step, axis=-1))
    assert cos.min() > 0.9999


def test_fused_attention_refuses_bad_input(rt):
    attn, cache, rope = rt.model.blocks[0].attn, rt.cache, rt.model.rope
    rows = cache.data[0].numpy()
    freqs = torch.view_as_real(rope.freqs).reshape(rope.freqs.shape[0], -1).numpy()
    D = rt.args.dim
    mla = attn.fused._mla
    with pytest.raises(ValueError, match=r"x: expected float32 \[T, "):
        mla.decode(np.zeros((1, D + 1), np.float32), 0, rows, freqs, np.zeros((1, D), np.float32))
    with pytest.raises(ValueError, match="cache: positions"):
        mla.decode(np.zeros((2, D), np.float32), rows.shape[0] - 1, rows, freqs, np.zeros((2, D), np.float32))
    with pytest.raises(TypeError):   # a float64 cache would be written through a copy: refused
        mla.decode(np.zeros((1, D), np.float32), 0, rows.astype(np.float64), freqs, np.zeros((1, D), np.float32))
    with pytest.raises(ContextFullError, match="larger ctx"):
        attn(torch.zeros(2, D), cache.max_tokens - 1, cache, rope, "absorb")


def test_float_files_keep_the_torch_path(tiny_f32):
    with hybrid.load(tiny_f32, device="cpu", threads=2) as r:
        assert all(b.attn.fused is None for b in r.model.blocks)


# ----------------------------------------------------------------------------- router


class _RouterWeights:
    def __init__(self, gate_inp, bias):
        self.t = {"blk.0.ffn_gate_inp.weight": gate_inp}
        if bias is not None:
            self.t["blk.0.exp_probs_b.bias"] = bias

    def has(self, name):
        return name in self.t

    def tensor(self, name):
        return self.t[name]


ROUTINGS = {
    "r1": dict(gating_func=GATING_SIGMOID, n_group=8, n_group_used=4, n_expert_used=8,
               expert_weights_norm=True, expert_weights_scale=2.5, bias=True),
    "softmax": dict(gating_func=GATING_SOFTMAX, n_group=0, n_group_used=0, n_expert_used=6,
                    expert_weights_norm=False, expert_weights_scale=1.0, bias=False),
    "softmax-groups-norm": dict(gating_func=GATING_SOFTMAX, n_group=4, n_group_used=1,
                                n_expert_used=2, expert_weights_norm=True,
                                expert_weights_scale=0.0, bias=False),
}


@pytest.mark.parametrize("name", ROUTINGS)
def test_native_router_selects_as_the_torch_router(name):
    r = dict(ROUTINGS[name])
    g = torch.Generator().manual_seed(5)
    E, D, T = 64, 96, 300
    gate_inp = torch.randn(E, D, generator=g) * 0.2
    bias = torch.randn(E, generator=g) * 0.05 if r.pop("bias") else None
    args = ModelArgs(n_vocab=1, dim=D, n_layer=1, n_ff=1, n_head=1, qk_nope_dim=1, qk_rope_dim=1,
                     v_head_dim=1, q_lora_rank=0, kv_lora_rank=1, rms_eps=1e-6, n_dense_lead=0,
                     n_ff_exp=1, n_expert=E, n_expert_shared=0, rope_freq_base=1e4,
                     rope_scaling_type="none", rope_freq_scale=1.0, rope_orig_ctx=0,
                     rope_attn_factor=1.0, yarn_log_mul=0.0, **r)
    router = Router(args, _RouterWeights(gate_inp, bias), 0)
    assert router.select is None                 # a loader without expert_select: torch
    h = torch.randn(T, D, generator=g)
    want_ids, want_w = router(h)
    router.select = NativeRouter(args, bias)
    ids, w = router(h)
    assert ids.dtype == torch.long and ids.shape == want_ids.shape == (T, args.n_expert_used)
    assert torch.equal(ids, want_ids)            # same experts, best first
    np.testing.assert_allclose(w.numpy(), want_w.numpy(), rtol=2e-6, atol=1e-7)
    if args.n_group > 1:                         # the group limit did bite
        groups = ids // (E // args.n_group)
        assert all(len(set(row)) <= args.n_group_used for row in groups.tolist())


def test_native_router_refuses_bad_arguments():
    logits = np.zeros((2, 64), np.float32)
    ids, w = np.zeros((2, 8), np.int64), np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="groups"):
        _native.moe_route(logits, None, 2, 8, 1, 16, True, 1.0, ids[:, :8], w)  # 16 > 1 group of 8
    with pytest.raises(ValueError, match="gating"):
        _native.moe_route(logits, None, 3, 0, 0, 8, True, 1.0, ids, w)
    with pytest.raises(ValueError, match="bias"):
        _native.moe_route(logits, np.zeros(3, np.float32), 2, 0, 0, 8, True, 1.0, ids, w)
    with pytest.raises(TypeError):               # int32 ids would be written through a copy
        _native.moe_route(logits, None, 2, 0, 0, 8, True, 1.0, ids.astype(np.int32), w)


# ----------------------------------------------------------------------------- shared experts


def test_shared_experts_ride_along_in_the_routed_call(rt):
    """On the CPU path the shared experts are a one-expert layer of the native engine that
    the routed experts' call computes too: exactly routed + shared as two calls and an add
    would give, and to float rounding what three native linears and torch's SiLU give."""
    from hybrid.backends.native import QuantLinear
    from hybrid.models.deepseek2 import MoE

    moes = [(i, b.ffn) for i, b in enumerate(rt.model.blocks) if isinstance(b.ffn, MoE)]
    assert moes and all(m.shared is None and m.experts.shared_layer >= 0 for _, m in moes)
    g, gen = rt.gguf, torch.Generator().manual_seed(3)
    T, E, K = 5, rt.args.n_expert, rt.args.n_expert_used
    x = torch.randn(T, rt.args.dim, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=gen)
    for il, m in moes:
        eng, ex = m.experts.engine, m.experts
        with torch.inference_mode():   # as the runtime calls the model
            both = ex(x, ids, w)                                               # one native call
            staged = eng.forward(ex.layer, x, ids.int(), w, ex.shared_layer)   # staged path
            routed = eng.forward(ex.layer, x, ids, w)
            shared = eng.forward(ex.shared_layer, x, torch.zeros(T, 1, dtype=torch.long),
                                 torch.ones(T, 1))
            lin = {k: QuantLinear(g.view(f"blk.{il}.ffn_{k}_shexp.weight"),
                                  g.tensors[f"blk.{il}.ffn_{k}_shexp.weight"].ggml_type,
                                  g.tensors[f"blk.{il}.ffn_{k}_shexp.weight"].ne[0], 2)
                   for k in ("gate", "up", "down")}
            want = lin["down"](torch.nn.functional.silu(lin["gate"](x)) * lin["up"](x))
        assert torch.equal(both, routed + shared) and torch.equal(staged, both)
        np.testing.assert_allclose(shared.numpy(), want.numpy(), rtol=0,
                                   atol=1e-5 * float(want.abs().max()))


def test_embedding_rows_come_from_the_native_dequantizer_exactly(rt):
    from hybrid.backends import dequant

    e = rt.model.embed
    ids = torch.tensor([0, 3, rt.n_vocab - 1, 3])
    want = dequant.dequantize(e.view[ids.numpy()], e.ggml_type, e.n_per_row, device="cpu")
    got = e(ids)
    assert got.shape == (4, rt.args.dim) and torch.equal(got, want)
