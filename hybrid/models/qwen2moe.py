"""Qwen1.5/2 MoE (GGUF architecture `qwen2moe`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B).

llama.cpp's graph (src/models/qwen2moe.cpp): GQA with q/k/v biases and NEOX RoPE; MoE in
every block: softmax top-k, weights not normalized, plus a shared expert of
`expert_shared_feed_forward_length` scaled by sigmoid(h @ ffn_gate_inp_shexp) (models.moe).
"""

from __future__ import annotations

from hybrid.models.args import Qwen2MoeArgs
from hybrid.models.gqa import GQATransformer

ARCH = "qwen2moe"

# metadata reading, hard-coded router kinds and tensor specs: hybrid.models.args (torch-free)
ModelArgs = Qwen2MoeArgs


class Model(GQATransformer):
    pass
