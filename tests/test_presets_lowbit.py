"""DeepSeek-R1 in the four popular low-bit dynamic mixes (Unsloth's UD files): presets whose
tensor tables follow the public description of each file, totals within 1% of its published
size, and the dry-run's verdict for a 24 GB GPU + 192 GiB machine."""

import io
from contextlib import redirect_stdout

import pytest

from placement import quant_rules
from placement.presets import build_preset, preset_reference

GiB = 1 << 30
# preset -> (routed gate/up type, down_proj types, published size)
UD = {
    "deepseek-r1-ud-iq1_s": ("IQ1_S", {"IQ2_XXS", "IQ1_S"}, 131),
    "deepseek-r1-ud-iq1_m": ("IQ1_M", {"Q2_K", "IQ2_XXS"}, 158),
    "deepseek-r1-ud-iq2_xxs": ("IQ2_XXS", {"Q2_K"}, 183),
    "deepseek-r1-ud-q2_k_xl": ("Q2_K", {"Q3_K", "Q2_K"}, 212),
}


@pytest.mark.parametrize("name", list(UD))
def test_ud_preset_matches_published_size_and_description(name):
    gate_up, down, size = UD[name]
    inv = build_preset(name)
    ref = preset_reference(name)
    assert len(inv) == ref["tensors"] == 1025
    assert ref["published_size_gib"] == size
    assert abs(inv.total_bytes / GiB - size) / size < 0.01, f"{inv.total_bytes / GiB:.2f} GiB"
    types = {t.name: t.type_name for t in inv.tensors}
    for L in range(3, 61):
        assert types[f"blk.{L}.ffn_gate_exps.weight"] == types[f"blk.{L}.ffn_up_exps.weight"] == gate_up
        assert types[f"blk.{L}.ffn_down_shexp.weight"] == "Q6_K"        # shared experts 6-bit
        assert types[f"blk.{L}.attn_q_b.weight"] == "Q4_K"             # attention 4/6-bit
        assert types[f"blk.{L}.attn_kv_b.weight"] == "Q6_K"
    downs = [types[f"blk.{L}.ffn_down_exps.weight"] for L in range(3, 61)]
    assert set(downs) == down
    # the higher-bit down_proj layers are the first MoE layers, in one run
    assert downs == sorted(downs, key=lambda t: t != downs[0])
    assert all(types[f"blk.{L}.ffn_{k}.weight"] in ("Q4_K", "Q6_K") for L in range(3) for k in ("gate", "up", "down"))
    assert all(t.type_name == "F32" for t in inv.tensors if t.role in ("norm", "router"))


def _dry_run(preset):
    from placement.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["--preset", preset, "--hardware", "1x256g-24g", "--ram", "192GiB"])
    return rc, out.getvalue()


def test_dry_run_on_24gb_gpu_and_192gib_tells_which_fit():
    verdicts = {}
    for name in UD:
        rc, text = _dry_run(name)
        verdicts[name] = "DOES NOT FIT" not in text and "FITS" in text
    assert verdicts == {"deepseek-r1-ud-iq1_s": True, "deepseek-r1-ud-iq1_m": True,
                        "deepseek-r1-ud-iq2_xxs": True, "deepseek-r1-ud-q2_k_xl": False}


def test_recipe_refuses_what_it_cannot_place():
    rules = [{"match": r"\.ffn_down_exps\.", "type": "IQ1_S"}]
    with pytest.raises(ValueError, match=r"blk\.3\.ffn_down_exps\.weight \(rows of 128\).*IQ1_S"):
        quant_rules.recipe_type("blk.3.ffn_down_exps.weight", (128, 64, 8), rules)
    with pytest.raises(ValueError, match=r"no rule for tensor blk\.3\.attn_q_b\.weight"):
        quant_rules.recipe_type("blk.3.attn_q_b.weight", (1536, 24576), rules)
    assert quant_rules.recipe_type("blk.3.attn_norm.weight", (7168,), rules) == 0   # F32, untouched
