"""Qwen3 MoE (GGUF architecture `qwen3moe`: Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B).

llama.cpp's graph (src/models/qwen3moe.cpp): GQA with per-head q/k RMS norms before NEOX RoPE,
no biases; MoE in every block: softmax over the experts, top-k, weights normalized; no shared
expert.
"""

from __future__ import annotations

from hybrid.models.args import Qwen3MoeArgs
from hybrid.models.gqa import GQATransformer

ARCH = "qwen3moe"

# metadata reading, hard-coded router kinds and tensor specs: hybrid.models.args (torch-free)
ModelArgs = Qwen3MoeArgs


class Model(GQATransformer):
    pass
