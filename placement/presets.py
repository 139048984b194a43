"""Presets: the tensor inventory of a well-known GGUF, rebuilt from its architecture and quant rules.

A preset file (configs/presets/*.json) holds the architecture numbers (GGUF metadata keys
without the 'arch.' prefix), the tensor layout variant and, per quantization mix, the llama.cpp
rule set the public file was made with. Tensor shapes come from the architecture
(`deepseek2_tensors`), tensor types from placement.quant_rules; no size is typed in.
Preset name: '<model>-<mix>', e.g. 'deepseek-r1-q4_k_m'.
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
    N = hp["attention.key_length"] - R
    Dv = hp["attention.value_length"]
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


_LAYOUTS = {"deepseek2": deepseek2_tensors}


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
    tensors = []
    for tname, ne in _LAYOUTS[arch](hp, cfg.get("layout", {}).get("attn_kv_b", "unsplit")):
        t = quant_rules.tensor_type(tname, ne, mix, n_layer=hp["block_count"], n_expert=hp.get("expert_count", 0),
                                    n_gqa=n_gqa, rules=rules)
        tensors.append(make_tensor(tname, t, ne))
    model_info = ModelInfo.from_hparams(arch, lambda k, d=None: hp.get(k, d),
                                        name=f"{cfg.get('general.name', model)} {mix}",
                                        n_vocab=hp["vocab_size"], where=f"preset {name}")
    return Inventory(source=f"preset:{name.lower()}", model=model_info, tensors=tensors, quantization=mix)


def preset_reference(name: str) -> dict:
    """The public figures a preset must reproduce (for tests and the report)."""
    cfg, _, mix = preset_config(name)
    return dict(cfg["mixes"][mix].get("reference", {}))


__all__ = ["build_preset", "list_presets", "preset_reference", "deepseek2_tensors", "ggml"]
