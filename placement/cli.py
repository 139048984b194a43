"""`hybrid-run MODEL.gguf --dry-run` / `hybrid-run --dry-run --preset NAME`: print the Plan.

Exit status: 0 when the model fits, 3 when it does not, 2 for usage errors (one line on stderr).
"""

import argparse
import sys

EXIT_FITS, EXIT_USAGE, EXIT_NO_FIT = 0, 2, 3
PROG = "hybrid-run --dry-run"


def build_parser() -> argparse.ArgumentParser:
    from placement.solver import GPU_FORMATS, NUMA_MODES

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Plan where every byte of a GGUF model goes (GPU, host RAM, NUMA nodes) and estimate "
                    "its speed, from the header alone. Sizes: 48GiB, 48G (binary), 48GB (decimal).",
    )
    p.add_argument("model", nargs="?", help="GGUF file (or the first part of a split set)")
    src = p.add_argument_group("model source")
    src.add_argument("--preset", help="plan a well-known file instead of a GGUF (see --list-presets)")
    src.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the Plan as JSON")

    hw = p.add_argument_group("hardware (detected; each field can be replaced for a hypothetical machine)")
    hw.add_argument("--hardware", "--profile", dest="profile", metavar="PROFILE",
                    help="hardware profile: a name in configs/hardware (see --list-profiles) or a .json path")
    hw.add_argument("--list-profiles", action="store_true", help="list the hardware profiles and exit")
    hw.add_argument("--gpu-mem", metavar="SIZE", help="GPU memory (0: no GPU)")
    hw.add_argument("--gpu-name", metavar="NAME", help="GPU model name (picks its bandwidth when known)")
    hw.add_argument("--gpu-bandwidth", metavar="BW", help="GPU memory bandwidth, e.g. 960GB/s")
    hw.add_argument("--ram", metavar="SIZE", help="host RAM in all (split evenly over the NUMA nodes)")
    hw.add_argument("--numa-nodes", type=int, metavar="N", help="NUMA nodes")
    hw.add_argument("--cores", type=int, metavar="N", help="physical cores")
    hw.add_argument("--threads", type=int, metavar="N", help="hardware threads (default: as detected per core)")
    hw.add_argument("--bind-node", type=int, metavar="N",
                    help="plan as if run under `numactl -N N -m N` (cpus and memory of node N only)")
    hw.add_argument("--allowed-mems", metavar="LIST", help="memory nodes this process may use, e.g. 0-1")
    hw.add_argument("--allowed-cpus", metavar="LIST", help="cpus this process may run on, e.g. 0-31,64-95")
    hw.add_argument("--ram-bandwidth", metavar="BW", help="measured memory bandwidth per NUMA node, e.g. 150GB/s")
    hw.add_argument("--pcie-bandwidth", metavar="BW", help="host<->GPU bandwidth, e.g. 25GB/s")
    hw.add_argument("--isa", metavar="LIST", help="CPU features, e.g. avx2,avx512f,avx512_vnni")

    wl = p.add_argument_group("workload")
    wl.add_argument("--ctx", type=int, metavar="TOKENS", help="context length (default: min(32768, the model's))")
    wl.add_argument("--batch", type=int, metavar="N", help="sequences decoded together (default 1)")
    wl.add_argument("--prefill-chunk", type=int, metavar="TOKENS", help="tokens per prefill step (default 512)")

    po = p.add_argument_group("policy")
    po.add_argument("--numa", choices=NUMA_MODES + ("auto",),
                    help="off; interleave (pages round-robin over the nodes); distribute (each node holds a "
                         "slice of every expert); replicate (a full copy per node). Default auto: interleave "
                         "with several usable nodes")
    po.add_argument("--gpu-format", choices=GPU_FORMATS,
                    help="non-expert weights on the GPU: bf16, or quantized (GGUF bytes); auto: bf16 when it fits")
    po.add_argument("--cpu-only", action="store_true", help="do not use the GPU")
    po.add_argument("--no-expert-cache", action="store_true", help="do not cache routed experts on the GPU")
    po.add_argument("--gpu-prefill-tokens", metavar="N",
                    help="prefill chunks of at least N tokens stream each MoE layer's routed experts to the GPU "
                         "(0: off). Default: the crossover of PCIe streaming and CPU expert speed, when its "
                         "buffers fit beside the rest of the plan")
    po.add_argument("--expert-stats", metavar="FILE",
                    help="JSON of expert activation counts per layer ({\"layer\": [count per expert]}): "
                         "the GPU caches the most used experts")
    po.add_argument("--cuda-context", metavar="SIZE", help="reserve for the CUDA context (default 600MiB)")
    po.add_argument("--workspace", metavar="SIZE", help="GPU compute workspace (default: from the workload)")
    po.add_argument("--pinned", metavar="SIZE", help="pinned host buffers (default: from the workload)")
    po.add_argument("--host-reserve", metavar="SIZE", help="host RAM left to the OS and others (default 4GiB)")
    po.add_argument("--runtime-overhead", metavar="SIZE", help="this process's own RAM (default 1GiB)")
    return p


def _tokens(flag: str, text):
    """A whole number of tokens >= 0 from a flag's text (argparse's own errors span lines)."""
    from placement.solver import SolverError

    if text is None:
        return None
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise SolverError(f"{flag} {text}: give a whole number of tokens >= 0 (0 turns it off)")
    return v


def _overrides(a) -> dict:
    from placement.units import parse_size

    ov = {
        "gpu_mem": a.gpu_mem, "gpu_name": a.gpu_name, "gpu_bandwidth": a.gpu_bandwidth, "ram": a.ram,
        "numa_nodes": a.numa_nodes, "cores": a.cores, "threads": a.threads, "bind_node": a.bind_node,
        "allowed_mems": a.allowed_mems, "allowed_cpus": a.allowed_cpus, "ram_bandwidth": a.ram_bandwidth,
        "pcie_bandwidth": a.pcie_bandwidth, "isa": a.isa,
        "context": a.ctx, "batch": a.batch, "prefill_chunk": a.prefill_chunk,
        "numa": a.numa, "gpu_weight_format": a.gpu_format, "expert_stats": a.expert_stats,
        "gpu_prefill_tokens": _tokens("--gpu-prefill-tokens", a.gpu_prefill_tokens),
    }
    if a.cpu_only:
        ov["use_gpu"] = False
    if a.no_expert_cache:
        ov["expert_cache"] = False
    for flag, key in (("cuda_context", "cuda_context_bytes"), ("workspace", "workspace_bytes"),
                      ("pinned", "pinned_bytes"), ("host_reserve", "host_reserve_bytes"),
                      ("runtime_overhead", "runtime_overhead_bytes")):
        v = getattr(a, flag)
        if v is not None:
            ov[key] = parse_size(v)
    return {k: v for k, v in ov.items() if v is not None}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(e.code or 0)

    def fail(msg) -> int:
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE

    try:
        if a.list_presets:
            from placement.presets import list_presets

            print("\n".join(list_presets()))
            return EXIT_FITS
        if a.list_profiles:
            from placement.configs import list_configs

            print("\n".join(list_configs("hardware")))
            return EXIT_FITS
        if (a.model is None) == (a.preset is None):
            return fail("give a GGUF file or --preset NAME (one of them; --list-presets shows the presets)")
        from placement.inventory import load
        from placement.solver import build_inputs, solve

        inv = load(model=a.model, preset=a.preset)
        hw, wl, pol = build_inputs(profile=a.profile, **_overrides(a))
        plan = solve(inv, hw, wl, pol)
    except ValueError as e:  # our errors (bad file, flag, profile) are ValueError subclasses
        return fail(e)
    except OSError as e:
        return fail(f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}")
    print(plan.to_json() if a.json else plan.to_text())
    return EXIT_FITS if plan.fits else EXIT_NO_FIT


if __name__ == "__main__":
    sys.exit(main())
