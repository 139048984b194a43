"""The server's KV slots are the Plan's: `--parallel N` (or, for --serve, the most that fit)
is the Workload's slot count, the solver accounts N caches of --ctx tokens, the dry-run shows
them, the runtime allocates exactly those at load and the server runs on them, and a count
too large for the memory is refused with the flag and the most that fits."""

import json
import re

import pytest
from test_cli import assert_one_line_error, hybrid_run

import hybrid
from hybrid.app.cli import main
from placement import hardware as hwm
from placement.inventory import from_gguf
from placement.presets import build_preset
from placement.solver import SLOTS_MAX, Policy, Workload, solve
from placement.units import GiB


def _dry_run_json(capsys, *args):
    rc = main([*map(str, args), "--dry-run", "--json", "--device", "cpu"])
    return rc, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("serve", [False, True])
def test_the_dry_run_shows_the_slots_and_their_bytes(tiny_q4km, capsys, serve):
    extra = ["--serve"] if serve else []
    rc, d = _dry_run_json(capsys, tiny_q4km, "--ctx", "64", "--parallel", "4", *extra)
    per_token = from_gguf(tiny_q4km).model.kv_values_per_token * 4          # f32 on the CPU
    assert rc == 0 and d["kv_slots"] == 4 and d["kv_slot_tokens"] == 64
    assert d["kv_slot_bytes"] == 64 * per_token
    # the plan's budget holds all four: the cache, and what host RAM counts for it
    assert d["kv_cache_tokens"] == 4 * 64
    assert d["kv_cache_bytes"] == d["devices"]["cpu"]["breakdown"]["kv_cache"] == 4 * 64 * per_token
    main([str(tiny_q4km), "--dry-run", "--device", "cpu", "--ctx", "64", "--parallel", "4", *extra])
    text = capsys.readouterr().out
    assert "4 slots x 64 tokens" in text and "KV slots (requests served together): 4" in text


def test_without_parallel_a_run_plans_one_slot_and_a_server_the_most_that_fit(tiny_q4km, capsys):
    _, chat = _dry_run_json(capsys, tiny_q4km, "--ctx", "64")
    _, srv = _dry_run_json(capsys, tiny_q4km, "--ctx", "64", "--serve")
    assert chat["kv_slots"] == 1
    # a tiny model's slots are a few KiB: the cap, and the report says why
    assert srv["kv_slots"] == SLOTS_MAX and "without --parallel" in srv["kv_slots_reason"]


def _machine(ram_gib, gpu_gib=None):
    """A generated machine: one NUMA node of `ram_gib`, a GPU of `gpu_gib` (none: CPU only)."""
    kw = {"ram": f"{ram_gib}GiB", "numa_nodes": 1, "cores": 32, "ram_bandwidth": "150GB/s"}
    kw["gpu_mem"] = f"{gpu_gib}GiB" if gpu_gib else 0
    return hwm.apply_overrides(hwm.detect(), **kw)


def test_the_default_slot_count_follows_the_memory_the_cache_lives_in():
    r1 = build_preset("deepseek-r1-q4_k_m")
    wl, cpu = Workload(context=32768, batch=None), Policy(use_gpu=False, numa="off")
    per_slot = 32768 * r1.model.kv_values_per_token * 4                       # f32 in host RAM
    big = solve(r1, _machine(512), wl, cpu)
    # ~377 GiB of experts + reserves; each slot 4.3 GiB more: fewer on a smaller machine
    small = solve(r1, _machine(420), wl, cpu)
    assert big.fits and small.fits and big.kv_slot_bytes == small.kv_slot_bytes == per_slot
    assert big.kv_slots == SLOTS_MAX and 1 <= small.kv_slots < big.kv_slots
    assert small.kv_cache_bytes == small.kv_slots * per_slot
    # the most: one more slot would not fit
    more = solve(r1, _machine(420), Workload(context=32768, batch=small.kv_slots + 1), cpu)
    assert not more.fits
    assert f"{small.kv_slots + 1} would not" in small.kv_slots_reason and "host RAM" in small.kv_slots_reason
    # on a GPU the cache lives in VRAM: a smaller GPU, fewer slots (host RAM unchanged)
    gpu = Policy(numa="off", gpu_weight_format="quantized", expert_cache=False)
    g48, g24 = (solve(r1, _machine(512, g), wl, gpu) for g in (48, 24))
    assert g48.kv_cache_device == "gpu0" and g48.fits and g24.fits
    assert 1 <= g24.kv_slots < g48.kv_slots and "gpu0" in g24.kv_slots_reason


def test_a_plan_of_n_slots_allocates_n_caches_and_the_server_runs_on_them(tiny_q4km, monkeypatch):
    from hybrid.app.server import create_app
    from hybrid.runtime.batch import SlotEngine

    with hybrid.load(tiny_q4km, device="cpu", ctx=64, parallel=3) as rt:
        assert rt.plan.kv_slots == 3 and rt.ctx == 64
        assert len(rt.slot_caches) == 3 and rt.cache is rt.slot_caches[0]
        assert all(c.max_tokens == 64 for c in rt.slot_caches)
        # what was allocated is what the plan counted
        assert rt.loader.placed_bytes["cpu"]["kv_cache"] == rt.plan.kv_cache_bytes \
            == sum(c.nbytes for c in rt.slot_caches)
        made = []
        new_cache = rt.model.new_cache
        monkeypatch.setattr(rt.model, "new_cache", lambda *a, **k: made.append(a) or new_cache(*a, **k))
        app = create_app(rt, model="tiny")
        eng = app.state.scheduler.engine
        assert [s.cache for s in eng.slots] == rt.slot_caches            # the same objects
        assert all(s.cache is c for s, c in zip(eng.slots, rt.slot_caches))
        assert made == []                                                # and nothing more
        with pytest.raises(ValueError, match=r"plan has 3 KV slot.*parallel=4"):
            SlotEngine(rt, 4)


def test_a_parallel_too_large_for_the_memory_is_refused_with_the_most_that_fits(tiny_q4km):
    # 512 slots of 1M tokens: ~190 GiB of KV cache for the tiny model, more than this machine has
    r = hybrid_run(tiny_q4km, "--serve", "--port", "0", "--device", "cpu", "--ctx", "1000000",
                   "--force-ctx", "--parallel", "512")
    assert_one_line_error(r, "does not fit this machine", "the KV caches of --parallel 512", code=3)
    m = re.search(r"at most (\d+) fit \(--parallel \1\)", r.stderr)
    assert m and 1 <= int(m.group(1)) < 512, r.stderr
    # and the same answer from a hypothetical machine's dry-run, checked by planning both sides
    r1 = build_preset("deepseek-r1-q4_k_m")
    cpu = Policy(use_gpu=False, numa="off")
    plan = solve(r1, _machine(420), Workload(context=32768, batch=8), cpu)
    m = re.search(r"at most (\d+) fit \(--parallel \1\)", plan.problems[0].message)
    assert not plan.fits and m and "--parallel 8" in plan.problems[0].message
    most = int(m.group(1))
    assert solve(r1, _machine(420), Workload(context=32768, batch=most), cpu).fits
    assert not solve(r1, _machine(420), Workload(context=32768, batch=most + 1), cpu).fits
    assert any(s.cli == f"--parallel {most}" and s.fits for s in plan.suggestions)


def test_parallel_belongs_to_the_server(tiny_q4km):
    r = hybrid_run(tiny_q4km, "-p", "hi", "--parallel", "2", "--device", "cpu")
    assert_one_line_error(r, "--parallel 2", "--serve", code=2)


def test_the_load_checks_every_slot_against_the_plans_budget(tiny_q4km):
    from placement import plan_for_gguf

    plan = plan_for_gguf(tiny_q4km, ctx=64, batch=3, use_gpu=False, cpu_linear_min_bytes=0)
    short = plan_for_gguf(tiny_q4km, ctx=64, batch=3, use_gpu=False, cpu_linear_min_bytes=0)
    short.kv_cache_bytes -= plan.kv_slot_bytes            # counted two slots' bytes for three
    with pytest.raises(ValueError, match=r"KV cache for 192 tokens needs .*3 slot\(s\).* the plan counted"):
        hybrid.load(tiny_q4km, device="cpu", plan=short)
    plan.kv_cache_tokens += 1                              # 193 tokens do not split into 3 slots
    with pytest.raises(ValueError, match=r"193 tokens does not split into 3 slots"):
        hybrid.load(tiny_q4km, device="cpu", plan=plan)
