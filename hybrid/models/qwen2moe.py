"""Qwen1.5/2 MoE (GGUF architecture `qwen2moe`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B).

llama.cpp's graph (src/models/qwen2moe.cpp): GQA with q/k/v biases and NEOX RoPE; MoE in
every block: softmax top-k, weights not normalized, plus a shared expert of
`expert_shared_feed_forward_length` scaled by sigmoid(h @ ffn_gate_inp_shexp) (models.moe).
"""

from __future__ import annotations

from hybrid.models.gqa import GQAArgs, GQATransformer
from hybrid.models.moe import GATING_SOFTMAX

ARCH = "qwen2moe"


class ModelArgs(GQAArgs):
    @classmethod
    def from_gguf(cls, metadata: dict, tensors: dict, source: str = "model") -> GQAArgs:
        return cls.read(ARCH, metadata, tensors, source,
                        rope_neox=True, gating_func=GATING_SOFTMAX, expert_weights_norm=False)


class Model(GQATransformer):
    pass
