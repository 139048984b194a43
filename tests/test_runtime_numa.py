"""The runtime applies the Plan's NUMA mode: routed experts placed by hybrid.backends.numa, results
bit-identical to numa off, a rejected mode refused before anything loads, and the CLI's
--numa / --threads reach the expert engine."""

import numpy as np
import pytest

import hybrid

import hybrid._native  # noqa: E402,F401  (built with the package: missing must fail)

TOKENS = [5, 17, 99, 3, 250, 42, 7, 300, 11, 64]


@pytest.fixture(scope="module")
def q4(tiny_gguf):
    return tiny_gguf("Q4_K_M")


@pytest.fixture(scope="module")
def off_logits(q4):
    with hybrid.load(q4, device="cpu", threads=2, ctx=32, numa="off") as r:
        assert r.loader._placed.mode == "off"
        assert r.loader._placed.placed_bytes == 0   # off: experts read in place from the mmap
        return r.logits(TOKENS), r.decode_logits(TOKENS[:4])


@pytest.mark.parametrize("mode,parts", [("interleave", None), ("distribute", 2), ("replicate", 2)])
def test_every_mode_gives_the_logits_of_off(q4, off_logits, mode, parts):
    with hybrid.load(q4, device="cpu", threads=2, ctx=32, numa=mode, numa_partitions=parts,
                     copy_progress=False) as r:
        placed = r.loader._placed
        assert r.numa == r.plan.numa_mode == mode and placed.mode == mode
        # the experts really live in placed copies, in as many worker groups as asked
        assert placed.placed_bytes > 0 and not placed._copies
        assert len(placed.engine.partitions) == (parts or 1)
        expert_bytes = sum(t.n_bytes for n, t in r.gguf.tensors.items() if n.endswith("_exps.weight"))
        copies = parts if mode == "replicate" else 1
        assert placed.placed_bytes >= copies * expert_bytes
        assert placed.copied_bytes == copies * expert_bytes
        full, step = r.logits(TOKENS), r.decode_logits(TOKENS[:4])
    np.testing.assert_array_equal(full, off_logits[0])
    np.testing.assert_array_equal(step, off_logits[1])


@pytest.mark.parametrize("mode,parts", [("interleave", None), ("distribute", 2), ("replicate", 2)])
def test_hot_experts_are_not_copied_to_the_host(q4, off_logits, mode, parts):
    """The Plan counts no host bytes for experts hot on the GPU, so the copying modes leave
    them out (their part of the buffer is never written: no memory); layers whose experts are
    all hot copy nothing. The GPU path with the CPU as the device gives the CPU path's logits."""
    from hybrid.runtime.loader import MinimalPlan

    with hybrid.load(q4, device="cpu", threads=2, ctx=32) as r:
        moe = list(range(r.args.n_dense_lead, r.args.n_layer))
        E = r.args.n_expert
    hot = [[] if l not in moe else list(range(E)) if l == moe[-1] else list(range(0, E, 3))
           for l in range(moe[-1] + 1)]
    plan = MinimalPlan(device="cpu", kv_cache_tokens=32, numa_mode=mode, gpu_experts=hot)
    with hybrid.load(q4, threads=2, plan=plan, gpu_paths=True, decode_graphs="static",
                     numa_partitions=parts, copy_progress=False) as r:
        placed = r.loader._placed
        copies = parts if mode == "replicate" else 1
        cold = 0
        for l in moe:
            per_expert = sum(r.gguf.tensors[f"blk.{l}.ffn_{k}_exps.weight"].n_bytes
                             for k in ("gate", "up", "down")) // E
            cold += (E - len(hot[l])) * per_expert
        assert placed.copied_bytes == copies * cold
        full, step = r.logits(TOKENS), r.decode_logits(TOKENS[:4])
    for got, want in ((full, off_logits[0]), (step, off_logits[1])):   # hot experts: torch's rounding
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert cos.min() >= 0.999 and (got.argmax(-1) == want.argmax(-1)).all(), cos.min()


def _replicate_plan(path):
    """A 2-node machine whose RAM holds one copy of the experts but not two."""
    from placement import plan_for_gguf

    kw = dict(cpu_only=True, ctx=32, numa_nodes=2, host_reserve_bytes=0, runtime_overhead_bytes=0)
    roomy = plan_for_gguf(path, numa="distribute", ram=1 << 40, **kw).devices["cpu"]
    ram = roomy.bytes + roomy.breakdown["routed_experts"] // 2   # a second copy would not fit
    return (plan_for_gguf(path, numa="replicate", ram=ram, **kw),
            plan_for_gguf(path, numa="distribute", ram=ram, **kw))


def test_replicate_that_does_not_fit_is_refused_before_loading(q4, monkeypatch):
    rep, dist = _replicate_plan(q4)
    assert dist.fits, dist.problems
    assert not rep.fits and rep.numa_mode == "replicate"

    def no_loading(*a, **k):
        raise AssertionError("experts were placed although the plan was refused")

    monkeypatch.setattr("hybrid.backends.numa.PlacedExperts", no_loading)
    with pytest.raises(ValueError, match="replicate") as e:
        hybrid.load(q4, threads=2, plan=rep)
    msg = str(e.value)
    assert "does not fit" in msg and rep.problems[0].message in msg


def test_numa_partitions_split_the_workers(q4):
    with hybrid.load(q4, device="cpu", threads=2, ctx=16, numa="distribute", numa_partitions=2,
                     copy_progress=False) as r:
        eng = r.loader._engine
        assert eng.threads == 2 and [len(p) for p in eng.partitions] == [1, 1]


def test_default_threads_of_a_numa_mode_follow_node_groups(q4):
    from hybrid.backends.numa import node_groups

    want = sum(len(g.cpus) for g in node_groups("interleave"))
    with hybrid.load(q4, device="cpu", ctx=16, numa="interleave", copy_progress=False) as r:
        assert r.loader._engine.threads == want
    with hybrid.load(q4, device="cpu", ctx=16, numa="off") as r:
        # CPU-only, off: torch and the experts take turns, so every allowed CPU
        assert r.loader._engine.threads == r.threads


def test_cli_numa_and_threads_reach_the_engine(q4, monkeypatch):
    from hybrid.app import cli

    seen = {}
    real = hybrid.load

    def spy(path, **kw):
        rt = real(path, copy_progress=False, **kw)
        seen["numa"], seen["threads"] = rt.numa, rt.loader._engine.threads
        seen["plan_numa"] = rt.plan.numa_mode
        return rt

    monkeypatch.setattr(hybrid, "load", spy)
    a = cli.build_parser().parse_args([str(q4), "--device", "cpu", "--numa", "interleave",
                                      "--threads", "1", "--ctx", "32"])
    plan = cli.make_plan(str(q4), a)
    import io

    rt = cli.load_runtime(str(q4), a, plan, io.StringIO())
    rt.close()
    assert seen == {"numa": "interleave", "threads": 1, "plan_numa": "interleave"}
