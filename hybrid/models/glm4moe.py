"""GLM-4.5 / 4.6 (GGUF architecture `glm4moe`).

llama.cpp's graph (src/models/glm4-moe.cpp): GQA with q/k/v biases, optional per-head q/k RMS
norms, NEOX RoPE on the first `rope.dimension_count` dims of each head (half of them);
`leading_dense_block_count` dense blocks, then MoE: sigmoid gating with the selection bias
`exp_probs_b`, group-limited top-k when the file has expert groups, weights normalized and
scaled per the file's keys, shared experts added; the FFN's norm is `post_attention_norm`.
The trailing `nextn_predict_layers` MTP
blocks are counted in block_count and not run (as llama.cpp does for generation).
"""

from __future__ import annotations

from hybrid.models.gqa import GQAArgs, GQATransformer
from hybrid.models.moe import GATING_SIGMOID

ARCH = "glm4moe"


class ModelArgs(GQAArgs):
    @classmethod
    def from_gguf(cls, metadata: dict, tensors: dict, source: str = "model") -> GQAArgs:
        # llama.cpp takes sigmoid gating when the file has no expert_gating_func
        gating = None if metadata.get(ARCH + ".expert_gating_func") else GATING_SIGMOID
        return cls.read(ARCH, metadata, tensors, source, rope_neox=True, gating_func=gating)


class Model(GQATransformer):
    FFN_NORM = "post_attention_norm"   # what the converter names the FFN's norm
