"""llama.cpp's per-tensor type choice for a quantization mix (Q4_K_M, Q8_0, ...), re-derived.

Our own restatement of `llama_tensor_get_type` (src/llama-quant.cpp) as it was in early 2025,
limited to the branches that matter for the mixes we ship presets for. Used only to build
presets: a preset must reproduce the tensor types of a public file, and the types depend on
these heuristics, not just on the mix name.

Rule sets:
  "llama.cpp-2025-01": the rules the public DeepSeek-R1/V3 GGUFs were made with (Jan-Feb 2025).
      `attn_kv_b` is counted as an attention-V tensor for the layer-count sanity check but no
      rule matches its name, so it keeps the mix's base type (Q4_K in Q4_K_M).
  "llama.cpp-recent": llama.cpp master as of late 2025 classifies `attn_kv_b` with attn_v
      ("more sensitive"), so Q4_K_M gives it Q6_K in the use_more_bits layers and Q2_K gives it
      Q3_K; and Q2_K/Q3_K rows that are not whole 256-blocks fall back to Q4_0, not IQ4_NL.
      The same change sends a fused `attn_qkv` down the attn_v branch (its own Q5_K rule for
      Q4_K_M is no longer reached). None of the preset architectures has a fused attn_qkv.

Both sets agree on everything the GQA MoE presets (qwen3moe, glm4moe) and the split-MLA
layout (Kimi K2: attn_k_b / attn_v_b, no attn_kv_b) contain:
  - attn_v: Q6_K in the use_more_bits layers (Q4_K_M); the rule counts attn_v tensors, one per
    block, in layer order (llama.cpp sorts tensors by block number), so its counter is the
    block number and its total the block count, MTP blocks included;
  - ffn_down, ffn_down_exps, ffn_down_shexp: Q6_K in the use_more_bits blocks, the block
    parsed from the name for MoE models, out of all blocks (llama.cpp's n_layer counts the MTP
    blocks: glm4moe's block 92 of 93 is in the last eighth);
  - the n_expert == 8 rules (attn_v / attn_k Q8_0, attn_output Q5_K) fire for Mixtral-style
    8-expert models only: not for 128/160/384 experts;
  - routers (ffn_gate_inp), norms, biases and other 1-D tensors stay in float; a [D, 1] tensor
    is 1-D to ggml (trailing 1s do not count as dims).
Not modelled: the recent rule that gives token_embd the output's type when the model has no
output.weight (tied embeddings); no preset has tied embeddings.
"""

import re

from placement import ggml

RULE_SETS = ("llama.cpp-2025-01", "llama.cpp-recent")
DEFAULT_RULES = "llama.cpp-2025-01"

# mix name -> base type of every quantizable tensor before the per-tensor rules
MIX_BASE_TYPE = {
    "Q2_K": ggml.Q2_K,
    "Q4_K_M": ggml.Q4_K,
    "Q5_K_M": ggml.Q5_K,
    "Q6_K": ggml.Q6_K,
    "Q8_0": ggml.Q8_0,
}

# K-quants need rows that are whole 256-blocks; the quantizer falls back to a 32-block type
_FALLBACK = {
    ggml.Q2_K: ggml.IQ4_NL, ggml.Q3_K: ggml.IQ4_NL,
    ggml.Q4_K: ggml.Q5_0, ggml.Q5_K: ggml.Q5_1, ggml.Q6_K: ggml.Q8_0,
}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The first and last eighth of the layers, and every third layer in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def n_dims(ne) -> int:
    """ggml_n_dims: trailing dimensions of 1 do not count (a [D, 1] tensor is 1-D)."""
    n = 1
    for i, d in enumerate(ne):
        if int(d) > 1:
            n = i + 1
    return n


def is_quantizable(name: str, ne) -> bool:
    """Which tensors the quantizer touches at all (others keep their stored type, F32 here)."""
    if n_dims(ne) < 2:
        return False
    if not name.endswith("weight"):
        return False
    if name.endswith("_norm.weight"):
        return False
    # the router stays in float: its scores pick the experts
    if "ffn_gate_inp.weight" in name:
        return False
    return True


def _layer_of(name: str) -> int:
    # llama.cpp parses "blk.%d." for MoE models; the running counters it uses otherwise give
    # the same number for models with one such tensor per block (every architecture we have
    # presets for: one attn_v / attn_kv_b and one ffn_down* family per block, blocks in order).
    if not name.startswith("blk."):
        raise ValueError(f"tensor {name} has no layer number")
    return int(name.split(".")[1])


def recipe_type(name: str, ne, recipe: list) -> int:
    """GGML type id of tensor `name` under an explicit recipe: the per-tensor-group choices of
    a hand-made mix (Unsloth's dynamic "UD" files are made with llama-quantize's per-tensor
    overrides, not with a named mix's heuristics). recipe: ordered rules {"match": regex on
    the name, "type": GGML type name, "layers": [first, end) optional}; the first rule that
    matches decides; tensors the quantizer does not touch stay F32 (is_quantizable)."""
    if not is_quantizable(name, ne):
        return ggml.F32
    for rule in recipe:
        if not re.search(rule["match"], name):
            continue
        if "layers" in rule:
            lo, hi = rule["layers"]
            if not lo <= _layer_of(name) < hi:
                continue
        t = ggml.ggml_type(rule["type"]).id
        if ne[0] % ggml.ggml_type(t).block_size:
            raise ValueError(f"recipe gives {name} (rows of {ne[0]}) type {rule['type']}, whose "
                             f"blocks do not fit its rows")
        return t
    raise ValueError(f"recipe has no rule for tensor {name}")


def tensor_type(name: str, ne, mix: str, *, n_layer: int, n_expert: int, n_gqa: int = 1,
                rules: str = DEFAULT_RULES) -> int:
    """GGML type id that llama-quantize gives tensor `name` (GGML dims `ne`) for `mix`.

    Non-quantizable tensors return F32 (their stored type in the converters' output).
    """
    if mix not in MIX_BASE_TYPE:
        raise ValueError(f"unsupported quantization mix {mix!r}; supported: {', '.join(MIX_BASE_TYPE)}")
    if rules not in RULE_SETS:
        raise ValueError(f"unknown rule set {rules!r}; known: {', '.join(RULE_SETS)}")
    if not is_quantizable(name, ne):
        return ggml.F32

    t = MIX_BASE_TYPE[mix]
    attn_v_like = "attn_v.weight" in name
    if rules != "llama.cpp-2025-01" and ("attn_kv_b.weight" in name or "attn_qkv.weight" in name):
        attn_v_like = True

    if name == "output.weight":
        if ne[0] % 256:
            t = ggml.Q8_0
        elif t != ggml.Q8_0:
            t = ggml.Q6_K
    elif name == "token_embd.weight":
        pass  # only the IQ*/TQ* mixes change it
    elif attn_v_like:
        i_layer = _layer_of(name)
        if mix == "Q2_K":
            t = ggml.Q4_K if n_gqa >= 4 else ggml.Q3_K
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layer):
            t = ggml.Q6_K
        if n_expert == 8:
            t = ggml.Q8_0
    elif "attn_k.weight" in name:
        if n_expert == 8:
            t = ggml.Q8_0
    elif "ffn_down" in name:
        i_layer = _layer_of(name)
        if mix == "Q2_K":
            t = ggml.Q3_K
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layer):
            t = ggml.Q6_K
    elif "attn_output.weight" in name:
        if n_expert == 8:
            if mix in ("Q2_K", "Q4_K_M"):
                t = ggml.Q5_K
        elif mix == "Q2_K":
            t = ggml.Q3_K
    elif "attn_qkv.weight" in name:
        if mix == "Q4_K_M":
            t = ggml.Q5_K
        elif mix == "Q5_K_M":
            t = ggml.Q6_K

    block = ggml.ggml_type(t).block_size
    if ne[0] % block:
        if rules != "llama.cpp-2025-01" and t in (ggml.Q2_K, ggml.Q3_K):
            t = ggml.Q4_0
        else:
            t = _FALLBACK.get(t, t)
        if ne[0] % ggml.ggml_type(t).block_size:
            t = ggml.F16
    return t
