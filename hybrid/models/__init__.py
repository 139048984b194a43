"""Model implementations, one module per GGUF `general.architecture`.

Each module has `ModelArgs` (with `from_gguf(metadata, tensors, source)`) and `Model`
(a models.transformer.Transformer: its attention, RoPE and KV cache). The ModelArgs classes
and their tensor specs live, torch-free, in models.args (the dry-run checks files with them;
`header_args(arch, metadata, tensors, source)`), each architecture file re-exports its own.
Shared blocks:
layers (norms, RoPE, FFN), attention (GQA), moe (router kinds, MoE block), gqa (the
llama-family MoE transformer), transformer (the decoder skeleton).
"""

from __future__ import annotations

import importlib

# general.architecture -> module under hybrid.models
ARCHITECTURES = {
    "deepseek2": "deepseek2",
    "glm4moe": "glm4moe",
    "llama": "llama",
    "qwen2moe": "qwen2moe",
    "qwen3moe": "qwen3moe",
}


class UnsupportedArchitectureError(ValueError):
    pass


def get_model_module(arch: str, source: str = "model"):
    """The module implementing `arch` (ModelArgs, Model); ValueError if none."""
    mod = ARCHITECTURES.get(arch)
    if mod is None:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {arch!r} is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}")
    return importlib.import_module(f"hybrid.models.{mod}")
