"""Presets: the tensor inventory of a well-known GGUF, rebuilt from its architecture and quant rules.

A preset file (configs/presets/*.json) holds the architecture numbers (GGUF metadata keys
without the 'arch.' prefix), the tensor layout variant and, per quantization mix, the llama.cpp
rule set the public file was made with, or for a hand-made mix (Unsloth's dynamic quants) its
recipe: the type of each tensor group (quant_rules.recipe_type). Tensor shapes come from the architecture (one
generator per GGUF architecture: `deepseek2_tensors`, `qwen3moe_tensors`, ..., each listing the
tensors llama.cpp's loader (src/llama-model.cpp) creates for it), tensor types from
placement.quant_rules; no size is typed in.
Preset name: '<model>-<mix>', e.g. 'deepseek-r1-q4_k_m'.

Shape legend (GGML order, ne[0] = row length): D hidden, V vocab, E experts, F expert FFN,
FD dense FFN, FS shared-expert FFN, H / Hkv query / KV heads, K / Dv per-head key / value
width.
"""

from placement import ggml, quant_rules
from placement.configs import ConfigError, list_configs, load_config
from placement.inventory import Inventory, InventoryError, ModelInfo, make_tensor


def deepseek2_tensors(hp: dict, kv_b_layout: str = "unsplit"):
    """(name, ne) of every tensor of a deepseek2 GGUF, in converter order. ne is GGML order.

    D hidden, V vocab, E experts, F expert FFN, FD dense FFN, H heads, Lq/Lkv LoRA ranks,
    R rope dims, N nope dims, Dv value head dim.
    """
    L = hp["block_count"]
    D, V = hp["embedding_length"], hp["vocab_size"]
    E, F, FD = hp["expert_count"], hp["expert_feed_forward_length"], hp["feed_forward_length"]
    H, Lq, Lkv = hp["attention.head_count"], hp.get("attention.q_lora_rank", 0), hp["attention.kv_lora_rank"]
    R = hp["rope.dimension_count"]
    # MLA-aware converters (those that split attn_kv_b) give the decompressed head sizes in
    # *_mla keys and the cached latent's in key_length / value_length
    N = hp.get("attention.key_length_mla", hp["attention.key_length"]) - R
    Dv = hp.get("attention.value_length_mla", hp["attention.value_length"])
    n_dense = hp.get("leading_dense_block_count", 0)

    yield "token_embd.weight", (D, V)
    for i in range(L):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (D,)
        if Lq:
            yield b + "attn_q_a.weight", (D, Lq)
            yield b + "attn_q_a_norm.weight", (Lq,)
            yield b + "attn_q_b.weight", (Lq, H * (N + R))
        else:
            yield b + "attn_q.weight", (D, H * (N + R))
        yield b + "attn_kv_a_mqa.weight", (D, Lkv + R)
        yield b + "attn_kv_a_norm.weight", (Lkv,)
        if kv_b_layout == "unsplit":
            yield b + "attn_kv_b.weight", (Lkv, H * (N + Dv))
        elif kv_b_layout == "split":
            yield b + "attn_k_b.weight", (N, Lkv, H)
            yield b + "attn_v_b.weight", (Lkv, Dv, H)
        else:
            raise ConfigError(f"unknown attn_kv_b layout {kv_b_layout!r} (unsplit | split)")
        yield b + "attn_output.weight", (H * Dv, D)
        yield b + "ffn_norm.weight", (D,)
        if i < n_dense:
            yield b + "ffn_gate.weight", (D, FD)
            yield b + "ffn_up.weight", (D, FD)
            yield b + "ffn_down.weight", (FD, D)
        else:
            yield b + "ffn_gate_inp.weight", (D, E)
            yield b + "exp_probs_b.bias", (E,)
            yield b + "ffn_gate_exps.weight", (D, F, E)
            yield b + "ffn_up_exps.weight", (D, F, E)
            yield b + "ffn_down_exps.weight", (F, D, E)
            if hp.get("expert_shared_count", 0):
                S = F * hp["expert_shared_count"]
                yield b + "ffn_gate_shexp.weight", (D, S)
                yield b + "ffn_up_shexp.weight", (D, S)
                yield b + "ffn_down_shexp.weight", (S, D)
    yield "output_norm.weight", (D,)
    yield "output.weight", (D, V)


def _gqa_attention(b: str, hp: dict, bias: bool = False, qk_norm: bool = False):
    """A GQA block's attention: norm, q/k/v (+ biases), output, per-head q/k RMS norms."""
    D, H = hp["embedding_length"], hp["attention.head_count"]
    Hkv = hp.get("attention.head_count_kv", H)
    K = hp.get("attention.key_length", D // H)
    Dv = hp.get("attention.value_length", D // H)
    yield b + "attn_norm.weight", (D,)
    yield b + "attn_q.weight", (D, H * K)
    yield b + "attn_k.weight", (D, Hkv * K)
    yield b + "attn_v.weight", (D, Hkv * Dv)
    if bias:
        yield b + "attn_q.bias", (H * K,)
        yield b + "attn_k.bias", (Hkv * K,)
        yield b + "attn_v.bias", (Hkv * Dv,)
    yield b + "attn_output.weight", (H * Dv, D)
    if qk_norm:
        yield b + "attn_q_norm.weight", (K,)
        yield b + "attn_k_norm.weight", (K,)


def _ffn(b: str, D: int, F: int, suffix: str = ""):
    """gate/up/down of one SwiGLU FFN: '' dense, '_shexp' shared expert."""
    yield b + f"ffn_gate{suffix}.weight", (D, F)
    yield b + f"ffn_up{suffix}.weight", (D, F)
    yield b + f"ffn_down{suffix}.weight", (F, D)


def _routed(b: str, D: int, F: int, E: int, probs_bias: bool = False):
    """The router and the routed experts, stacked [E] in one tensor each."""
    yield b + "ffn_gate_inp.weight", (D, E)
    if probs_bias:
        yield b + "exp_probs_b.bias", (E,)
    yield b + "ffn_gate_exps.weight", (D, F, E)
    yield b + "ffn_up_exps.weight", (D, F, E)
    yield b + "ffn_down_exps.weight", (F, D, E)


def _head(hp: dict, layout: dict):
    D, V = hp["embedding_length"], hp["vocab_size"]
    yield "output_norm.weight", (D,)
    if not layout.get("tied_embeddings", False):   # tied: llama.cpp reuses token_embd
        yield "output.weight", (D, V)


def qwen3moe_tensors(hp: dict, layout: dict = None):
    """qwen3moe: GQA with per-head q/k norms, every block MoE, no shared expert."""
    layout = layout or {}
    D, L = hp["embedding_length"], hp["block_count"]
    yield "token_embd.weight", (D, hp["vocab_size"])
    for i in range(L):
        b = f"blk.{i}."
        yield from _gqa_attention(b, hp, qk_norm=True)
        yield b + "ffn_norm.weight", (D,)
        yield from _routed(b, D, hp["expert_feed_forward_length"], hp["expert_count"])
    yield from _head(hp, layout)


def qwen2moe_tensors(hp: dict, layout: dict = None):
    """qwen2moe: GQA with q/k/v biases; routed experts plus one shared expert of its own width
    (expert_shared_feed_forward_length) scaled by a sigmoid gate (ffn_gate_inp_shexp, [D])."""
    layout = layout or {}
    D, L = hp["embedding_length"], hp["block_count"]
    yield "token_embd.weight", (D, hp["vocab_size"])
    for i in range(L):
        b = f"blk.{i}."
        yield from _gqa_attention(b, hp, bias=True)
        yield b + "ffn_norm.weight", (D,)
        yield from _routed(b, D, hp["expert_feed_forward_length"], hp["expert_count"])
        yield b + "ffn_gate_inp_shexp.weight", (D,)
        yield from _ffn(b, D, hp["expert_shared_feed_forward_length"], "_shexp")
    yield from _head(hp, layout)


def llama_tensors(hp: dict, layout: dict = None):
    """llama: GQA; dense FFN blocks, or (expert_count > 0, Mixtral-style) routed experts whose
    width is feed_forward_length, as llama.cpp's loader reads it."""
    layout = layout or {}
    D, L, FD = hp["embedding_length"], hp["block_count"], hp["feed_forward_length"]
    E = hp.get("expert_count", 0)
    yield "token_embd.weight", (D, hp["vocab_size"])
    for i in range(L):
        b = f"blk.{i}."
        yield from _gqa_attention(b, hp)
        yield b + "ffn_norm.weight", (D,)
        if E:
            yield from _routed(b, D, hp.get("expert_feed_forward_length", FD), E)
        else:
            yield from _ffn(b, D, FD)
    yield from _head(hp, layout)


def glm4moe_tensors(hp: dict, layout: dict = None):
    """glm4moe: GQA with q/k/v biases and (355B: layout qk_norm) per-head q/k norms, partial
    RoPE; leading dense blocks, then sigmoid-routed experts with a selection bias
    (exp_probs_b) and expert_shared_count shared experts of the expert width. The last
    nextn_predict_layers blocks are MTP blocks: a full MoE block plus eh_proj and its norms
    (GLM-4.5 also stores nextn embed_tokens / shared_head_head: layout nextn_embeddings).
    The FFN norm is called post_attention_norm in this architecture.
    """
    layout = layout or {}
    D, V, L = hp["embedding_length"], hp["vocab_size"], hp["block_count"]
    E, F, FD = hp["expert_count"], hp["expert_feed_forward_length"], hp["feed_forward_length"]
    n_dense = hp.get("leading_dense_block_count", 0)
    n_nextn = hp.get("nextn_predict_layers", 0)
    S = F * hp.get("expert_shared_count", 0)
    yield "token_embd.weight", (D, V)
    for i in range(L):
        b = f"blk.{i}."
        yield from _gqa_attention(b, hp, bias=True, qk_norm=layout.get("qk_norm", True))
        yield b + "post_attention_norm.weight", (D,)
        if i < n_dense:
            yield from _ffn(b, D, FD)
        else:
            yield from _routed(b, D, F, E, probs_bias=True)
            if S:
                yield from _ffn(b, D, S, "_shexp")
        if i >= L - n_nextn:
            yield b + "nextn.eh_proj.weight", (2 * D, D)
            yield b + "nextn.enorm.weight", (D,)
            yield b + "nextn.hnorm.weight", (D,)
            if layout.get("nextn_embeddings", False):
                yield b + "nextn.embed_tokens.weight", (D, V)
                yield b + "nextn.shared_head_head.weight", (D, V)
            yield b + "nextn.shared_head_norm.weight", (D,)
    yield from _head(hp, layout)


_LAYOUTS = {
    "deepseek2": lambda hp, layout: deepseek2_tensors(hp, layout.get("attn_kv_b", "unsplit")),
    "glm4moe": glm4moe_tensors,
    "llama": llama_tensors,
    "qwen2moe": qwen2moe_tensors,
    "qwen3moe": qwen3moe_tensors,
}


def _preset_files() -> dict:
    """{model name: config dict} over configs/presets/*.json (a file may name several models)."""
    out = {}
    for stem in list_configs("presets"):
        cfg = load_config("presets", stem)
        for name in cfg.get("names", [stem]):
            out[name] = cfg
    return out


def list_presets() -> list:
    """All preset names, '<model>-<mix>' lower case."""
    names = []
    for model, cfg in _preset_files().items():
        names.extend(f"{model}-{mix.lower()}" for mix in cfg.get("mixes", {}))
    return sorted(names)


def preset_config(name: str):
    """(config dict, model name, mix) for a preset name."""
    files = _preset_files()
    key = name.lower()
    for model, cfg in files.items():
        for mix in cfg.get("mixes", {}):
            if key == f"{model}-{mix.lower()}":
                return cfg, model, mix
    raise InventoryError(f"unknown preset {name!r}; known: {', '.join(list_presets()) or '(none)'}")


def build_preset(name: str, rules: str = None) -> Inventory:
    """Inventory of preset `name`; `rules` overrides the mix's llama.cpp rule set."""
    cfg, model, mix = preset_config(name)
    arch = cfg["architecture"]
    if arch not in _LAYOUTS:
        raise InventoryError(f"preset {name}: no tensor layout for architecture {arch!r}")
    hp = cfg["hparams"]
    rules = rules or cfg["mixes"][mix].get("rules", quant_rules.DEFAULT_RULES)
    n_gqa = hp["attention.head_count"] // max(1, hp.get("attention.head_count_kv", hp["attention.head_count"]))
    model_info = ModelInfo.from_hparams(arch, lambda k, d=None: hp.get(k, d),
                                        name=f"{cfg.get('general.name', model)} {mix}",
                                        n_vocab=hp["vocab_size"], where=f"preset {name}")
    recipe = cfg["mixes"][mix].get("recipe")
    tensors = []
    for tname, ne in _LAYOUTS[arch](hp, cfg.get("layout", {})):
        if recipe is not None:   # a hand-made mix: its per-tensor-group types
            t = quant_rules.recipe_type(tname, ne, recipe)
        else:
            # llama.cpp's quantizer counts every block, MTP blocks included (hparams.n_layer)
            t = quant_rules.tensor_type(tname, ne, mix, n_layer=hp["block_count"],
                                        n_expert=hp.get("expert_count", 0), n_gqa=n_gqa, rules=rules)
        tensors.append(make_tensor(tname, t, ne, n_layer=model_info.n_layer))
    return Inventory(source=f"preset:{name.lower()}", model=model_info, tensors=tensors, quantization=mix)


def preset_reference(name: str) -> dict:
    """The public figures a preset must reproduce (for tests and the report)."""
    cfg, _, mix = preset_config(name)
    return dict(cfg["mixes"][mix].get("reference", {}))


__all__ = ["build_preset", "list_presets", "preset_reference", "deepseek2_tensors", "glm4moe_tensors",
           "llama_tensors", "qwen2moe_tensors", "qwen3moe_tensors", "ggml"]
