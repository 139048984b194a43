"""Qwen3 MoE (GGUF architecture `qwen3moe`: Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B).

llama.cpp's graph (src/models/qwen3moe.cpp): GQA with per-head q/k RMS norms before NEOX RoPE,
no biases; MoE in every block: softmax over the experts, top-k, weights normalized; no shared
expert.
"""

from __future__ import annotations

from hybrid.models.gqa import GQAArgs, GQATransformer
from hybrid.models.moe import GATING_SOFTMAX

ARCH = "qwen3moe"


class ModelArgs(GQAArgs):
    @classmethod
    def from_gguf(cls, metadata: dict, tensors: dict, source: str = "model") -> GQAArgs:
        return cls.read(ARCH, metadata, tensors, source,
                        rope_neox=True, gating_func=GATING_SOFTMAX, expert_weights_norm=True)


class Model(GQATransformer):
    pass
