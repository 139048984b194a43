"""Llama (GGUF architecture `llama`): Mixtral-style MoE when `llama.expert_count` > 0, else a
dense llama (SmolLM2, Llama 3).

llama.cpp's graph (src/models/llama.cpp): GQA with NORMAL (adjacent-pair) RoPE, no biases;
MoE: softmax top-k, weights normalized; no shared expert. The output head may be tied to the
embedding (no `output.weight`).
"""

from __future__ import annotations

from hybrid.models.gqa import GQAArgs, GQATransformer
from hybrid.models.moe import GATING_SOFTMAX

ARCH = "llama"


class ModelArgs(GQAArgs):
    @classmethod
    def from_gguf(cls, metadata: dict, tensors: dict, source: str = "model") -> GQAArgs:
        a = cls.read(ARCH, metadata, tensors, source,
                     rope_neox=False, gating_func=GATING_SOFTMAX, expert_weights_norm=True)
        if a.n_expert and metadata.get(ARCH + ".expert_feed_forward_length") is None:
            # Mixtral files have no expert_feed_forward_length: llama.cpp sizes llama's experts
            # by feed_forward_length (not n_ff / K, the qwen*moe fallback)
            a.n_ff_exp = a.n_ff
        return a


class Model(GQATransformer):
    pass
