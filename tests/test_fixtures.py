"""hybrid.fixtures: the tiny deepseek2 GGUFs are what llama.cpp expects and runs."""

import jinja2.sandbox
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from hybrid.fixtures import (
    BOS,
    DEEPSEEK_R1_CHAT_TEMPLATE,
    EOS,
    TinyConfig,
    build,
    split_gguf,
    tokenizer_vocab,
)
from hybrid.gguf_file import GGUFFile

PROMPT = "Hello, world! The capital of France is Paris."


# --------------------------------------------------------------------------------------------
# Layout and metadata (no llama.cpp needed)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_group_used"):
        TinyConfig(n_group=4, n_group_used=4)
    with pytest.raises(ValueError, match="n_group"):
        TinyConfig(n_group=3)
    with pytest.raises(ValueError, match="gating"):
        TinyConfig(gating="relu")
    with pytest.raises(ValueError, match="n_expert_used"):
        TinyConfig(n_expert_used=17)


def test_default_layout_matches_llama_cpp_deepseek2(tiny_f32):
    cfg = TinyConfig()
    D, H, E, F = cfg.n_embd, cfg.n_head, cfg.n_expert, cfg.expert_ffn
    N, R, Vd, Lq, Lkv = cfg.qk_nope, cfg.qk_rope, cfg.v_head, cfg.q_lora_rank, cfg.kv_lora_rank
    g = GGUFFile(tiny_f32)
    V = len(g.get("tokenizer.ggml.tokens"))
    ne = {n: t.ne for n, t in g.tensors.items()}
    assert ne["token_embd.weight"] == (D, V) and ne["output.weight"] == (D, V)
    assert ne["blk.0.attn_q_a.weight"] == (D, Lq) and ne["blk.0.attn_q_b.weight"] == (Lq, H * (N + R))
    assert ne["blk.0.attn_kv_a_mqa.weight"] == (D, Lkv + R)
    assert ne["blk.0.attn_kv_b.weight"] == (Lkv, H * (N + Vd))
    assert ne["blk.0.attn_output.weight"] == (H * Vd, D)
    assert ne["blk.0.ffn_gate.weight"] == (D, cfg.ffn) and ne["blk.0.ffn_down.weight"] == (cfg.ffn, D)
    assert "blk.0.ffn_gate_exps.weight" not in ne  # leading dense block
    assert ne["blk.1.ffn_gate_inp.weight"] == (D, E) and ne["blk.1.exp_probs_b.bias"] == (E,)
    assert ne["blk.1.ffn_gate_exps.weight"] == (D, F, E) and ne["blk.1.ffn_down_exps.weight"] == (F, D, E)
    assert ne["blk.2.ffn_up_shexp.weight"] == (D, F * cfg.n_expert_shared)
    assert "blk.0.attn_k_b.weight" not in ne
    a = "deepseek2."
    assert g.get(a + "attention.head_count_kv") == H and g.get(a + "attention.key_length") == N + R
    assert g.get(a + "attention.key_length_mla") is None
    assert g.get(a + "expert_gating_func") == 2 and g.get(a + "expert_group_count") == 4
    assert g.get(a + "rope.scaling.type") == "yarn"
    assert g.get("tokenizer.chat_template") == DEEPSEEK_R1_CHAT_TEMPLATE


def test_variant_layouts(tiny_gguf):
    cfg = TinyConfig()
    H, N, Vd, Lkv = cfg.n_head, cfg.qk_nope, cfg.v_head, cfg.kv_lora_rank
    g = GGUFFile(tiny_gguf("F32", mla_split=True, q_lora_rank=0, n_group=0, gating="softmax"))
    a = "deepseek2."
    assert g.tensors["blk.0.attn_k_b.weight"].ne == (N, Lkv, H)
    assert g.tensors["blk.0.attn_v_b.weight"].ne == (Lkv, Vd, H)
    assert "blk.0.attn_kv_b.weight" not in g.tensors
    assert g.tensors["blk.0.attn_q.weight"].ne == (cfg.n_embd, H * (N + cfg.qk_rope))
    assert "blk.0.attn_q_a.weight" not in g.tensors and g.get(a + "attention.q_lora_rank") == 0
    assert g.get(a + "attention.head_count_kv") == 1
    assert g.get(a + "attention.key_length") == Lkv + cfg.qk_rope and g.get(a + "attention.value_length") == Lkv
    assert g.get(a + "attention.key_length_mla") == N + cfg.qk_rope
    assert g.get(a + "attention.value_length_mla") == Vd
    assert g.get(a + "expert_group_count") is None and g.get(a + "expert_gating_func") == 1
    assert "blk.1.exp_probs_b.bias" not in g.tensors


def test_mla_split_layout_is_the_same_network(tiny_gguf):
    cfg = TinyConfig()
    H, N, Vd, Lkv = cfg.n_head, cfg.qk_nope, cfg.v_head, cfg.kv_lora_rank
    old, new = GGUFFile(tiny_gguf("F32")), GGUFFile(tiny_gguf("F32", mla_split=True))
    for layer in range(cfg.n_layer):
        kv_b = old.view(f"blk.{layer}.attn_kv_b.weight").view(np.float32).reshape(H, N + Vd, Lkv)
        k_b = new.view(f"blk.{layer}.attn_k_b.weight").view(np.float32).reshape(H, Lkv, N)
        v_b = new.view(f"blk.{layer}.attn_v_b.weight").view(np.float32).reshape(H, Vd, Lkv)
        assert np.array_equal(k_b, kv_b[:, :N].transpose(0, 2, 1))
        assert np.array_equal(v_b, kv_b[:, N:])
    same = "blk.1.ffn_gate_exps.weight"
    assert np.array_equal(old.view(same), new.view(same))


def test_planted_traits_make_it_look_trained(tiny_f32):
    """What lets two correct implementations agree to the last token (hybrid/fixtures/):
    a token's own embedding routes with clear margins and predicts one text token clearly."""
    cfg = TinyConfig()
    K, G, Gu = cfg.n_expert_used, cfg.n_group, cfg.n_group_used
    _, types, _ = tokenizer_vocab(cfg.n_merges)
    with GGUFFile(tiny_f32) as g:
        def w(name):
            return g.view(name).view(np.float32).reshape(g.tensors[name].shape).astype(np.float64)

        emb = w("token_embd.weight")                                      # [V, D]
        V = len(emb)
        x = emb / np.sqrt((emb * emb).mean(-1, keepdims=True))
        for il in range(cfg.n_dense, cfg.n_layer):
            p = f"blk.{il}."
            h = x * w(p + "ffn_norm.weight")
            sel = 1 / (1 + np.exp(-h @ w(p + "ffn_gate_inp.weight").T)) + w(p + "exp_probs_b.bias")
            sel = sel.reshape(V, G, -1)                                    # [V, G, E/G]
            score = np.sort(sel, -1)[..., -2:].sum(-1)                    # [V, G] as llama.cpp
            order = np.argsort(-score, -1)                                 # groups, best first
            group = np.take_along_axis(score, order, -1)
            kept = np.sort(np.take_along_axis(sel, order[:, :Gu, None], 1).reshape(V, -1), -1)
            assert (group[:, Gu - 1] - group[:, Gu]).min() > 0.05, f"layer {il}: near-tied groups"
            assert (kept[:, -K] - kept[:, -K - 1]).min() > 0.05, f"layer {il}: near-tied experts"
        logits = x @ w("output.weight").T                                  # [V, V]
    top2 = np.sort(logits, -1)[:, -2:]
    assert ((top2[:, 1] - top2[:, 0]) / logits.std(-1)).min() > 3
    # never EOS or another special token, never a control byte (byte b is token 3 + b)
    control = {3 + b for b in [*range(9), *range(11, 32), 127]}
    assert all(types[t] == 1 and t not in control for t in logits.argmax(-1).tolist())


def test_build_is_cached_by_config(tmp_path):
    a = build(TinyConfig(n_layer=2), "F32", tmp_path)
    mtime = a.stat().st_mtime_ns
    assert build(TinyConfig(n_layer=2), "F32", tmp_path) == a and a.stat().st_mtime_ns == mtime
    b = build(TinyConfig(n_layer=2, seed=1), "F32", tmp_path)
    assert b != a and b.read_bytes() != a.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_vocab_has_every_byte_and_r1_specials():
    tokens, types, merges = tokenizer_vocab(300)
    assert len(set(tokens)) == len(tokens) and 400 < len(tokens) < 700
    assert tokens[:2] == [BOS, EOS] and types[:3] == [3, 3, 3]
    for special in ("<think>", "</think>", "<｜User｜>", "<｜Assistant｜>"):
        assert types[tokens.index(special)] == 4
    assert {"Ġ", "Ċ", "a", "ÿ"} <= set(tokens)
    vocab = set(tokens)
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in (m.split(" ") for m in merges))


def test_chat_template_renders_r1_prompt():
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>hmm</think>Hello"},
        {"role": "user", "content": "2+2?"},
    ]
    text = env.from_string(DEEPSEEK_R1_CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=True, bos_token=BOS
    )
    assert text == (
        f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜>Hello{EOS}<｜User｜>2+2?<｜Assistant｜><think>\n"
    )


# --------------------------------------------------------------------------------------------
# llama.cpp loads and runs every variant


def _logits(path, text=PROMPT):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True)
        llm.eval(tokens)
        return tokens, np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


VARIANTS = {
    "q4km": ("Q4_K_M", {}),
    "q8": ("Q8_0", {}),
    "q4km-mla-split": ("Q4_K_M", {"mla_split": True}),
    "q8-mla-split": ("Q8_0", {"mla_split": True}),
    "q8-no-q-lora": ("Q8_0", {"q_lora_rank": 0}),
    "q8-no-groups": ("Q8_0", {"n_group": 0}),
    "q8-softmax": ("Q8_0", {"gating": "softmax"}),
    "q8-no-yarn": ("Q8_0", {"yarn": False}),
}


@pytest.mark.parametrize("ftype,kwargs", VARIANTS.values(), ids=VARIANTS.keys())
def test_llama_cpp_runs_variant(tiny_gguf, ftype, kwargs):
    path = tiny_gguf(ftype, **kwargs)
    tokens, logits = _logits(path)
    n_vocab = TinyConfig(**kwargs).vocab_size
    assert logits.shape == (len(tokens), n_vocab)
    assert np.isfinite(logits).all()
    assert logits.std() > 1e-3  # not a constant output
    assert not np.allclose(logits[0], logits[-1])  # depends on the input


def test_quantized_logits_track_f32(tiny_gguf):
    _, ref = _logits(tiny_gguf("F32"))
    for ftype, min_corr in (("Q8_0", 0.99), ("Q4_K_M", 0.9)):
        _, got = _logits(tiny_gguf(ftype))
        corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
        assert corr > min_corr, (ftype, corr)


def test_mla_layouts_give_the_same_logits(tiny_gguf):
    # Same weights, two GGUF layouts, two llama.cpp attention paths (MHA vs absorbed MQA).
    _, old = _logits(tiny_gguf("F32"))
    _, new = _logits(tiny_gguf("F32", mla_split=True))
    assert np.abs(old - new).max() < 1e-2 * np.abs(old).max()


def test_llama_cpp_loads_split_set(tmp_path, tiny_q4km):
    parts = split_gguf(tiny_q4km, tmp_path / "tiny", 3)
    _, whole = _logits(tiny_q4km)
    _, split = _logits(parts[0])
    np.testing.assert_array_equal(split, whole)


def test_tokenizer_round_trips_ascii(tiny_q4km):
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(tiny_q4km), n_ctx=64, verbose=False, vocab_only=True)
    try:
        text = "Hello, world! 0123456789 ~`!@#$%^&*()_+-={}[]|\\:;\"'<>?,./\n\tThe  end."
        tokens = llm.tokenize(text.encode(), add_bos=False)
        assert llm.detokenize(tokens).decode() == text
        assert len(tokens) < len(text.encode())  # the merges do something
        with_bos = llm.tokenize(b"Hi", add_bos=True)
        assert with_bos[0] == llm.token_bos() == tokenizer_vocab(TinyConfig().n_merges)[0].index(BOS)
        tokens_v, _, _ = tokenizer_vocab(TinyConfig().n_merges)
        user = llm.tokenize("<｜User｜>Hi".encode(), add_bos=False, special=True)
        assert user[0] == tokens_v.index("<｜User｜>")
        assert llm.token_eos() == tokens_v.index(EOS)
    finally:
        llm.close()


def test_low_bit_expert_model_is_cfg_with_random_lattice_experts(tmp_path, tiny_gguf):
    """build_low_bit_experts (the benchmark stand-in for IQ2_XXS / IQ1_S files): the routed
    experts are valid random blocks of the type at the float model's RMS, every other tensor is
    the base quantization's (taken from the few-expert build), the router cfg's own float
    weights; llama.cpp and hybrid run it and agree."""
    import dataclasses

    from gguf.quants import dequantize

    import hybrid
    from hybrid.fixtures import build_low_bit_experts

    cfg = TinyConfig()
    path = build_low_bit_experts(cfg, "IQ2_XXS", tmp_path, base="Q8_0")     # built here, not cached
    few = build(dataclasses.replace(cfg, n_expert=8), "Q8_0", tmp_path)
    with GGUFFile(path) as g, GGUFFile(few) as s, GGUFFile(tiny_gguf("F32")) as f:
        assert g.metadata["deepseek2.expert_count"] == cfg.n_expert
        assert list(g.tensors) == list(f.tensors)
        for name, t in g.tensors.items():
            if name.endswith("_exps.weight"):
                assert t.ggml_type == QT.IQ2_XXS
                got = dequantize(np.asarray(g.view(name)), QT.IQ2_XXS)
                want = np.asarray(f.view(name)).view(np.float32)
                assert abs(np.sqrt(np.mean(got ** 2)) / np.sqrt(np.mean(want ** 2)) - 1) < 0.1, name
            elif "ffn_gate_inp" in name or "exp_probs_b" in name:
                np.testing.assert_array_equal(np.asarray(g.view(name)), np.asarray(f.view(name)))
            else:
                assert t.ggml_type == s.tensors[name].ggml_type
                assert np.asarray(g.view(name)).tobytes() == np.asarray(s.view(name)).tobytes(), name
    tokens, logits = _logits(path)
    assert np.isfinite(logits).all() and logits.std() > 1e-3
    rt = hybrid.load(path, device="cpu", ctx=64, threads=2)
    try:
        ours = [t for t, _ in rt.generate_tokens(tokens, max_tokens=6, temperature=0.0, stop_at_eos=False)]
    finally:
        rt.close()
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(tokens)
        theirs = []
        for _ in range(6):
            theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([theirs[-1]])
    finally:
        llm.close()
    assert ours == theirs
