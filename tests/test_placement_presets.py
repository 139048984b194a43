"""Presets rebuild well-known GGUFs from architecture + llama.cpp type rules; checked against the
public files' figures and, on tiny fixtures, against llama.cpp's own quantizer."""

import pytest

from placement import ggml, quant_rules
from placement.inventory import from_gguf, tensor_group, tensor_role
from placement.presets import build_preset, list_presets, preset_config, preset_reference

GiB = 1 << 30


def test_ggml_table_matches_gguf():
    from gguf.constants import GGML_QUANT_SIZES

    for t, (block, size) in GGML_QUANT_SIZES.items():
        if int(t) in ggml.TYPES:
            assert (ggml.TYPES[int(t)].block_size, ggml.TYPES[int(t)].type_size) == (block, size), t.name
            assert ggml.TYPES[int(t)].name == t.name
    # every type of the tables we rely on is known to gguf too
    assert {"Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0", "F32", "BF16"} <= {t.name for t in GGML_QUANT_SIZES}


def test_presets_listed():
    names = list_presets()
    for n in ("deepseek-r1-q4_k_m", "deepseek-r1-q8_0", "deepseek-r1-q2_k", "deepseek-v3-q4_k_m"):
        assert n in names


def test_r1_q4_k_m_matches_public_file():
    inv = build_preset("deepseek-r1-q4_k_m")
    ref = preset_reference("deepseek-r1-q4_k_m")
    assert len(inv) == ref["tensors"] == 1025
    assert abs(inv.total_bytes / GiB - ref["tensor_data_gib"]) / ref["tensor_data_gib"] < 0.005
    # in fact it is exact to the 10 MiB llama.cpp prints
    assert round(inv.total_bytes / GiB, 2) == 376.65
    assert inv.count_by_type() == ref["type_counts"] == {"F32": 361, "Q4_K": 606, "Q6_K": 58}
    types = {t.name: t.type_name for t in inv.tensors}
    assert types["token_embd.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K"
    assert all(types[f"blk.{i}.attn_kv_b.weight"] == "Q4_K" for i in range(61))
    assert all(t.type_name == "F32" for t in inv.tensors if t.role == "norm")
    # the 57 others: ffn_down / _exps / _shexp of the use_more_bits layers
    q6 = sorted(t.name for t in inv.tensors if t.type_name == "Q6_K" and t.name != "output.weight")
    assert len(q6) == 57 and all("ffn_down" in n for n in q6)
    # routed experts are ~97% of the bytes (ARCHITECTURE.md)
    share = inv.bytes_by_role()["routed_experts"] / inv.total_bytes
    assert 0.97 < share < 0.98


def test_v3_is_the_same_file_layout():
    a, b = build_preset("deepseek-r1-q4_k_m"), build_preset("deepseek-v3-q4_k_m")
    assert a.total_bytes == b.total_bytes and a.count_by_type() == b.count_by_type()


def test_r1_q8_0_matches_public_file():
    inv = build_preset("deepseek-r1-q8_0")
    ref = preset_reference("deepseek-r1-q8_0")
    assert len(inv) == 1025
    assert inv.count_by_type() == ref["type_counts"] == {"F32": 361, "Q8_0": 664}
    assert abs(inv.total_bytes / GiB - ref["tensor_data_gib"]) / ref["tensor_data_gib"] < 0.005


def test_r1_q2_k_rules():
    inv = build_preset("deepseek-r1-q2_k")
    assert inv.count_by_type() == preset_reference("deepseek-r1-q2_k")["type_counts"]
    types = {t.name: t.type_name for t in inv.tensors}
    assert types["output.weight"] == "Q6_K"
    assert types["blk.10.attn_output.weight"] == "Q3_K"
    assert types["blk.10.ffn_down_exps.weight"] == "Q3_K"
    assert types["blk.10.ffn_up_exps.weight"] == "Q2_K"
    assert types["blk.10.attn_kv_b.weight"] == "Q2_K"
    assert inv.total_bytes < build_preset("deepseek-r1-q4_k_m").total_bytes * 0.65


def test_todays_rules_differ_on_attn_kv_b():
    old = build_preset("deepseek-r1-q4_k_m")
    new = build_preset("deepseek-r1-q4_k_m", rules="llama.cpp-recent")
    kv_b_new = {t.layer: t.type_name for t in new.tensors if t.name.endswith("attn_kv_b.weight")}
    more_bits = [i for i in range(61) if quant_rules.use_more_bits(i, 61)]
    assert sorted(i for i, t in kv_b_new.items() if t == "Q6_K") == more_bits
    assert new.count_by_type()["Q6_K"] == old.count_by_type()["Q6_K"] + len(more_bits)


def test_use_more_bits_layers_of_r1():
    layers = [i for i in range(61) if quant_rules.use_more_bits(i, 61)]
    assert layers[:7] == list(range(7)) and layers[-8:] == list(range(53, 61))
    assert len(layers) == 30


def test_k_quant_fallback_for_short_rows():
    # rows of 128 cannot hold a 256-block: Q4_K falls back to Q5_0, Q6_K to Q8_0, Q2_K to IQ4_NL
    name = "blk.0.attn_kv_b.weight"
    assert quant_rules.tensor_type(name, (128, 64), "Q4_K_M", n_layer=8, n_expert=16) == ggml.Q5_0
    assert quant_rules.tensor_type("blk.0.ffn_down.weight", (128, 64), "Q4_K_M", n_layer=8, n_expert=16) == ggml.Q8_0
    assert quant_rules.tensor_type(name, (128, 64), "Q2_K", n_layer=8, n_expert=16) == ggml.IQ4_NL
    with pytest.raises(ValueError, match="unsupported quantization mix"):
        quant_rules.tensor_type(name, (256, 64), "IQ1_S", n_layer=8, n_expert=16)


def test_roles_and_groups():
    assert tensor_role("blk.3.ffn_up_exps.weight") == "routed_experts"
    assert tensor_role("blk.3.ffn_down_shexp.weight") == "shared_expert"
    assert tensor_role("blk.0.ffn_down.weight") == "dense_ffn"
    assert tensor_role("blk.3.ffn_gate_inp.weight") == "router"
    assert tensor_role("blk.3.exp_probs_b.bias") == "router"
    assert tensor_role("blk.3.attn_q_a_norm.weight") == "norm"
    assert tensor_role("output_norm.weight") == "norm"
    assert tensor_role("token_embd.weight") == "embedding"
    assert tensor_role("output.weight") == "output"
    assert tensor_role("blk.3.attn_q_b.weight") == "attention"
    assert tensor_group("blk.3.attn_kv_b.weight") == "attention.kv_b"
    assert tensor_group("blk.3.attn_k_b.weight") == "attention.kv_b"


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="deepseek-r1-q4_k_m"):
        preset_config("deepseek-r1-q3_k_s")


def _hp_of(inv):
    m = inv.model
    return dict(n_layer=m.n_layer, n_expert=m.n_expert, n_gqa=1)


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q8_0", "Q2_K"])
def test_rules_agree_with_llama_cpp_on_tiny_model(tiny_gguf, mix):
    """The installed llama.cpp quantizes a tiny deepseek2; our rules must name the same types.

    llama-cpp-python bundles a recent llama.cpp, so one of our rule sets (the newer one, where
    attn_kv_b counts as attn_v) must match it tensor for tensor; the other may differ only on
    attn_kv_b and on the fallback type of rows that are not whole 256-blocks.
    """
    path = tiny_gguf(mix)
    inv = from_gguf(path)
    m = inv.model
    results = {}
    for rules in quant_rules.RULE_SETS:
        diff = []
        for t in inv.tensors:
            want = quant_rules.tensor_type(t.name, t.ne, mix, n_layer=m.n_layer, n_expert=m.n_expert,
                                           n_gqa=1, rules=rules)
            if want != t.ggml_type:
                diff.append((t.name, t.type_name, ggml.type_name(want)))
        results[rules] = diff
    assert any(not d for d in results.values()), results
    ne0 = {t.name: t.ne[0] for t in inv.tensors}
    for rules, diff in results.items():
        assert all("attn_kv_b" in name or ne0[name] % 256 for name, _, _ in diff), (rules, diff)
