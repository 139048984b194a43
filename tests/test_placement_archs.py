"""Placement for the GQA MoE architectures (qwen3moe, qwen2moe, Mixtral-style and dense llama,
glm4moe) and the new presets (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B-A35B, GLM-4.6,
Kimi K2): preset totals against the public files, dry runs on the design-point machine, and
tiny GGUF headers of each architecture that llama.cpp itself loads and quantizes."""

import ctypes
import dataclasses
import os
import re

import numpy as np

import pytest

from placement import ggml, hardware, quant_rules
from placement.cli import main as dry_run
from placement.inventory import ModelInfo, from_gguf, tensor_role
from placement.presets import (build_preset, glm4moe_tensors, llama_tensors, preset_config, preset_reference,
                               qwen2moe_tensors, qwen3moe_tensors)
from placement.solver import Policy, Workload, solve
from placement.units import fmt_bytes

GiB = 1 << 30
NEW_PRESETS = ["qwen3-30b-a3b-q4_k_m", "qwen3-235b-a22b-q4_k_m", "qwen3-coder-480b-a35b-q4_k_m",
               "glm-4.6-q4_k_m", "kimi-k2-q4_k_m"]
# the design point: 48 GB GPU, 512 GiB of RAM on 2 NUMA nodes, 64 cores
BOX = ["--gpu-mem", "48GiB", "--ram", "512GiB", "--numa-nodes", "2", "--cores", "64"]


# --- presets against the public files ------------------------------------------------------

@pytest.mark.parametrize("name", NEW_PRESETS + ["glm-4.6-q8_0"])
def test_preset_total_within_1pct_of_public_file(name):
    inv, ref = build_preset(name), preset_reference(name)
    assert ref.get("what"), f"{name}: the reference must say where its figure comes from"
    if "tensor_data_gib" in ref:
        got, want = inv.total_bytes / GiB, ref["tensor_data_gib"]
    else:   # a file size in decimal GB: the header (vocabulary) is a few MB more than the tensors
        got, want = inv.total_bytes / 1e9, ref["file_gb"]
    assert abs(got - want) / want < 0.01, (name, got, want)
    if "tensors" in ref:
        assert len(inv) == ref["tensors"]
    if "type_counts" in ref:
        assert inv.count_by_type() == ref["type_counts"]


def test_qwen3_presets_equal_the_llama_cpp_logs():
    """Where a llama.cpp load log is public, the rebuilt file equals it to the digits printed."""
    for name, gib, digits in (("qwen3-30b-a3b-q4_k_m", 17.28, 2), ("qwen3-235b-a22b-q4_k_m", 132.386, 3),
                              ("qwen3-coder-480b-a35b-q4_k_m", 270.13, 2), ("glm-4.6-q8_0", 353.259, 3)):
        assert round(build_preset(name).total_bytes / GiB, digits) == gib, name


def test_qwen3_235b_tensor_types():
    types = {t.name: t.type_name for t in build_preset("qwen3-235b-a22b-q4_k_m").tensors}
    more_bits = [i for i in range(94) if quant_rules.use_more_bits(i, 94)]
    assert len(more_bits) == 46
    for i in range(94):
        hi = "Q6_K" if i in more_bits else "Q4_K"
        assert (types[f"blk.{i}.attn_v.weight"], types[f"blk.{i}.ffn_down_exps.weight"]) == (hi, hi)
        assert types[f"blk.{i}.attn_k.weight"] == types[f"blk.{i}.ffn_up_exps.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_q_norm.weight"] == types[f"blk.{i}.ffn_gate_inp.weight"] == "F32"
    assert (types["token_embd.weight"], types["output.weight"]) == ("Q4_K", "Q6_K")


def test_glm46_layout_and_mtp_block():
    inv = build_preset("glm-4.6-q4_k_m")
    m = inv.model
    # 92 transformer blocks run; the converter appends the MTP block as block 92 (block_count 93)
    assert (m.n_layer, m.n_nextn, m.n_block, m.n_dense_lead) == (92, 1, 93, 3)
    mtp = [t for t in inv.tensors if t.role == "mtp"]
    # the 23 tensors llama.cpp reports as "unused tensor blk.92.*" for GLM-4.6
    assert len(mtp) == 23 and {t.layer for t in mtp} == {92}
    assert sum(t.n_bytes for t in mtp) == inv.bytes_by_role()["mtp"]
    assert 2.0 * GiB < inv.bytes_by_role()["mtp"] < 3.0 * GiB
    assert inv.moe_layers() == list(range(3, 92))
    assert m.shared_ff == 1536 and m.expert_ff == 1536 and m.n_expert == 160
    types = {t.name: t.type_name for t in inv.tensors}
    # the quantizer counts all 93 blocks: block 92 is in the last eighth
    assert types["blk.92.ffn_down_exps.weight"] == "Q6_K" and types["blk.92.nextn.eh_proj.weight"] == "Q4_K"
    assert types["blk.5.attn_q.bias"] == "F32" and types["blk.5.exp_probs_b.bias"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.40.ffn_down_shexp.weight"] == "Q6_K"
    assert types["blk.41.ffn_down_shexp.weight"] == types["blk.41.ffn_down_exps.weight"] == "Q4_K"
    # out of 93 blocks the last eighth starts at 81, out of 92 it would start at 80
    assert types["blk.80.ffn_down_exps.weight"] == types["blk.80.attn_v.weight"] == "Q4_K"
    assert types["blk.81.ffn_down_exps.weight"] == types["blk.81.attn_v.weight"] == "Q6_K"


def test_kimi_k2_is_deepseek2_with_split_kv_b():
    inv = build_preset("kimi-k2-q4_k_m")
    m = inv.model
    assert (m.architecture, m.attention, m.n_layer, m.n_dense_lead, m.n_expert, m.n_head, m.n_vocab) == \
        ("deepseek2", "mla", 61, 1, 384, 64, 163840)
    assert (m.qk_nope_dim, m.v_head_dim, m.kv_lora_rank, m.qk_rope_dim) == (128, 128, 512, 64)
    assert len(inv) == 1096 and inv.moe_layers() == list(range(1, 61))
    types = {t.name: t.type_name for t in inv.tensors}
    # rows of 128 (nope) take no 256-block: Q4_K falls back to Q5_0, as in the public MLA files
    assert inv.count_by_type()["Q5_0"] == 61 and types["blk.7.attn_k_b.weight"] == "Q5_0"
    assert types["blk.7.attn_v_b.weight"] == "Q4_K"
    assert inv.tensor("blk.7.ffn_up_exps.weight").ne == (7168, 2048, 384)


@pytest.mark.parametrize("name, per_token", [
    # GQA: layers x KV heads x (K + V) x 2 bytes. Qwen3-30B-A3B's llama.cpp log: 'KV cache ... 16384
    # cells, 48 layers ... K (f16): 768.00 MiB, V (f16): 768.00 MiB' = 98304 B per token
    ("qwen3-30b-a3b-q4_k_m", 48 * 4 * (128 + 128) * 2),
    ("qwen3-235b-a22b-q4_k_m", 94 * 4 * 256 * 2),
    ("qwen3-coder-480b-a35b-q4_k_m", 62 * 8 * 256 * 2),
    ("glm-4.6-q4_k_m", 92 * 8 * 256 * 2),          # the MTP block keeps no cache
    # MLA: layers x (kv_lora_rank + rope dims) x 2 bytes, as before
    ("kimi-k2-q4_k_m", 61 * (512 + 64) * 2),
    ("deepseek-r1-q4_k_m", 70272),
])
def test_kv_bytes_per_token(name, per_token):
    inv = build_preset(name)
    assert inv.model.kv_bytes_per_token == per_token
    hw = hardware.from_profile("2x256g-48g")
    gpu = solve(inv, hw, Workload(context=4096), Policy(expert_cache=False), _suggest=False)
    assert gpu.kv_bytes_per_token == per_token and gpu.kv_cache_bytes == 4096 * per_token   # bf16 on the GPU
    cpu = solve(inv, hw, Workload(context=4096), Policy(use_gpu=False), _suggest=False)
    assert cpu.kv_cache_dtype == "f32" and cpu.kv_bytes_per_token == 2 * per_token


# --- dry runs on the design point ----------------------------------------------------------

@pytest.mark.parametrize("name", NEW_PRESETS)
def test_dry_run_on_48g_gpu_512g_ram(capsys, name):
    for hw in (["--hardware", "2x256g-48g"], BOX):
        rc = dry_run(["--preset", name] + hw)
        out, err = capsys.readouterr()
        assert not err
        kind = "MLA latent" if name.startswith("kimi") else "K and V per KV head"
        assert f"KV cache ({kind}" in out
        if name.startswith("kimi"):
            # 578 GiB of weights, 546 GiB of them routed experts, cannot fit 512 GiB of RAM: the
            # plan names the shortfall and the change that makes it fit
            assert rc == 3 and "verdict: DOES NOT FIT" in out
            # (the hot-expert cache holds Q4_K/Q6_K experts in their blocks: ~18 GiB of them stay
            # out of RAM; as bf16 copies ~3.3x fewer would, 565-575 GiB needed; the GPU workspace
            # holds the MLA K/V expansion of a 512-token chunk: fewer still)
            needs = float(re.search(r"cpu: needs ([0-9.]+) GiB", out).group(1))
            assert 550 < needs < 560 and "GiB missing" in out, out
            assert "[fits] a machine with 768 GiB of RAM (2 x 384 GiB" in out and "--ram 768GiB" in out
        else:
            assert rc == 0 and "verdict: FITS" in out, out
        if name.startswith("glm"):
            assert "23 tensors (2.40 GiB) of the MTP/nextn block(s) 92 stay unread" in out


def test_mtp_block_is_planned_nowhere():
    inv = build_preset("glm-4.6-q4_k_m")
    mtp = inv.bytes_by_role()["mtp"]
    routed = inv.bytes_by_role()["routed_experts"]
    plan = solve(inv, hardware.from_profile("2x256g-48g"), Workload(), Policy(expert_cache=False, gpu_prefill_tokens=0))
    gpu, cpu = plan.devices["gpu0"].breakdown, plan.devices["cpu"].breakdown
    assert "mtp" not in gpu and "mtp" not in cpu and "mtp" not in plan.tensor_placement
    assert cpu["routed_experts"] == routed            # block 92's experts are not in host RAM
    assert plan.weights_bytes == inv.total_bytes      # but they are in the file
    assert len(plan.gpu_experts) == 92
    # bf16 weights on the GPU: every tensor that runs, none of block 92
    run = sum(t.n_elements * 2 for t in inv.tensors if t.role in ("attention", "dense_ffn", "shared_expert", "output"))
    assert sum(gpu[r] for r in ("attention", "dense_ffn", "shared_expert", "output")) == run
    assert mtp > 0 and any("MTP/nextn" in n for n in plan.notes)


# --- tiny GGUF headers of each architecture --------------------------------------------------

def _byte_chars():
    """GPT-2's byte -> printable character map: a vocabulary llama.cpp's BPE loader accepts."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = [], 0
    for b in range(256):
        out.append(chr(b) if b in printable else chr(256 + extra))
        extra += b not in printable
    return out


def _write_tiny(path, arch, hp, layout_fn, layout=None):
    """An F32 GGUF of zeros with the tensors of `layout_fn` and metadata `hp` (no 'arch.')."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for k, v in hp.items():
        key = f"{arch}.{k}"
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v)
        else:
            w.add_float32(key, float(v))
    V = hp["vocab_size"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_byte_chars() + [f"<|t{i}|>" for i in range(V - 256)])
    w.add_token_types([1] * V)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_file_type(0)
    for name, ne in layout_fn(hp, layout or {}):
        w.add_tensor(name, np.zeros(tuple(reversed(ne)), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_cpp_loads(path) -> bool:
    """llama.cpp's loader checks every tensor's name and shape and that none is left over."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        return False
    llama_cpp.llama_model_free(model)
    return True


def _llama_cpp_quantize(src, dst, mix="Q4_K_M"):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


# rows of 256 so that the K-quant rules (not their fallbacks) decide; 8 blocks give use_more_bits
# both kinds of block (0, 3, 6, 7 get more bits)
_BASE = {"context_length": 4096, "embedding_length": 256, "block_count": 8, "vocab_size": 512,
         "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 64,
         "attention.value_length": 64, "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0}
_MOE = dict(_BASE, feed_forward_length=512, expert_feed_forward_length=256, expert_count=4, expert_used_count=2)


def _qwen2moe_2d_gate(hp, layout):
    """qwen2moe with the shared expert's gate stored [D, 1] (HF's [1, D] linear): one dim to ggml,
    so llama.cpp's loader takes it for its [D] and its quantizer leaves it in float."""
    for name, ne in qwen2moe_tensors(hp, layout):
        yield name, (ne + (1,) if name.endswith("ffn_gate_inp_shexp.weight") else ne)


TINY = {
    "qwen3moe": ("qwen3moe", qwen3moe_tensors, _MOE, None),
    "qwen2moe": ("qwen2moe", _qwen2moe_2d_gate, dict(_MOE, expert_shared_feed_forward_length=512), None),
    # Mixtral-style: 8 experts, whose width llama.cpp takes from feed_forward_length
    "mixtral": ("llama", llama_tensors,
                dict(_BASE, feed_forward_length=256, expert_count=8, expert_used_count=2), None),
    "llama": ("llama", llama_tensors, dict(_BASE, feed_forward_length=512), None),
    # 6 blocks: 1 dense, 4 MoE, then 1 MTP block
    "glm4moe": ("glm4moe", glm4moe_tensors,
                dict(_MOE, block_count=6, nextn_predict_layers=1, leading_dense_block_count=1, expert_shared_count=1,
                     expert_weights_scale=2.5, expert_weights_norm=True, expert_gating_func=2,
                     **{"rope.dimension_count": 32}), {"qk_norm": True}),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{case: (F32 path, Q4_K_M path, hparams)}, quantized by the installed llama.cpp."""
    d = tmp_path_factory.mktemp("archs")
    out = {}
    for case, (arch, fn, hp, layout) in TINY.items():
        f32 = _write_tiny(d / f"{case}-F32.gguf", arch, hp, fn, layout)
        out[case] = (f32, _llama_cpp_quantize(f32, d / f"{case}-Q4_K_M.gguf"), hp)
    return out


@pytest.mark.parametrize("case", list(TINY))
def test_llama_cpp_loads_our_tensor_layouts(tiny, case):
    """The preset generators list exactly the tensors llama.cpp's loader wants, shapes included."""
    assert _llama_cpp_loads(tiny[case][0]), f"llama.cpp refused the {case} layout (its log says why)"


@pytest.mark.parametrize("case", list(TINY))
@pytest.mark.parametrize("rules", quant_rules.RULE_SETS)
def test_quant_rules_agree_with_llama_cpp(tiny, case, rules):
    _, q4, hp = tiny[case]
    n_gqa = hp["attention.head_count"] // hp["attention.head_count_kv"]
    diff = []
    for t in from_gguf(q4).tensors:
        want = quant_rules.tensor_type(t.name, t.ne, "Q4_K_M", n_layer=hp["block_count"],
                                       n_expert=hp.get("expert_count", 0), n_gqa=n_gqa, rules=rules)
        if want != t.ggml_type:
            diff.append((t.name, t.type_name, ggml.type_name(want)))
    assert not diff
    types = {t.name: t.type_name for t in from_gguf(q4).tensors}
    if case == "qwen2moe":
        # llama.cpp writes it back 1-D; as the converter stored it ([D, 1]) our rule keeps it too
        assert types["blk.1.ffn_gate_inp_shexp.weight"] == "F32"
        src = {t.name: t.ne for t in from_gguf(tiny[case][0]).tensors}["blk.1.ffn_gate_inp_shexp.weight"]
        assert src == (256, 1) and quant_rules.tensor_type("blk.1.ffn_gate_inp_shexp.weight", src, "Q4_K_M",
                                                           n_layer=8, n_expert=4) == ggml.F32
    if case == "mixtral":   # the n_expert == 8 rules
        assert types["blk.1.attn_v.weight"] == types["blk.1.attn_k.weight"] == "Q8_0"
        assert types["blk.1.attn_output.weight"] == "Q5_K"
    else:   # the use_more_bits blocks out of all of them (MTP block included)
        L = hp["block_count"]
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(L)] == \
            ["Q6_K" if quant_rules.use_more_bits(i, L) else "Q4_K" for i in range(L)]
        assert "Q4_K" in types.values() and "Q6_K" in types.values()


@pytest.mark.parametrize("case", list(TINY))
def test_tiny_header_inventory(tiny, case):
    f32, _, hp = tiny[case]
    inv = from_gguf(f32)
    m = inv.model
    D, L, H, Hkv = hp["embedding_length"], hp["block_count"], hp["attention.head_count"], hp["attention.head_count_kv"]
    n_run = L - hp.get("nextn_predict_layers", 0)
    assert (m.attention, m.n_layer, m.n_block, m.n_head, m.n_head_kv) == ("gqa", n_run, L, H, Hkv)
    assert m.kv_bytes_per_token == n_run * Hkv * (64 + 64) * 2
    E = hp.get("expert_count", 0)
    F = hp.get("expert_feed_forward_length", hp["feed_forward_length"])
    lead = hp.get("leading_dense_block_count", 0)
    roles = {t.name: t.role for t in inv.tensors}
    assert roles["blk.1.attn_q.weight"] == roles["blk.1.attn_output.weight"] == "attention"
    assert roles["token_embd.weight"] == "embedding" and roles["output.weight"] == "output"
    if E:
        assert m.expert_ff == F and inv.moe_layers() == list(range(lead, n_run))
        assert inv.expert_bytes(lead) == 3 * D * F * 4                 # gate, up, down of one expert, F32
        assert roles["blk.1.ffn_gate_inp.weight"] == "router"
        assert all(roles[f"blk.{lead}.ffn_{k}_exps.weight"] == "routed_experts" for k in ("gate", "up", "down"))
    else:
        assert inv.moe_layers() == [] and "routed_experts" not in inv.bytes_by_role()
        assert roles["blk.1.ffn_down.weight"] == "dense_ffn" and m.dense_ff == 512
    if case == "qwen3moe":
        assert roles["blk.1.attn_q_norm.weight"] == roles["blk.1.attn_k_norm.weight"] == "norm"
        assert m.dense_ff == 0       # its feed_forward_length is unused: no dense block
    if case == "qwen2moe":
        assert roles["blk.1.attn_q.bias"] == roles["blk.1.attn_v.bias"] == "attention"
        # the shared expert's sigmoid gate goes with the shared expert, not with the router
        assert roles["blk.1.ffn_gate_inp_shexp.weight"] == roles["blk.1.ffn_down_shexp.weight"] == "shared_expert"
        assert m.shared_ff == 512 and m.n_expert_shared == 1
    if case == "glm4moe":
        assert roles["blk.1.exp_probs_b.bias"] == "router" and roles["blk.0.ffn_up.weight"] == "dense_ffn"
        assert roles["blk.1.post_attention_norm.weight"] == "norm"
        assert m.shared_ff == 256 and m.qk_rope_dim == 32
        last = [t for t in inv.tensors if t.layer == L - 1]
        assert last and all(t.role == "mtp" for t in last)
        assert {"blk.5.nextn.eh_proj.weight", "blk.5.ffn_up_exps.weight", "blk.5.attn_q.weight"} <= \
            {t.name for t in last}
    assert tensor_role("blk.3.nextn.eh_proj.weight") == "mtp"    # by name too, whatever the block
    # early Mixtral files: one 2-D tensor per expert
    assert tensor_role("blk.3.ffn_down.7.weight") == "routed_experts"


def test_tiny_glm4moe_plan_leaves_the_mtp_block_out(tiny):
    f32, q4, _ = tiny["glm4moe"]
    inv = from_gguf(q4)
    mtp = [t for t in inv.tensors if t.role == "mtp"]
    plan = solve(inv, hardware.detect(), Workload(context=512, prefill_chunk=64), Policy(use_gpu=False))
    cpu = plan.devices["cpu"].breakdown
    assert cpu["routed_experts"] == sum(t.n_bytes for t in inv.tensors if t.role == "routed_experts")
    assert not any(t.role == "routed_experts" for t in mtp) and any("_exps" in t.name for t in mtp)
    # every tensor that runs is planned (F32 copies of the small quantized linears), block 5 is not
    planned = sum(v for k, v in cpu.items() if k in inv.bytes_by_role())
    assert planned >= inv.total_bytes - sum(t.n_bytes for t in mtp) - inv.bytes_by_role()["embedding"]
    assert cpu["kv_cache"] == 512 * 5 * 2 * 128 * 4          # 5 layers that run, f32 on the CPU
    assert len(plan.gpu_experts) == 5 and plan.fits


def test_tiny_dense_llama_plans_without_experts(tiny):
    inv = from_gguf(tiny["llama"][0])
    plan = solve(inv, hardware.from_profile("2x256g-48g"), Workload(context=1024), Policy())
    assert plan.fits and "routed_experts" not in plan.tensor_placement
    assert plan.tensor_placement["dense_ffn"] == ("gpu0", "bf16")
    assert plan.gpu_prefill_tokens == 0 and "no routed experts" in plan.gpu_prefill["reason"]
    assert plan.n_gpu_experts == 0 and plan.estimate["decode_tok_s"] > 0


def test_gqa_head_sizes_default_to_embedding_over_heads():
    hp = {"block_count": 4, "embedding_length": 512, "attention.head_count": 8, "attention.head_count_kv": 2,
          "expert_count": 8, "expert_used_count": 2, "feed_forward_length": 1024}
    m = ModelInfo.from_hparams("llama", lambda k, d=None: hp.get(k, d), name="x", n_vocab=32, where="t")
    assert (m.head_dim_k, m.head_dim_v, m.qk_rope_dim) == (64, 64, 64)
    assert m.kv_bytes_per_token == 4 * 2 * (64 + 64) * 2
    assert (m.expert_ff, m.dense_ff) == (1024, 0)      # Mixtral: experts as wide as feed_forward_length
    with pytest.raises(ValueError, match="nextn_predict_layers = 4 leaves no block"):
        ModelInfo.from_hparams("llama", lambda k, d=None: dict(hp, nextn_predict_layers=4).get(k, d),
                               name="x", n_vocab=32, where="t")


# --- a full-size header --------------------------------------------------------------------

def test_glm46_header_equals_preset(tmp_path):
    """GLM-4.6 Q4_K_M as a GGUF header with a sparse data region (200 GiB, no blocks written):
    the header path reads the same model as the preset, MTP block and all."""
    import gguf

    cfg, _, mix = preset_config("glm-4.6-q4_k_m")
    preset = build_preset("glm-4.6-q4_k_m")
    path = tmp_path / "GLM-4.6-Q4_K_M.gguf"
    w = gguf.GGUFWriter(str(path), "glm4moe")
    for k, v in cfg["hparams"].items():
        if k == "vocab_size":   # converters write no vocab_size: the reader takes token_embd's rows
            continue
        key = f"glm4moe.{k}"
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v)
        else:
            w.add_float32(key, float(v))
    w.add_file_type(15)
    for t in preset.tensors:
        w.add_tensor_info(t.name, tuple(reversed(t.ne)), np.float32, t.n_bytes,
                          raw_dtype=gguf.GGMLQuantizationType(t.ggml_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    size = os.path.getsize(path)
    data = -(-size // 32) * 32 + sum(-(-t.n_bytes // 32) * 32 for t in preset.tensors)
    os.truncate(path, data)
    inv = from_gguf(path)
    assert inv.model == dataclasses.replace(preset.model, name=inv.model.name)
    assert [(t.name, t.role, t.ggml_type, t.n_bytes) for t in inv.tensors] == \
        [(t.name, t.role, t.ggml_type, t.n_bytes) for t in preset.tensors]
    assert inv.quantization == "Q4_K_M" and inv.bytes_by_role()["mtp"] == preset.bytes_by_role()["mtp"]


@pytest.mark.parametrize("chunk", [512, 4096])
def test_r1_cpu_plan_counts_the_expert_engines_buffers(chunk):
    """DeepSeek-R1 on a CPU-only plan: the expert engine holds the three dense FFNs (18432 wide)
    and the shared experts as one-expert layers beside the routed ones, so a token's h rows are
    the dense FFN's 18432 (one slot), wider than 8 routed slots of 2048; the chunk's scratch
    stops at the engine's 2048-token chunk while x and y hold every token of a prefill chunk.
    With a GPU the engine has the routed experts alone."""
    inv = build_preset("deepseek-r1-q4_k_m")
    hw = hardware.from_profile("2x256g-48g")
    D, F, FD, E, K = 7168, 2048, 18432, 256, 8
    q8k = lambda n: n // 256 * 292   # noqa: E731  K-quant activation rows
    io = 2 * chunk * D * 4 + 2 * chunk * (K + 1) * 4
    counts = 4 * (E + 1) + 8 * E + 8 * (E + 1)
    c = min(chunk, 2048)
    cpu = solve(inv, hw, Workload(context=8192, prefill_chunk=chunk), Policy(use_gpu=False), _suggest=False)
    b = cpu.devices["cpu"].breakdown
    assert (b["expert_io"], b["expert_scratch"]) == (io, c * (2 * q8k(D) + 4 * FD + q8k(FD) + 4 * K) + counts)
    gpu = solve(inv, hw, Workload(context=8192, prefill_chunk=chunk), Policy(), _suggest=False)
    b = gpu.devices["cpu"].breakdown
    assert (b["expert_io"], b["expert_scratch"]) == (io, c * (2 * q8k(D) + 4 * K * F + K * q8k(F) + 4 * K) + counts)


def _cpu_plan(inv, ram, **wl):
    hw = hardware.apply_overrides(hardware.from_profile("2x256g-48g"), ram=ram, numa_nodes=1)
    return solve(inv, hw, Workload(**wl), Policy(use_gpu=False), _suggest=False)


def test_cpu_only_plans_take_a_long_prefill_chunk_where_it_fits():
    """No --prefill-chunk: a CPU-only plan takes the engine's 2048-token chunk where its buffers
    fit (counted: the plan equals the one given 2048), keeps 512 where only that fits and says
    why, never trades a KV slot for it, stops at the context, and a plan with a GPU keeps 512
    (the GPU's attention workspace); a given chunk is the plan's."""
    inv = build_preset("deepseek-r1-q4_k_m")
    used = lambda p: p.devices["cpu"].bytes   # noqa: E731
    short, long_ = (_cpu_plan(inv, 512 * GiB, context=8192, prefill_chunk=c) for c in (512, 2048))
    auto = _cpu_plan(inv, 512 * GiB, context=8192)
    assert auto.fits and auto.workload["prefill_chunk"] == 2048
    assert used(auto) == used(long_) > used(short)
    assert any(n.startswith("prefill chunk 2048 (CPU-only") for n in auto.notes)
    # room for 512 but not for 2048
    tight = _cpu_plan(inv, (used(short) + used(long_)) // 2, context=8192)
    assert tight.fits and tight.workload["prefill_chunk"] == 512 and used(tight) == used(short)
    assert (f"prefill chunk 512 (no --prefill-chunk): 2048 would need {fmt_bytes(used(long_) - used(short))} more "
            f"host RAM, which cpu has no room for") in tight.notes
    # KV slots first: 3 slots fit with 512, only 2 with 2048
    three = _cpu_plan(inv, 512 * GiB, context=8192, batch=3, prefill_chunk=512)
    slots = _cpu_plan(inv, used(three) + (used(long_) - used(short)) // 2, context=8192, batch=None)
    assert (slots.kv_slots, slots.workload["prefill_chunk"]) == (3, 512)
    # no longer than the context; a given chunk stays; with a GPU 512
    assert _cpu_plan(inv, 512 * GiB, context=1000).workload["prefill_chunk"] == 1000
    assert _cpu_plan(inv, 512 * GiB, context=8192, prefill_chunk=64).workload["prefill_chunk"] == 64
    gpu = solve(inv, hardware.from_profile("2x256g-48g"), Workload(context=8192), Policy(), _suggest=False)
    assert gpu.device != "cpu" and gpu.workload["prefill_chunk"] == 512


def test_parallel_beyond_the_default_chunk_plans_a_chunk_for_its_slots():
    """--parallel 600 without --prefill-chunk: the chunk holds a decode step of every slot (600),
    where a given chunk of 512 refuses it by name."""
    inv = build_preset("qwen3-30b-a3b-q4_k_m")
    plan = _cpu_plan(inv, 2048 * GiB, context=1024, batch=600)
    assert plan.fits and plan.kv_slots == 600 and plan.workload["prefill_chunk"] == 1024
    gpu = solve(inv, hardware.from_profile("2x256g-80g"), Workload(context=256, batch=600), Policy(), _suggest=False)
    assert gpu.workload["prefill_chunk"] == 600
    with pytest.raises(ValueError, match=r"--parallel 600: at most --prefill-chunk \(512\)"):
        _cpu_plan(inv, 2048 * GiB, context=1024, batch=600, prefill_chunk=512)
