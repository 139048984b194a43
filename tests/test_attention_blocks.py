"""Attention in query blocks (issue 18, defect 2): the Plan's workspace holds one block of
scores, heads x attn_query_block x keys; no attention path may build more at once, and blocking
must not change a result.

References are independent of the code under test: a float64 softmax written out here, and the
same model run with one block spanning the whole chunk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hybrid
from hybrid.models.layers import attend


def _reference(q, k, v, scale, pos0=None, mask=None):
    """float64 softmax attention, query head h on K/V head h // G, written out."""
    q, k, v = (t.double() for t in (q, k, v))
    Hq, T, _ = q.shape
    G = Hq // k.shape[0]
    k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    s = torch.einsum("htd,hsd->hts", q, k) * scale
    if pos0 is not None:
        seen = torch.arange(k.shape[1])[None, :] <= (torch.arange(T)[:, None] + pos0)
        s = s.masked_fill(~seen, float("-inf"))
    elif mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,hsd->htd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("T,pos0,block", [(1, 0, 64), (1, 30, 4), (5, 0, 2), (70, 0, 16), (70, 9, 64),
                                           (33, 17, 1), (64, 3, 64), (65, 3, 64)])
def test_attend_equals_a_float64_softmax(T, pos0, block):
    g = torch.Generator().manual_seed(T * 100 + pos0 + block)
    Hq, Hkv, Dk, Dv = 8, 2, 16, 12
    S = pos0 + T
    q = torch.randn(Hq, T, Dk, generator=g)
    k, v = torch.randn(Hkv, S, Dk, generator=g), torch.randn(Hkv, S, Dv, generator=g)
    got = attend(q, k, v, 0.25, block, pos0=pos0)
    np.testing.assert_allclose(got.numpy(), _reference(q, k, v, 0.25, pos0=pos0).numpy(), rtol=0, atol=2e-6)
    # the explicit-mask form (CUDA graphs) and no mask at all
    pos = torch.arange(T) + pos0
    mask = torch.arange(S)[None, :] <= pos[:, None]
    got = attend(q, k, v, 0.25, block, mask=mask)
    np.testing.assert_allclose(got.numpy(), _reference(q, k, v, 0.25, mask=mask).numpy(), rtol=0, atol=2e-6)
    got = attend(q, k, v, 0.25, block)
    np.testing.assert_allclose(got.numpy(), _reference(q, k, v, 0.25).numpy(), rtol=0, atol=2e-6)


def test_attend_takes_the_fused_kernels_output_layout(monkeypatch):
    """CUDA's flash / memory-efficient kernels return [1, H, n, D] over [1, n, H, D] memory
    (a transposed view): grouped query heads must still land on their own rows. Its first GPU
    run raised here ("view size is not compatible") for every GQA prefill block."""
    real = F.scaled_dot_product_attention

    def fused_layout(*a, **kw):
        o = real(*a, **kw)
        return o.transpose(1, 2).contiguous().transpose(1, 2)   # same values, the kernels' strides

    monkeypatch.setattr(F, "scaled_dot_product_attention", fused_layout)
    g = torch.Generator().manual_seed(5)
    Hq, Hkv, T, Dk, Dv = 8, 2, 20, 16, 12
    q = torch.randn(Hq, T, Dk, generator=g)
    k, v = torch.randn(Hkv, T, Dk, generator=g), torch.randn(Hkv, T, Dv, generator=g)
    for block in (1, 8, 64):
        got = attend(q, k, v, 0.25, block, pos0=0)
        np.testing.assert_allclose(got.numpy(), _reference(q, k, v, 0.25, pos0=0).numpy(), rtol=0, atol=2e-6)


class _Spy:
    """Wraps a function; keeps the shapes of its tensor arguments."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kw):
        self.calls.append([tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
        return self.fn(*args, **kw)


def test_attend_builds_at_most_one_block_of_scores_from_4d_inputs(monkeypatch):
    spy = _Spy(F.scaled_dot_product_attention)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    Hq, Hkv, T, S, block = 8, 2, 70, 100, 16
    q, k, v = torch.randn(Hq, T, 16), torch.randn(Hkv, S, 16), torch.randn(Hkv, S, 16)
    attend(q, k, v, 0.25, block, pos0=S - T)
    assert len(spy.calls) == 5                                      # ceil(70 / 16) blocks
    for qs, ks, vs, *_ in spy.calls:
        assert len(qs) == len(ks) == len(vs) == 4, "3-D inputs keep CUDA on the math kernel"
        assert qs[1] * qs[2] * ks[2] <= Hq * block * S, (qs, ks)  # scores of this call


def _blocks(rt):
    return [b.attn for b in rt.model.blocks]


def _run(rt, toks, block, mode):
    for a in _blocks(rt):
        a.query_block = block
    rt.model.attn_mode = mode
    try:
        return rt.logits(toks)
    finally:
        rt.model.attn_mode = "auto"


@pytest.fixture(scope="module")
def mla_runtime(tiny_gguf):
    # torch experts and torch linears: the blocked torch attention, not the fused native call
    with hybrid.load(tiny_gguf("F32"), device="cpu", threads=2, ctx=128, experts="torch",
                     cpu_linears="torch") as rt:
        yield rt


@pytest.mark.parametrize("mode", ["absorb", "decompress"])
def test_mla_blocks_bound_the_scores_and_change_nothing(mla_runtime, monkeypatch, mode):
    rt = mla_runtime
    toks = np.random.default_rng(5).integers(0, rt.n_vocab, 45).tolist()
    whole = _run(rt, toks, 1000, mode)
    soft, sdpa = _Spy(torch.softmax), _Spy(F.scaled_dot_product_attention)
    monkeypatch.setattr(torch, "softmax", soft)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    blocked = _run(rt, toks, 8, mode)
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=2e-5 * np.abs(whole).max())
    H, S = rt.args.n_head, len(toks)
    scores = [c[0] for c in soft.calls if len(c[0]) == 3] + [
        (c[0][1] * c[0][2], c[1][2]) for c in sdpa.calls]        # softmax [H, n, S]; SDPA rows x keys
    assert scores, "no attention scores were seen: the spy missed the path"
    for shape in scores:
        assert int(np.prod(shape)) <= H * 8 * S, shape


@pytest.fixture(scope="module")
def gqa_runtime(gqa_gguf):
    with hybrid.load(gqa_gguf("qwen3moe", "F32"), device="cpu", threads=2, ctx=128, experts="torch",
                     cpu_linears="torch") as rt:
        yield rt


def test_gqa_blocks_bound_the_scores_and_change_nothing(gqa_runtime, monkeypatch):
    rt = gqa_runtime
    toks = np.random.default_rng(6).integers(0, rt.n_vocab, 45).tolist()
    whole = _run(rt, toks, 1000, "auto")
    sdpa = _Spy(F.scaled_dot_product_attention)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    blocked = _run(rt, toks, 8, "auto")
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=2e-5 * np.abs(whole).max())
    H, S = rt.args.n_head, len(toks)
    assert sdpa.calls
    for qs, ks, *_ in sdpa.calls:
        assert len(qs) == 4 and qs[1] * qs[2] * ks[2] <= H * 8 * S, (qs, ks)


def test_the_loader_takes_the_block_from_the_plan(tiny_gguf):
    from placement import plan_for_gguf

    path = tiny_gguf("F32")
    plan = plan_for_gguf(str(path), ctx=128, cpu_only=True)
    plan.policy = dict(plan.policy, attn_query_block=5)
    with hybrid.load(path, device="cpu", threads=2, ctx=128, plan=plan, experts="torch") as rt:
        assert {a.query_block for a in _blocks(rt)} == {5}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_blocks_run_on_fused_kernels_within_one_block():
    """bf16 4-D blocks are accepted by the fused kernels alone (the math kernel excluded), and
    the peak stays near one block of scores, far below [H, T, S]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    Hq, Hkv, T, D, block = 32, 4, 4096, 128, 64
    q = torch.randn(Hq, T, D, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(Hkv, T, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        out = attend(q, k, v, D ** -0.5, block, pos0=0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= out.numel() * 2 + 2 * Hq * block * T * 4, peak        # output + one block, twice
    ref = _reference(q[:, -8:].float().cpu(), k.float().cpu(), v.float().cpu(), D ** -0.5, pos0=T - 8)
    np.testing.assert_allclose(out[:, -8:].float().cpu().numpy(), ref.numpy(), rtol=0, atol=2e-2)
