"""The GQA-family architectures on every engine path deepseek2 has: NUMA placements, the GPU
half run with the CPU as the device (overlapped experts, the fixed-shape decode step CUDA
graphs capture, hot experts from the Plan, the prefill offload), the native one-call
attention against the torch path, and the shared expert's sigmoid gate (qwen2moe) on the
overlapped path. The reference is the same file on the plain CPU path (whose logits
tests/test_gqa_models.py checks against llama.cpp)."""

import numpy as np
import pytest

import hybrid
from hybrid.runtime.loader import MinimalPlan

import hybrid._native  # noqa: E402,F401  (built with the package: missing must fail)

TOKENS = [5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 120, 9, 31, 77]
ARCHS = ("qwen3moe", "qwen2moe", "llama", "glm4moe")


def _cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module", params=ARCHS)
def model(request, gqa_gguf):
    path = gqa_gguf(request.param, "Q4_K_M")
    with hybrid.load(path, device="cpu", threads=2, ctx=64) as r:
        return request.param, path, r.logits(TOKENS), r.decode_logits(TOKENS)


@pytest.mark.parametrize("mode,parts", [("interleave", None), ("distribute", 2), ("replicate", 2)])
def test_numa_modes_give_the_logits_of_off(model, mode, parts):
    _, path, full, _ = model
    with hybrid.load(path, device="cpu", threads=2, ctx=64, numa=mode, numa_partitions=parts) as r:
        np.testing.assert_array_equal(r.logits(TOKENS), full)


def test_gpu_path_on_cpu_equals_the_cpu_path(model):
    from hybrid.backends.gpu import OverlappedExperts

    _, path, full, step = model
    with hybrid.load(path, device="cpu", threads=2, ctx=64, gpu_paths=True) as r:
        moe = [b.ffn.experts for b in r.model.blocks if hasattr(b.ffn, "experts")]
        assert moe and all(isinstance(e, OverlappedExperts) for e in moe)
        np.testing.assert_array_equal(r.logits(TOKENS), full)
        np.testing.assert_array_equal(r.decode_logits(TOKENS), step)


def test_static_decode_equals_eager(model):
    """The segmented fixed-shape step (KV cache written at tensor positions, read up to a
    bucket under a mask) that CUDA graphs capture, run eagerly."""
    _, path, _, step = model
    with hybrid.load(path, device="cpu", threads=2, ctx=64, gpu_paths=True,
                     decode_graphs="static") as r:
        assert r.decoder is not None and r.decoder.mode == "static"
        got = r.decode_logits(TOKENS)
    # the static step attends in torch, the eager step natively: activation rounding differs
    assert _cos(got, step).min() >= 0.9995
    assert (got.argmax(-1) == step.argmax(-1)).mean() >= 0.9


def test_hot_experts_run_in_torch_and_the_engine_skips_them(model):
    _, path, full, _ = model
    with hybrid.load(path, device="cpu", threads=2, ctx=64) as r:
        moe = [il for il, b in enumerate(r.model.blocks) if hasattr(b.ffn, "experts")]
        E = r.args.n_expert
    hot = [list(range(0, E, 3)) if il in moe else [] for il in range(max(moe) + 1)]
    plan = MinimalPlan(kv_cache_tokens=64, gpu_experts=hot)
    with hybrid.load(path, threads=2, plan=plan, gpu_paths=True, decode_graphs="off") as r:
        assert r.loader.stats["gpu_hot_experts"] == sum(len(h) for h in hot)
        got = r.logits(TOKENS)
    # bf16 copies of the hot experts: close to the all-CPU result at every position; with one
    # of them never computed the minimum falls far below
    assert _cos(got, full).min() >= 0.999


def test_prefill_offload_equals_the_engine(model):
    """Chunks of at least gpu_prefill_tokens stream each MoE layer's experts to the device
    and compute them there (bf16): close to the engine's result everywhere."""
    _, path, full, _ = model
    with hybrid.load(path, device="cpu", threads=2, ctx=64, gpu_paths=True, decode_graphs="off",
                     gpu_prefill_tokens=8) as r:
        assert r.loader.offload is not None
        got = r.logits(TOKENS)
    assert _cos(got, full).min() >= 0.999


def test_native_attention_is_used_and_equals_torch(model, monkeypatch):
    from hybrid.backends.native import NativeGQA

    _, path, _, step = model
    with hybrid.load(path, device="cpu", threads=2, ctx=64) as r:
        assert all(isinstance(b.attn.fused, NativeGQA) for b in r.model.blocks)
    monkeypatch.setattr(NativeGQA, "build", classmethod(lambda cls, attn, workers: None))
    with hybrid.load(path, device="cpu", threads=2, ctx=64) as r:
        assert all(b.attn.fused is None for b in r.model.blocks)
        torch_step = r.decode_logits(TOKENS)
    assert _cos(torch_step, step).min() >= 0.9995
