"""The GQA-family architectures (qwen3moe, qwen2moe, llama as Mixtral-style MoE and dense,
glm4moe) against llama.cpp on the same files: tiny fixtures written the way llama.cpp's
converter writes each architecture (hybrid/fixtures/gqa.py), F32 and quantized by llama.cpp.

The fixtures' next-token distributions are spread (GQAConfig.output_peak, block_gain), so KL
divergences measure something and the transformer blocks decide a share of the argmaxes;
routing is decisive (fixtures/traits.py), so both implementations pick the same experts.
"""

import functools

import numpy as np
import pytest
import torch

import hybrid
from hybrid.fixtures import GQAConfig
from hybrid.gguf_file import GGUFFile
from hybrid.models import get_model_module
from hybrid.models.moe import GATING_SIGMOID, GATING_SOFTMAX
from test_deepseek2 import _cos_rows, greedy_equal_to_llama_cpp, llama_cpp_logits

N_TOKENS = 128  # >= 128 positions for the KL criterion, >= 64 for the exact one
CTX = 192

# name -> (architecture, GQAConfig overrides of GQAConfig.of's layout)
MODELS = {
    "qwen3moe": ("qwen3moe", {}),  # q/k norms, head_dim * heads != n_embd, 2 KV heads
    "qwen2moe": ("qwen2moe", {}),  # q/k/v biases, sigmoid-gated shared expert, no weight norm
    "mixtral": ("llama", {}),  # llama with experts, NORMAL rope pairs
    "llama_dense": ("llama", {"n_expert": 0, "block_gain": 3.0}),
    "glm4moe": ("glm4moe", {}),  # biases, q/k norms, half-rope, dense lead, groups, MTP block
}
# other layouts of the same architectures, checked for exactness on F32
LAYOUTS = {
    "mixtral_tied": ("llama", {"tied_output": True}),
    "llama_dense_tied": ("llama", {"n_expert": 0, "tied_output": True}),  # SmolLM2's layout
    "glm4moe_plain": ("glm4moe", {"qk_norm": False, "n_group": 0, "n_group_used": 0,
                                  "expert_weights_norm": False, "expert_weights_scale": 0.0}),
    "qwen2moe_mha": ("qwen2moe", {"n_head_kv": 4}),
    "glm4moe_bias": ("glm4moe", {"selection_bias": 0.5}),  # the selection bias decides choices
    "qwen3moe_yarn": ("qwen3moe", {"yarn_factor": 4.0}),  # as Qwen3 long-context files carry it
}


def _tokens(n_vocab, n=N_TOKENS, seed=1):
    # never the control tokens 0..2 (BOS/EOS/PAD): a prompt has them at most at its start
    return tuple(np.random.default_rng(seed).integers(3, n_vocab, n).tolist())


@pytest.fixture(scope="module")
def model_file(gqa_gguf):
    def get(name, ftype):
        arch, kw = {**MODELS, **LAYOUTS}[name]
        return gqa_gguf(arch, ftype, **kw)

    return get


@functools.lru_cache(maxsize=None)
def _llama_cpp(path, tokens, f32_kv=False) -> np.ndarray:
    return llama_cpp_logits(path, tokens, n_ctx=CTX, f32_kv=f32_kv)


def _ours(path, tokens, **kw) -> np.ndarray:
    with hybrid.load(path, device="cpu", threads=2, ctx=CTX, **kw) as rt:
        return rt.logits(tokens)


def _kl(p_logits, q_logits) -> np.ndarray:
    """KL(P || Q) per position, P and Q the softmax of the rows (float64)."""
    def logp(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logp(p_logits), logp(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


# per-position cosine vs llama.cpp on the same file (its f16 KV cache included)
MIN_COS = {"Q4_K_M": 0.998, "Q8_0": 0.9995}
# a decisive top-2 logit margin: above the largest shift of a top-2 margin between the two
# implementations measured on these files (0.19, llama_dense Q4_K_M; 0.13 on Q8_0)
DECISIVE = 0.25


def _top1_splits(ours, theirs) -> list[int]:
    """Positions where the top-1s differ although `theirs` has a decisive top-2 margin."""
    s = np.sort(theirs, -1)
    decisive = s[:, -1] - s[:, -2] >= DECISIVE
    return np.flatnonzero(decisive & (ours.argmax(-1) != theirs.argmax(-1))).tolist()


def _reference(model_file, name):
    """The F32 model's logits (llama.cpp, f32 KV cache: equal to ours to ~1e-7, see below)."""
    f32 = model_file(name, "F32")
    toks = _tokens(GQAConfig.of(MODELS[name][0], **MODELS[name][1]).vocab_size)
    return toks, _llama_cpp(f32, toks, f32_kv=True)


# ----------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("name", list(MODELS) + list(LAYOUTS))
def test_model_args_from_fixture(model_file, name):
    arch, kw = {**MODELS, **LAYOUTS}[name]
    cfg = GQAConfig.of(arch, **kw)
    path = model_file(name, "F32")
    with GGUFFile(path) as g:
        a = get_model_module(arch).ModelArgs.from_gguf(g.metadata, g.tensors, str(path))
    assert (a.dim, a.n_layer, a.n_head, a.n_head_kv) == (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_head_kv)
    assert (a.head_dim_k, a.head_dim_v, a.rope_dim) == (cfg.head_dim, cfg.head_dim, cfg.rope_dim or cfg.head_dim)
    assert a.rope_neox == (arch != "llama")  # llama.cpp: LLAMA_ROPE_TYPE_NORM for llama only
    assert (a.n_expert, a.n_expert_used, a.n_dense_lead) == (cfg.n_expert, cfg.n_expert_used if cfg.n_expert else 0, cfg.n_dense)
    if cfg.n_expert:
        assert a.n_ff_exp == cfg.expert_ffn  # Mixtral: from feed_forward_length
    assert a.gating_func == (GATING_SIGMOID if cfg.gating == "sigmoid" else GATING_SOFTMAX)
    assert a.expert_weights_norm == cfg.expert_weights_norm
    assert (a.n_group, a.n_group_used, a.n_nextn_layer) == (cfg.n_group, cfg.n_group_used, cfg.n_nextn)


def test_glm4moe_gating_defaults_to_sigmoid(model_file):
    # llama.cpp: a glm4moe file without expert_gating_func gates with sigmoid
    path = model_file("glm4moe", "F32")
    with GGUFFile(path) as g:
        md = dict(g.metadata)
        del md["glm4moe.expert_gating_func"]
        a = get_model_module("glm4moe").ModelArgs.from_gguf(md, g.tensors, str(path))
    assert a.gating_func == GATING_SIGMOID


# ----------------------------------------------------------------------------- llama.cpp


@pytest.mark.parametrize("name", list(MODELS) + list(LAYOUTS))
def test_f32_matches_llama_cpp_exactly(model_file, name):
    """Same graph as llama.cpp: with F32 weights and llama.cpp's f32 KV cache both compute in
    float32, so logits agree to float32 rounding (measured max |diff| / max |logit| <= 1.8e-6
    over the models and layouts) and every top-1 matches. Planted slips, in a copy of the tree:
    kq scale / sqrt(1.1) 0.018; k norm skipped 0.087; q bias dropped 0.11; qwen2moe's shared
    expert gate ignored 0.23; glm4moe's partial RoPE ignored 0.33, its MTP block run 0.40,
    expert groups ignored 0.44, softmax gating 0.58, selection bias ignored 0.57 (on
    glm4moe_bias; the default's small bias never overturns a choice); llama with NEOX pairs
    0.42; K/V heads swapped 0.46; YaRN ignored 0.37 (qwen3moe_yarn)."""
    path = model_file(name, "F32")
    arch, kw = {**MODELS, **LAYOUTS}[name]
    toks = _tokens(GQAConfig.of(arch, **kw).vocab_size)
    ours = _ours(path, toks)
    ref = _llama_cpp(path, toks, f32_kv=True)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5, f"max |ours - llama.cpp| / max |logit| = {rel:.3g}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
@pytest.mark.parametrize("name", list(MODELS))
def test_quantized_kl_within_llama_cpp(model_file, name, ftype):
    """The issue's criterion: on the same quantized file, the mean KL divergence of our logits
    from the F32 model's is at most 1.25x llama.cpp's, over 128 positions; and our logits
    stay close to llama.cpp's at every position (per-position cosine, and the same top-1
    wherever llama.cpp's top-2 margin is decisive).

    Measured: KL ratio 1.000..1.003 (Q4_K_M), 0.97..1.04 (Q8_0); min cosine 0.99893
    (llama_dense Q4_K_M), >= 0.99954 for the others on Q4_K_M, >= 0.99963 on Q8_0; top-1s
    differ only at margins below 0.035 (near-ties: the blocks decide many argmaxes here). test_blocks_matter shows
    what a skipped block does to these figures."""
    toks, ref = _reference(model_file, name)
    path = model_file(name, ftype)
    ours = _ours(path, toks)
    theirs = _llama_cpp(path, toks)
    kl_ours, kl_theirs = _kl(ref, ours).mean(), _kl(ref, theirs).mean()
    cos = _cos_rows(ours, theirs)
    split = _top1_splits(ours, theirs)
    figures = (f"mean KL vs F32: ours {kl_ours:.4g}, llama.cpp {kl_theirs:.4g} (ratio "
               f"{kl_ours / kl_theirs:.3f}); min cosine vs llama.cpp {cos.min():.6f} at position "
               f"{cos.argmin()}; top-1 differs where llama.cpp's top-2 margin >= {DECISIVE} at "
               f"{split}")
    assert kl_ours <= 1.25 * kl_theirs, figures
    assert cos.min() >= MIN_COS[ftype] and not split, figures


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_32_tokens_equal_llama_cpp_on_q8(model_file, name):
    """32 greedy tokens on the Q8_0 file equal llama.cpp's (default settings, f16 KV cache).
    A difference shows both implementations' logits for the two tokens (a near-tie, or not)."""
    path = model_file(name, "Q8_0")
    with hybrid.load(path, device="cpu", threads=2, ctx=CTX) as rt:
        prompt = rt.tokenize("The capital of France is")
        ours = greedy_equal_to_llama_cpp(rt, path, prompt, 32, n_ctx=CTX)
    assert len(set(ours)) > 8  # a walk through the vocabulary, not one token repeated


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("ftype", ["F32", "Q8_0"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_then_decode_equals_full_sequence(model_file, name, ftype):
    """Decode through the K/V cache (from the first token; and after a 40-token prefill) and
    prefill in chunks of 7 give the logits of one full-sequence prefill. F32: all in torch,
    the same float32 arithmetic (measured <= 1.2e-6 of the logit scale). Q8_0: decode and the
    short chunks run the native attention (NativeGQA), the full prefill torch's; the native
    matmul quantizes activations to 8 bits per block, and a 1e-7 difference between the two
    attention outputs flips a rounding now and then (measured up to 1e-2 of the logit scale,
    cosine >= 0.99987). Planted: RoPE one position late in torch's decode steps (invisible
    when every step has it: RoPE is relative) moves the decode after a prefill by 0.10-0.14
    of the logit scale on F32; one position early in every chunk after the first fails too."""
    path = model_file(name, ftype)
    arch, kw = MODELS[name]
    toks = _tokens(GQAConfig.of(arch, **kw).vocab_size, n=64, seed=2)
    with hybrid.load(path, device="cpu", threads=2, ctx=CTX) as rt:
        full = rt.logits(toks)
        step = rt.decode_logits(toks)
        rt.logits(toks[:40])  # a prompt prefilled, then decoded one token at a time
        with torch.inference_mode():
            after = [rt._forward(torch.tensor([t]), last_only=True)[-1].numpy() for t in toks[40:]]
        step[40:] = np.stack(after)
        old = rt.prefill_chunk
        try:
            rt.prefill_chunk = 7  # chunks that straddle every boundary
            chunked = rt.logits(toks)
        finally:
            rt.prefill_chunk = old
    scale = np.abs(full).max()
    if ftype == "F32":
        np.testing.assert_allclose(step, full, rtol=0, atol=2e-5 * scale)
        np.testing.assert_allclose(chunked, full, rtol=0, atol=2e-5 * scale)
    else:
        for other in (step, chunked):
            cos = _cos_rows(other, full)
            assert cos.min() >= 0.9995, f"min cosine {cos.min():.7f} at position {cos.argmin()}"
            assert not _top1_splits(other, full)
            assert np.abs(other - full).max() <= 2e-2 * scale


# ----------------------------------------------------------------------------- the blocks matter


def _greedy(rt, prompt, n=32):
    # (a last (-1, text) item flushes text held back mid-UTF-8 sequence)
    return [t for t, _ in rt.generate_tokens(prompt, max_tokens=n, temperature=0.0,
                                             stop_at_eos=False) if t >= 0]


def _bypass(rt, part):
    """Make every block's attention, FFN (dense or MoE), or routed experts output zeros: the
    residual stream passes through that part unchanged."""
    zeros = torch.zeros_like
    for blk in rt.model.blocks:
        if part == "attention":
            blk.attn = lambda x, *a, **k: zeros(x)
        elif part == "ffn":
            blk.ffn = lambda h: zeros(h)
        elif hasattr(blk.ffn, "experts"):
            blk.ffn.experts = lambda h, ids, w: zeros(h)


@pytest.mark.parametrize("part", ["attention", "ffn", "routed"])
@pytest.mark.parametrize("name", list(MODELS))
def test_blocks_matter(model_file, name, part):
    """Guards the comparisons above against blindness: the fixtures must not let a model pass
    whose attention, FFN or routed experts do nothing. With that part skipped, both criteria of
    test_quantized_kl_within_llama_cpp fail on the Q8_0 file by far, and the 32 greedy tokens
    of test_greedy_32_tokens_equal_llama_cpp_on_q8 change (measured: at most 56% of them
    stay; the blocks decide some steps, GQAConfig.block_gain)."""
    if part == "routed" and MODELS[name][1].get("n_expert") == 0:
        pytest.skip("a dense model has no routed experts")
    toks, ref = _reference(model_file, name)
    path = model_file(name, "Q8_0")
    theirs = _llama_cpp(path, toks)
    with hybrid.load(path, device="cpu", threads=2, ctx=CTX) as rt:
        prompt = rt.tokenize("The capital of France is")
        greedy = _greedy(rt, prompt)
        _bypass(rt, part)
        ours = rt.logits(toks)
        bypassed = _greedy(rt, prompt)
    kl_ours, kl_theirs = _kl(ref, ours).mean(), _kl(ref, theirs).mean()
    cos = _cos_rows(ours, theirs)
    figures = (f"without the {part}: KL {kl_ours:.4g} vs llama.cpp's {kl_theirs:.4g}, min "
               f"cosine {cos.min():.4f}; greedy tokens {greedy} -> {bypassed}")
    assert kl_ours > 10 * kl_theirs, figures
    assert cos.min() < 0.99, figures
    assert bypassed != greedy, figures
