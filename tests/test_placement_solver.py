"""Solver scenarios of issue 5 on DeepSeek-R1 Q4_K_M (the preset), each asserting the verdict
and the numbers behind it, plus the expert cache, reserves, estimate and the Plan contract."""

from dataclasses import replace

import pytest

from placement import hardware as hwm
from placement.plan import Plan
from placement.presets import build_preset
from placement.solver import (Policy, Workload, build_inputs, choose_gpu_experts, hot_expert_bytes,
                              hot_expert_format, solve)
from placement.units import GiB

R1 = "deepseek-r1-q4_k_m"


@pytest.fixture(scope="module")
def r1():
    return build_preset(R1)


@pytest.fixture(scope="module")
def box():
    """48 GB GPU + 512 GB on 2 NUMA nodes, described by overrides on top of this machine."""
    return hwm.apply_overrides(hwm.detect(), gpu_mem="48GiB", ram="512GiB", numa_nodes=2, cores=64, threads=128,
                               ram_bandwidth="150GB/s")


def _plan(inv, hw, **kw):
    hw2, wl, pol = build_inputs(hardware=hw, **kw)
    return solve(inv, hw2, wl, pol)


def test_48g_gpu_512g_two_nodes_interleave_fits(r1, box):
    p = _plan(r1, box, numa="interleave")
    assert p.fits and not p.problems
    assert p.numa_mode == "interleave" and p.gpu_weight_format == "bf16"
    assert p.kv_cache_tokens >= 32768 and p.max_context_tokens >= 32768
    # MLA latent cache: (512 + 64) x 61 layers x 2 bytes per token
    assert p.kv_bytes_per_token == 576 * 61 * 2 == 70272
    assert p.kv_cache_bytes == p.kv_cache_tokens * 70272 and p.kv_cache_device == "gpu0"
    gpu, cpu, n0, n1 = (p.devices[k] for k in ("gpu0", "cpu", "numa0", "numa1"))
    assert gpu.bytes <= gpu.capacity_bytes == 48 * GiB
    # non-expert weights as bf16: ~30 GiB (embedding stays in host RAM)
    nonexp = sum(v for k, v in gpu.breakdown.items() if k in ("attention", "dense_ffn", "shared_expert", "output",
                                                               "router", "norm"))
    assert 29 * GiB < nonexp < 32 * GiB
    # interleave: each node holds half of the host-resident experts
    assert n0.breakdown["routed_experts"] == n1.breakdown["routed_experts"]
    assert abs(n0.breakdown["routed_experts"] * 2 - cpu.breakdown["routed_experts"]) <= 2
    routed = r1.bytes_by_role()["routed_experts"]
    # the host holds every expert the GPU does not (GGUF bytes; the GPU's copies too: Q4_K/Q6_K
    # experts have the fused kernel, so they stay in their blocks there)
    gguf_cached = sum(len(p.gpu_experts[l]) * r1.expert_bytes(l) for l in r1.moe_layers())
    assert p.hot_expert_format == "quantized"
    assert gguf_cached > 0 and gpu.breakdown["routed_experts"] == sum(
        len(p.gpu_experts[l]) * hot_expert_bytes(r1, l, "quantized") for l in r1.moe_layers()) == gguf_cached
    assert abs(cpu.breakdown["routed_experts"] + gguf_cached - routed) <= 256
    assert p.estimate["decode_tok_s"] > 1 and p.estimate["prefill_tok_s"] > 10


def test_replicate_needs_twice_the_expert_memory(r1, box):
    p = _plan(r1, box, numa="replicate")
    assert not p.fits
    cpu = p.devices["cpu"]
    per_node = p.devices["numa0"].breakdown["routed_experts"]
    assert cpu.breakdown["routed_experts"] == 2 * per_node
    assert per_node > 256 * GiB * 0.9    # one copy does not fit a 256 GiB node
    msgs = " ".join(q.message for q in p.problems)
    assert "replicate" in msgs and "2x expert memory" in msgs
    assert {q.budget for q in p.problems} >= {"cpu", "numa0", "numa1"}
    fixes = {s.cli: s for s in p.suggestions}
    assert fixes["--numa interleave"].fits and fixes["--numa distribute"].fits


def test_bound_to_one_node_names_the_binding(r1, box):
    p = _plan(r1, box, bind_node=1)
    assert not p.fits
    cpu = p.devices["cpu"]
    assert cpu.capacity_bytes == 256 * GiB
    assert p.devices["numa0"].capacity_bytes == 0
    (prob,) = [q for q in p.problems if q.budget == "cpu"]
    assert "numactl -N 1 -m 1" in prob.message and "NUMA node 1" in prob.message
    assert "512.00 GiB on 2 NUMA nodes" in prob.message
    assert prob.over_bytes == cpu.bytes - cpu.capacity_bytes > 90 * GiB
    unbind = [s for s in p.suggestions if s.change == "unbind"]
    assert unbind and unbind[0].fits and "binding" in unbind[0].message
    # the same model on the same box unbound fits: the binding alone is the cause
    assert _plan(r1, box).fits


def test_24g_gpu_fits_only_with_quantized_weights(r1, box):
    p = _plan(r1, box, gpu_mem="24GiB")
    assert p.fits and p.gpu_weight_format == "quantized"
    (why,) = [n for n in p.notes if n.startswith("auto: GPU weights quantized")]
    assert "GPU weights bf16, numa interleave: does not fit" in why
    assert p.tensor_placement["attention"] == ("gpu0", "quantized")
    assert "quantized" in p.to_text()
    forced = _plan(r1, box, gpu_mem="24GiB", gpu_weight_format="bf16")
    assert not forced.fits and [q.budget for q in forced.problems] == ["gpu0"]
    assert forced.problems[0].needed_bytes > 24 * GiB
    fix = [s for s in forced.suggestions if s.change == "gpu_format"]
    assert fix and fix[0].fits and fix[0].cli == "--gpu-format quantized"


def test_80g_gpu_spends_leftover_on_routed_experts(r1, box):
    # GPU prefill off: its buffers would come out of this leftover (test_placement_gpu_prefill)
    p = _plan(r1, box, gpu_mem="80GiB", gpu_prefill_tokens=0)
    p48 = _plan(r1, box)
    assert p.fits and p.gpu_weight_format == "bf16"
    moe = r1.moe_layers()
    assert len(p.gpu_experts) == 61
    assert all(p.gpu_experts[i] == [] for i in range(3))            # dense layers
    counts = [len(p.gpu_experts[i]) for i in moe]
    # evenly, per layer (in their Q4_K/Q6_K blocks: ~12.6 MiB each)
    assert min(counts) >= 24 and max(counts) - min(counts) <= 1
    assert p.n_gpu_experts == sum(counts) > p48.n_gpu_experts
    gpu = p.devices["gpu0"]
    # hot experts kept in their GGUF blocks (fused kernel): planned at the file's bytes, plus
    # the row-block workspace of chunks too long for the fused kernel (issue 18)
    cached = sum(len(p.gpu_experts[l]) * hot_expert_bytes(r1, l, "quantized") for l in moe)
    assert hot_expert_bytes(r1, 3, "quantized") == r1.expert_bytes(3)
    assert gpu.breakdown["routed_experts"] == cached > 35 * GiB
    assert gpu.breakdown["dequant_workspace"] > 0
    # leftover spent: less than one more expert's bytes remain free
    assert 0 <= gpu.free_bytes < max(hot_expert_bytes(r1, l, "quantized") for l in moe)
    assert p.tensor_placement["routed_experts.gpu_cache"] == ("gpu0", "quantized")
    assert "as quantized (in their GGUF blocks" in " ".join(p.to_text().split())
    # as bf16 copies (--hot-format bf16): 2 bytes a weight, ~3.3x fewer experts
    b = _plan(r1, box, gpu_mem="80GiB", gpu_prefill_tokens=0, hot_expert_format="bf16")
    assert hot_expert_bytes(r1, 3, "bf16") == 3 * 7168 * 2048 * 2 > 3 * r1.expert_bytes(3)
    assert b.devices["gpu0"].breakdown["routed_experts"] == sum(
        len(b.gpu_experts[l]) * hot_expert_bytes(r1, l, "bf16") for l in moe)
    assert "dequant_workspace" not in b.devices["gpu0"].breakdown
    assert b.tensor_placement["routed_experts.gpu_cache"] == ("gpu0", "bf16")
    assert 3.0 < p.n_gpu_experts / b.n_gpu_experts < 3.6
    assert "L3:" in p.to_text() and "L60:" in p.to_text()
    assert p.estimate["expert_cache_hit_rate"] > p48.estimate["expert_cache_hit_rate"] > 0
    off = _plan(r1, box, gpu_mem="80GiB", expert_cache=False, gpu_prefill_tokens=0)
    assert off.n_gpu_experts == 0 and off.estimate["decode_tok_s"] < p.estimate["decode_tok_s"]


def test_256g_ram_says_how_much_is_missing(r1, box):
    hw = hwm.apply_overrides(box, ram="256GiB", numa_nodes=1, cores=64)
    p = _plan(r1, hw)
    assert not p.fits
    (prob,) = p.problems
    cpu = p.devices["cpu"]
    assert prob.budget == "cpu" and prob.available_bytes == 256 * GiB
    assert prob.over_bytes == cpu.bytes - 256 * GiB
    assert 100 * GiB < prob.over_bytes < 115 * GiB
    assert f"{prob.over_bytes / GiB:.2f} GiB missing" in prob.message
    (ram,) = [s for s in p.suggestions if s.change == "ram"]
    assert ram.fits and ram.scope == "machine" and ram.cli == "--ram 384GiB"
    # a size a server is built with, and the least RAM that fits, tight to the GiB
    least = int(ram.message.split("at least ")[1].split(" GiB")[0])
    assert 256 + prob.over_bytes // GiB <= least <= 256 + prob.over_bytes // GiB + 2
    assert _plan(r1, hw, ram=f"{least}GiB").fits
    assert not _plan(r1, hw, ram=f"{least - 1}GiB").fits
    assert _plan(r1, hw, ram="384GiB").fits
    assert any(s.change == "preset" and "q2_k" in s.cli for s in p.suggestions)


def test_expert_stats_pick_the_hot_experts(r1, box):
    E = 256
    stats = {l: [1.0] * E for l in r1.moe_layers()}
    for l in stats:
        stats[l][200] = stats[l][17] = 1000.0      # two hot experts everywhere
    stats[10][5] = 5000.0
    p = _plan(r1, box, expert_stats=stats)
    for l in r1.moe_layers():
        assert {17, 200} <= set(p.gpu_experts[l])
    assert 5 in p.gpu_experts[10]
    even = _plan(r1, box)
    assert p.estimate["expert_cache_hit_rate"] > even.estimate["expert_cache_hit_rate"]


@pytest.mark.parametrize("fmt", ["bf16", "quantized"])
def test_choose_gpu_experts_even_split(r1, fmt):
    per_round = sum(hot_expert_bytes(r1, l, fmt) for l in r1.moe_layers())
    chosen = choose_gpu_experts(r1, 3 * per_round + hot_expert_bytes(r1, 3, fmt), None, fmt)
    assert [len(chosen[l]) for l in (3, 4, 60)] == [4, 3, 3]
    assert chosen[4] == [0, 1, 2]
    assert choose_gpu_experts(r1, 0, None, fmt)[3] == []


def test_hot_experts_are_quantized_only_where_the_gpu_has_a_fused_kernel(r1):
    """auto: Q4_K/Q6_K experts (R1 Q4_K_M) in their blocks; IQ experts as bf16 copies (no
    fused kernel: dequantized before every product); a given format is kept."""
    iq = build_preset("deepseek-r1-ud-iq1_s")
    assert {t.ggml_type for t in iq.tensors if t.role == "routed_experts"} - {8, 12, 13, 14}
    assert hot_expert_format(r1) == "quantized" and hot_expert_format(iq) == "bf16"
    assert hot_expert_format(iq, "quantized") == "quantized" and hot_expert_format(r1, "bf16") == "bf16"
    from hybrid.backends.qmatvec import FUSED_TYPES
    from placement.solver import FUSED_GPU_TYPES

    assert FUSED_TYPES == FUSED_GPU_TYPES   # one set, two homes (the solver imports no torch)


def test_explicit_reserves_move_bytes(r1, box):
    base = _plan(r1, box)
    more = _plan(r1, box, cuda_context_bytes=base.policy["cuda_context_bytes"] + 4 * GiB)
    lost = base.devices["gpu0"].breakdown["routed_experts"] - more.devices["gpu0"].breakdown["routed_experts"]
    one = max(hot_expert_bytes(r1, l, "quantized") for l in r1.moe_layers())   # the cache shrinks by whole experts
    assert 4 * GiB - one <= lost <= 4 * GiB + one
    assert more.devices["gpu0"].breakdown["cuda_context"] == base.devices["gpu0"].breakdown["cuda_context"] + 4 * GiB
    res = base.reserves["workspace"]
    assert res["bytes"] == base.devices["gpu0"].breakdown["workspace"]
    assert res["attention_scores"] == 128 * 64 * 32768 * 4
    # a 512-token chunk attends decompressed: K (128 nope + 64 rope) and V (128) over the
    # context, bf16 on the GPU, for 16 of the 128 heads at a time
    assert res["attention_expansion"] == 16 * (128 + 64 + 128) * 32768 * 2
    assert res["bytes"] == res["activations"] + res["attention_scores"] + res["attention_expansion"] + res["logits"]
    assert _plan(r1, box, prefill_chunk=64).reserves["workspace"]["attention_expansion"] == 0
    longer = _plan(r1, box, context=65536)
    assert longer.devices["gpu0"].breakdown["kv_cache"] == 2 * base.devices["gpu0"].breakdown["kv_cache"]


def test_context_too_long_for_gpu_suggests_a_shorter_one(r1, box):
    p = _plan(r1, box, context=400_000, allow_long_context=True, gpu_weight_format="bf16", expert_cache=False)
    assert not p.fits
    (ctx,) = [s for s in p.suggestions if s.change == "ctx"]
    n = int(ctx.cli.split()[1])
    assert 32768 < n < 400_000 and n <= p.max_context_tokens + 256
    assert _plan(r1, box, context=n, allow_long_context=True, gpu_weight_format="bf16").fits


def test_estimate_follows_bandwidth_and_numa(r1, box):
    inter = _plan(r1, box, numa="interleave")
    dist = _plan(r1, box, numa="distribute")
    off = _plan(r1, box, numa="off")
    assert dist.fits and dist.estimate["decode_tok_s"] > inter.estimate["decode_tok_s"] > off.estimate["decode_tok_s"]
    fast = _plan(r1, hwm.apply_overrides(box, ram_bandwidth="300GB/s"), numa="interleave")
    assert fast.estimate["decode_tok_s"] > inter.estimate["decode_tok_s"]
    a = inter.estimate["assumptions"]
    assert "150 GB/s (given)" in a["ram_bandwidth_per_node"]
    # bytes per token: K=8 experts x 58 layers of ~25-29 MB, minus the GPU-cached share
    moved = inter.estimate["bytes_per_token"]["cpu_experts"] + inter.estimate["bytes_per_token"]["gpu_experts"]
    assert 11e9 < moved < 13.5e9


def test_no_gpu_plans_everything_on_the_cpu(r1, box):
    p = _plan(r1, box, cpu_only=True)
    assert p.fits and "gpu0" not in p.devices and p.gpu_weight_format == "none"
    assert p.kv_cache_device == "cpu" and p.kv_cache_dtype == "f32" and p.device == "cpu"
    assert all(dev == "cpu" for dev, _ in p.tensor_placement.values())
    assert p.devices["cpu"].breakdown["routed_experts"] == r1.bytes_by_role()["routed_experts"]


def test_plan_json_round_trip_and_contract(r1, box):
    p = _plan(r1, box, numa="interleave")
    d = p.to_dict()
    for key in ("fits", "weights_bytes", "devices", "kv_cache_bytes", "kv_cache_tokens", "gpu_experts", "estimate",
                "problems", "suggestions", "numa_mode", "gpu_weight_format", "tensor_placement"):
        assert key in d
    assert d["devices"]["gpu0"]["bytes"] == p.devices["gpu0"].bytes
    assert "breakdown" in d["devices"]["cpu"] and "free_bytes" in d["devices"]["cpu"]
    assert {"decode_tok_s", "prefill_tok_s", "assumptions"} <= set(d["estimate"])
    q = Plan.from_json(p.to_json())
    assert q.to_dict() == d
    assert q.placement_of("blk.5.attn_q_b.weight") == ("gpu0", "bf16")
    assert q.placement_of("blk.5.attn_kv_b.weight") == ("gpu0", "bf16")
    assert q.placement_of("blk.5.ffn_norm.weight") == ("gpu0", "f32")
    assert q.placement_of("blk.5.ffn_up_exps.weight") == ("cpu", "quantized")
    assert q.placement_of("token_embd.weight") == ("cpu", "quantized")
    assert q.gpu_expert_ids(5) == p.gpu_experts[5] and q.gpu_expert_ids(0) == []


def test_bad_options_are_value_errors(r1, box):
    with pytest.raises(ValueError, match="--numa"):
        solve(r1, box, Workload(), Policy(numa="sometimes"))
    with pytest.raises(ValueError, match="--ctx"):
        solve(r1, box, Workload(context=0), Policy())
    with pytest.raises(ValueError, match="unknown option"):
        build_inputs(hardware=box, frobnicate=1)
    with pytest.raises(ValueError, match="256 experts"):
        _plan(r1, box, expert_stats={3: [1, 2, 3]})


def test_default_context_follows_the_model(r1, box):
    p = _plan(r1, box)
    assert p.kv_cache_tokens == 32768                  # min(32K, 163840)
    small = replace(r1.model, context_length=4096)
    inv = replace(r1, model=small)
    assert solve(inv, box).kv_cache_tokens == 4096
