"""What would make a plan fit: concrete changes, each re-planned with the change applied
before it is offered, in the flags of hybrid-run (the same vocabulary as the run itself).

A change is a dict of build_inputs keys (None: take the key back), applied by apply_changes:
hardware keys through placement.hardware.apply_overrides (which composes overrides the way
the command line applies them), workload and policy keys by replacing fields. So the plan a
suggestion reports is the plan its command line gives (tests/test_placement_advice.py checks
that by parsing the command lines).
"""

from dataclasses import fields, replace
from functools import lru_cache

from placement.hardware import HW_OVERRIDES, apply_overrides
from placement.plan import Suggestion
from placement.units import GiB, fmt_bytes

# build_inputs key -> hybrid-run flag. Booleans: the flag when the value differs from the
# default (use_gpu False -> --cpu-only); sizes are written in whole GiB or MiB.
FLAGS = {
    "context": "--ctx", "allow_long_context": "--force-ctx", "batch": "--parallel",
    "prefill_chunk": "--prefill-chunk", "numa": "--numa", "gpu_weight_format": "--gpu-format",
    "use_gpu": "--cpu-only", "expert_cache": "--no-expert-cache",
    "gpu_prefill_tokens": "--gpu-prefill-tokens", "expert_stats": "--expert-stats", "threads": "--threads",
    "cuda_context_bytes": "--cuda-context", "workspace_bytes": "--workspace", "pinned_bytes": "--pinned",
    "host_reserve_bytes": "--host-reserve", "runtime_overhead_bytes": "--runtime-overhead",
    "gpu_mem": "--gpu-mem", "gpu_name": "--gpu-name", "gpu_bandwidth": "--gpu-bandwidth", "ram": "--ram",
    "numa_nodes": "--numa-nodes", "cores": "--cores", "threads_per_core": "--threads-per-core",
    "bind_node": "--bind-node", "allowed_mems": "--allowed-mems", "allowed_cpus": "--allowed-cpus",
    "ram_bandwidth": "--ram-bandwidth", "pcie_bandwidth": "--pcie-bandwidth", "isa": "--isa",
    "preset": "--preset",
}
WORKLOAD_KEYS = ("context", "allow_long_context", "batch", "prefill_chunk")
_NEGATED = {"use_gpu", "expert_cache"}     # flags that set False
# What a user buys: GPU memory classes, with cards of that size
GPU_CLASSES = ((16, "RTX 4080 / A4000"), (24, "RTX 4090 / RTX 3090 / L4"), (32, "RTX 5090"),
               (48, "RTX 6000 Ada / L40S / A6000"), (80, "A100 80GB / H100"), (96, "RTX PRO 6000 / H100 NVL"),
               (141, "H200"), (192, "B200 / MI300X"))
# Per-socket (NUMA node) memory sizes a server is built with, in GiB
NODE_RAM_SIZES = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def _size(n: int) -> str:
    return f"{n // GiB}GiB" if n % GiB == 0 else f"{-(-n // (1 << 20))}MiB"


def flags_for(changes: dict) -> list:
    """The flags that apply `changes` (keys taken back are not written: see Suggestion.drop)."""
    out = []
    for k, v in changes.items():
        if v is None:
            continue
        flag = FLAGS[k]
        if k in _NEGATED or k == "allow_long_context":
            if (not v) if k in _NEGATED else v:
                out.append(flag)
            continue
        if k.endswith("_bytes") or k in ("gpu_mem", "ram"):
            v = _size(int(v)) if isinstance(v, int) else v
        out.extend([flag, str(v)])
    return out


def apply_changes(hw, wl, pol, changes: dict) -> tuple:
    """(hw, wl, pol) with `changes` applied as the command line would apply them."""
    hw_kw = {k: v for k, v in changes.items() if k in HW_OVERRIDES}
    if hw_kw:
        # None takes an override back; a key the machine never had is a no-op
        hw = apply_overrides(hw, **{k: v for k, v in hw_kw.items() if v is not None})
        gone = [k for k, v in hw_kw.items() if v is None and k in hw.overrides]
        if gone:
            kept = {k: v for k, v in hw.overrides.items() if k not in gone}
            hw = apply_overrides(hw.base, **kept) if kept else hw.base
    wl_kw = {k: v for k, v in changes.items() if k in WORKLOAD_KEYS}
    pol_kw = {k: v for k, v in changes.items() if k not in HW_OVERRIDES and k not in WORKLOAD_KEYS
              and k != "preset"}
    defaults = {f.name: f.default for f in fields(pol)}
    pol_kw = {k: (defaults[k] if v is None else v) for k, v in pol_kw.items()}
    return hw, replace(wl, **wl_kw), replace(pol, **pol_kw)


@lru_cache(maxsize=None)
def _preset(name):
    from placement.presets import build_preset

    return build_preset(name)


def same_model_presets(inv) -> list:
    """Presets of the same model as `inv`, smallest first: the same architecture and shape,
    and the preset's model name in the file's general.name when any preset's is (R1 and V3
    share a shape)."""
    from placement.presets import list_presets, preset_config

    def shape(m):
        return (m.architecture, m.n_layer, m.n_embd, m.n_expert, m.expert_ff, m.n_vocab)

    def norm(text):
        return "".join(ch for ch in text.lower() if ch.isalnum())

    out = [(n, _preset(n)) for n in list_presets() if f"preset:{n}" != inv.source]
    out = [(n, i) for n, i in out if shape(i.model) == shape(inv.model)]
    named = [(n, i) for n, i in out if norm(preset_config(n)[1]) in norm(inv.model.name)]
    return sorted(named or out, key=lambda x: x[1].total_bytes)


def _figure(p) -> str:
    e = p.estimate or {}
    return f"decode ~{e.get('decode_tok_s', 0):.1f} tok/s" if e else ""


def suggest(inv, hw, wl, pol, plan, solve) -> list:
    """Suggestions for a plan that does not fit; each one re-planned with its change applied.

    `solve(inv, hw, wl, pol)` plans without suggestions. Only a change whose re-plan fits is
    marked fits; one that removes some of the problems is kept as 'helps'."""
    budgets = {p.budget for p in plan.problems}
    gpu_over, host_over = "gpu0" in budgets, bool(budgets - {"gpu0"})
    out, seen, fixed = [], set(), {}    # fixed: id(suggestion) -> the budgets it brings within

    def replan(changes, inv2=None):
        return solve(inv2 or inv, *apply_changes(hw, wl, pol, changes))

    def offer(change, changes, message, scope="run", inv2=None, p=None):
        key = tuple(sorted(changes.items(), key=lambda kv: kv[0]))
        if key in seen:
            return None
        seen.add(key)
        p = p or replan(changes, inv2)
        left = {q.budget for q in p.problems}
        if p.fits or left < budgets:
            drop = [FLAGS[k] for k, v in changes.items() if v is None]
            fig = _figure(p) if p.fits else "; ".join(q.message.split(":")[0] + " still over" for q in p.problems)
            out.append(Suggestion(change, " ".join(flags_for(changes)), f"{message} ({fig})" if fig else message,
                                  p.fits, changes=dict(changes), scope=scope, drop=drop,
                                  estimate={k: (p.estimate or {}).get(k) for k in ("decode_tok_s", "prefill_tok_s")}))
            fixed[id(out[-1])] = budgets - left
        return p

    # --- on this machine: flags of the run ----------------------------------------------
    if wl.batch > 1:    # fewer KV slots first: the context each request gets stays
        from placement.solver import most_slots

        n = most_slots(inv, hw, wl, pol, wl.batch - 1)
        if n:
            offer("batch", {"batch": n}, f"fewer KV slots: {n} (the most that fit) of {wl.context} tokens")
    ctx = max_fitting_context(inv, hw, wl, pol, solve)
    if ctx and ctx < wl.context:
        offer("ctx", {"context": ctx}, f"a shorter context: {ctx} tokens (the most that fits)")
    if gpu_over:
        if plan.gpu_weight_format == "bf16":
            offer("gpu_format", {"gpu_weight_format": "quantized"},
                  "keep the non-expert weights quantized on the GPU (their GGUF types, not bf16)")
        if wl.prefill_chunk > 128:
            offer("prefill_chunk", {"prefill_chunk": 128}, "smaller prefill chunks (less GPU workspace)")
        offer("cpu_only", {"use_gpu": False}, "everything on the CPU (slow: attention on the CPU)")
    if host_over and plan.numa_mode == "replicate":
        for mode in ("distribute", "interleave"):
            offer("numa", {"numa": mode}, f"one copy of the routed experts spread over the nodes ({mode}), "
                                          f"not a copy per node")
    # --- another model file ---------------------------------------------------------------
    if host_over or gpu_over:   # the largest smaller one that fits: the least quality lost
        for name, inv2 in reversed(same_model_presets(inv)):
            if inv2.total_bytes >= inv.total_bytes:
                continue
            p = replan({}, inv2)
            if p.fits:
                offer("preset", {"preset": name},
                      f"the same model quantized smaller: {name} ({fmt_bytes(inv2.total_bytes)}, "
                      f"this file {fmt_bytes(inv.total_bytes)})", scope="model", p=p)
                break
    # --- another machine --------------------------------------------------------------------
    if host_over and hw.binding:
        _offer_unbind(hw, offer)
    if host_over:
        _offer_ram(hw, replan, offer)
    if gpu_over:
        _offer_gpu(hw, replan, offer)
    if not any(s.fits for s in out):
        _offer_pair(list(out), fixed, budgets, replan, offer)
    order = {"run": 0, "model": 1, "machine": 2}
    out.sort(key=lambda s: (not s.fits, order[s.scope]))
    return out


def _offer_pair(out, fixed, budgets, replan, offer):
    """When no change fits alone: the first two whose fixes cover every budget, re-planned
    together, offered when that fits."""
    for i, a in enumerate(out):
        for b in out[i + 1:]:
            if fixed[id(a)] | fixed[id(b)] != budgets or set(a.changes) & set(b.changes) \
                    or "preset" in {**a.changes, **b.changes}:
                continue
            changes = {**a.changes, **b.changes}
            p = replan(changes)
            if p.fits:
                scope = "machine" if "machine" in (a.scope, b.scope) else "run"
                offer("pair", changes, f"both: {a.message.split(' (')[0]}; and {b.message.split(' (')[0]}",
                      scope=scope, p=p)
                return


def _offer_unbind(hw, offer):
    all_nodes = [n.id for n in hw.numa_nodes]
    if "bind_node" in hw.overrides or "allowed_mems" in hw.overrides or "allowed_cpus" in hw.overrides:
        changes = {"bind_node": None, "allowed_mems": None, "allowed_cpus": None}
    else:   # bound from outside (numactl, taskset, cpuset): the dry-run says the whole machine
        from placement.units import fmt_int_list

        changes = {"allowed_mems": fmt_int_list(all_nodes),
                   "allowed_cpus": fmt_int_list(c for n in hw.numa_nodes for c in n.cpus)}
    offer("unbind", changes,
          f"run without the binding ({hw.binding}): all {len(all_nodes)} NUMA nodes, "
          f"{fmt_bytes(sum(n.total_bytes for n in hw.numa_nodes))}", scope="machine")


def _host_ok(p) -> bool:
    return not {q.budget for q in p.problems} - {"gpu0"}


def _offer_ram(hw, replan, offer):
    """The least RAM in all (whole GiB, equal NUMA nodes as --ram splits it) that holds the
    plan, found by re-planning; offered as the next size a server is built with."""
    n = len(hw.numa_nodes)
    lo = hw.ram_total // GiB
    hi = max(lo * 2, 64)
    while not _host_ok(replan({"ram": hi * GiB})):
        if hi > (1 << 20):   # 1 PiB: nothing RAM can fix (e.g. a context that needs a GPU)
            return
        lo, hi = hi, hi * 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _host_ok(replan({"ram": mid * GiB})) else (mid, hi)
    per_node = next((s for s in NODE_RAM_SIZES if s * n >= hi), -(-hi // n))
    total = per_node * n
    layout = f"{n} x {per_node} GiB, one per NUMA node" if n > 1 else "one NUMA node"
    offer("ram", {"ram": total * GiB}, f"a machine with {total} GiB of RAM ({layout}; at least {hi} GiB)",
          scope="machine")


def _offer_gpu(hw, replan, offer):
    have = hw.gpus[0].total_bytes if hw.gpus else 0
    for size, cards in GPU_CLASSES:
        if size * GiB <= have:
            continue
        p = replan({"gpu_mem": size * GiB})
        if "gpu0" not in {q.budget for q in p.problems}:
            offer("gpu_mem", {"gpu_mem": size * GiB}, f"a {size} GB-class GPU ({cards})", scope="machine", p=p)
            return


def max_fitting_context(inv, hw, wl, pol, solve) -> int:
    """The longest context (a multiple of 256, at least 256) whose plan fits, else 0. The
    hot-expert cache only takes what is left, so it is planned without."""
    def ok(ctx):
        return solve(inv, hw, replace(wl, context=ctx), replace(pol, expert_cache=False)).fits

    if not ok(256):
        return 0
    lo, hi = 1, max(1, wl.context // 256)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid * 256) else (lo, mid - 1)
    return lo * 256
