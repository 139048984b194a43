"""Model implementations, one module per GGUF `general.architecture`."""

from __future__ import annotations

import importlib

# general.architecture -> module under hybrid.models
ARCHITECTURES = {
    "deepseek2": "deepseek2",
}


class UnsupportedArchitectureError(ValueError):
    pass


def get_model_module(arch: str, source: str = "model"):
    """The module implementing `arch` (ModelArgs, the model class); ValueError if none."""
    mod = ARCHITECTURES.get(arch)
    if mod is None:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}")
    return importlib.import_module(f"hybrid.models.{mod}")
