"""The fused GPU kernels (hybrid.backends.qmatvec) run by Triton's interpreter on the CPU.

Not collected by a plain pytest run: tests/test_qmatvec.py runs this file in a child process
with TRITON_INTERPRET=1, which must be set before Triton is first imported (the interpreter
replaces triton.language's functions at import). References are independent of the kernel:
gguf-py's dequantization in float64 for the kernel; the bf16/f32 TorchExperts and the
unfused row-block path for the callers.
"""

import os

import numpy as np
import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_qmatvec.py"

import gguf  # noqa: E402

from hybrid.backends import dequant as dq  # noqa: E402
from hybrid.backends import gpu, qmatvec  # noqa: E402
from hybrid.backends.torch_experts import TorchExperts  # noqa: E402
from quantdata import random_rows  # noqa: E402

FUSED = [dq.Q8_0, dq.Q4_K, dq.Q5_K, dq.Q6_K]


def _ref_matrix(raw: np.ndarray, t: int) -> np.ndarray:
    """gguf-py's dequantization (float64): not the code under test."""
    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t))
    return np.asarray(out, dtype=np.float64).reshape(raw.shape[0], -1)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_interpreter_runs_the_kernels():
    """Each type passes the check its first use runs (gpu._check_fused)."""
    assert qmatvec.available("cpu")
    assert all(gpu.fused_ok(t, "cpu") for t in FUSED) and not gpu.fused_ok(dq.IQ2_XXS, "cpu")
    assert all(gpu._fused_checked[(t, "cpu")] is True for t in FUSED)


@pytest.mark.parametrize("t", FUSED, ids=[dq.TYPE_NAMES[t] for t in FUSED])
def test_slots_match_gguf_py(t):
    """out[s] = W[eids[s]] @ x[xrows[s]]: matrices picked per slot, rows read in any order,
    a slot of expert -1 all zeros, N not a multiple of the kernel's row block."""
    rng = np.random.default_rng(t)
    E, N, D = 3, 45, 512
    raw = np.stack([random_rows(t, N, D, rng) for _ in range(E)])              # [E, N, rb]
    x = torch.randn(5, D)
    eids = torch.tensor([2, -1, 0, 1, 2, 0], dtype=torch.int32)
    xrows = torch.tensor([0, 1, 4, 3, 2, 0], dtype=torch.int32)
    out = qmatvec.qmatvec(torch.from_numpy(raw), t, D, x, eids, xrows)
    for s in range(6):
        e = int(eids[s])
        if e < 0:
            assert (out[s] == 0).all()
            continue
        want = _ref_matrix(raw[e], t) @ x[int(xrows[s])].double().numpy()
        assert _rel(out[s], want) < 2e-6, (s, _rel(out[s], want))


@pytest.mark.parametrize("t, D", [(dq.Q8_0, 288), (dq.Q4_K, 768), (dq.Q6_K, 256)])
def test_one_matrix_rows_of_x(t, D):
    """No ids: slot s is row s of x times the one matrix (DequantLinear); Q8_0 rows need not
    be whole 256s."""
    rng = np.random.default_rng(D)
    raw = random_rows(t, 70, D, rng)
    x = torch.randn(7, D, dtype=torch.bfloat16)
    out = qmatvec.qmatvec(torch.from_numpy(raw), t, D, x)
    want = x.double().numpy() @ _ref_matrix(raw, t).T
    assert out.shape == (7, 70) and _rel(out, want) < 2e-6


def _experts(types, E=5, F=256, D=256, seed=0):
    rng = np.random.default_rng(seed)
    g = random_rows(types[0], E * F, D, rng).reshape(E, F, -1)
    u = random_rows(types[1], E * F, D, rng).reshape(E, F, -1)
    d = random_rows(types[2], E * D, F, rng).reshape(E, D, -1)
    blocks = [torch.from_numpy(m) for m in (g, u, d)]
    dense = [dq.dequantize(m.reshape(-1, m.shape[-1]), t).view(E, m.shape[1], -1)
             for m, t in zip((g, u, d), types)]
    return blocks, TorchExperts(*dense)


@pytest.mark.parametrize("types", [(dq.Q4_K, dq.Q4_K, dq.Q6_K), (dq.Q5_K, dq.Q8_0, dq.Q4_K)])
def test_quant_experts_equal_the_float_experts(types):
    """Hot experts in their blocks: decode (fused slots), the graphs' static step, and a chunk
    long enough that the busiest expert is dequantized in row blocks while the others run
    fused."""
    blocks, ref = _experts(types)
    qe = gpu.QuantExperts(*blocks, types, dtype=torch.float32, block_weights=1 << 15)
    assert qe.fused
    rng = torch.Generator().manual_seed(0)
    for T in (1, 3, gpu.FUSED_MAX_TOKENS + 3):
        ids = torch.randint(-1, 5, (T, 2), generator=rng)
        if T > gpu.FUSED_MAX_TOKENS:
            ids[:, 0] = 2                                  # expert 2: more tokens than fused
            ids[:, 1] = torch.where(ids[:, 1] == 2, 3, ids[:, 1])
        w = torch.rand(T, 2, generator=rng)
        x = torch.randn(T, 256, generator=rng)
        want = ref(x, ids, w)
        got = qe(x, ids, w, host_ids=ids)
        assert _rel(got, want) < 1e-5, (T, _rel(got, want))
        if T <= gpu.FUSED_MAX_TOKENS:
            assert _rel(qe.static(x, ids, w), want) < 1e-5


def test_dequant_linear_fused_and_row_blocks_agree():
    raw = random_rows(dq.Q4_K, 96, 512, np.random.default_rng(3))
    lin = gpu.DequantLinear(raw, dq.Q4_K, 512, "cpu", dtype=torch.float32, block_weights=1 << 14)
    assert lin.fused and lin.rows_per_block == 32
    want = _ref_matrix(raw, dq.Q4_K)
    for T in (1, gpu.FUSED_MAX_TOKENS, gpu.FUSED_MAX_TOKENS + 1):   # fused, fused, row blocks
        x = torch.randn(T, 512)
        assert _rel(lin(x), x.double().numpy() @ want.T) < 2e-6, T
    x3 = torch.randn(2, 3, 512)
    assert lin(x3).shape == (2, 3, 96)


def test_a_stand_in_run_with_fused_hot_experts_and_weights_matches_the_cpu(tiny_gguf, monkeypatch):
    """The whole GPU path with the CPU standing in and the fused kernels on: quantized GPU
    weights and quantized hot experts (some hot, not all: the CPU engine computes the rest)
    give the logits of the plain CPU run."""
    import hybrid
    from hybrid.runtime.loader import CpuStandIn
    from test_plan_allocation import TOKENS, _gpu_plan

    calls = {"experts": 0, "linears": 0}
    real = gpu._qmatvec

    def counting(w, *a, **kw):
        calls["experts" if w.dim() == 3 else "linears"] += 1
        return real(w, *a, **kw)

    monkeypatch.setattr(gpu, "_qmatvec", counting)
    q4 = tiny_gguf("Q4_K_M")
    _, plan = _gpu_plan(q4, "quantized", "quantized")
    toks = TOKENS[:5]                   # below the plan's GPU prefill (8): hot experts fused
    with hybrid.load(q4, threads=2, plan=CpuStandIn(plan), gpu_paths=True, prefill_chunk=16,
                     gpu_prefill_chunk=8, decode_graphs="static") as r:
        got = r.logits(toks)
        assert r.loader.offload is None or r.loader.offload.calls == 0
    with hybrid.load(q4, device="cpu", threads=2, ctx=64) as r:
        ref = r.logits(toks)
    assert calls["experts"] > 0 and calls["linears"] > 0, calls
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.999 and (got.argmax(-1) == ref.argmax(-1)).all()
