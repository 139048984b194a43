"""The planner's flags, one vocabulary for `hybrid-run` and `hybrid-run --dry-run`
(add_plan_args), and the dry-run itself: print the Plan (`dry_run`).

Exit status: 0 when the model fits, 3 when it does not, 2 for usage errors (one line on stderr).
"""

import argparse
import os
import shlex
import sys

EXIT_FITS, EXIT_USAGE, EXIT_NO_FIT = 0, 2, 3
PROG = "hybrid-run --dry-run"

# Flags that describe a hypothetical machine, another model file or the report: the dry-run's
# alone (the run uses this machine and MODEL.gguf). dest -> flag.
DRY_RUN_ONLY = {
    "preset": "--preset", "list_presets": "--list-presets", "list_profiles": "--list-profiles",
    "json": "--json", "profile": "--hardware", "gpu_name": "--gpu-name",
    "gpu_bandwidth": "--gpu-bandwidth", "ram": "--ram", "numa_nodes": "--numa-nodes", "cores": "--cores",
    "threads_per_core": "--threads-per-core", "bind_node": "--bind-node", "allowed_mems": "--allowed-mems",
    "allowed_cpus": "--allowed-cpus", "ram_bandwidth": "--ram-bandwidth", "pcie_bandwidth": "--pcie-bandwidth",
    "isa": "--isa",
}


def number_arg(kind, lo=None, lo_open=False, hi=None, what=""):
    """argparse type: an int/float within bounds, with a one-line message otherwise."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return v

    return parse


def _checked(parse):
    """argparse type: the text, once `parse` accepts it (sizes and bandwidths need a unit)."""
    def check(text):
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return check


def add_plan_args(p) -> None:
    """The planner's flags, grouped, on parser `p` (hybrid-run's: the run and the dry-run share it)."""
    from placement.solver import GPU_FORMATS, NUMA_MODES
    from placement.units import parse_bandwidth, size_with_unit

    size, bandwidth = _checked(size_with_unit), _checked(parse_bandwidth)
    pl = p.add_argument_group("placement (the run and --dry-run alike; sizes need a unit: 48GiB, 48GB)")
    pl.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: the GPU when there is one (default)")
    pl.add_argument("--cpu-only", dest="device", action="store_const", const="cpu", help="same as --device cpu")
    pl.add_argument("--gpu-mem", metavar="SIZE", type=size,
                    help="GPU memory to plan with, e.g. 40GiB (default: what is free; 0: no GPU)")
    pl.add_argument("--gpu-format", choices=GPU_FORMATS, default="auto",
                    help="non-expert weights on the GPU: bf16, or quantized (their GGUF types); default auto: "
                         "the faster estimate that fits")
    pl.add_argument("--hot-format", choices=GPU_FORMATS, default="auto",
                    help="routed experts cached on the GPU: bf16 copies, or quantized (their GGUF blocks, "
                         "~3x as many in the same VRAM, a fused Triton kernel); default auto: quantized "
                         "where the experts' types have that kernel (Q8_0, Q4_K, Q5_K, Q6_K)")
    pl.add_argument("--numa", choices=NUMA_MODES + ("auto",), default="auto",
                    help="routed experts over NUMA nodes: interleave (pages round-robin), distribute (each node "
                         "a slice of every expert), replicate (a copy per node) or off; default auto: the "
                         "faster estimate that fits")
    pl.add_argument("--threads", type=number_arg(int, 1, what="at least 1"), metavar="N",
                    help="CPU worker threads (default: one per cpu this process may use; never more)")
    pl.add_argument("--ctx", type=number_arg(int, 16, what="at least 16 tokens"), metavar="TOKENS",
                    help="context length (default: min(32768, the model's))")
    pl.add_argument("--parallel", "--batch", dest="parallel", type=number_arg(int, 1, what="at least 1"),
                    metavar="N", help="KV slots of --ctx tokens each: requests --serve decodes together, "
                                      "accounted in the plan (default with --serve: the most that fit after "
                                      "the weights, at most 8; otherwise 1)")
    pl.add_argument("--force-ctx", action="store_true",
                    help="allow --ctx beyond the context the model was trained for")
    pl.add_argument("--prefill-chunk", type=number_arg(int, 1, what="at least 1 token"), metavar="TOKENS",
                    help="prompt tokens per prefill step (default: 2048 for a CPU-only plan where "
                         "its buffers fit, else 512)")
    pl.add_argument("--gpu-prefill-tokens", type=number_arg(int, 0, what=">= 0 (0 = off)"), metavar="N",
                    help="prompt chunks of at least N tokens stream the routed experts to the GPU (0: off; "
                         "default: the crossover of PCIe streaming and CPU expert speed, when its buffers fit)")
    pl.add_argument("--no-expert-cache", action="store_true",
                    help="do not cache routed experts on the GPU")
    pl.add_argument("--expert-stats", metavar="FILE",
                    help="JSON of expert activation counts per layer (from --save-expert-stats): the GPU "
                         "caches the most used experts")
    pl.add_argument("--measure", action="store_true",
                    help="measure this machine's memory bandwidth and compute again for the estimate "
                         "(about a second; otherwise measured once and cached per machine)")
    pl.add_argument("--cuda-context", metavar="SIZE", type=size, help="reserve for the CUDA context (default 600MiB)")
    pl.add_argument("--workspace", metavar="SIZE", type=size, help="GPU compute workspace (default: from the workload)")
    pl.add_argument("--pinned", metavar="SIZE", type=size, help="pinned host buffers (default: from the workload)")
    pl.add_argument("--host-reserve", metavar="SIZE", type=size, help="host RAM left to the OS (default 4GiB)")
    pl.add_argument("--runtime-overhead", metavar="SIZE", type=size, help="this process's own RAM (default 1GiB)")

    dr = p.add_argument_group("dry-run: model and report")
    dr.add_argument("--preset", help="plan a well-known file instead of MODEL.gguf (see --list-presets)")
    dr.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    dr.add_argument("--list-profiles", action="store_true", help="list the hardware profiles and exit")
    dr.add_argument("--json", action="store_true", help="print the Plan as JSON")

    hw = p.add_argument_group("dry-run: a hypothetical machine (each flag replaces what is detected)")
    hw.add_argument("--hardware", "--profile", dest="profile", metavar="PROFILE",
                    help="a name in configs/hardware (see --list-profiles) or a .json path")
    hw.add_argument("--ram", metavar="SIZE", type=size, help="host RAM in all, split evenly over the NUMA nodes")
    hw.add_argument("--numa-nodes", type=number_arg(int, 1, what="at least 1"), metavar="N",
                    help="NUMA nodes (sockets)")
    hw.add_argument("--cores", type=number_arg(int, 1, what="at least 1"), metavar="N", help="physical cores in all")
    hw.add_argument("--threads-per-core", type=number_arg(int, 1, what="at least 1"), metavar="N",
                    help="hardware threads per core (SMT; default: as detected)")
    hw.add_argument("--bind-node", type=number_arg(int, 0, what=">= 0"), metavar="N",
                    help="as if run under `numactl -N N -m N` (cpus and memory of node N only)")
    hw.add_argument("--allowed-mems", metavar="LIST", help="memory nodes this process may use, e.g. 0-1")
    hw.add_argument("--allowed-cpus", metavar="LIST", help="cpus this process may run on, e.g. 0-31,64-95")
    hw.add_argument("--gpu-name", metavar="NAME", help="GPU model name (picks its bandwidth when known)")
    hw.add_argument("--gpu-bandwidth", metavar="BW", type=bandwidth, help="GPU memory bandwidth, e.g. 960GB/s")
    hw.add_argument("--ram-bandwidth", metavar="BW", type=bandwidth,
                    help="memory read bandwidth per NUMA node, e.g. 150GB/s")
    hw.add_argument("--pcie-bandwidth", metavar="BW", type=bandwidth, help="host<->GPU bandwidth, e.g. 25GB/s")
    hw.add_argument("--isa", metavar="LIST", help="CPU features, e.g. avx2,avx512f,avx512_vnni")


def overrides(a) -> dict:
    """build_inputs keywords from parsed flags (those not given left out)."""
    ov = {"numa": a.numa, "gpu_weight_format": a.gpu_format, "hot_expert_format": a.hot_format,
          "expert_stats": a.expert_stats,
          "gpu_prefill_tokens": a.gpu_prefill_tokens, "context": a.ctx, "prefill_chunk": a.prefill_chunk,
          "threads": a.threads, "gpu_mem": a.gpu_mem, "cuda_context_bytes": a.cuda_context,
          "workspace_bytes": a.workspace, "pinned_bytes": a.pinned, "host_reserve_bytes": a.host_reserve,
          "runtime_overhead_bytes": a.runtime_overhead, "batch": a.parallel}
    ov.update({dest: getattr(a, dest) for dest in DRY_RUN_ONLY
               if dest not in ("preset", "list_presets", "list_profiles", "json", "profile")})
    if a.force_ctx:
        ov["allow_long_context"] = True
    if a.measure:
        ov["measure"] = "again"
    if a.device == "cpu":
        ov["use_gpu"] = False
    if a.no_expert_cache:
        ov["expert_cache"] = False
    from placement.units import parse_size

    for k in ("cuda_context_bytes", "workspace_bytes", "pinned_bytes", "host_reserve_bytes", "runtime_overhead_bytes"):
        if ov[k] is not None:
            ov[k] = parse_size(ov[k])
    ov = {k: v for k, v in ov.items() if v is not None}
    if getattr(a, "serve", False) and a.parallel is None:
        ov["batch"] = None      # a server's slots: the most that fit (placement.solver.SLOTS_MAX)
    return ov


# --- suggestions as command lines -------------------------------------------------------

def _arity(action, argv, i) -> int:
    """Tokens the option at argv[i] takes, as argparse reads them (no abbreviations)."""
    if "=" in argv[i] or action.nargs == 0:
        return 1
    if action.nargs == "?":
        nxt = argv[i + 1] if i + 1 < len(argv) else "-"
        return 2 if not nxt.startswith("-") else 1
    return 2


def command_for(parser, argv, suggestion) -> str:
    """The user's command line with `suggestion` applied: the flags it changes or takes back
    removed, its flags added (the model replaced, for another file)."""
    from placement.advice import FLAGS

    actions = parser._option_string_actions
    dests = {actions[FLAGS[k]].dest for k in suggestion.changes}
    new_model = "preset" in suggestion.changes
    out, i, positional_only = [], 0, False
    while i < len(argv):
        tok = argv[i]
        name = tok.partition("=")[0]
        if not positional_only and tok == "--":
            positional_only = True
        elif not positional_only and name in actions:
            act = actions[name]
            n = _arity(act, argv, i)
            if act.dest not in dests and not (new_model and act.dest == "demo"):
                out.extend(argv[i:i + n])
            i += n
            continue
        elif not (new_model and (positional_only or not tok.startswith("-"))):
            out.append(tok)
        i += 1
    if suggestion.scope != "run" and "--dry-run" not in out:
        out.append("--dry-run")   # another machine or file: what this run cannot be, checked
    return shlex.join(["hybrid-run"] + out + suggestion.cli.split())


def dry_run(a, argv, parser) -> int:
    """`hybrid-run --dry-run`: print the Plan for the parsed flags `a` (argv: the command line,
    for the suggestions' command lines)."""
    def fail(msg) -> int:
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE

    try:
        if a.list_presets:
            from placement.presets import list_presets

            return _print("\n".join(list_presets()), EXIT_FITS)
        if a.list_profiles:
            from placement.configs import list_configs

            return _print("\n".join(list_configs("hardware")), EXIT_FITS)
        if (a.model is None) == (a.preset is None):
            return fail("give a GGUF file or --preset NAME (one of them; --list-presets shows the presets)")
        from placement.inventory import load
        from placement.solver import build_inputs, solve

        inv = load(model=a.model, preset=a.preset)
        hw, wl, pol = build_inputs(profile=a.profile, **overrides(a))
        plan = solve(inv, hw, wl, pol)
    except ValueError as e:  # our errors (bad file, flag, profile) are ValueError subclasses
        return fail(e)
    except OSError as e:
        return fail(f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}")
    for s in plan.suggestions:
        s.command = command_for(parser, argv, s)
    return _print(plan.to_json() if a.json else plan.to_text(), EXIT_FITS if plan.fits else EXIT_NO_FIT)


def _print(text, rc) -> int:
    """Print; a reader that went away (`| head -1`) ends the output quietly, status kept."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # the interpreter flushes stdout again at exit: point it at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return rc


def main(argv=None) -> int:
    """The dry-run alone: `hybrid-run --dry-run ARGS` (the same parser and flags)."""
    from hybrid.app.cli import main as hybrid_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return hybrid_main(argv if "--dry-run" in argv else argv + ["--dry-run"])


if __name__ == "__main__":
    sys.exit(main())
