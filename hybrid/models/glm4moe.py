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

from hybrid.models.args import Glm4MoeArgs
from hybrid.models.gqa import GQATransformer

ARCH = "glm4moe"

# metadata reading, hard-coded router kinds and tensor specs: hybrid.models.args (torch-free)
ModelArgs = Glm4MoeArgs


class Model(GQATransformer):
    FFN_NORM = ModelArgs.FFN_NORM   # post_attention_norm: what the converter names it
