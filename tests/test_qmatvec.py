"""Hot experts and GPU weights kept in their GGUF blocks (issue 18): the fused Triton kernels
(hybrid.backends.qmatvec) under Triton's interpreter in a child process, the unfused path
the CPU stand-in takes, and the choice between them."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hybrid.backends import dequant as dq
from hybrid.backends import gpu, qmatvec
from hybrid.backends.torch_experts import TorchExperts
from quantdata import random_rows

TESTS = Path(__file__).parent


def test_fused_kernels_under_the_triton_interpreter(fixture_cache):
    """tests/interp_qmatvec.py with TRITON_INTERPRET=1 (it has to be set before Triton is
    imported, so not in this process): the kernels against gguf-py, QuantExperts and
    DequantLinear through them, a stand-in run with them on. The child imports the hybrid
    this process does (subproc.hybrid_env) and shares its fixtures."""
    from subproc import NEUTRAL_CWD, hybrid_env

    pytest.importorskip("triton")   # a test dependency (pyproject [test]): present in CI
    env = hybrid_env(TRITON_INTERPRET="1", HYBRID_FIXTURE_CACHE=str(fixture_cache))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        str(TESTS / "interp_qmatvec.py")], env=env, capture_output=True, text=True,
                       timeout=600, cwd=NEUTRAL_CWD)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail, tail


def _experts(types, E=4, F=256, D=256, seed=0):
    rng = np.random.default_rng(seed)
    g = random_rows(types[0], E * F, D, rng).reshape(E, F, -1)
    u = random_rows(types[1], E * F, D, rng).reshape(E, F, -1)
    d = random_rows(types[2], E * D, F, rng).reshape(E, D, -1)
    dense = [dq.dequantize(m.reshape(-1, m.shape[-1]), t).view(E, m.shape[1], -1)
             for m, t in zip((g, u, d), types)]
    return [torch.from_numpy(m) for m in (g, u, d)], TorchExperts(*dense)


@pytest.mark.parametrize("types", [(dq.Q4_K, dq.Q4_K, dq.Q6_K), (dq.IQ2_XXS, dq.IQ2_XXS, dq.Q2_K)])
def test_quant_experts_without_the_fused_kernel(types):
    """The CPU stand-in's path (and CUDA without Triton): by expert in row blocks, or slot by
    slot in the static step; slots whose expert is not hot (-1) add nothing."""
    blocks, ref = _experts(types)
    qe = gpu.QuantExperts(*blocks, types, dtype=torch.float32, block_weights=1 << 14)
    assert not qe.fused and qe.rpb == (64, 64)
    assert qe.nbytes == sum(b.numel() for b in blocks)
    g = torch.Generator().manual_seed(1)
    for T in (1, 5, gpu.FUSED_MAX_TOKENS + 4):
        ids = torch.randint(-1, 4, (T, 3), generator=g)
        w = torch.rand(T, 3, generator=g)
        x = torch.randn(T, 256, generator=g)
        want = ref(x, ids, w)
        for got in (qe(x, ids, w), qe(x, ids, w, host_ids=ids.clone()), qe.static(x, ids, w)):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    none = torch.full((2, 3), -1)
    assert (qe.static(torch.randn(2, 256), none, torch.rand(2, 3)) == 0).all()


def test_fused_kernels_are_chosen_by_type_and_device(monkeypatch, caplog):
    assert qmatvec.FUSED_TYPES == {dq.Q8_0, dq.Q4_K, dq.Q5_K, dq.Q6_K}
    assert not gpu.fused_ok(dq.Q4_K, "cpu")          # no interpreter in this process
    # a CUDA device without Triton: unfused, said once in the log
    monkeypatch.setattr(qmatvec, "triton", None)
    monkeypatch.setattr(gpu, "_warned_no_triton", set())
    with caplog.at_level(logging.WARNING, logger="hybrid.backends.gpu"):
        assert not gpu.fused_ok(dq.Q4_K, "cuda") and not gpu.fused_ok(dq.Q6_K, "cuda")
    assert sum("Triton is not installed" in r.message for r in caplog.records) == 1
    assert not gpu.fused_ok(dq.IQ2_XXS, "cuda")
    with pytest.raises(RuntimeError, match="no Triton"):
        qmatvec.qmatvec(torch.zeros(4, 144, dtype=torch.uint8), dq.Q4_K, 256, torch.zeros(1, 256))


def test_quant_experts_from_gguf_hold_the_file_bytes(tiny_gguf):
    from hybrid.gguf_file import GGUFFile

    g = GGUFFile(tiny_gguf("Q4_K_M"))
    layer = next(int(n.split(".")[1]) for n in g.tensors if n.endswith("ffn_gate_exps.weight"))
    hot = [0, 2]
    qe = gpu.QuantExperts.from_gguf(g, layer, "cpu", hot)
    ref = TorchExperts.from_gguf(g, layer, dtype=torch.float32, experts=hot)
    per_expert = sum(g.tensors[f"blk.{layer}.ffn_{k}_exps.weight"].n_bytes // g.tensors[
        f"blk.{layer}.ffn_{k}_exps.weight"].shape[0] for k in ("gate", "up", "down"))
    assert qe.nbytes == len(hot) * per_expert
    x, ids, w = torch.randn(3, qe.d_model), torch.tensor([[0, 1], [1, -1], [0, 0]]), torch.rand(3, 2)
    want = ref(x, ids, w)
    assert torch.allclose(qe(x, ids, w), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available() or qmatvec.triton is None,
                    reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("t", sorted(qmatvec.FUSED_TYPES))
def test_cuda_fused_kernel_matches_dequantize_then_matmul(t):
    rng = np.random.default_rng(t)
    raw = np.stack([random_rows(t, 200, 1024, rng) for _ in range(3)])
    w = torch.from_numpy(raw).cuda()
    x = torch.randn(4, 1024, device="cuda")
    eids = torch.tensor([1, -1, 2, 0, 1], dtype=torch.int32, device="cuda")
    rows = torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32, device="cuda")
    out = qmatvec.qmatvec(w, t, 1024, x, eids, rows)
    for s in range(5):
        e = int(eids[s])
        want = (dq.dequantize(w[e], t) @ x[int(rows[s])]) if e >= 0 else torch.zeros(200, device="cuda")
        assert torch.allclose(out[s], want, rtol=1e-4, atol=1e-4 * max(want.abs().max().item(), 1e-6))


@pytest.mark.skipif(not torch.cuda.is_available() or qmatvec.triton is None,
                    reason="needs a CUDA GPU and Triton")
def test_cuda_quant_experts_static_step_captures_in_a_graph():
    types = (dq.Q4_K, dq.Q4_K, dq.Q6_K)
    blocks, ref = _experts(types)
    qe = gpu.QuantExperts(*[b.cuda() for b in blocks], types)
    assert qe.fused
    x = torch.randn(1, 256, device="cuda")
    ids = torch.tensor([[0, -1, 3]], device="cuda")
    w = torch.rand(1, 3, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        qe.static(x, ids, w)                                # warm-up (Triton compiles here)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = qe.static(x, ids, w)
    for e in ([[1, 2, -1]], [[3, 3, 0]]):
        ids.copy_(torch.tensor(e))
        graph.replay()
        torch.cuda.synchronize()
        want = TorchExperts(ref.gate.cuda(), ref.up.cuda(), ref.down.cuda())(x, ids, w)
        assert torch.allclose(y, want, rtol=1e-3, atol=1e-3 * want.abs().max().item()), e


@pytest.mark.parametrize("broken", ["raises", "wrong"])
def test_a_fused_kernel_failing_its_check_is_turned_off(monkeypatch, caplog, broken):
    """A Triton that cannot compile the kernel on this GPU, or compiles it wrong: the first
    use checks it against dequantize-then-matmul, turns it off and says why, once."""
    def kernel(w, t, D, x, eids=None, xrows=None, out=None):
        if broken == "raises":
            raise RuntimeError("PassManager::run failed")
        return torch.ones(x.shape[0] if eids is None else eids.shape[0], w.shape[-2])

    monkeypatch.setattr(qmatvec, "available", lambda device: True)
    monkeypatch.setattr(qmatvec, "qmatvec", kernel)
    monkeypatch.setattr(gpu, "_fused_checked", {})
    with caplog.at_level(logging.WARNING, logger="hybrid.backends.gpu"):
        assert not gpu.fused_ok(dq.Q4_K, "cpu") and not gpu.fused_ok(dq.Q4_K, "cpu")
    why = [r.getMessage() for r in caplog.records]
    assert len(why) == 1 and "fused Q4_K kernel is off" in why[0]
    assert ("PassManager" in why[0]) if broken == "raises" else ("wrong results" in why[0])
    raw = random_rows(dq.Q4_K, 8, 256, np.random.default_rng(0))
    lin = gpu.DequantLinear(raw, dq.Q4_K, 256, "cpu", dtype=torch.float32)
    x = torch.randn(1, 256)
    assert not lin.fused and torch.allclose(lin(x), x @ dq.dequantize(raw, dq.Q4_K).t(), rtol=1e-4, atol=1e-3)
