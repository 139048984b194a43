"""GPU prefill in the Plan (issue 8): the token threshold from the crossover of PCIe streaming
and CPU expert speed, the VRAM reserved for its buffers, what gives way when they do not fit,
and the flags of the dry-run planner and hybrid-run."""

import io
import json
import math
import types

import pytest

from placement import hardware as hwm
from placement.cli import main as dry_run
from placement.plan import Plan
from placement.presets import build_preset
from placement.solver import (
    _hit_rates,
    build_inputs,
    gpu_prefill_reserve,
    prefill_crossover,
    solve,
)

R1 = "deepseek-r1-q4_k_m"


@pytest.fixture(scope="module")
def r1():
    return build_preset(R1)


def _plan(inv, profile=None, hardware=None, **kw):
    hw, wl, pol = build_inputs(profile=profile, hardware=hardware, **kw)
    return solve(inv, hw, wl, pol)


def _crossover(inv, profile=None, hardware=None, **kw):
    """The threshold model with no hot-expert cache (the docstring's arithmetic)."""
    hw, wl, pol = build_inputs(profile=profile, hardware=hardware, **kw)
    wl = wl.resolved(inv.model)
    mode = "interleave" if len(hw.allowed_nodes) > 1 else "off"
    return prefill_crossover(inv, hw, wl, pol, mode, hw.gpus[0] if hw.gpus else None, _hit_rates(inv, None, {}))


def _routed(inv):
    by_layer = {}
    for t in inv.tensors:
        if t.role == "routed_experts":
            by_layer[t.layer] = by_layer.get(t.layer, 0) + t.n_bytes
    return by_layer


# ----------------------------------------------------------------------------- threshold model


def test_crossover_arithmetic_r1_on_the_profiles(r1):
    S = sum(_routed(r1).values())
    assert S == 393_983_557_632                       # 31 layers of 6.34 GB, 27 of 7.31 GB
    # 2x256g-48g: 64 AVX512-VNNI cores x 120 GFLOP/s; 2 x 150 GB/s interleaved x 0.75 x 0.7
    flops_tok = 58 * 2 * 8 * 3 * 7168 * 2048
    c = max(flops_tok / (64 * 120e9), S * (1 - (1 - 8 / 256) ** 512) / 512 / (300e9 * 0.75 * 0.7))
    x48 = _crossover(r1, "2x256g-48g")
    assert x48["cpu_s_per_token"] == pytest.approx(c, rel=1e-9) and c == pytest.approx(5.32e-3, rel=1e-3)
    assert x48["pcie_s_per_chunk"] == pytest.approx(S / 25e9)
    assert x48["tokens"] == math.ceil(S / 25e9 / c) == 2962
    # PCIe 50 GB/s: half the streaming time, half the threshold
    x80 = _crossover(r1, "2x256g-80g")
    assert x80["tokens"] == math.ceil(S / 50e9 / c) == 1481
    # 32 cores: twice the CPU time per token, half the threshold of the 64-core box
    x24 = _crossover(r1, "1x256g-24g")
    assert x24["cpu_s_per_token"] == pytest.approx(2 * c) and x24["tokens"] == 1481


def test_faster_pcie_lowers_the_threshold_slower_raises_it(r1):
    base = hwm.from_profile("2x256g-48g")
    t = {bw: _crossover(r1, hardware=hwm.apply_overrides(base, pcie_bandwidth=bw))["tokens"]
         for bw in ("12.5GB/s", "25GB/s", "64GB/s")}
    assert t["12.5GB/s"] > t["25GB/s"] > t["64GB/s"]
    assert t["12.5GB/s"] == pytest.approx(2 * t["25GB/s"], abs=1)
    # when streaming is nearly free, dequantizing every expert once per chunk bounds it from below
    fast = _crossover(r1, hardware=hwm.apply_overrides(base, pcie_bandwidth="10000GB/s"))
    assert fast["tokens"] == math.ceil(fast["dequant_s_per_chunk"]
                                       / (fast["cpu_s_per_token"] - fast["gpu_s_per_token"]))


def test_reserve_is_two_of_the_largest_layer_plus_the_chunk_workspace(r1):
    _, wl, pol = build_inputs(profile="2x256g-48g")
    wl = wl.resolved(r1.model)
    res = gpu_prefill_reserve(r1, wl, pol, 8192)
    assert res["slot"] == max(_routed(r1).values()) == 7_310_671_872      # a layer with Q6_K down
    assert res["staging"] == 2 * res["slot"]
    # 8192-token activations beyond the 512 already in the workspace: 7680 x 176128 x 4 B
    assert res["workspace"] > 7680 * 176128 * 4
    assert res["bytes"] == res["staging"] + res["workspace"]
    assert gpu_prefill_reserve(r1, wl, pol, 16384)["workspace"] > res["workspace"]


# ----------------------------------------------------------------------------- the plan


def test_no_gpu_no_gpu_prefill(r1):
    p = _plan(r1, "2x256g-48g", cpu_only=True)
    assert p.gpu_prefill_tokens == 0 and "no GPU" in p.gpu_prefill["reason"]
    q = _plan(r1, "2x256g-48g", cpu_only=True, gpu_prefill_tokens=4096)
    assert q.gpu_prefill_tokens == 0
    assert any(n.startswith("--gpu-prefill-tokens 4096: no GPU") for n in q.notes)


def test_80g_reserves_the_buffers_and_gives_up_hot_experts(r1):
    p = _plan(r1, "2x256g-80g")
    off = _plan(r1, "2x256g-80g", gpu_prefill_tokens=0)
    g, g0 = p.devices["gpu0"], off.devices["gpu0"]
    info = p.gpu_prefill
    # the plan's threshold is the crossover with the hot-expert cache it keeps: a bit above 1481
    assert info["source"] == "model" and info["crossover"]["tokens"] == p.gpu_prefill_tokens
    assert 1481 < p.gpu_prefill_tokens < 1481 * 1.2
    assert g.breakdown["prefill_staging"] == 2 * 7_310_671_872 == info["staging_bytes"]
    assert g.breakdown["prefill_workspace"] == info["workspace_bytes"] > 0
    assert "prefill_staging" not in g0.breakdown and off.gpu_prefill_tokens == 0
    # the hot-expert cache shrank by the reserve (to within one round of experts)
    lost = g0.breakdown["routed_experts"] - g.breakdown["routed_experts"]
    assert info["hot_cache_given_up_bytes"] == lost
    assert abs(lost - info["reserve_bytes"]) < sum(r1.expert_bytes(l) for l in r1.moe_layers())
    assert g.fits and p.fits
    assert any("hot-expert cache holds" in n and "--gpu-prefill-tokens 0" in n for n in p.notes)
    # what torch holds after load: the staging slots yes, the per-chunk workspace no
    assert p.predicted_gpu_allocated() - off.predicted_gpu_allocated() == info["staging_bytes"] - lost


def test_48g_bf16_does_not_fit_the_buffers_prefill_off_cache_kept(r1):
    p = _plan(r1, "2x256g-48g")
    off = _plan(r1, "2x256g-48g", gpu_prefill_tokens=0)
    assert p.fits and p.gpu_weight_format == "bf16" and p.gpu_prefill_tokens == 0
    assert p.gpu_experts == off.gpu_experts and "prefill_staging" not in p.devices["gpu0"].breakdown
    (note,) = [n for n in p.notes if n.startswith("GPU prefill off")]
    # 13.01 GiB: the workspace holds the MLA K/V expansion of a 512-token chunk over 32768 keys
    # for one group of 16 heads (16 x 320 values x 2 B: 0.31 GiB; all 128 heads at once were
    # 2.50 GiB and left 10.82)
    assert "21.38 GiB" in note and "13.01 GiB are left" in note and "--gpu-format quantized" in note
    # the model still says where the crossover would be
    assert p.gpu_prefill["crossover"]["tokens"] > 2962
    # the named change makes room: quantized GPU weights, GPU prefill on, the cache smaller
    q = _plan(r1, "2x256g-48g", gpu_format="quantized")
    assert q.fits and q.gpu_prefill_tokens > 0 and "prefill_staging" in q.devices["gpu0"].breakdown


def test_a_shorter_context_named_as_the_way_to_make_room(r1):
    p = _plan(r1, "2x256g-80g", gpu_mem="56GiB", ctx=65536)
    assert p.gpu_prefill_tokens == 0
    reason = p.gpu_prefill["reason"]
    ctx = int(reason.split("--ctx ")[1].split()[0])
    assert ctx % 256 == 0 and 8192 <= ctx < 65536
    assert _plan(r1, "2x256g-80g", gpu_mem="56GiB", ctx=ctx).gpu_prefill_tokens > 0
    # tight: one 256-token step longer does not leave the room
    assert _plan(r1, "2x256g-80g", gpu_mem="56GiB", ctx=ctx + 512).gpu_prefill_tokens == 0


def test_explicit_threshold(r1):
    p = _plan(r1, "2x256g-80g", gpu_prefill_tokens=4000)
    assert p.gpu_prefill_tokens == 4000 and p.gpu_prefill["source"] == "given"
    # above the GPU prefill chunk: the runtime's chunks grow to the threshold, so does the workspace
    big = _plan(r1, "2x256g-80g", gpu_prefill_tokens=20000)
    assert big.gpu_prefill["workspace_bytes"] > p.gpu_prefill["workspace_bytes"]
    over = _plan(r1, "2x256g-80g", gpu_prefill_tokens=40000)        # context 32768
    assert over.gpu_prefill_tokens == 0
    assert any(n.startswith("--gpu-prefill-tokens 40000: GPU prefill off") for n in over.notes)
    small = _plan(r1, "2x256g-48g", gpu_prefill_tokens=1000)      # VRAM too small: said, not forced
    assert small.gpu_prefill_tokens == 0
    assert any(n.startswith("--gpu-prefill-tokens 1000: GPU prefill off: its buffers need") for n in small.notes)
    with pytest.raises(ValueError, match="--gpu-prefill-tokens"):
        _plan(r1, "2x256g-80g", gpu_prefill_tokens=-1)


def test_crossover_beyond_a_chunk_or_the_context_is_off(r1):
    slow = _plan(r1, "2x256g-80g", pcie_bandwidth="2GB/s")
    assert slow.gpu_prefill_tokens == 0 and "more than a GPU prefill chunk holds (8192" in slow.gpu_prefill["reason"]
    assert "prefill_staging" not in slow.devices["gpu0"].breakdown
    short = _plan(r1, "2x256g-80g", ctx=1024)
    assert short.gpu_prefill_tokens == 0 and "more than the context holds (1024" in short.gpu_prefill["reason"]
    ok = _plan(r1, "2x256g-80g", ctx=2048)
    assert 0 < ok.gpu_prefill_tokens <= 2048 and ok.gpu_prefill["chunk_tokens"] == 2048


def test_json_and_text_show_threshold_and_reserve(r1):
    p = _plan(r1, "2x256g-80g")
    d = p.to_dict()
    assert d["gpu_prefill_tokens"] == p.gpu_prefill_tokens > 0
    assert d["gpu_prefill"]["reserve_bytes"] == p.devices["gpu0"].breakdown["prefill_staging"] + \
        p.devices["gpu0"].breakdown["prefill_workspace"]
    assert d["devices"]["gpu0"]["breakdown"]["prefill_staging"] == 2 * 7_310_671_872
    q = Plan.from_json(p.to_json())
    assert q.to_dict() == d and q.gpu_prefill_tokens == p.gpu_prefill_tokens
    text = p.to_text()
    assert f"GPU prefill: chunks of {p.gpu_prefill_tokens}+ prompt tokens" in text
    assert "reserved 21.38 GiB (staging 2 x 6.81 GiB" in text and "over PCIe at 50 GB/s" in text
    assert "GPU prefill: off: " in _plan(r1, "2x256g-48g").to_text()
    # a plan saved before the field existed still loads, GPU prefill off
    d.pop("gpu_prefill_tokens"), d.pop("gpu_prefill")
    assert Plan.from_dict(d).gpu_prefill_tokens == 0


# ----------------------------------------------------------------------------- flags


def _run(capsys, argv):
    rc = dry_run(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_dry_run_flag(capsys):
    base = ["--preset", R1, "--hardware", "2x256g-80g", "--json"]
    rc, out, _ = _run(capsys, base)
    auto = json.loads(out)
    rc0, out, _ = _run(capsys, base + ["--gpu-prefill-tokens", "0"])
    off = json.loads(out)
    rc1, out, _ = _run(capsys, base + ["--gpu-prefill-tokens", "3000"])
    given = json.loads(out)
    assert rc == rc0 == rc1 == 0
    assert auto["gpu_prefill_tokens"] > 0 and off["gpu_prefill_tokens"] == 0 and given["gpu_prefill_tokens"] == 3000
    assert off["n_gpu_experts"] > auto["n_gpu_experts"]
    assert off["policy"]["gpu_prefill_tokens"] == 0 and given["gpu_prefill"]["source"] == "given"
    for bad in ("x", "-5", "1.5"):
        rc, _, err = _run(capsys, ["--preset", R1, "--gpu-prefill-tokens", bad])
        assert rc == 2 and "--gpu-prefill-tokens" in err and len(err.strip().splitlines()) == 1


def test_hybrid_run_flag_parsing(capsys):
    from hybrid.app.cli import build_parser, main

    assert build_parser().parse_args(["m.gguf", "--gpu-prefill-tokens", "64"]).gpu_prefill_tokens == 64
    assert build_parser().parse_args(["m.gguf"]).gpu_prefill_tokens is None
    for bad, what in (("x", "not an integer"), ("-1", "out of range")):
        assert main(["m.gguf", "--gpu-prefill-tokens", bad]) == 2
        err = capsys.readouterr().err
        assert "--gpu-prefill-tokens" in err and what in err and len(err.strip().splitlines()) == 1
    # --dry-run hands it to the planner
    assert main(["--dry-run", "--preset", R1, "--hardware", "2x256g-80g", "--gpu-prefill-tokens", "0",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_prefill_tokens"] == 0


def test_hybrid_run_puts_the_flag_into_the_plan_and_load_gets_the_plans_value(tiny_q4km, monkeypatch):
    """No GPU here: torch is told it has one, the plan gets a 48 GiB one by --gpu-mem."""
    import torch

    import hybrid
    from hybrid.app import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    a = cli.build_parser().parse_args([str(tiny_q4km), "--gpu-mem", "48GiB", "--ctx", "64",
                                       "--gpu-prefill-tokens", "8"])
    plan = cli.make_plan(str(tiny_q4km), a)
    assert plan.device == "cuda:0" and plan.gpu_prefill_tokens == 8
    assert plan.gpu_prefill["source"] == "given" and plan.devices["gpu0"].breakdown["prefill_staging"] > 0
    a0 = cli.build_parser().parse_args([str(tiny_q4km), "--gpu-mem", "48GiB", "--ctx", "64",
                                        "--gpu-prefill-tokens", "0"])
    assert cli.make_plan(str(tiny_q4km), a0).gpu_prefill_tokens == 0
    seen = {}

    def fake_load(path, **kw):
        seen.update(kw)
        return types.SimpleNamespace(tokenizer=object(), close=lambda: None)

    monkeypatch.setattr(hybrid, "load", fake_load)
    cli.load_runtime(str(tiny_q4km), a, plan, io.StringIO())
    assert seen["plan"] is plan and seen["gpu_prefill_tokens"] == 8
    seen.clear()
    a_none = cli.build_parser().parse_args([str(tiny_q4km)])
    cli.load_runtime(str(tiny_q4km), a_none, plan, io.StringIO())
    assert "gpu_prefill_tokens" not in seen        # load() reads plan.gpu_prefill_tokens itself


def test_hybrid_run_without_gpu_ignores_the_flag_with_a_warning(tiny_q4km, caplog):
    from hybrid.app import cli

    a = cli.build_parser().parse_args([str(tiny_q4km), "--device", "cpu", "--ctx", "64",
                                       "--gpu-prefill-tokens", "8"])
    with caplog.at_level("WARNING", logger="hybrid"):
        plan = cli.make_plan(str(tiny_q4km), a)
    assert plan.device == "cpu" and plan.gpu_prefill_tokens == 0
    assert "--gpu-prefill-tokens 8 is ignored" in caplog.text
