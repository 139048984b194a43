"""placement: will a GGUF model fit this machine, where does each byte go, how fast will it run.

Pure Python (no torch at import), from the GGUF header alone or from a preset:

    from placement import plan_for_gguf
    plan = plan_for_gguf("DeepSeek-R1-Q4_K_M-00001-of-00009.gguf", gpu_mem="48GiB", numa="interleave")
    print(plan.to_text()); plan.fits; plan.tensor_placement; plan.gpu_experts

Modules: inventory (tensors and roles), presets (well-known files), quant_rules (llama.cpp type
choice), hardware (detection and overrides), probe (this machine measured, cached), solver
(-> Plan), advice (what would make it fit, re-planned), plan (the Plan), cli (the flags the run
and --dry-run share, and the dry-run).
"""

_EXPORTS = {
    "Plan": "placement.plan", "DeviceUsage": "placement.plan", "Problem": "placement.plan",
    "Suggestion": "placement.plan",
    "solve": "placement.solver", "plan_for_gguf": "placement.solver", "plan_for_preset": "placement.solver",
    "predict_cpu_rss_growth": "placement.solver", "Workload": "placement.solver", "Policy": "placement.solver",
    "Inventory": "placement.inventory", "from_gguf": "placement.inventory",
    "build_preset": "placement.presets", "list_presets": "placement.presets",
    "Hardware": "placement.hardware", "detect": "placement.hardware",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # lazy: `import placement` stays free; hybrid.app.cli imports placement.cli only for --dry-run
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'placement' has no attribute {name!r}")
