"""deepseek2 model: vs a float64 reference, vs llama.cpp, and self-consistency of the cache.

The float64 reference below is deliberately plain and independent of hybrid's code paths:
gguf's numpy dequantization, full per-head K/V (no latent cache, no absorption), per-token
Python loops for routing, RoPE/YaRN written out per position from llama.cpp's formulas.
"""

import math

import gguf
import numpy as np
import pytest
import torch

import hybrid
from hybrid.gguf_file import GGUFFile
from hybrid.models import UnsupportedArchitectureError, get_model_module
from hybrid.models.deepseek2 import ModelArgs

N_TOKENS = 64

# Variants the issue asks for: old attn_kv_b layout + YaRN + groups (default TinyConfig),
# q_lora_rank 0, the newer split k_b/v_b layout, softmax gating without bias or groups.
VARIANTS = {
    "default": {},
    "q_lora0": {"q_lora_rank": 0},
    "mla_split": {"mla_split": True},
    "softmax": {"gating": "softmax", "n_group": 0, "expert_weights_norm": False,
                "expert_weights_scale": 1.0},
}


def _tokens(n_vocab, n=N_TOKENS, seed=1):
    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


# ----------------------------------------------------------------------------- reference


def _deq64(g, name):
    info = g.tensors[name]
    w = gguf.quants.dequantize(np.asarray(g.view(name)), gguf.GGMLQuantizationType(info.ggml_type))
    return np.asarray(w, dtype=np.float64).reshape(info.shape)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_tables(md, n_pos):
    """(cos [P, R/2], sin [P, R/2], kq_scale) of a deepseek2 GGUF's metadata md: llama.cpp's
    "normal" RoPE (adjacent pairs) with YaRN, written out per position from its formulas."""
    a = "deepseek2."
    R = md[a + "rope.dimension_count"]
    Kh = md.get(a + "attention.key_length_mla", md[a + "attention.key_length"])
    base = md[a + "rope.freq_base"]
    yarn = md.get(a + "rope.scaling.type") == "yarn"
    T = n_pos
    cos = np.zeros((T, R // 2))
    sin = np.zeros((T, R // 2))
    kq_scale = 1.0 / math.sqrt(Kh)
    for p in range(T):
        for i in range(R // 2):
            th_ex = p * base ** (-2.0 * i / R)
            th, mag = th_ex, 1.0
            if yarn:
                s = md[a + "rope.scaling.factor"]
                n_orig = md[a + "rope.scaling.original_context_length"]
                cd = [R * math.log(n_orig / (b * 2 * math.pi)) / (2 * math.log(base)) for b in (32, 1)]
                lo, hi = max(0, math.floor(cd[0])), min(R - 1, math.ceil(cd[1]))
                ramp = 1 - min(1, max(0, (i - lo) / max(0.001, hi - lo)))
                th = th_ex / s * (1 - ramp) + th_ex * ramp
                # with yarn_log_multiplier set, llama.cpp's magnitude factors cancel to 1
                mag = 1.0 if md.get(a + "rope.scaling.yarn_log_multiplier") else 1 + 0.1 * math.log(s)
            cos[p, i], sin[p, i] = math.cos(th) * mag, math.sin(th) * mag
    if yarn:
        s = md[a + "rope.scaling.factor"]
        m_all = md.get(a + "rope.scaling.yarn_log_multiplier", 0.0) / 0.1
        mag = 1.0 if m_all else 1 + 0.1 * math.log(s)
        mscale = mag * (1 + 0.1 * m_all * math.log(s))
        kq_scale = mscale * mscale / math.sqrt(Kh)

    return cos, sin, kq_scale


def reference_logits(path, tokens):
    """float64 logits [T, B] of a deepseek2 GGUF, computed the plain way."""
    g = GGUFFile(path)
    md = g.metadata
    a = "deepseek2."
    H = md[a + "attention.head_count"]
    R = md[a + "rope.dimension_count"]
    Kh = md.get(a + "attention.key_length_mla", md[a + "attention.key_length"])
    Vh = md.get(a + "attention.value_length_mla", md[a + "attention.value_length"])
    N = Kh - R
    C = md[a + "attention.kv_lora_rank"]
    eps = md[a + "attention.layer_norm_rms_epsilon"]
    base = md[a + "rope.freq_base"]
    n_dense = md[a + "leading_dense_block_count"]
    K = md[a + "expert_used_count"]
    G = md.get(a + "expert_group_count", 0)
    Gu = md.get(a + "expert_group_used_count", 0)
    sigmoid = md[a + "expert_gating_func"] == 2
    w_norm = md[a + "expert_weights_norm"]
    w_scale = md[a + "expert_weights_scale"]
    yarn = md.get(a + "rope.scaling.type") == "yarn"
    T = len(tokens)

    cos, sin, kq_scale = rope_tables(md, T)
    def rope(x):  # [T, ..., R]
        out = x.copy()
        for p in range(T):
            for i in range(R // 2):
                x0, x1 = x[p, ..., 2 * i], x[p, ..., 2 * i + 1]
                out[p, ..., 2 * i] = x0 * cos[p, i] - x1 * sin[p, i]
                out[p, ..., 2 * i + 1] = x0 * sin[p, i] + x1 * cos[p, i]
        return out

    def silu(x):
        return x / (1 + np.exp(-x))

    x = _deq64(g, "token_embd.weight")[tokens]
    n_layer = md[a + "block_count"]
    for il in range(n_layer):
        p = f"blk.{il}."
        W = lambda n: _deq64(g, p + n + ".weight")  # noqa: E731
        h = _rms(x, W("attn_norm"), eps)
        if p + "attn_q.weight" in g.tensors:
            q = h @ W("attn_q").T
        else:
            q = _rms(h @ W("attn_q_a").T, W("attn_q_a_norm"), eps) @ W("attn_q_b").T
        q = q.reshape(T, H, Kh)
        q[..., N:] = rope(q[..., N:])
        kv = h @ W("attn_kv_a_mqa").T
        lat = _rms(kv[:, :C], W("attn_kv_a_norm"), eps)
        kpe = rope(kv[:, C:])
        if p + "attn_kv_b.weight" in g.tensors:
            kvb = W("attn_kv_b").reshape(H, N + Vh, C)
            wk, wv = kvb[:, :N], kvb[:, N:]
        else:
            wk = W("attn_k_b").reshape(H, C, N).transpose(0, 2, 1)
            wv = W("attn_v_b").reshape(H, Vh, C)
        k = np.concatenate([np.einsum("hnc,sc->shn", wk, lat),
                            np.broadcast_to(kpe[:, None, :], (T, H, R))], -1)   # [S, H, Kh]
        v = np.einsum("hvc,sc->shv", wv, lat)                                      # [S, H, V]
        sc = np.einsum("thd,shd->hts", q, k) * kq_scale
        sc = np.where(np.tril(np.ones((T, T), bool)), sc, -np.inf)
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("hts,shv->thv", pr, v).reshape(T, H * Vh)
        x = x + o @ W("attn_output").T
        h = _rms(x, W("ffn_norm"), eps)
        if il < n_dense:
            x = x + (silu(h @ W("ffn_gate").T) * (h @ W("ffn_up").T)) @ W("ffn_down").T
            continue
        logits = h @ W("ffn_gate_inp").T
        if sigmoid:
            probs = 1 / (1 + np.exp(-logits))
        else:
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
        bias = _deq64(g, p + "exp_probs_b.bias") if p + "exp_probs_b.bias" in g.tensors else 0.0
        gate_e, up_e, down_e = W("ffn_gate_exps"), W("ffn_up_exps"), W("ffn_down_exps")
        shared = (silu(h @ W("ffn_gate_shexp").T) * (h @ W("ffn_up_shexp").T)) @ W("ffn_down_shexp").T
        y = np.zeros_like(x)
        for t in range(T):
            sel = probs[t] + bias
            if G > 1:
                per = len(sel) // G
                gs = [sum(sorted(sel[j * per:(j + 1) * per])[-2:]) for j in range(G)]
                keep = sorted(range(G), key=lambda j: -gs[j])[:Gu]
                sel = np.array([sel[e] if e // per in keep else -np.inf for e in range(len(sel))])
            ids = np.argsort(-sel, kind="stable")[:K]
            wts = probs[t, ids]
            if w_norm:
                wts = wts / wts.sum()
            if w_scale not in (0.0, 1.0):
                wts = wts * w_scale
            for e, we in zip(ids, wts):
                y[t] += we * ((silu(gate_e[e] @ h[t]) * (up_e[e] @ h[t])) @ down_e[e].T)
        x = x + y + shared
    x = _rms(x, _deq64(g, "output_norm.weight"), eps)
    out = _deq64(g, "output.weight" if "output.weight" in g.tensors else "token_embd.weight")
    g.close()
    return x @ out.T


def _cos_rows(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ----------------------------------------------------------------------------- metadata


def test_model_args_from_fixture(tiny_f32):
    with GGUFFile(tiny_f32) as g:
        args = ModelArgs.from_gguf(g.metadata, g.tensors, str(tiny_f32))
    assert (args.dim, args.n_layer, args.n_head) == (256, 3, 4)
    assert (args.qk_nope_dim, args.qk_rope_dim, args.v_head_dim, args.kv_lora_rank) == (32, 16, 32, 64)
    assert (args.n_expert, args.n_expert_used, args.n_group, args.n_group_used) == (16, 4, 4, 2)
    assert args.n_dense_lead == 1 and args.gating_func == 2 and not args.mla_split
    assert args.rope_scaling_type == "yarn" and args.rope_freq_scale == pytest.approx(0.25)
    # llama.cpp: yarn_log_multiplier 0.1 -> mscale_all_dims 1; mscale = 1 + 0.1*ln(4);
    # kq_scale = mscale^2 / sqrt(N + R); rope magnitude factors cancel (attn_factor*(1+0.1 ln s) = 1)
    mscale = 1 + 0.1 * math.log(4.0)
    assert args.kq_scale() == pytest.approx(mscale * mscale / math.sqrt(48), rel=1e-6)
    ext, attn = args.rope_params()
    assert ext == 1.0 and attn * (1 + 0.1 * math.log(4.0)) == pytest.approx(1.0, rel=1e-6)


def test_mtp_blocks_are_not_part_of_the_trunk(tiny_f32):
    # V3/R1 GGUFs with the MTP block count it in block_count; llama.cpp runs
    # block_count - nextn_predict_layers layers for generation
    with GGUFFile(tiny_f32) as g:
        md = dict(g.metadata)
        md["deepseek2.block_count"] = 4
        md["deepseek2.nextn_predict_layers"] = 1
        tensors = dict(g.tensors, **{"blk.3.attn_norm.weight": g.tensors["blk.2.attn_norm.weight"]})
        args = ModelArgs.from_gguf(md, tensors, "x.gguf")       # the MTP block is in the file
        assert args.n_layer == 3 and args.n_nextn_layer == 1
        with pytest.raises(ValueError, match="block_count is 4, expected 3"):
            ModelArgs.from_gguf(md, g.tensors, "x.gguf")        # ... and must be


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedArchitectureError,
                       match="x.gguf: architecture 'mamba'.*supported: deepseek2, glm4moe, llama, qwen2moe, qwen3moe"):
        get_model_module("mamba", source="x.gguf")


def test_missing_metadata_names_the_key(tiny_f32):
    with GGUFFile(tiny_f32) as g:
        md = dict(g.metadata)
        del md["deepseek2.attention.kv_lora_rank"]
        with pytest.raises(ValueError, match="kv_lora_rank"):
            ModelArgs.from_gguf(md, g.tensors, "x.gguf")


# ----------------------------------------------------------------------------- float reference


@pytest.fixture(scope="module")
def f32_runtime(tiny_f32):
    rt = hybrid.load(tiny_f32, device="cpu", threads=2, ctx=128, experts="torch")
    yield rt
    rt.close()


@pytest.mark.parametrize("variant", ["default", "q_lora0", "mla_split", "softmax"])
def test_matches_float64_reference(tiny_gguf, variant):
    """float32 runtime vs float64 reference on the same dequantized weights.

    Bound: float32 rounding (6e-8 relative) accumulated over dot products of <= 512 terms
    and 3 layers; measured ~1e-6 of the logit scale here. 2e-5 leaves a 20x margin, while a
    wrong op anywhere moves logits by far more (a 2% error in kq_scale alone: 1e-2).
    Top-1 must agree everywhere (random weights have no near-ties at this precision).
    """
    path = tiny_gguf("F32", **VARIANTS[variant])
    with hybrid.load(path, device="cpu", threads=2, ctx=128, experts="torch") as rt:
        toks = _tokens(rt.n_vocab)
        ours = rt.logits(toks)
    ref = reference_logits(path, toks)
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= 2e-5 * scale, f"max |ours - ref| = {err:.3g} (logit scale {scale:.3g})"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


# ----------------------------------------------------------------------------- consistency


def test_cached_decode_equals_full_sequence(f32_runtime):
    rt = f32_runtime
    toks = _tokens(rt.n_vocab, seed=2)
    full = rt.logits(toks)
    step = rt.decode_logits(toks)
    np.testing.assert_allclose(step, full, rtol=0, atol=2e-5 * np.abs(full).max())


def test_chunked_prefill_equals_one_shot(f32_runtime):
    rt = f32_runtime
    toks = _tokens(rt.n_vocab, seed=3)
    one = rt.logits(toks)
    old = rt.prefill_chunk
    try:
        rt.prefill_chunk = 7  # chunks that straddle every boundary
        chunked = rt.logits(toks)
    finally:
        rt.prefill_chunk = old
    np.testing.assert_allclose(chunked, one, rtol=0, atol=2e-5 * np.abs(one).max())


def test_absorbed_and_decompressed_attention_agree(f32_runtime):
    rt = f32_runtime
    toks = _tokens(rt.n_vocab, seed=4)
    try:
        rt.model.attn_mode = "absorb"
        a = rt.logits(toks)
        rt.model.attn_mode = "decompress"
        d = rt.logits(toks)
    finally:
        rt.model.attn_mode = "auto"
    np.testing.assert_allclose(a, d, rtol=0, atol=2e-5 * np.abs(a).max())
    assert not np.allclose(a[1:], a[:-1])  # sanity: positions differ


def test_latent_cache_holds_only_latent_and_rope(f32_runtime):
    rt = f32_runtime
    a = rt.args
    # per token and layer: kv_lora_rank + rope dims, never H * (nope + rope + v)
    assert rt.cache.data.shape == (a.n_layer, rt.ctx, a.kv_lora_rank + a.qk_rope_dim)
    full_kv = a.n_head * (a.qk_head_dim + a.v_head_dim)
    assert rt.cache.data.shape[-1] < full_kv


def test_context_overflow_is_a_clear_error(f32_runtime):
    with pytest.raises(ValueError, match="context of 128 tokens"):
        f32_runtime.logits([1] * 129)


def test_token_out_of_range(f32_runtime):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        f32_runtime.logits([0, f32_runtime.n_vocab])


# ----------------------------------------------------------------------------- llama.cpp


def llama_cpp_logits(path, tokens, n_ctx=128, f32_kv=False):
    import llama_cpp
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}  # 0 = GGML_TYPE_F32 (default f16)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2,
                          n_threads_batch=2, verbose=False, **kv)
    try:
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_llama_cpp_exactly_on_f32(tiny_gguf, variant):
    """Same graph as llama.cpp: with F32 weights and an F32 KV cache llama.cpp computes in
    float32 throughout, so logits agree to ~1e-12 in cosine and every top-1 matches.
    This is the strict check of the architecture (scales, RoPE/YaRN, routing, MLA layouts):
    measured with injected slips, the min cosine of the variant least affected drops to
    0.9983 (30% of the selection bias leaking into the expert weights; sigmoid variants),
    0.9932 (YaRN off), 0.9979 (kq_scale / 1.2), 0.945 (NEOX rope pairing), 0.995
    (expert_weights_norm flipped), 0.960 (routed experts skipped), 0.837 (group-limited
    routing ignored; grouped variants)."""
    path = tiny_gguf("F32", **VARIANTS[variant])
    with hybrid.load(path, device="cpu", threads=2, ctx=128) as rt:
        toks = _tokens(rt.n_vocab)
        ours = rt.logits(toks)
    ref = llama_cpp_logits(path, toks, f32_kv=True)
    cos = _cos_rows(ours, ref)
    assert cos.min() >= 0.99999, f"min per-position cosine {cos.min():.7f} at {cos.argmin()}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_llama_cpp(tiny_gguf, ftype, variant):
    """Quantized files vs llama.cpp with its default settings (f16 KV cache), 64 tokens: the
    issue's bounds, per-position cosine >= 0.999 at every position and top-1 >= 98%.

    They hold because the fixture routes decisively and has peaked next-token distributions,
    as a trained model does (hybrid/fixtures/, planted traits): with purely random weights
    llama.cpp's own 8-bit activation rounding flips near-tied expert choices and top-1s
    (llama.cpp on the Q8_0 file vs on the F32 file: min cosine 0.82).
    Measured, correct: min cosine >= 0.99959 (Q4_K_M) and >= 0.99979 (Q8_0) over the
    variants, top-1 100%; over 50 other token draws min 0.99941, top-1 100%. What remains
    is the size of llama.cpp's own f16-vs-f32 KV cache difference (0.99970 on Q4_K_M).
    Injected bugs, min cosine of the variant least affected: YaRN off 0.9929, kq_scale / 1.2
    0.9978, expert_weights_norm flipped 0.9946 (softmax variant; the others <= 0.69 and
    top-1 <= 80%), NEOX rope pairing 0.945, routed experts skipped 0.960, group-limited
    routing ignored 0.836 (grouped variants), 30% of the selection bias in the expert
    weights 0.9980 (sigmoid variants). Top-1 stays 100% under most of them, here as with
    attention zeroed (the planted successor decides every argmax): the cosine bound is the
    discriminating one (see also test_routed_experts_matter); top-1 where the blocks decide is
    test_top1_equals_references_where_the_blocks_decide's.
    """
    path = tiny_gguf(ftype, **VARIANTS[variant])
    with hybrid.load(path, device="cpu", threads=2, ctx=128) as rt:
        toks = _tokens(rt.n_vocab)
        ours = rt.logits(toks)
    ref = llama_cpp_logits(path, toks)
    cos = _cos_rows(ours, ref)
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    figures = (f"min cosine {cos.min():.6f} at position {cos.argmin()}, median "
               f"{np.median(cos):.6f}, top-1 {top1:.1%}")
    assert cos.min() >= 0.999 and top1 >= 0.98, figures


def _zero_routed_experts(rt):
    """Make every MoE layer's routed experts output zeros (the shared expert still runs)."""
    moes = [b.ffn for b in rt.model.blocks if hasattr(b.ffn, "experts")]
    assert len(moes) == rt.args.n_layer - rt.args.n_dense_lead
    for moe in moes:
        moe.experts = lambda h, ids, w: torch.zeros_like(h)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_routed_experts_matter(tiny_gguf, variant):
    """Guards test_matches_llama_cpp against blindness: the fixture's decisive routing must
    not come from routed experts too weak to matter. Without them our logits must miss
    llama.cpp's by far more than the 1e-3 cosine deficit that test allows (measured median
    deficit: 0.20 for the sigmoid variants, 0.021 for softmax)."""
    path = tiny_gguf("Q8_0", **VARIANTS[variant])
    with hybrid.load(path, device="cpu", threads=2, ctx=128) as rt:
        toks = _tokens(rt.n_vocab)
        _zero_routed_experts(rt)
        ours = rt.logits(toks)
    deficit = 1 - _cos_rows(ours, llama_cpp_logits(path, toks))
    assert np.median(deficit) >= 1e-2, (f"without routed experts the median cosine deficit vs "
                                        f"llama.cpp is only {np.median(deficit):.4f}")


def llama_cpp_greedy(path, prompt, n, n_ctx=128, f32_kv=False):
    """llama.cpp's greedy continuation of prompt: n tokens and the logits each was picked from."""
    import llama_cpp
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}  # 0 = GGML_TYPE_F32 (default f16)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2,
                          n_threads_batch=2, verbose=False, **kv)
    try:
        llm.eval(list(prompt))
        out, logits = [], []
        for _ in range(n):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            out.append(int(row.argmax()))
            logits.append(row)
            llm.eval([out[-1]])
        return out, logits
    finally:
        llm.close()


def greedy_equal_to_llama_cpp(rt, path, prompt, n=32, **llama_kw):
    """Our greedy continuation (n tokens) and llama.cpp's on the same file; fails at the first
    difference showing both implementations' logits for the two tokens."""
    # (a last (-1, text) item flushes text held back mid-UTF-8 sequence)
    ours = [t for t, _ in rt.generate_tokens(prompt, max_tokens=n, temperature=0.0,
                                             stop_at_eos=False) if t >= 0]
    ref, ref_logits = llama_cpp_greedy(path, prompt, n, **llama_kw)
    if ours != ref:
        i = next(k for k, (a, b) in enumerate(zip(ours, ref)) if a != b)
        mine = rt.logits(prompt + ours[:i])[-1]
        pytest.fail(
            f"first difference at step {i}: ours {ours[i]} / llama.cpp {ref[i]}; our logits "
            f"for them {mine[ours[i]]:.5f} / {mine[ref[i]]:.5f}, llama.cpp's "
            f"{ref_logits[i][ours[i]]:.5f} / {ref_logits[i][ref[i]]:.5f}")
    return ours


# The fixture plants each token's successor in the output weights (hybrid/fixtures/traits.py)
# so strongly (top-1 margins >= 12 logits) that embedding and head alone decide every argmax:
# greedy and top-1 checks on it pass with every block bypassed. These files keep 10% of that
# peak, so the blocks decide about half of the argmaxes (measured: 56% of the 64 positions
# below and of the greedy steps differ from the planted successor; min top-1 margin 0.004 on
# F32, 0.027 on Q8_0, where ours and llama.cpp differ by < 1e-3).
HEAD_PEAK_KEPT = 0.1


@pytest.fixture(scope="module")
def blocks_decide(tiny_gguf, fixture_cache):
    """ftype -> (path, successor table): the default model with its planted next-token peak
    cut to HEAD_PEAK_KEPT (output.weight rewritten in a copy of the F32 file, then quantized
    by llama.cpp), cached next to the fixture it derives from."""
    import os

    from hybrid.fixtures import TinyConfig, quantize
    from hybrid.fixtures.deepseek2 import _traits
    from hybrid.fixtures.traits import PEAK

    cfg = TinyConfig()
    tr = _traits(cfg)
    src = tiny_gguf("F32")

    def make(ftype):
        dst = fixture_cache / f"{src.stem}-head{HEAD_PEAK_KEPT}-{ftype}.gguf"
        if dst.exists():
            return dst, tr.succ
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        if ftype == "F32":
            with GGUFFile(src) as g:
                info = g.tensors["output.weight"]
                w = np.asarray(g.view("output.weight")).view(np.float32).reshape(info.shape).copy()
                offset = info.offset
            unit = tr.identity / np.linalg.norm(tr.identity, axis=1, keepdims=True)
            np.add.at(w, tr.succ, (-(1 - HEAD_PEAK_KEPT) * PEAK * unit).astype(np.float32))
            tmp.write_bytes(src.read_bytes())
            with open(tmp, "r+b") as f:
                f.seek(offset)
                f.write(w.tobytes())
        else:
            quantize(make("F32")[0], tmp, ftype)
        os.replace(tmp, dst)
        return dst, tr.succ

    return make


def _off_successor(tokens, next_ids, succ):
    """Fraction of predictions that are not the planted successor of their input token."""
    return float(np.mean(np.asarray(next_ids) != succ[np.asarray(tokens)]))


@pytest.mark.parametrize("ftype", ["Q8_0", "F32"])
def test_greedy_32_tokens_equal_llama_cpp(blocks_decide, ftype):
    """The issue's greedy criterion: 32 tokens on the Q8_0 file equal llama.cpp's (default
    settings); on the F32 file too, with llama.cpp's f32 KV cache (both compute the same
    floats). On files where the blocks decide the argmax (see blocks_decide): bypassing
    every block, or zeroing attention, changes the continuation. A flip shows both
    implementations' logits for the two tokens."""
    path, succ = blocks_decide(ftype)
    with hybrid.load(path, device="cpu", threads=2, ctx=128) as rt:
        prompt = rt.tokenize("The capital of France is")
        ours = greedy_equal_to_llama_cpp(rt, path, prompt, 32, f32_kv=ftype == "F32")
    assert len(set(ours)) > 8  # a walk through the vocabulary, not one token repeated
    seq = prompt + ours
    off = _off_successor(seq[len(prompt) - 1:-1], ours, succ)
    assert off >= 0.25, f"only {off:.0%} of the steps were decided by the blocks"


def test_top1_equals_references_where_the_blocks_decide(blocks_decide):
    """Top-1 at every one of 64 positions equals the float64 reference's and llama.cpp's
    (F32: f32 KV cache, the same floats; Q8_0: its defaults), on files where the blocks
    decide about half of the argmaxes (zeroed attention: top-1 agreement drops to ~50%)."""
    f32, succ = blocks_decide("F32")
    q8, _ = blocks_decide("Q8_0")
    for path in (f32, q8):
        with hybrid.load(path, device="cpu", threads=2, ctx=128) as rt:
            toks = _tokens(rt.n_vocab)
            ours = rt.logits(toks)
        top1 = ours.argmax(-1)
        refs = {"llama.cpp": llama_cpp_logits(path, toks, f32_kv=path == f32)}
        if path == f32:
            refs["float64 reference"] = reference_logits(path, toks)
        for name, ref in refs.items():
            bad = np.flatnonzero(top1 != ref.argmax(-1))
            assert bad.size == 0, f"{path.name}: top-1 differs from {name} at positions {bad.tolist()}"
        off = _off_successor(toks, top1, succ)
        assert off >= 0.25, f"only {off:.0%} of the positions were decided by the blocks"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
def test_matches_llama_cpp_on_cuda(tiny_gguf, ftype):
    path = tiny_gguf(ftype)
    with hybrid.load(path, device="cuda", threads=2, ctx=128) as rt:
        toks = _tokens(rt.n_vocab)
        ours = rt.logits(toks)
        step = rt.decode_logits(toks)
    ref = llama_cpp_logits(path, toks)
    cos = _cos_rows(ours, ref)
    assert cos.min() >= 0.999, f"min per-position cosine {cos.min():.6f}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.98
    assert _cos_rows(step, ours).min() >= 0.9999
