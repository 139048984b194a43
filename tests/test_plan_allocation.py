"""Plan = allocation (issue 18): what the loader places on the GPU matches what the solver
planned for it, per kind, within 5%.

No GPU here: the solver plans for a fake one (--gpu-mem on a hardware profile) sized so the
Plan spends VRAM on non-expert weights (bf16 or GGUF blocks), a hot-expert cache that holds
some experts but not all, the KV cache and GPU prefill's staging slots; the runtime loads
that Plan with the CPU standing in for the GPU (CpuStandIn, gpu_paths=True), through the GPU's
code paths, and its loader records the bytes placed per plan device (Loader.placed_bytes).
Workspaces, the CUDA context and the allocator slack live per forward or inside CUDA: only a
GPU can measure them (max_memory_allocated, issue 18's gpu-check kit)."""

import numpy as np
import pytest
import torch

import hybrid
from hybrid.runtime.loader import CpuStandIn
from placement.inventory import from_gguf
from placement.solver import (CPU_PREFILL_CHUNK, ENGINE_TOKEN_CHUNK, _fmt_bytes_of, dequant_workspace_bytes, hot_expert_bytes,
                              plan_for_gguf)

import hybrid._native  # noqa: E402,F401

TOKENS = [5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 120, 9]
WEIGHT_ROLES = ("attention", "dense_ffn", "shared_expert", "output", "router", "norm", "other")
KW = dict(profile="1x256g-24g", numa="off", ctx=64, prefill_chunk=16, gpu_prefill_chunk=8,
          gpu_prefill_tokens=8)


@pytest.fixture(scope="module")
def q4(tiny_gguf):
    return tiny_gguf("Q4_K_M")


def _gpu_plan(path, fmt, hot="bf16"):
    """A plan whose gpu0 holds the weights in `fmt`, hot experts in `hot`, GPU prefill at 8
    tokens, and room for a third of the routed experts (rounded down: some hot, not all)."""
    inv = from_gguf(path)
    base = plan_for_gguf(path, gpu_mem="48GiB", gpu_format=fmt, expert_cache=False, **KW)
    per_round = sum(hot_expert_bytes(inv, l, hot) for l in inv.moe_layers())
    ws = dequant_workspace_bytes() if hot == "quantized" and fmt != "quantized" else 0
    cap = base.devices["gpu0"].bytes + ws + per_round * (inv.model.n_expert // 3) + per_round // 2
    plan = plan_for_gguf(path, gpu_mem=str(cap), gpu_format=fmt, hot_format=hot, **KW)
    assert plan.fits and plan.gpu_weight_format == fmt and plan.gpu_prefill_tokens == 8
    assert plan.hot_expert_format == hot
    n_hot = [len(plan.gpu_experts[l]) for l in inv.moe_layers()]
    assert all(0 < n < inv.model.n_expert for n in n_hot), n_hot
    return inv, plan


def _planned_weights_by_format(inv, plan) -> dict:
    """The Plan's gpu0 weights split by the format it gave each tensor group."""
    from placement.inventory import tensor_group

    out = {}
    for t in inv.tensors:
        if t.role in ("routed_experts", "mtp", "embedding"):
            continue
        g = tensor_group(t.name)
        dev, fmt = plan.tensor_placement[g if g in plan.tensor_placement else t.role]
        if dev == "gpu0":
            out[fmt] = out.get(fmt, 0) + _fmt_bytes_of(t, fmt)
    return out


def _close(got, want, what):
    assert want > 0, f"{what}: the plan has none"
    assert abs(got - want) <= 0.05 * want, f"{what}: placed {got} B, planned {want} B"


@pytest.mark.parametrize("fmt, hot", [("bf16", "bf16"), ("quantized", "quantized"),
                                      ("bf16", "quantized")])
def test_placed_bytes_match_the_plan(q4, fmt, hot):
    inv, plan = _gpu_plan(q4, fmt, hot)
    g = plan.devices["gpu0"].breakdown
    with hybrid.load(q4, threads=2, plan=CpuStandIn(plan), gpu_paths=True, prefill_chunk=16,
                     gpu_prefill_chunk=8, decode_graphs="static") as r:
        assert r.loader.stand_in and r.loader.offload is not None
        placed = r.loader.placed_bytes["gpu0"]
        # the stand-in computes what the CPU path does (hot experts bf16 or blocks, prefill bf16)
        got = r.logits(TOKENS)
        assert r.loader.offload.calls > 0
    with hybrid.load(q4, device="cpu", threads=2, ctx=64) as r:
        ref = r.logits(TOKENS)
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.999 and (got.argmax(-1) == ref.argmax(-1)).all()

    # hot experts: bf16 copies or their GGUF blocks, planned at that size
    _close(placed.get("routed_experts", 0), g["routed_experts"], "hot experts")
    per_expert = sum(hot_expert_bytes(inv, l, hot) * len(plan.gpu_experts[l]) for l in inv.moe_layers())
    assert g["routed_experts"] == per_expert
    if hot == "quantized":   # the blocks are the file's bytes
        assert per_expert == sum(inv.expert_bytes(l) * len(plan.gpu_experts[l]) for l in inv.moe_layers())
        assert "dequant_workspace" in g
    _close(placed.get("kv_cache", 0), g["kv_cache"], "KV cache")
    _close(placed.get("prefill_staging", 0), g["prefill_staging"], "prefill staging")
    weights = {k.split(".", 1)[1]: v for k, v in placed.items() if k.startswith("weights.")}
    _close(sum(weights.values()), sum(g.get(k, 0) for k in WEIGHT_ROLES), "weights")
    want = _planned_weights_by_format(inv, plan)
    assert sum(want.values()) == sum(g.get(k, 0) for k in WEIGHT_ROLES)
    assert set(weights) == set(want), (weights, want)
    for k in want:
        _close(weights[k], want[k], f"weights held as {k}")
    if fmt == "quantized":
        assert weights["quantized"] > weights["bf16"]   # kv_b alone is bf16
    # and together: everything the loader placed on gpu0, against the same entries of the plan
    kinds = ("routed_experts", "kv_cache", "prefill_staging")
    _close(sum(weights.values()) + sum(placed[k] for k in kinds),
           sum(g.get(k, 0) for k in WEIGHT_ROLES + kinds), "gpu0 total")


def test_placed_bytes_of_a_cpu_run_have_no_gpu(q4):
    with hybrid.load(q4, device="cpu", threads=2, ctx=64) as r:
        placed, kv = r.loader.placed_bytes, r.cache.nbytes
    assert "gpu0" not in placed and placed["cpu"]["kv_cache"] == kv


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["bf16", "quantized"])
def test_cuda_allocated_after_load_matches_placed_and_plan(q4, fmt):
    """On a GPU: what torch holds after loading is what the loader recorded (plus the bridge
    and small tables) and what the Plan predicts (Plan.predicted_gpu_allocated), within 5%."""
    _, plan = _gpu_plan(q4, fmt, fmt)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with hybrid.load(q4, threads=2, plan=plan, prefill_chunk=16, gpu_prefill_chunk=8) as r:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        placed = sum(r.loader.placed_bytes["gpu0"].values())
    _close(held, placed, "allocated vs placed")
    _close(held, plan.predicted_gpu_allocated(), "allocated vs the Plan")


@pytest.mark.parametrize("where", ["cpu", "cpu, a prefill chunk over the engine's", "cpu, the plan's chunk",
                                   "stand-in"])
def test_expert_engine_buffers_are_the_plans(q4, where):
    """The expert engine's own buffers (I/O and a chunk's scratch: MoEEngine.buffer_bytes, read
    from its vectors) are the Plan's expert_io + expert_scratch, to the byte: on the CPU the
    FFNs the native linears take are one-expert layers of the engine, with a GPU the routed
    experts are alone; a prefill chunk longer than the engine's token chunk has I/O buffers for
    all its tokens, scratch for a chunk; with no chunk given, the runtime takes the one the
    solver chose and counted (CPU-only: CPU_PREFILL_CHUNK). (Where a one-expert layer is the
    widest: test_moe's buffer_bytes test and test_placement_archs' R1 plan.)"""
    assert ENGINE_TOKEN_CHUNK == hybrid._native.MoEEngine.token_chunk
    if where == "cpu, the plan's chunk":
        kw = dict(device="cpu", threads=2, ctx=4096)
    elif where.startswith("cpu"):
        chunk = 16 if where == "cpu" else ENGINE_TOKEN_CHUNK + 88
        kw = dict(device="cpu", threads=2, ctx=64, prefill_chunk=chunk)
    else:
        kw = dict(threads=2, plan=CpuStandIn(_gpu_plan(q4, "bf16")[1]), gpu_paths=True, prefill_chunk=16,
                  gpu_prefill_chunk=8, decode_graphs="static")
    with hybrid.load(q4, **kw) as r:
        r.logits(TOKENS[:5])   # under the GPU prefill's 8 tokens: the engine runs it
        eng = r.loader._engine._eng
        ffn_layers = eng.n_layers - len(from_gguf(q4).moe_layers())
        got, host = eng.buffer_bytes, r.plan.devices["cpu"].breakdown
    assert (ffn_layers > 0) == where.startswith("cpu")
    assert got == host["expert_io"] + host["expert_scratch"] > 0
    if where == "cpu, the plan's chunk":
        assert r.prefill_chunk == r.plan.workload["prefill_chunk"] == CPU_PREFILL_CHUNK
