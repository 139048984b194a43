"""NUMA placement of routed-expert memory and of the expert engine's worker threads.

Modes (the Plan names one; `--numa`):
  off         one worker group on all allowed CPUs; experts used in place from the mmap'd file.
  interleave  experts copied into memory interleaved page by page over the allowed nodes;
              one worker group on all allowed CPUs.
  distribute  one worker group per node; node p holds rows [f0_p, f1_p) of every expert's gate
              and up and rows [d0_p, d1_p) of its down, bound to node p: one copy in total,
              and each node's workers read only node-local weights.
  replicate   a full copy per node (only when the Plan says it fits); each node's workers
              compute the same row ranges as in distribute, from their local copy.

Splitting down by its output rows D rather than by the F columns (with partial sums) keeps
every output element one dot product computed by one thread, so all modes give
bit-identical results; the price is that h (K x F floats per token, ~64 KB) is read across
nodes, against megabytes of weights.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from hybrid import _native
from hybrid.backends.experts import ExpertEngine, NativeExperts, split_rows

MODES = ("off", "interleave", "distribute", "replicate")
_CHUNK = 64 << 20  # bytes per read: big enough to stream, small enough to drop from the page cache


@dataclass
class NodeGroup:
    """A partition of the engine: memory node `node` and the CPUs of its workers."""

    node: int
    cpus: list


def node_groups(mode: str, *, threads: int | None = None, logical_partitions: int | None = None,
                hardware=None) -> list[NodeGroup]:
    """Worker groups for `mode` on this machine, within the CPUs and memory nodes this process
    may use. Default workers per node: its physical cores minus one for the runtime (at least
    one). `logical_partitions` splits each node's CPUs into that many groups of the same node,
    so the per-node logic runs on one-node machines (tests)."""
    if mode not in MODES:
        raise ValueError(f"--numa {mode}: unknown mode; use one of {', '.join(MODES)}")
    if hardware is None:
        from placement.hardware import detect

        hardware = detect(gpus=False)   # the NUMA layout alone
    allowed_cpus = set(_native.allowed_cpus())
    nodes = [n for n in hardware.allowed_nodes if allowed_cpus & set(n.cpus)] or hardware.allowed_nodes
    groups = []
    for n in nodes:
        cpus = sorted(allowed_cpus & set(n.cpus)) or sorted(allowed_cpus)
        groups.append(NodeGroup(n.id, cpus))
    if not groups:
        groups = [NodeGroup(0, sorted(allowed_cpus))]
    if mode in ("off", "interleave"):
        groups = [NodeGroup(-1, sorted({c for g in groups for c in g.cpus}))]
    if logical_partitions:
        groups = [NodeGroup(g.node, part) for g in groups
                  for part in _split_cpus(g.cpus, logical_partitions)]
    per_group = _threads_per_group(groups, threads, hardware)
    return [NodeGroup(g.node, [g.cpus[i % len(g.cpus)] for i in range(n)]) for g, n in zip(groups, per_group)]


def _split_cpus(cpus: list, parts: int) -> list:
    # with fewer CPUs than parts, groups share CPUs round-robin (logic tests on small machines)
    return [[cpus[(i + j * parts) % len(cpus)] for j in range(max(1, len(cpus) // parts))]
            for i in range(parts)]


def _threads_per_group(groups, threads, hardware) -> list:
    if threads is not None:
        if threads < len(groups):
            raise ValueError(f"--threads {threads}: needs at least one per NUMA group ({len(groups)})")
        base, extra = divmod(threads, len(groups))
        return [base + (i < extra) for i in range(len(groups))]
    out = []
    for g in groups:
        cores = len({hardware.cpu_core.get(c, c) for c in g.cpus}) if hardware.cpu_core else len(g.cpus)
        out.append(max(1, cores - 1))
    return out


class PlacedExperts:
    """Routed-expert memory of a model, placed per mode, registered with one ExpertEngine."""

    def __init__(self, gguf, mode: str, groups: list[NodeGroup], *, d_model: int, max_tokens: int = 512,
                 max_k: int = 8, hugepages: bool = True, progress: bool = True):
        if mode not in MODES:
            raise ValueError(f"--numa {mode}: unknown mode; use one of {', '.join(MODES)}")
        self.gguf = gguf
        self.mode = mode
        self.groups = groups
        self.hugepages = hugepages
        self.progress = progress
        self.buffers: list = []            # NumaBuffer objects (keep them alive)
        self.copied_bytes = 0              # queued for load(): what becomes resident
        self.warnings: list[str] = []
        self.engine = ExpertEngine(d_model, max_tokens=max_tokens, max_k=max_k,
                                   partitions=[g.cpus for g in groups])
        self._copies: list = []            # pending (path, offset, nbytes, dst memoryview)

    # -- allocation ---------------------------------------------------------------------
    def _alloc(self, nbytes: int, node: int | None) -> np.ndarray:
        nodes = sorted({g.node for g in self.groups if g.node >= 0})
        if node is not None:
            policy, target = _native.MemPolicy.bind, [node]
        elif self.mode == "interleave":
            from placement.hardware import detect

            policy, target = _native.MemPolicy.interleave, detect(gpus=False).allowed_mems
        else:
            policy, target = _native.MemPolicy.none, nodes
        buf = _native.NumaBuffer(nbytes, policy, target, self.hugepages)
        if buf.policy_error:
            self._warn(f"NUMA {policy.name} refused ({buf.policy_error}); memory is placed by the kernel "
                       "as with --numa off")
        if self.hugepages and buf.hugepage_error:
            self._warn(f"transparent huge pages not available ({buf.hugepage_error})")
        self.buffers.append(buf)
        return np.frombuffer(buf, dtype=np.uint8)

    def _warn(self, msg: str):
        if msg not in self.warnings:
            self.warnings.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _copy(self, info, rows: tuple[int, int] | None, n_experts: int, node: int | None,
              skip=frozenset()) -> np.ndarray:
        """Queue a copy of rows [r0, r1) of every expert of a tensor (all rows when None) but
        the experts in `skip` (hot on the GPU: the CPU engine never reads them, and their
        part of the buffer, never written, takes no memory)."""
        per_expert = info.n_bytes // n_experts
        row = info.row_bytes
        r0, r1 = rows if rows is not None else (0, per_expert // row)
        nbytes = n_experts * (r1 - r0) * row
        dst = self._alloc(max(nbytes, 1), node)
        if rows is None and not skip:
            self._copies.append((info.path, info.offset, nbytes, memoryview(dst)[:nbytes]))
            self.copied_bytes += nbytes
        else:
            span = (r1 - r0) * row
            for e in range(n_experts):
                if e in skip:
                    continue
                self._copies.append((info.path, info.offset + e * per_expert + r0 * row, span,
                                     memoryview(dst)[e * span:(e + 1) * span]))
                self.copied_bytes += span
        return dst[:nbytes]

    # -- layers -------------------------------------------------------------------------
    def add_layer(self, layer: int, skip=()) -> NativeExperts:
        """The layer's experts for the engine; `skip`: expert ids hot on the GPU, which the
        copying modes leave out (the Plan counts no host bytes for them) and the engine is
        told to skip."""
        names = [f"blk.{layer}.ffn_{k}_exps.weight" for k in ("gate", "up", "down")]
        gate, up, down = (self.gguf.tensors[n] for n in names)
        E, F, D = gate.shape[0], gate.shape[1], gate.shape[2]
        types = [int(t.ggml_type) for t in (gate, up, down)]
        skip = frozenset(int(e) for e in skip)
        if self.mode == "off":
            views = [self.gguf.view(n) for n in names]
            experts = self.engine.add_layer(E, views[0], types[0], views[1], types[1], views[2], types[2])
        elif self.mode == "interleave":
            g, u, d = (self._copy(t, None, E, None, skip) for t in (gate, up, down))
            experts = self.engine.add_layer(E, g, types[0], u, types[1], d, types[2])
        else:
            shares = [len(gr.cpus) for gr in self.groups]
            slices = []
            for gr, (f0, f1), (d0, d1) in zip(self.groups, split_rows(F, shares), split_rows(D, shares)):
                node = gr.node if gr.node >= 0 else None
                if self.mode == "distribute":
                    g = self._copy(gate, (f0, f1), E, node, skip)
                    u = self._copy(up, (f0, f1), E, node, skip)
                    d = self._copy(down, (d0, d1), E, node, skip)
                    slices.append((g, types[0], u, types[1], d, types[2], f0, f1, d0, d1, f0, d0))
                else:  # replicate
                    g, u, d = (self._copy(t, None, E, node, skip) for t in (gate, up, down))
                    slices.append((g, types[0], u, types[1], d, types[2], f0, f1, d0, d1, 0, 0))
            experts = self.engine.add_layer_slices(E, F, slices)
        if skip:
            mask = np.zeros(E, np.uint8)
            mask[sorted(skip)] = 1
            experts.set_skip(mask)
        return experts

    @property
    def placed_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    # -- loading ------------------------------------------------------------------------
    def load(self, workers: int | None = None) -> None:
        """Copy the queued expert bytes from the file(s) into their placed buffers, in parallel,
        dropping the file's pages from the page cache as it goes (no second resident copy)."""
        copies, self._copies = self._copies, []
        total = sum(c[2] for c in copies)
        if not total:
            return
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                       desc=f"experts ({self.mode})", dynamic_ncols=True)
        fds = {p: os.open(p, os.O_RDONLY) for p in {c[0] for c in copies}}
        # split big copies into chunks so several readers stream one big tensor together
        chunks = []
        for path, off, n, dst in copies:
            for s in range(0, n, _CHUNK):
                chunks.append((fds[path], off + s, min(_CHUNK, n - s), dst[s:s + _CHUNK]))

        def run(chunk):
            fd, off, n, dst = chunk
            got = 0
            while got < n:
                r = os.preadv(fd, [dst[got:n]], off + got)
                if r <= 0:
                    raise OSError(f"{_path_of(fd, fds)}: unexpected end of file at byte {off + got} "
                                  "(truncated GGUF?)")
                got += r
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
            return n

        try:
            with ThreadPoolExecutor(max_workers=workers or min(8, max(2, len(_native.allowed_cpus())))) as ex:
                for n in ex.map(run, chunks):
                    if bar is not None:
                        bar.update(n)
        finally:
            for fd in fds.values():
                os.close(fd)
            if bar is not None:
                bar.close()

    def close(self):
        self.engine.close()
        self.buffers = []


def _path_of(fd, fds) -> str:
    return next((p for p, f in fds.items() if f == fd), "GGUF file")


def numa_maps_policy(address: int) -> str | None:
    """The policy field of /proc/self/numa_maps for the mapping holding `address` (the kernel
    merges neighbouring mappings with the same policy, so match the nearest start below)."""
    best = None
    try:
        with open("/proc/self/numa_maps") as f:
            for line in f:
                start, policy = line.split()[:2]
                start = int(start, 16)
                if start <= address and (best is None or start > best[0]):
                    best = (start, policy)
    except OSError:
        return None
    return best[1] if best else None
