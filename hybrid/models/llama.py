"""Llama (GGUF architecture `llama`): Mixtral-style MoE when `llama.expert_count` > 0, else a
dense llama (SmolLM2, Llama 3).

llama.cpp's graph (src/models/llama.cpp): GQA with NORMAL (adjacent-pair) RoPE, no biases;
MoE: softmax top-k, weights normalized; no shared expert. The output head may be tied to the
embedding (no `output.weight`).
"""

from __future__ import annotations

from hybrid.models.args import LlamaArgs
from hybrid.models.gqa import GQATransformer

ARCH = "llama"

# metadata reading, hard-coded router kinds and tensor specs: hybrid.models.args (torch-free)
ModelArgs = LlamaArgs


class Model(GQATransformer):
    pass
