"""The native causal attention of prompt chunks (native/flash.h, issue 15): every ISA's kernel
against a float64 softmax written out here, the strided inputs the models hand it (GQA cache
rows, MLA's two key parts), the argument checks, and whole models with and without it.

Bound: the output of a query is a convex combination of value rows; the kernels sum in float
(the SIMD ones in another order, with a polynomial exp within 2 ulp), so each output is within
ATOL_REL x max|v| of the float64 result (measured worst ~1e-6 relative on these shapes).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hybrid
from hybrid import _native

ATOL_REL = 4e-6
ISAS = _native.available_isas()


def _reference(q, k, v, scale, pos0, q_rope=None, k_rope=None):
    """float64 causal softmax attention, query head h on kv head h // G; k / k_rope with one
    head serve every head."""
    T, H, _ = q.shape
    Hkv, S, _ = v.shape
    G = H // Hkv
    out = torch.empty(T, H, v.shape[2], dtype=torch.float64)
    seen = torch.arange(S)[None, :] <= (torch.arange(T)[:, None] + pos0)
    for h in range(H):
        g = h // G
        s = q[:, h].double() @ k[g % k.shape[0]].double().T
        if q_rope is not None:
            s = s + q_rope[:, h].double() @ k_rope[g % k_rope.shape[0]].double().T
        s = (s * scale).masked_fill(~seen, -math.inf)
        out[:, h] = torch.softmax(s, -1) @ v[g].double()
    return out


def _flash(q, k, v, scale, pos0, q_rope=None, k_rope=None, threads=2, out=None):
    if out is None:
        out = torch.empty(q.shape[0], q.shape[1], v.shape[2])
    _native.flash_attention(q.numpy(), k.numpy(), v.numpy(), out.numpy(), scale, pos0,
                            q_rope=None if q_rope is None else q_rope.numpy(),
                            k_rope=None if k_rope is None else k_rope.numpy(), threads=threads)
    return out


@pytest.fixture(params=ISAS)
def isa(request):
    before = _native.isa()
    _native.set_isa(request.param)
    yield request.param
    _native.set_isa(before)


# T, H, Hkv, Dk, R (second key part, 0: none), Dv, pos0, extra keys past the chunk
SHAPES = [
    (1, 2, 2, 16, 0, 16, 0, 0),
    (2, 4, 1, 32, 0, 8, 0, 0),         # MQA, T = 2
    (7, 8, 2, 24, 0, 20, 5, 3),        # value dims 16 + 4: a one-vector tile and scalar columns
    (47, 2, 2, 16, 8, 16, 0, 0),       # one row short of an item
    (48, 3, 3, 40, 16, 32, 10, 1),     # exactly one item of rows
    (49, 4, 4, 64, 32, 64, 0, 0),      # one row past
    (64, 16, 2, 32, 0, 36, 100, 0),    # G = 8: items of 6 tokens x 8 heads
    (97, 4, 4, 128, 64, 128, 1, 0),    # MLA's head shape, key tails, a 64-key step and then some
    (130, 2, 1, 48, 0, 40, 200, 5),    # long cached prefix: every key block before the diagonal
    (513, 2, 2, 16, 16, 16, 0, 0),
]


@pytest.mark.parametrize("T,H,Hkv,Dk,R,Dv,pos0,extra", SHAPES)
def test_flash_equals_a_float64_softmax(isa, T, H, Hkv, Dk, R, Dv, pos0, extra):
    g = torch.Generator().manual_seed(T * 1000 + H * 10 + pos0)
    S = pos0 + T + extra
    q, k, v = torch.randn(T, H, Dk, generator=g), torch.randn(Hkv, S, Dk, generator=g), torch.randn(Hkv, S, Dv, generator=g)
    qr = kr = None
    if R:
        qr, kr = torch.randn(T, H, R, generator=g), torch.randn(1, S, R, generator=g)   # shared by every head
    scale = 1.0 / math.sqrt(Dk + R)
    got = _flash(q, k, v, scale, pos0, qr, kr)
    want = _reference(q, k, v, scale, pos0, qr, kr)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=0, atol=ATOL_REL * v.abs().max().item())


def test_flash_peaked_softmax_and_large_scores(isa):
    """Scores up to ~+-300 (a few keys take all the weight, the rest underflow to 0): no inf or
    NaN, and the result still the float64 one."""
    g = torch.Generator().manual_seed(3)
    T, H, S = 100, 2, 100
    q, k = torch.randn(T, H, 32, generator=g) * 3, torch.randn(H, S, 32, generator=g) * 3
    v = torch.randn(H, S, 16, generator=g) * 1000
    got = _flash(q, k, v, 1.0, 0)
    assert torch.isfinite(got).all()
    want = _reference(q, k, v, 1.0, 0)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=0, atol=ATOL_REL * v.abs().max().item())


def test_flash_reads_strided_views_and_writes_only_its_outputs(isa):
    """What the models pass: GQA's cache rows [S, Hkv, Dk] seen as [Hkv, S, Dk], queries sliced
    out of a wider projection, MLA's rope dims as [1, S, R] rows of the latent cache, and an
    output view inside a larger buffer whose other elements must stay untouched."""
    g = torch.Generator().manual_seed(4)
    T, H, Hkv, Dk, R, Dv, pos0 = 60, 4, 2, 32, 16, 24, 7
    S = pos0 + T
    qkv = torch.randn(T, H, Dk + R + 5, generator=g)
    q, qr = qkv[:, :, :Dk], qkv[:, :, Dk:Dk + R]
    k_cache, v_cache = torch.randn(S + 3, Hkv, Dk, generator=g), torch.randn(S + 3, Hkv, Dv, generator=g)
    latent = torch.randn(S, 50 + R, generator=g)
    kr = latent[:, 50:].unsqueeze(0)
    k, v = k_cache[:S].transpose(0, 1), v_cache[:S].transpose(0, 1)
    big = torch.full((T, H + 1, Dv + 4), 7.0)
    out = big[:, 1:, 2:2 + Dv]
    _flash(q, k, v, 0.2, pos0, qr, kr, out=out)
    want = _reference(q, k, v, 0.2, pos0, qr, kr)
    np.testing.assert_allclose(out.double().numpy(), want.numpy(), rtol=0, atol=ATOL_REL * v.abs().max().item())
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[:, 1:, 2:2 + Dv] = False
    assert (big[mask] == 7.0).all(), "elements outside the output view were written"


def test_flash_result_does_not_depend_on_the_thread_count(isa):
    g = torch.Generator().manual_seed(5)
    T, H, S = 150, 6, 150
    q, k, v = torch.randn(T, H, 32, generator=g), torch.randn(3, S, 32, generator=g), torch.randn(3, S, 32, generator=g)
    one = _flash(q, k, v, 0.2, 0, threads=1)
    two = _flash(q, k, v, 0.2, 0, threads=2)
    assert torch.equal(one, two)


def _args(T=4, H=2, Hkv=2, Dk=8, Dv=8, S=4):
    return (torch.randn(T, H, Dk), torch.randn(Hkv, S, Dk), torch.randn(Hkv, S, Dv), torch.empty(T, H, Dv))


@pytest.mark.parametrize("case,match", [
    ("short-cache", "cache holds 4 keys"),
    ("heads", "3 heads, v 2: the query heads must be a positive multiple"),
    ("k-dims", "k: expected"),
    ("out-shape", "out: expected"),
    ("rope-alone", "come together"),
    ("float64", "float32"),
    ("strided-last", "last dim must be contiguous"),
    ("read-only-out", "writable"),
])
def test_flash_rejects_bad_arguments_by_name(case, match):
    q, k, v, out = _args()
    kw = {}
    pos0 = 0
    if case == "short-cache":
        pos0 = 1
    elif case == "heads":
        q, out = torch.randn(4, 3, 8), torch.empty(4, 3, 8)
    elif case == "k-dims":
        k = torch.randn(2, 4, 6)
    elif case == "out-shape":
        out = torch.empty(4, 2, 9)
    elif case == "rope-alone":
        kw["q_rope"] = torch.randn(4, 2, 4).numpy()
    elif case == "float64":
        q = q.double()
    elif case == "strided-last":
        q = torch.randn(4, 2, 16)[:, :, ::2]
    arrays = [q.numpy(), k.numpy(), v.numpy(), out.numpy()]
    if case == "read-only-out":
        arrays[3].flags.writeable = False
    with pytest.raises(ValueError, match=match):
        _native.flash_attention(*arrays, 0.5, pos0, **kw)


@pytest.fixture(scope="module")
def mla_runtime(tiny_gguf):
    # 12 heads: a decompressed chunk expands them in groups of 2 (models.args.mla_expand_heads)
    with hybrid.load(tiny_gguf("Q8_0", n_head=12), device="cpu", threads=2, ctx=256) as rt:
        yield rt


@pytest.fixture(scope="module")
def gqa_runtime(gqa_gguf):
    with hybrid.load(gqa_gguf("qwen3moe", "Q8_0"), device="cpu", threads=2, ctx=256) as rt:
        yield rt


@pytest.mark.parametrize("which,method", [("mla", "_decompressed"), ("gqa", "_attend")])
def test_models_hand_the_native_attention_what_their_torch_path_reads(which, method, request):
    """A prompt in chunks of 60 (later chunks attend to a cached prefix): each block's
    attention step runs with the native causal attention and again with the torch path the
    block falls back to, on the same inputs; the two agree to float rounding. (Compared per
    step, not by logits: in a Q8_0 model a 1e-6 difference can flip an activation's rounding
    and then a router's choice.)"""
    rt = request.getfixturevalue(f"{which}_runtime")
    blocks = [b.attn for b in rt.model.blocks]
    assert all(a.causal is not None for a in blocks), "the loader gave no native causal attention"
    native_calls, steps = [], []

    class Spy:
        def __init__(self, fn):
            self.fn, self.accepts = fn, fn.accepts

        def __call__(self, *a, **k):
            native_calls.append(1)
            return self.fn(*a, **k)

    def both_paths(attn, fn):
        def step(*a, **k):
            got = fn(*a, **k)
            causal, attn.causal = attn.causal, None
            try:
                want = fn(*a, **k)
            finally:
                attn.causal = causal
            steps.append((k.get("pos0"), got.shape[0], ((got - want).abs().max() / want.abs().max()).item()))
            return got
        return step

    saved = [(a.causal, a.__dict__.get(method)) for a in blocks]
    step = rt.prefill_chunk
    try:
        for a in blocks:
            a.causal = Spy(a.causal)
            setattr(a, method, both_paths(a, getattr(a, method)))
        rt.model.attn_mode = "decompress"
        rt.prefill_chunk = 60
        rt.logits(np.random.default_rng(7).integers(0, rt.n_vocab, 150).tolist())
    finally:
        rt.model.attn_mode = "auto"
        rt.prefill_chunk = step
        for a, (c, m) in zip(blocks, saved):
            a.causal = c
            a.__dict__.pop(method, None)
    from hybrid.models.args import mla_expand_heads

    H = rt.args.n_head
    per_step = -(-H // mla_expand_heads(H)) if which == "mla" else 1   # MLA: one call per head group
    assert len(steps) == 3 * len(blocks) and len(native_calls) == per_step * len(steps)
    assert sorted({p for p, _, _ in steps}) == [0, 60, 120]
    worst = max(d for _, _, d in steps)
    assert worst < 1e-5, steps


def test_decompressed_chunks_expand_one_head_group_at_a_time(mla_runtime, monkeypatch):
    """The K / V expansion of a decompressed chunk never holds more heads than the Plan's
    workspace counts (models.args.mla_expand_heads of them), and that workspace covers it."""
    from hybrid.models.args import mla_expand_heads

    rt = mla_runtime
    a, H = rt.args, rt.args.n_head
    seen = []
    matmul = torch.matmul

    def spy(x, y, *rest, **kw):
        out = matmul(x, y, *rest, **kw)
        if out.dim() == 3 and out.shape[0] <= H and out.shape[2] in (a.qk_nope_dim, a.v_head_dim):
            seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    rt.model.attn_mode = "decompress"
    try:
        rt.logits(np.random.default_rng(8).integers(0, rt.n_vocab, 100).tolist())
    finally:
        rt.model.attn_mode = "auto"
    group = mla_expand_heads(H)
    assert 1 < group < H and seen, (group, seen)
    assert max(s[0] for s in seen) == group
    per_position = group * (a.qk_nope_dim + a.qk_rope_dim + a.v_head_dim) * 4
    assert rt.plan.reserves["workspace"]["attention_expansion"] >= per_position * max(s[1] for s in seen)
