"""Hardware detection parsers (sample /proc and /sys text), overrides and profiles."""

import json

import pytest

from placement import hardware as hwm
from placement.configs import ConfigError
from placement.units import GiB, parse_bandwidth, parse_int_list, parse_size, fmt_int_list

STATUS_BOUND = """Name:\tpython
Umask:\t0022
State:\tR (running)
Cpus_allowed:\tffffffff,00000000,ffffffff,00000000
Cpus_allowed_list:\t32-63,96-127
Mems_allowed:\t00000000,00000002
Mems_allowed_list:\t1
voluntary_ctxt_switches:\t3
"""

NODE_MEMINFO = """Node 1 MemTotal:       263921868 kB
Node 1 MemFree:        200000000 kB
Node 1 MemUsed:         63921868 kB
Node 1 FilePages:       10000000 kB
Node 1 Shmem:            1000000 kB
Node 1 HugePages_Total:     0
"""


def test_parse_proc_status_binding():
    s = hwm.parse_proc_status(STATUS_BOUND)
    assert s["cpus"] == list(range(32, 64)) + list(range(96, 128))
    assert s["mems"] == [1]


def test_parse_int_list():
    assert parse_int_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_int_list(" 5 ") == [5]
    assert parse_int_list("") == []
    assert parse_int_list("0-7:2") == [0, 2, 4, 6]
    with pytest.raises(ValueError):
        parse_int_list("5-3")
    assert fmt_int_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"


def test_sizes():
    assert parse_size("48GiB") == 48 * GiB
    assert parse_size("48G") == 48 * GiB
    assert parse_size("48GB") == 48 * 10**9
    assert parse_size("1.5TiB") == int(1.5 * (1 << 40))
    assert parse_bandwidth("150GB/s") == 150e9
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_parse_node_meminfo():
    mi = hwm.parse_node_meminfo(NODE_MEMINFO)
    assert mi["MemTotal"] == 263921868 * 1024
    assert mi["FilePages"] == 10000000 * 1024
    assert mi["HugePages_Total"] == 0


def test_read_numa_nodes_from_fake_sysfs(tmp_path):
    for n, cpus in ((0, "0-31,64-95"), (1, "32-63,96-127")):
        d = tmp_path / f"node{n}"
        d.mkdir()
        (d / "meminfo").write_text(NODE_MEMINFO.replace("Node 1", f"Node {n}"))
        (d / "cpulist").write_text(cpus + "\n")
    (tmp_path / "possible").write_text("0-1\n")   # not a node directory
    nodes = hwm.read_numa_nodes(tmp_path)
    assert [n.id for n in nodes] == [0, 1]
    assert nodes[1].cpus[:2] == [32, 33] and len(nodes[1].cpus) == 64
    assert nodes[0].total_bytes == 263921868 * 1024
    # available = free + page cache - shmem
    assert nodes[0].available_bytes == (200000000 + 10000000 - 1000000) * 1024
    assert hwm.read_numa_nodes(tmp_path / "missing") == []


def test_reconcile_nodes_with_host_totals():
    node = hwm.NumaNode(id=0, total_bytes=7 * GiB, available_bytes=3 * GiB, cpus=[0, 1])
    fixed = hwm.reconcile_nodes([node], 24 * GiB, 20 * GiB, 2)
    assert fixed[0].total_bytes == 24 * GiB and fixed[0].available_bytes == 20 * GiB
    ok = hwm.NumaNode(id=0, total_bytes=24 * GiB, available_bytes=3 * GiB, cpus=[0, 1])
    assert hwm.reconcile_nodes([ok], 24 * GiB, 20 * GiB, 2)[0] is ok
    assert hwm.reconcile_nodes([], 8 * GiB, 4 * GiB, 4)[0].cpus == [0, 1, 2, 3]


def test_parse_cpuinfo_and_nvidia_smi():
    info = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma f16c avx512f avx512bw avx512_vnni\n"
    isa = hwm.parse_cpuinfo_isa(info)
    assert "avx512_vnni" in isa and "avx2" in isa and "amx_int8" not in isa
    gpus = hwm.parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559, 80000\n1, Tesla T4, 15360, 15000\nbad line\n")
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].total_bytes == 81559 << 20 and gpus[0].free_bytes == 80000 << 20
    assert gpus[0].bandwidth == 3.35e12 and gpus[1].bandwidth == 320e9


SMI = ("0, GPU-aaaa1111-0000, NVIDIA H100 80GB HBM3, 81559, 80000\n"
       "1, GPU-bbbb2222-0000, Tesla T4, 15360, 15000\n")


@pytest.mark.parametrize("visible, want", [
    (None, ["NVIDIA H100 80GB HBM3", "Tesla T4"]),
    ("1", ["Tesla T4"]),                      # torch's cuda:0 is the T4
    ("1,0", ["Tesla T4", "NVIDIA H100 80GB HBM3"]),
    ("GPU-bbbb", ["Tesla T4"]),               # a UUID prefix, as CUDA takes it
    ("0,7,1", ["NVIDIA H100 80GB HBM3"]),     # CUDA stops at the first entry it cannot resolve
    ("", []),
    ("-1", []),
])
def test_nvidia_smi_gpus_are_the_ones_cuda_visible_devices_shows(visible, want):
    gpus = hwm.parse_nvidia_smi(SMI, visible)
    assert [g.name for g in gpus] == want
    assert [g.index for g in gpus] == list(range(len(want)))   # cuda:i, not nvidia-smi's index


def test_gpus_are_read_without_a_cuda_context_until_the_process_uses_cuda(monkeypatch):
    """nvidia-smi while CUDA is unused here (torch.cuda.mem_get_info would start a context on
    every GPU, hundreds of MB each, for a dry-run); torch once CUDA is in use."""
    import subprocess

    import torch

    class Done:
        returncode, stdout = 0, SMI

    ran = []
    monkeypatch.setattr(hwm.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(hwm.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or Done())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (100 * GiB, 141 * GiB))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    gpus = hwm.detect_gpus()
    assert [g.name for g in gpus] == ["Tesla T4"] and gpus[0].free_bytes == 15000 << 20 and len(ran) == 1
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    gpus = hwm.detect_gpus()
    assert [(g.name, g.free_bytes) for g in gpus] == [("NVIDIA H200", 100 * GiB)] and len(ran) == 1
    # a MIG instance is not among nvidia-smi's GPUs: torch it is, even before CUDA is used
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-5c1ab2cd-0000")
    assert [g.name for g in hwm.detect_gpus()] == ["NVIDIA H200"] and len(ran) == 1
    monkeypatch.setattr(subprocess, "run", None)   # nothing looked for at all
    assert hwm.detect(gpus=False).gpus == [] and len(ran) == 1


def test_detect_this_machine():
    hw = hwm.detect()
    assert hw.ram_total > 0 and 0 < hw.ram_available <= hw.ram_total
    assert hw.numa_nodes and hw.allowed_nodes
    all_cpus = {c for n in hw.numa_nodes for c in n.cpus}
    assert hw.allowed_cpus and set(hw.allowed_cpus) <= all_cpus
    # node memory agrees with the host totals (within the reconciliation tolerance)
    assert abs(sum(n.total_bytes for n in hw.numa_nodes) - hw.ram_total) <= 0.1 * hw.ram_total
    assert hwm.detect_membind() is None or isinstance(hwm.detect_membind(), list)


def test_describe_binding():
    assert hwm.describe_binding([0, 1], [0], [0, 1], [0]) == ""
    s = hwm.describe_binding(list(range(32, 64)), [1], list(range(64)), [0, 1], membind=[1])
    assert "NUMA node(s) 1 of 0-1" in s and "membind" in s and "cpus 32-63" in s


def test_overrides_make_a_hypothetical_machine():
    hw = hwm.apply_overrides(hwm.detect(), gpu_mem="48GiB", ram="512GiB", numa_nodes=2, cores=64, threads=128)
    assert hw.hypothetical and not hw.binding
    assert hw.gpus[0].total_bytes == 48 * GiB
    assert [n.total_bytes for n in hw.numa_nodes] == [256 * GiB, 256 * GiB]
    assert len(hw.allowed_cpus) == 128 and hw.allowed_mems == [0, 1]
    assert hw.numa_nodes[0].cpus == list(range(32)) + list(range(64, 96))
    assert hw.allowed_cores == 64
    no_gpu = hwm.apply_overrides(hw, gpu_mem=0)
    assert no_gpu.gpus == [] and hw.gpus  # a copy: the input is untouched


def test_bind_node_is_numactl():
    hw = hwm.apply_overrides(hwm.from_profile("2x256g-48g"), bind_node=1)
    assert hw.allowed_mems == [1]
    assert hw.allowed_cpus == hw.numa_nodes[1].cpus
    assert "numactl -N 1 -m 1" in hw.binding
    assert hw.allowed_cores == 32
    with pytest.raises(ValueError, match="NUMA nodes 0-1"):
        hwm.apply_overrides(hw, bind_node=5)
    with pytest.raises(ValueError, match="NUMA nodes 0-1"):
        hwm.apply_overrides(hw, allowed_mems="3")
    only_mem = hwm.apply_overrides(hwm.from_profile("2x256g-48g"), allowed_mems="1")
    assert only_mem.allowed_mems == [1] and "membind" in only_mem.binding


def test_profile(tmp_path):
    hw = hwm.from_profile("2x256g-48g")
    assert hw.gpus[0].total_bytes == 48 * GiB and hw.gpus[0].bandwidth == 960e9
    assert len(hw.numa_nodes) == 2 and hw.ram_total == 512 * GiB
    assert hw.ram_bandwidth_per_node == 150e9 and "avx512_vnni" in hw.isa
    assert hw.sources == {"all": "profile:2x256g-48g"}
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"ram": "1TiB", "numa_nodes": 4, "cores": 96, "gpus": []}))
    mine = hwm.from_profile(str(p))
    assert len(mine.numa_nodes) == 4 and mine.gpus == [] and mine.ram_total == 1 << 40
    with pytest.raises(ConfigError, match="2x256g-48g"):
        hwm.from_profile("no-such-profile")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"numa_nodes": 2}))
    with pytest.raises(ValueError, match="ram"):
        hwm.from_profile(str(bad))


def test_allowed_cores_count_smt_siblings_once(tmp_path):
    hw = hwm.from_profile("2x256g-48g")              # 64 cores, 128 threads: cpu c and c+64 are siblings
    assert hwm.apply_overrides(hw, allowed_cpus="0-31").allowed_cores == 32
    assert hwm.apply_overrides(hw, allowed_cpus="0-15,64-79").allowed_cores == 16
    for cpu, core in ((0, 0), (1, 1), (2, 0), (3, 1)):
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "core_id").write_text(f"{core}\n")
        (d / "physical_package_id").write_text("0\n")
    cores = hwm.read_cpu_cores(tmp_path)
    assert cores == {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)}
