"""NUMA modes of the expert engine: same outputs in every mode, placement visible from outside,
no hidden second copy of the experts after loading."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT, GGUFWriter

from hybrid import _native
from hybrid.gguf_file import GGUFFile
from hybrid.backends.numa import PlacedExperts, node_groups, numa_maps_policy
from quantdata import random_rows

TYPES = (QT.Q4_K, QT.Q4_K, QT.Q6_K)


def write_expert_gguf(path, n_layers, E, D, F, seed=0):
    """A GGUF holding only routed-expert tensors of random valid blocks (fast to make at GB size)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "deepseek2")
    for layer in range(n_layers):
        for name, qtype, rows, cols in (("gate", TYPES[0], F, D), ("up", TYPES[1], F, D), ("down", TYPES[2], D, F)):
            data = random_rows(qtype, E * rows, cols, rng).reshape(E, rows, -1)
            w.add_tensor(f"blk.{layer}.ffn_{name}_exps.weight", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_experts(tmp_path_factory):
    return write_expert_gguf(tmp_path_factory.mktemp("numa") / "experts.gguf", 2, 16, 512, 512)


def run_mode(path, mode, logical_partitions=None, threads=None):
    g = GGUFFile(path)
    groups = node_groups(mode, threads=threads, logical_partitions=logical_partitions)
    placed = PlacedExperts(g, mode, groups, d_model=512, max_tokens=64, max_k=4, progress=False)
    layers = [placed.add_layer(i) for i in range(2)]
    placed.load()
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((40, 512)).astype(np.float32))
    ids = torch.from_numpy(np.stack([rng.choice(16, 4, replace=False) for _ in range(40)]))
    w = torch.from_numpy(rng.random((40, 4)).astype(np.float32))
    out = [layer(x, ids, w) for layer in layers]
    return out, placed, groups


MODES = [("interleave", None), ("distribute", 2), ("distribute", 3), ("replicate", 2), ("off", 3)]


@pytest.mark.parametrize("mode,parts", MODES, ids=[f"{m}-{p}" for m, p in MODES])
def test_every_mode_is_bit_identical_to_off(small_experts, mode, parts):
    ref, placed_off, _ = run_mode(small_experts, "off")
    got, placed, groups = run_mode(small_experts, mode, logical_partitions=parts, threads=max(parts or 2, 2))
    assert len(placed.engine.partitions) == (parts or 1)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    placed.close()
    placed_off.close()


def test_placement_is_visible_in_numa_maps_and_affinity(small_experts):
    _, placed, groups = run_mode(small_experts, "distribute", logical_partitions=2, threads=2)
    if placed.warnings:
        pytest.skip(f"this kernel/container refuses NUMA policies: {placed.warnings[0]}")
    for buf in placed.buffers:
        policy = numa_maps_policy(buf.address)
        assert policy is not None and policy.startswith("bind:"), policy
    assert placed.engine.worker_cpus == [c for g in groups for c in g.cpus]
    placed.close()
    _, placed, _ = run_mode(small_experts, "interleave")
    for buf in placed.buffers:
        assert numa_maps_policy(buf.address).startswith("interleave:")
    placed.close()


def test_bad_mode_and_threads_are_refused():
    with pytest.raises(ValueError, match="--numa"):
        node_groups("spread")
    with pytest.raises(ValueError, match="--threads"):
        node_groups("distribute", threads=1, logical_partitions=2)


def test_default_threads_leave_one_core_per_node_for_the_runtime():
    groups = node_groups("distribute")
    from placement.hardware import detect

    hw = detect()
    for g in groups:
        node = next(n for n in hw.numa_nodes if n.id == g.node)
        cores = len({hw.cpu_core.get(c, c) for c in set(node.cpus) & set(_native.allowed_cpus())})
        assert len(g.cpus) == max(1, cores - 1)


def _rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory):
    # 4 layers x 64 experts of 1024 x 2048 (Q4_K gate/up, Q6_K down): 1.04 GB
    return write_expert_gguf(tmp_path_factory.mktemp("numa-big") / "experts.gguf", 4, 64, 2048, 1024, seed=1)


@pytest.mark.parametrize("mode,parts", [("off", None), ("interleave", None), ("distribute", 2), ("replicate", 2)])
def test_memory_after_loading_is_what_the_mode_predicts(big_experts, mode, parts):
    """RSS (anonymous) + the file's pages in the page cache, after loading and one forward over
    every expert, within 10% of one copy of the experts (replicate: one per node group)."""
    g = GGUFFile(big_experts)
    expert_bytes = sum(t.n_bytes for t in g.tensors.values())
    assert expert_bytes >= 1e9
    import os

    fd = os.open(big_experts, os.O_RDONLY)
    # start with none of the file cached: written back first, since dirty pages stay (the
    # fixture has just written 1 GB; counted in `before`, they were written back and dropped
    # during a busy full run, and the copies' GB looked like no growth: "0.03 GiB held")
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    before = _rss_anon() + _native.file_resident_bytes(str(big_experts))
    groups = node_groups(mode, threads=2, logical_partitions=parts)
    placed = PlacedExperts(g, mode, groups, d_model=2048, max_tokens=64, max_k=8, progress=False)
    layers = [placed.add_layer(i) for i in range(4)]
    placed.load()
    x = torch.ones(8, 2048)
    ids = torch.arange(64).view(8, 8)  # every expert once
    for layer in layers:
        layer(x, ids, torch.ones(8, 8))
    used = _rss_anon() + _native.file_resident_bytes(str(big_experts)) - before
    copies = len(groups) if mode == "replicate" else 1
    predicted = copies * expert_bytes
    msg = f"{mode}: {used / 2**30:.2f} GiB held, predicted {predicted / 2**30:.2f} GiB"
    assert used <= 1.1 * predicted, msg  # no hidden second copy
    # Copies are anonymous memory and must all be there; with `off` the experts are page cache,
    # which the kernel may reclaim under memory pressure from other processes.
    assert used >= (0.9 if mode != "off" else 0.5) * predicted, msg
    placed.close()
    g.close()
