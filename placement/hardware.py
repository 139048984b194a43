"""What this process may use: GPUs, host RAM, NUMA nodes, the cpus/memory nodes it is bound to, ISA.

Detection reads /proc and /sys (cpuset, node meminfo), psutil, py-libnuma (membind: what
`numactl -m` sets, invisible in /proc/self/status) and nvidia-smi / torch.cuda for GPUs. Every
field can be replaced for a hypothetical machine (`apply_overrides`, `from_profile`).
The parsers take text so they can be tested with sample files.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from placement.configs import load_config
from placement.units import fmt_bytes, fmt_int_list, parse_bandwidth, parse_int_list, parse_size


class HardwareError(ValueError):
    pass


@dataclass
class GPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    bandwidth: float = 0.0   # bytes/s; 0 = unknown (the solver then assumes one and says so)


@dataclass
class NumaNode:
    id: int
    total_bytes: int
    available_bytes: int     # free + reclaimable page cache, as far as the kernel tells
    cpus: list = field(default_factory=list)


@dataclass
class Hardware:
    gpus: list
    ram_total: int
    ram_available: int
    numa_nodes: list
    allowed_cpus: list       # cpus this process may run on (affinity / cpuset)
    allowed_mems: list       # memory nodes it may allocate from (cpuset mems and membind)
    physical_cores: int
    logical_cpus: int
    isa: list = field(default_factory=list)
    ram_bandwidth_per_node: float = 0.0   # bytes/s, 0 = unknown
    pcie_bandwidth: float = 0.0           # bytes/s host<->GPU, 0 = unknown
    cpu_flops: float = 0.0                # sustained FLOP/s of the allowed cpus, 0 = unknown (measured only)
    layer_overhead_s: float = 0.0         # a CPU decode step's small torch ops, per layer (measured only)
    cpu_flops_by_type: dict = field(default_factory=dict)   # "ggml type" -> FLOP/s of its matmul (measured only)
    # "tokens per expert" -> FLOP/s of the expert engine's prefill, Q4_K experts (measured only)
    moe_prefill_flops: dict = field(default_factory=dict)
    attention_flops: float = 0.0          # FLOP/s of the native causal attention of a prompt chunk (measured only)
    # "ggml type" -> bytes/s its one-token matmul computes, weights in cache (measured only)
    cpu_decode_bytes_by_type: dict = field(default_factory=dict)
    # a one-token Q4_K matmul streaming from RAM, as a share of the read bandwidth (measured only)
    ram_kernel_efficiency: float = 0.0
    binding: str = ""        # why allowed_* is narrower than the machine, "" when it is not
    hypothetical: bool = False
    sources: dict = field(default_factory=dict)   # field -> detected | override | profile:NAME
    cpu_core: dict = field(default_factory=dict)  # logical cpu -> physical core (SMT siblings share one)
    # apply_overrides: the machine before any override and the overrides in force, so that a
    # further override is applied to the base with all of them (the order the CLI applies them)
    base: object = field(default=None, repr=False, compare=False)
    overrides: dict = field(default_factory=dict, repr=False, compare=False)

    # --- derived ------------------------------------------------------------------------
    @property
    def node_ids(self) -> list:
        return [n.id for n in self.numa_nodes]

    @property
    def allowed_nodes(self) -> list:
        allowed = set(self.allowed_mems)
        return [n for n in self.numa_nodes if n.id in allowed]

    @property
    def is_bound(self) -> bool:
        return bool(self.binding)

    @property
    def threads_per_core(self) -> int:
        return max(1, self.logical_cpus // max(1, self.physical_cores))

    @property
    def allowed_cores(self) -> int:
        """Physical cores among the allowed cpus (SMT siblings counted once)."""
        if self.cpu_core:
            return max(1, len({self.cpu_core.get(c, ("cpu", c)) for c in self.allowed_cpus}))
        return max(1, len(self.allowed_cpus) // self.threads_per_core)

    def summary(self) -> dict:
        d = asdict(replace(self, base=None))
        for k in ("cpu_core", "base", "overrides"):
            del d[k]
        d["allowed_cpus"] = fmt_int_list(self.allowed_cpus)
        d["allowed_mems"] = fmt_int_list(self.allowed_mems)
        for n in d["numa_nodes"]:
            n["cpus"] = fmt_int_list(n["cpus"])
        return d

    def describe(self) -> str:
        gpus = ", ".join(f"{g.name} {fmt_bytes(g.total_bytes)}" for g in self.gpus) or "no GPU"
        nodes = " + ".join(fmt_bytes(n.total_bytes) for n in self.numa_nodes)
        s = (f"{gpus}; RAM {fmt_bytes(self.ram_total)} on {len(self.numa_nodes)} NUMA node(s) ({nodes}); "
             f"{self.physical_cores} cores / {self.logical_cpus} threads")
        if self.binding:
            s += f"; {self.binding}"
        return s


# --- parsers (text in, values out) --------------------------------------------------------

def parse_proc_status(text: str) -> dict:
    """Cpus_allowed_list / Mems_allowed_list of /proc/<pid>/status -> {'cpus': [...], 'mems': [...]}."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Cpus_allowed_list":
            out["cpus"] = parse_int_list(value)
        elif key == "Mems_allowed_list":
            out["mems"] = parse_int_list(value)
    return out


def parse_node_meminfo(text: str) -> dict:
    """/sys/devices/system/node/nodeN/meminfo -> {'MemTotal': bytes, 'MemFree': bytes, ...}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*Node\s+\d+\s+([\w()]+):\s+(\d+)\s*(kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    return out


def parse_cpuinfo_isa(text: str) -> list:
    """The SIMD features we dispatch on, from the first 'flags' line of /proc/cpuinfo."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return [f for f in wanted if f in flags]
    return []


def parse_nvidia_smi(text: str, visible: str | None = None) -> list:
    """`nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.free --format=csv,noheader,nounits`
    (or without the uuid column), as the GPUs CUDA shows this process: `visible` is
    CUDA_VISIBLE_DEVICES (None: all), which nvidia-smi ignores and torch does not."""
    found = []   # (uuid, GPU)
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        uuid = parts.pop(1) if len(parts) >= 5 else ""
        if len(parts) < 4:
            continue
        try:
            idx, name, total, free = int(parts[0]), parts[1], int(float(parts[2])), int(float(parts[3]))
        except ValueError:
            continue
        found.append((uuid, GPU(index=idx, name=name, total_bytes=total << 20, free_bytes=free << 20,
                                bandwidth=gpu_bandwidth_for(name))))
    if visible is None:
        return [g for _, g in found]
    shown = []
    for entry in visible.split(","):
        entry = entry.strip()
        hit = [g for u, g in found
               if (entry.isdigit() and g.index == int(entry)) or (entry and u and u.startswith(entry))]
        if len(hit) != 1:   # CUDA stops at the first entry it cannot resolve
            break
        shown.append(hit[0])
    return [replace(g, index=i) for i, g in enumerate(shown)]   # torch's cuda:i


# HBM/GDDR bandwidth of common cards (vendor figures), for estimates when not measured
_GPU_BANDWIDTH = [
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12), ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.04e12), ("A100", 1.56e12), ("L40S", 864e9), ("L40", 864e9), ("L4", 300e9),
    ("RTX 6000 Ada", 960e9), ("RTX A6000", 768e9), ("A6000", 768e9), ("A40", 696e9),
    ("RTX 5090", 1.79e12), ("RTX 4090", 1.01e12), ("RTX 3090", 936e9), ("A10", 600e9), ("T4", 320e9),
]


def gpu_bandwidth_for(name: str) -> float:
    for key, bw in _GPU_BANDWIDTH:
        if key.lower() in name.lower():
            return bw
    return 0.0


# --- detection ----------------------------------------------------------------------------

def _read(path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def read_numa_nodes(root="/sys/devices/system/node") -> list:
    """NUMA nodes from sysfs (works without libnuma); [] where sysfs has none (macOS, containers)."""
    root = Path(root)
    nodes = []
    if not root.is_dir():
        return nodes
    for d in sorted(root.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        mi = parse_node_meminfo(_read(d / "meminfo"))
        if not mi.get("MemTotal"):
            continue
        avail = mi.get("MemFree", 0) + mi.get("FilePages", 0) - mi.get("Shmem", 0)
        nodes.append(NumaNode(id=int(d.name[4:]), total_bytes=mi["MemTotal"],
                              available_bytes=max(0, min(avail, mi["MemTotal"])),
                              cpus=parse_int_list(_read(d / "cpulist"))))
    return nodes


def reconcile_nodes(nodes: list, ram_total: int, ram_available: int, logical_cpus: int) -> list:
    """Make node memory agree with the host totals.

    Some VMs and containers expose a sysfs node that covers only part of the RAM; when the
    nodes' sum is off by more than 10%, scale them to the host figures (one node: take them).
    """
    if not nodes:
        return [NumaNode(id=0, total_bytes=ram_total, available_bytes=ram_available,
                         cpus=list(range(logical_cpus)))]
    s_total = sum(n.total_bytes for n in nodes)
    if abs(s_total - ram_total) <= 0.1 * ram_total:
        return nodes
    out = []
    for n in nodes:
        share = n.total_bytes / s_total if s_total else 1 / len(nodes)
        out.append(replace(n, total_bytes=int(ram_total * share), available_bytes=int(ram_available * share)))
    return out


def detect_membind():
    """Nodes of the MPOL_BIND policy set by `numactl -m` / set_mempolicy, or None when not bound.

    Not visible in /proc/self/status (that shows the cpuset); asked through libnuma.
    """
    try:
        from numa import memory as numa_memory
        from numa import info as numa_info

        if not numa_info.numa_available():
            return None
        nodes = sorted(numa_memory.get_membind_nodes())
        n_conf = numa_info.get_num_configured_nodes()
    except Exception:  # no libnuma on this machine (py-libnuma fails at import) or no NUMA
        return None
    return nodes if nodes and len(nodes) < n_conf else None


def detect_gpus() -> list:
    """GPUs with total/free memory: from torch.cuda once this process uses CUDA, else from
    nvidia-smi (asking torch would start a CUDA context on every GPU: hundreds of MB of each,
    for a dry-run or a CPU-only run), else torch.cuda when a GPU driver is visible (importing
    torch costs seconds)."""
    torch = sys.modules.get("torch")
    in_use = torch is not None and torch.cuda.is_initialized()
    mig = "MIG-" in os.environ.get("CUDA_VISIBLE_DEVICES", "")   # instances nvidia-smi's list lacks
    if not in_use and not mig and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.free",
                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                return parse_nvidia_smi(out.stdout, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except (OSError, subprocess.SubprocessError):
            pass
    if torch is None and (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")):
        try:
            import torch  # noqa: F811 - only here, never at module level
        except ImportError:
            return []
    if torch is None:
        return []
    gpus = []
    try:
        if not torch.cuda.is_available():
            return []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            gpus.append(GPU(index=i, name=name, total_bytes=int(total), free_bytes=int(free),
                            bandwidth=gpu_bandwidth_for(name)))
    except Exception:
        return []
    return gpus


def describe_binding(allowed_cpus, allowed_mems, all_cpus, all_nodes, membind=None) -> str:
    """A sentence naming the restriction, or '' when the process may use the whole machine."""
    parts = []
    if all_nodes and set(allowed_mems) != set(all_nodes):
        how = "membind (numactl -m)" if membind else "cpuset"
        parts.append(f"may allocate only on NUMA node(s) {fmt_int_list(allowed_mems)} of "
                     f"{fmt_int_list(all_nodes)} ({how})")
    if all_cpus and set(allowed_cpus) != set(all_cpus):
        parts.append(f"may run only on cpus {fmt_int_list(allowed_cpus)} of {fmt_int_list(all_cpus)} "
                     f"(affinity / cpuset, e.g. numactl -N, taskset)")
    return "this process " + " and ".join(parts) if parts else ""


def detect(gpus: bool = True) -> Hardware:
    """The machine this process runs on, as far as it may use it (`gpus` False: none looked
    for, for a run told to stay on the CPU)."""
    import psutil

    vm = psutil.virtual_memory()
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    nodes = reconcile_nodes(read_numa_nodes(), int(vm.total), int(vm.available), logical)
    status = parse_proc_status(_read("/proc/self/status"))
    all_cpus = sorted({c for n in nodes for c in n.cpus}) or list(range(logical))
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
    else:
        cpus = status.get("cpus", all_cpus)
    mems = status.get("mems", [n.id for n in nodes])
    membind = detect_membind()
    if membind:
        mems = sorted(set(mems) & set(membind)) or membind
    mems = [m for m in mems if m in {n.id for n in nodes}] or [n.id for n in nodes]
    return Hardware(
        gpus=detect_gpus() if gpus else [],
        ram_total=int(vm.total), ram_available=int(vm.available),
        numa_nodes=nodes, allowed_cpus=cpus, allowed_mems=mems,
        physical_cores=int(physical), logical_cpus=int(logical),
        isa=parse_cpuinfo_isa(_read("/proc/cpuinfo")),
        binding=describe_binding(cpus, mems, all_cpus, [n.id for n in nodes], membind),
        sources={"all": "detected"}, cpu_core=read_cpu_cores(),
    )


def measure(hw: Hardware, refresh: bool = False) -> Hardware:
    """`hw` (this machine, detected) with its measured read bandwidth and compute
    (placement.probe: cached per machine; `refresh` measures again); as it was when the
    probe cannot run."""
    from placement.probe import measured

    m = measured(refresh)
    if not m:
        return hw
    hw = replace(hw, sources=dict(hw.sources, ram_bandwidth="measured", cpu_flops="measured"))
    hw.ram_bandwidth_per_node = m["read_bytes_per_s"] / max(1, len(hw.allowed_nodes))
    hw.cpu_flops = m["cpu_flops"]
    hw.layer_overhead_s = m.get("layer_overhead_s", 0.0)
    hw.cpu_flops_by_type = dict(m.get("cpu_flops_by_type", {}))
    hw.moe_prefill_flops = dict(m.get("moe_prefill_flops", {}))
    hw.attention_flops = m.get("attention_flops", 0.0)
    hw.cpu_decode_bytes_by_type = dict(m.get("decode_bytes_per_s_by_type", {}))
    hw.ram_kernel_efficiency = min(1.0, m.get("matmul_read_bytes_per_s", 0.0) / m["read_bytes_per_s"])
    return hw


def read_cpu_cores(root="/sys/devices/system/cpu") -> dict:
    """logical cpu -> (package, core) from sysfs topology; {} where sysfs does not say."""
    out = {}
    for d in Path(root).glob("cpu[0-9]*"):
        core = _read(d / "topology" / "core_id").strip()
        pkg = _read(d / "topology" / "physical_package_id").strip()
        if core.lstrip("-").isdigit():
            out[int(d.name[3:])] = (int(pkg) if pkg.lstrip("-").isdigit() else 0, int(core))
    return out


# --- hypothetical machines ----------------------------------------------------------------

def _core_map(cores: int, threads_per_core: int) -> dict:
    return {c + t * cores: c for t in range(threads_per_core) for c in range(cores)}


def _topology(ram_total: int, n_nodes: int, cores: int, threads_per_core: int) -> list:
    """Equal nodes; logical cpu ids like Linux numbers them: first threads of all cores, then siblings."""
    if n_nodes < 1 or cores < n_nodes:
        raise HardwareError(f"--numa-nodes {n_nodes} needs at least as many cores (--cores {cores})")
    nodes = []
    for k in range(n_nodes):
        lo, hi = k * cores // n_nodes, (k + 1) * cores // n_nodes
        cpus = [c + t * cores for t in range(threads_per_core) for c in range(lo, hi)]
        mem = ram_total // n_nodes
        nodes.append(NumaNode(id=k, total_bytes=mem, available_bytes=mem, cpus=sorted(cpus)))
    return nodes


HW_OVERRIDES = ("gpu_mem", "gpu_bandwidth", "gpu_name", "ram", "numa_nodes", "cores", "threads",
                "threads_per_core", "bind_node", "allowed_mems", "allowed_cpus", "ram_bandwidth",
                "pcie_bandwidth", "isa")


def apply_overrides(hw: Hardware, source="override", **overrides) -> Hardware:
    """A copy of `hw` with the given fields replaced (HW_OVERRIDES; None: not given, or taken
    back when `hw` had it). Sizes accept '48GiB'-style strings.

    Changing ram, numa_nodes, cores or threads makes a hypothetical machine: the topology is
    rebuilt with equal nodes and the process may use all of it unless bind_node / allowed_* say
    otherwise. Overrides compose: on an overridden `hw` all of them are applied again to its
    base, in one order, so `apply_overrides(apply_overrides(h, a), b)` is
    `apply_overrides(h, a + b)` (a suggestion's re-plan and its command line agree).
    """
    unknown = set(overrides) - set(HW_OVERRIDES)
    if unknown:
        raise HardwareError(f"unknown hardware override(s): {', '.join(sorted(unknown))}")
    root = hw.base if hw.base is not None else hw
    merged = {k: v for k, v in {**hw.overrides, **overrides}.items() if v is not None}
    out = _apply(root, source=source, **merged)
    out.base, out.overrides = root, merged
    return out


def _apply(hw: Hardware, *, gpu_mem=None, gpu_bandwidth=None, gpu_name=None, ram=None,
           numa_nodes=None, cores=None, threads=None, threads_per_core=None, bind_node=None,
           allowed_mems=None, allowed_cpus=None, ram_bandwidth=None, pcie_bandwidth=None, isa=None,
           source="override") -> Hardware:
    hw = replace(hw, gpus=[replace(g) for g in hw.gpus], numa_nodes=[replace(n) for n in hw.numa_nodes],
                 sources=dict(hw.sources))
    if gpu_mem is not None:
        size = parse_size(gpu_mem)
        if size <= 0:
            hw.gpus = []
        elif hw.gpus:
            hw.gpus[0] = replace(hw.gpus[0], total_bytes=size, free_bytes=size)
        else:
            hw.gpus = [GPU(index=0, name=gpu_name or "GPU", total_bytes=size, free_bytes=size)]
        hw.sources["gpu_mem"] = source
    if hw.gpus and gpu_name is not None:
        hw.gpus[0] = replace(hw.gpus[0], name=gpu_name, bandwidth=hw.gpus[0].bandwidth or gpu_bandwidth_for(gpu_name))
    if hw.gpus and gpu_bandwidth is not None:
        hw.gpus[0] = replace(hw.gpus[0], bandwidth=parse_bandwidth(gpu_bandwidth))
        hw.sources["gpu_bandwidth"] = source
    if any(v is not None for v in (ram, numa_nodes, cores, threads, threads_per_core)):
        total = parse_size(ram) if ram is not None else hw.ram_total
        n = int(numa_nodes) if numa_nodes is not None else len(hw.numa_nodes)
        c = int(cores) if cores is not None else hw.physical_cores
        if c < 1:
            raise HardwareError(f"--cores {cores}: give at least 1")
        tpc = (int(threads_per_core) if threads_per_core is not None
               else max(1, int(threads) // c) if threads is not None else hw.threads_per_core)
        if tpc < 1:
            raise HardwareError(f"--threads-per-core {threads_per_core}: give at least 1")
        hw.numa_nodes = _topology(total, n, c, tpc)
        hw.ram_total = hw.ram_available = total
        hw.physical_cores, hw.logical_cpus = c, c * tpc
        hw.cpu_core = _core_map(c, tpc)
        hw.allowed_cpus = sorted(x for nd in hw.numa_nodes for x in nd.cpus)
        hw.allowed_mems = [nd.id for nd in hw.numa_nodes]
        hw.binding = ""
        if hw.sources.get("ram_bandwidth") == "measured":   # this machine's figures, not the new one's
            hw.ram_bandwidth_per_node, hw.cpu_flops, hw.layer_overhead_s = 0.0, 0.0, 0.0
            hw.cpu_flops_by_type, hw.cpu_decode_bytes_by_type, hw.ram_kernel_efficiency = {}, {}, 0.0
            hw.moe_prefill_flops, hw.attention_flops = {}, 0.0
            del hw.sources["ram_bandwidth"], hw.sources["cpu_flops"]
        if cores is None and not hw.hypothetical:
            hw.sources["cores"] = "this machine"   # said in the plan: the user may not mean it
        hw.hypothetical = True
        for k, v in (("ram", ram), ("numa_nodes", numa_nodes), ("cores", cores), ("threads", threads),
                     ("threads_per_core", threads_per_core)):
            if v is not None:
                hw.sources[k] = source
    all_cpus = sorted(x for nd in hw.numa_nodes for x in nd.cpus)
    all_nodes = hw.node_ids
    if bind_node is not None:
        node = next((nd for nd in hw.numa_nodes if nd.id == int(bind_node)), None)
        if node is None:
            raise HardwareError(f"--bind-node {bind_node}: this machine has NUMA nodes {fmt_int_list(all_nodes)}")
        hw.allowed_mems, hw.allowed_cpus = [node.id], list(node.cpus)
        hw.binding = (f"this process is bound to NUMA node {node.id} (cpus {fmt_int_list(node.cpus)}, memory node "
                      f"{node.id}: numactl -N {node.id} -m {node.id})")
        hw.sources["binding"] = source
    if allowed_mems is not None or allowed_cpus is not None:
        if allowed_mems is not None:
            mems = parse_int_list(allowed_mems) if isinstance(allowed_mems, str) else sorted(allowed_mems)
            bad = set(mems) - set(all_nodes)
            if bad or not mems:
                raise HardwareError(f"--allowed-mems {allowed_mems}: this machine has NUMA nodes {fmt_int_list(all_nodes)}")
            hw.allowed_mems = mems
        if allowed_cpus is not None:
            cpus = parse_int_list(allowed_cpus) if isinstance(allowed_cpus, str) else sorted(allowed_cpus)
            if not cpus:
                raise HardwareError("--allowed-cpus: empty cpu list")
            hw.allowed_cpus = cpus
        hw.binding = describe_binding(hw.allowed_cpus, hw.allowed_mems, all_cpus, all_nodes,
                                      membind=allowed_mems is not None)
        hw.sources["binding"] = source
    if ram_bandwidth is not None:
        hw.ram_bandwidth_per_node = parse_bandwidth(ram_bandwidth)
        hw.sources["ram_bandwidth"] = source
    if pcie_bandwidth is not None:
        hw.pcie_bandwidth = parse_bandwidth(pcie_bandwidth)
        hw.sources["pcie_bandwidth"] = source
    if isa is not None:
        hw.isa = [s.strip() for s in isa.split(",")] if isinstance(isa, str) else list(isa)
        hw.sources["isa"] = source
    return hw


def from_profile(name_or_path) -> Hardware:
    """A hypothetical machine from configs/hardware/<name>.json (or a path to such a file)."""
    cfg = load_config("hardware", name_or_path)
    src = f"profile:{Path(str(name_or_path)).stem}"
    try:
        ram = parse_size(cfg["ram"])
        cores = int(cfg["cores"])
        threads = int(cfg.get("threads", cores))
        nodes = _topology(ram, int(cfg.get("numa_nodes", 1)), cores, max(1, threads // cores))
        gpus = []
        for i, g in enumerate(cfg.get("gpus", [])):
            size = parse_size(g["memory"])
            bw = parse_bandwidth(g["bandwidth"]) if "bandwidth" in g else gpu_bandwidth_for(g.get("name", ""))
            gpus.append(GPU(index=i, name=g.get("name", f"GPU {i}"), total_bytes=size, free_bytes=size, bandwidth=bw))
        hw = Hardware(
            gpus=gpus, ram_total=ram, ram_available=ram, numa_nodes=nodes,
            allowed_cpus=sorted(c for n in nodes for c in n.cpus), allowed_mems=[n.id for n in nodes],
            physical_cores=cores, logical_cpus=threads, isa=list(cfg.get("isa", [])),
            ram_bandwidth_per_node=parse_bandwidth(cfg.get("ram_bandwidth_per_node", 0)),
            pcie_bandwidth=parse_bandwidth(cfg.get("pcie_bandwidth", 0)),
            hypothetical=True, sources={"all": src}, cpu_core=_core_map(cores, max(1, threads // cores)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise HardwareError(f"hardware profile {name_or_path}: bad or missing field: {e}") from None
    return hw
