"""The Plan: where every tensor group lives, in which format, and what each memory budget holds.

The single source of truth between the solver and the runtime: the runtime loads what the plan
says, where it says (`Plan.placement_of`). Plain dataclasses; `to_dict`/`to_json` for machines,
`to_text` for people, `from_dict`/`from_json` to read a saved plan back.

Formats: "bf16" and "f32" (dequantized at load), "quantized" (the GGUF bytes as stored; for a
tensor stored as F32/F16 that is the stored float type).
Devices: "gpu0" (first GPU), "cpu" (host RAM as a whole), "numa0".. (host RAM per NUMA node).
"""

import json
import textwrap
from dataclasses import asdict, dataclass, field, fields

from placement.inventory import tensor_group, tensor_role
from placement.units import fmt_bytes

FORMATS = ("bf16", "f32", "quantized")


@dataclass
class DeviceUsage:
    bytes: int                 # what the plan puts here
    capacity_bytes: int        # what this process may use here
    breakdown: dict = field(default_factory=dict)   # role or reserve -> bytes
    kind: str = "gpu"          # gpu | host | numa
    note: str = ""

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.bytes

    @property
    def fits(self) -> bool:
        return self.bytes <= self.capacity_bytes


@dataclass
class Problem:
    budget: str                # the device key that overflows ("gpu0", "cpu", "numa1")
    needed_bytes: int
    available_bytes: int
    message: str

    @property
    def over_bytes(self) -> int:
        return self.needed_bytes - self.available_bytes


@dataclass
class Suggestion:
    change: str                # short id: gpu_format, ctx, numa, unbind, ram, gpu_mem, cpu_only, preset, ...
    cli: str                   # the hybrid-run flags that apply it (with `drop` taken away)
    message: str               # what to do, in words, with the re-plan's figure
    fits: bool                 # the plan re-solved with this change alone fits
    changes: dict = field(default_factory=dict)   # build_inputs keys -> values (None: taken back)
    scope: str = "run"         # run: flags of this run; model: another GGUF file; machine: other hardware
    drop: list = field(default_factory=list)      # flags of the command line this change takes away
    estimate: dict = field(default_factory=dict)  # decode_tok_s / prefill_tok_s of the re-plan
    command: str = ""          # the user's command line with the change applied (set by the CLI)


@dataclass
class Plan:
    fits: bool
    model: str                 # general.name or preset description
    source: str                # GGUF path or "preset:NAME"
    architecture: str
    quantization: str
    weights_bytes: int         # tensor data of the model
    n_tensors: int
    devices: dict              # "gpu0" | "cpu" | "numaN" -> DeviceUsage
    kv_cache_bytes: int
    kv_cache_tokens: int       # context x batch (all KV slots together)
    kv_cache_device: str
    kv_bytes_per_token: int
    kv_cache_dtype: str        # bf16 on the GPU, f32 on the CPU by default
    max_context_tokens: int    # the longest context the KV budget could hold (expert cache and GPU
                               # prefill given up)
    gpu_weight_format: str     # bf16 | quantized | none
    numa_mode: str             # off | interleave | distribute | replicate
    tensor_placement: dict     # group -> [device, format]
    cpu_linear_min_bytes: int  # on the CPU, 'quantized' linears below this (or of types without a
                               # native kernel) are held as f32 copies
    gpu_experts: list          # per layer: routed expert ids cached on the GPU ([] for dense layers)
    estimate: dict
    # prefill chunks of at least this many tokens stream the routed experts to gpu0 (0: never);
    # gpu_prefill says why, the crossover arithmetic and the VRAM reserved for it
    gpu_prefill_tokens: int = 0
    gpu_prefill: dict = field(default_factory=dict)
    kv_cache_kind: str = "mla"  # mla: one latent (+ rope key) per layer; gqa: K and V per KV head
    # the hot-expert cache's form: quantized (GGUF blocks, fused GPU kernel) | bf16 | none
    hot_expert_format: str = "none"
    # KV slots (sequences decoded together, one cache of kv_cache_tokens / kv_slots tokens each:
    # the server's --parallel) and why that many
    kv_slots: int = 1
    kv_slots_reason: str = ""
    problems: list = field(default_factory=list)
    suggestions: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    reserves: dict = field(default_factory=dict)    # how each reserve was sized
    workload: dict = field(default_factory=dict)
    policy: dict = field(default_factory=dict)
    hardware: dict = field(default_factory=dict)

    # --- queries for the runtime --------------------------------------------------------
    def placement_of(self, name: str):
        """(device, format) of tensor `name`; routed experts answer for the CPU-resident copy
        (the GPU cache of `gpu_experts[layer]` is extra, see `gpu_expert_ids`)."""
        group = tensor_group(name)
        if group not in self.tensor_placement:
            group = tensor_role(name)
        dev, fmt = self.tensor_placement[group]
        return dev, fmt

    def gpu_expert_ids(self, layer: int) -> list:
        if 0 <= layer < len(self.gpu_experts):
            return list(self.gpu_experts[layer])
        return []

    @property
    def device(self) -> str:
        """torch device of the non-expert compute: 'cuda:0' when the plan uses the GPU."""
        return "cuda:0" if "gpu0" in self.devices else "cpu"

    @property
    def kv_slot_tokens(self) -> int:
        """Tokens of one KV slot: the context of one sequence."""
        return self.kv_cache_tokens // max(1, self.kv_slots)

    @property
    def kv_slot_bytes(self) -> int:
        return self.kv_slot_tokens * self.kv_bytes_per_token

    @property
    def n_gpu_experts(self) -> int:
        return sum(len(x) for x in self.gpu_experts)

    def predicted_cpu_rss_growth(self, include_workspace: bool = True) -> int:
        """Host bytes the runtime's own loading (and one forward, with the workspace) should add
        to RSS: everything planned on 'cpu' except the OS reserve, the fixed interpreter/torch
        overhead (resident before loading) and page tables (kernel memory, not RSS)."""
        cpu = self.devices.get("cpu")
        if cpu is None:
            return 0
        skip = {"host_reserve", "runtime_overhead", "page_tables"}
        if not include_workspace:
            skip.update(("workspace", "tile_scratch", "expert_scratch"))
        return sum(v for k, v in cpu.breakdown.items() if k not in skip)

    def predicted_cpu_rss_after_forward(self) -> int:
        """Host bytes still resident once a forward has returned: the load's lines and the
        scratch the first forward keeps (tile_scratch, expert_scratch), not the workspace, whose
        activations are freed when the forward returns."""
        cpu = self.devices.get("cpu")
        return self.predicted_cpu_rss_growth() - (cpu.breakdown.get("workspace", 0) if cpu else 0)

    def predicted_gpu_allocated(self) -> int:
        """What torch.cuda.memory_allocated() should reach after loading (no CUDA context, no
        allocator slack, no workspaces: those are not live tensors between steps; the GPU
        prefill staging slots are, allocated at load)."""
        gpu = self.devices.get("gpu0")
        if gpu is None:
            return 0
        return sum(v for k, v in gpu.breakdown.items()
                   if k not in ("cuda_context", "allocator_slack", "workspace", "prefill_workspace",
                                "dequant_workspace"))

    # --- serialization ------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "devices":
                v = {k: dict(asdict(u), free_bytes=u.free_bytes) for k, u in v.items()}
            elif f.name == "problems":
                v = [dict(asdict(p), over_bytes=p.over_bytes) for p in v]
            elif f.name == "suggestions":
                v = [asdict(s) for s in v]
            elif f.name == "tensor_placement":
                v = {k: list(x) for k, x in v.items()}
            d[f.name] = v
        d["n_gpu_experts"] = self.n_gpu_experts
        d["kv_slot_tokens"], d["kv_slot_bytes"] = self.kv_slot_tokens, self.kv_slot_bytes
        return d

    def to_json(self, indent=2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["devices"] = {k: DeviceUsage(**{x: v[x] for x in ("bytes", "capacity_bytes", "breakdown", "kind", "note")})
                         for k, v in d["devices"].items()}
        kw["problems"] = [Problem(**{x: p[x] for x in ("budget", "needed_bytes", "available_bytes", "message")})
                          for p in d.get("problems", [])]
        kw["suggestions"] = [Suggestion(**s) for s in d.get("suggestions", [])]
        kw["tensor_placement"] = {k: tuple(v) for k, v in d["tensor_placement"].items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    # --- report for people --------------------------------------------------------------
    def _gpu_prefill_text(self) -> list:
        p = self.gpu_prefill or {}
        x = p.get("crossover") or {}
        if not p:
            return []
        if not self.gpu_prefill_tokens:
            model = f" (the crossover model says from {x['tokens']} tokens per chunk)" if x.get("tokens") else ""
            return [f"GPU prefill: off: {p.get('reason') or 'not planned'}{model}"]
        how = "given" if p.get("source") == "given" else "crossover model"
        head = (f"GPU prefill: chunks of {self.gpu_prefill_tokens}+ prompt tokens ({how}; up to "
                f"{p['chunk_tokens']} per chunk) stream each MoE layer's routed experts to gpu0, double-buffered; "
                f"reserved {fmt_bytes(p['reserve_bytes'])} (staging 2 x {fmt_bytes(p['slot_bytes'])}, "
                f"workspace {fmt_bytes(p['workspace_bytes'])})")
        L = [head]
        if x:
            L.append(f"  crossover: {x['routed_bytes'] / 1e9:.1f} GB of routed experts over PCIe at "
                     f"{x['pcie_bandwidth'] / 1e9:.0f} GB/s = {x['pcie_s_per_chunk']:.2f} s per chunk vs "
                     f"{x['cpu_s_per_token'] * 1e3:.2f} ms per token on the CPU: GPU from {x['tokens']} tokens; "
                     f"experts at {p['chunk_tokens']}-token chunks ~{x['gpu_expert_tok_s']:.0f} tok/s vs "
                     f"~{x['cpu_expert_tok_s']:.0f} on the CPU")
        return L

    def to_text(self, width: int = 100) -> str:
        """The report: verdict, what to do (the suggestions, re-planned), the estimate, then the
        details; no line longer than `width`."""
        def put(text, indent=0, hang=2):
            L.extend(textwrap.wrap(text, width, initial_indent=" " * indent,
                                   subsequent_indent=" " * (indent + hang), break_on_hyphens=False) or [""])

        L = []
        put(f"{self.model} [{self.source}] {self.architecture} {self.quantization}: "
            f"{fmt_bytes(self.weights_bytes)} in {self.n_tensors} tensors")
        if self.fits:
            L.append("verdict: FITS")
        else:
            L.append("verdict: DOES NOT FIT")
            for p in self.problems:
                put(f"- {p.message}", 2)
        if self.suggestions:
            L.append("")
            L.append("what would make it fit (each re-planned with its change):" if not self.fits else "suggestions:")
            for s in self.suggestions:
                put(f"[{'fits' if s.fits else 'helps'}] {s.message}", 2, 7)
                if s.command:
                    L.extend(_command_lines(s.command, width, 9))
                else:
                    put(f"flags: {s.cli}", 9, 4)
        e = self.estimate
        if e:
            L.append("")
            L.append(f"estimate: decode ~{e.get('decode_tok_s', 0):.1f} tok/s, prefill ~{e.get('prefill_tok_s', 0):.0f} tok/s")
        for n in self.notes:
            put(f"note: {n}")
        L += ["", "details", "-------"]
        hw = self.hardware.get("description")
        if hw:
            put(f"machine: {hw}")
        w = self.workload
        put(f"workload: context {w.get('context')} x {w.get('batch')} KV slot(s), prefill chunk "
            f"{w.get('prefill_chunk')}; numa {self.numa_mode}; GPU weights {self.gpu_weight_format}")
        L.append("")
        L.append(f"{'budget':<8} {'capacity':>12} {'planned':>12} {'free':>12}")
        for name, u in self.devices.items():
            mark = "" if u.fits else "  <-- OVER"
            L.append(f"{name:<8} {fmt_bytes(u.capacity_bytes):>12} {fmt_bytes(u.bytes):>12} "
                     f"{fmt_bytes(u.free_bytes):>12}{mark}")
            parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(u.breakdown.items(), key=lambda kv: -kv[1]) if v)
            if parts or u.note:
                put("; ".join(x for x in (parts, u.note) if x), 9)
        L.append("")
        L.append(f"{'tensor group':<26} {'device':<8} {'format':<10}".rstrip())
        for g, (dev, fmt) in self.tensor_placement.items():
            L.append(f"{g:<26} {dev:<8} {fmt}")
        L.append("")
        kind = "K and V per KV head" if self.kv_cache_kind == "gqa" else "MLA latent"
        n = self.kv_slots
        slots = f"{n} slot{'s' if n > 1 else ''} x {self.kv_slot_tokens} tokens" if n > 1 else f"{self.kv_cache_tokens} tokens"
        put(f"KV cache ({kind}, {self.kv_cache_dtype}): {slots} x {self.kv_bytes_per_token} B = "
            f"{fmt_bytes(self.kv_cache_bytes)} on {self.kv_cache_device}; room for up to "
            f"{self.max_context_tokens} tokens{' per slot' if n > 1 else ''}")
        put(f"KV slots (requests served together): {n}"
            + (f": {self.kv_slots_reason}" if self.kv_slots_reason else ""))
        if self.n_gpu_experts:
            per_layer = [(i, len(x)) for i, x in enumerate(self.gpu_experts) if x]
            counts = sorted({n for _, n in per_layer})
            fmt = self.tensor_placement.get("routed_experts.gpu_cache", ("gpu0", "bf16"))[1]
            size = self.devices["gpu0"].breakdown.get("routed_experts", 0) if "gpu0" in self.devices else 0
            how = ("in their GGUF blocks, multiplied by a fused kernel" if fmt == "quantized" else
                   "dequantized at load (no fused GPU kernel for their types): planned at that size")
            put(f"GPU expert cache: {self.n_gpu_experts} routed experts in {len(per_layer)} layers "
                f"({'-'.join(str(c) for c in (counts[0], counts[-1])) if len(counts) > 1 else counts[0]} per layer), "
                f"{fmt_bytes(size)} as {fmt} ({how})")
            put(" ".join(f"L{i}:{n}" for i, n in per_layer), 2, 0)
        for line in self._gpu_prefill_text():
            put(line.strip(), 2 if line.startswith(" ") else 0)
        if e:
            L.append("estimate from:")
            for k, v in e.get("assumptions", {}).items():
                put(f"{k}: {v}", 2)
        return "\n".join(L)


def _command_lines(command: str, width: int, indent: int) -> list:
    """A shell command in lines of at most `width`, continued with backslashes (copy-pastable)."""
    import shlex

    units, toks = [], [shlex.quote(t) for t in shlex.split(command)]
    for i, tok in enumerate(toks):   # a flag stays on the line of its value
        if units and units[-1].startswith("--") and " " not in units[-1] and not tok.startswith("-"):
            units[-1] += " " + tok
        else:
            units.append(tok)
    lines, cur = [], " " * indent + "$"
    for tok in units:
        if len(cur) + 1 + len(tok) > width - 2 and cur.strip() != "$":
            lines.append(cur + " \\")
            cur = " " * (indent + 4) + tok
        else:
            cur += " " + tok
    return lines + [cur]
