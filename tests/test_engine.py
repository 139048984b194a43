"""Engine: sampling, generation (stop strings, EOS, streaming, prefix reuse), greedy
continuation vs llama.cpp."""

import numpy as np
import pytest
import torch

import hybrid
from hybrid.runtime.loader import MinimalPlan
from hybrid.runtime.sampling import Sampler, SamplingParams

# ----------------------------------------------------------------------------- sampling


def test_greedy_is_argmax():
    x = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert Sampler(temperature=0.0)(x) == 1


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    x = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    a = [Sampler(temperature=1.0, seed=5)(x) for _ in range(1)]
    s1, s2 = Sampler(temperature=1.0, seed=5), Sampler(temperature=1.0, seed=5)
    draws1 = [s1(x) for _ in range(2000)]
    draws2 = [s2(x) for _ in range(2000)]
    assert draws1 == draws2 and a[0] == draws1[0]
    freq = np.bincount(draws1, minlength=3) / 2000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.04)


def test_top_k_and_top_p_cut_the_tail():
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(temperature=1.0, top_k=2, seed=0)
    assert set(s(x) for _ in range(300)) == {0, 1}
    s = Sampler(temperature=1.0, top_p=0.75, seed=0)   # 0.5 + 0.3 reaches 0.75: keep two
    assert set(s(x) for _ in range(300)) == {0, 1}
    s = Sampler(temperature=1.0, top_p=0.4, seed=0)    # the first token alone covers 0.4
    assert set(s(x) for _ in range(50)) == {0}


def test_repetition_penalty_demotes_seen_tokens():
    x = torch.tensor([2.0, 1.9, -1.0])
    assert Sampler(temperature=0.0, repetition_penalty=1.2)(x, history=[0]) == 1
    assert Sampler(temperature=0.0, repetition_penalty=1.0)(x, history=[0]) == 0


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0.0}, {"top_k": -2},
                                {"repetition_penalty": 0}])
def test_bad_sampling_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw).check()


# ----------------------------------------------------------------------------- generation


class _CharTokenizer:
    """Stand-in tokenizer for engine tests that must not depend on llama.cpp: token id i
    decodes to chr(ord('a') + i % 26), and token 1 is EOS (never sampled unless forced)."""

    bos_id, eos_id, add_bos, chat_template = 0, 1, True, None

    def encode(self, text, add_bos=None, special=True):
        return [0] + [2 + (ord(c) - ord("a")) % 26 for c in text]

    def is_eog(self, t):
        return t == self.eos_id

    def stream_decoder(self):
        class D:
            def push(_, t):
                return chr(ord("a") + t % 26)

            def flush(_):
                return ""

        return D()

    def close(self):
        pass


@pytest.fixture(scope="module")
def rt(tiny_f32):
    r = hybrid.load(tiny_f32, device="cpu", threads=2, ctx=128, experts="torch")
    r._tokenizer = _CharTokenizer()
    yield r
    r.close()


def test_greedy_generation_matches_argmax_of_logits(rt):
    prompt = [0, 5, 9, 17, 3]
    out = list(rt.generate_tokens(prompt, max_tokens=8, temperature=0.0, stop_at_eos=False))
    toks = [t for t, _ in out]
    assert len(toks) == 8 and rt.last_stats.finish_reason == "length"
    seq = list(prompt)
    for t in toks:  # each token is the argmax of a fresh full forward over the sequence
        assert t == int(rt.logits(seq)[-1].argmax())
        seq.append(t)


def test_stop_string_truncates_and_stops(rt):
    prompt = [0, 5, 9, 17, 3]
    full = "".join(rt.generate(prompt, max_tokens=12, temperature=0.0, stop_at_eos=False))
    assert len(full) == 12
    stop = full[5:7]
    cut = full.index(stop)
    text = "".join(rt.generate(prompt, max_tokens=12, temperature=0.0, stop=[stop],
                               stop_at_eos=False))
    assert text == full[:cut]
    assert rt.last_stats.finish_reason == "stop"


def test_eos_stops_generation(rt):
    prompt = [0, 5, 9]
    first = next(iter(rt.generate_tokens(prompt, max_tokens=1, temperature=0.0)))[0]
    saved = rt.tokenizer.eos_id
    rt.tokenizer.eos_id = first  # make the first greedy token the end token
    try:
        pieces = list(rt.generate(prompt, max_tokens=10, temperature=0.0))
    finally:
        rt.tokenizer.eos_id = saved
    assert pieces == [] and rt.last_stats.finish_reason == "stop"
    assert rt.last_stats.completion_tokens == 1


def test_prefix_is_reused_and_results_unchanged(rt):
    a = [0, 4, 8, 15, 16, 23, 42 % 30]
    ref = [t for t, _ in rt.generate_tokens(a + [3, 3], max_tokens=4, temperature=0.0,
                                            stop_at_eos=False)]
    rt.reset()
    list(rt.generate_tokens(a, max_tokens=2, temperature=0.0))
    got = [t for t, _ in rt.generate_tokens(a + [3, 3], max_tokens=4, temperature=0.0,
                                            stop_at_eos=False)]
    assert rt.last_stats.cached_tokens == len(a)
    assert got == ref


def test_context_limit_caps_max_tokens(rt):
    prompt = list(range(2, 120))
    out = list(rt.generate_tokens(prompt, max_tokens=50, temperature=0.0, stop_at_eos=False))
    assert len(out) == rt.ctx - len(prompt)


def test_bad_device_is_a_clear_error(tiny_f32):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        hybrid.load(tiny_f32, device="cuda")


def test_minimal_plan_places_like_the_solver():
    p = MinimalPlan(device="cuda:0", gpu_experts=[[], [3, 5]])
    assert p.placement_of("token_embd.weight") == ("cpu", "quantized")
    assert p.placement_of("blk.1.ffn_up_exps.weight") == ("cpu", "quantized")
    assert p.placement_of("blk.0.attn_q_b.weight") == ("gpu0", "bf16")
    assert p.gpu_expert_ids(1) == [3, 5] and p.gpu_expert_ids(7) == []
    assert MinimalPlan().placement_of("output.weight") == ("cpu", "quantized")


def test_runtime_uses_the_solver_plan(rt):
    from placement.plan import Plan

    assert isinstance(rt.plan, Plan) and rt.plan.fits
    assert rt.ctx == rt.plan.kv_cache_tokens == 128
    # what the Plan places, the runtime loads there: routed experts on the CPU (torch, as
    # asked), one set per MoE layer; every linear on the CPU; the KV cache it sized
    a = rt.args
    assert rt.plan.placement_of("blk.1.ffn_up_exps.weight") == ("cpu", "quantized")
    assert rt.loader.stats["torch_experts"] == a.n_layer - a.n_dense_lead
    assert rt.loader.stats["native_experts"] == rt.loader.stats["gpu_hot_experts"] == 0
    assert rt.cache.data.shape[1] == rt.plan.kv_cache_tokens


# ----------------------------------------------------------------------------- llama.cpp


def test_generate_chat_streams_text(tiny_q8):
    with hybrid.load(tiny_q8, device="cpu", threads=2, ctx=256) as r:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        pieces = list(r.generate(msgs, max_tokens=16, temperature=0.7, seed=1))
        st = r.last_stats
        assert st.prompt_tokens == len(r.tokenizer.encode_chat(msgs))
        assert 1 <= st.completion_tokens <= 16
        text = "".join(pieces)
        toks = [t for t in st.tokens if not r.tokenizer.is_eog(t)]
        assert text == r.detokenize(toks)
        again = "".join(r.generate(msgs, max_tokens=16, temperature=0.7, seed=1))
        assert again == text  # same seed, same text (prefix reused from the cache)


def test_token_ids_without_detokenizing_need_no_tokenizer(tiny_q8, monkeypatch):
    """detokenize=False: the same tokens, empty pieces, and no tokenizer asked for (bench_gpu
    on a GPU machine without llama-cpp-python); stop strings need the text."""
    with hybrid.load(tiny_q8, device="cpu", threads=2, ctx=128) as r:
        prompt = [5, 17, 99, 3]
        want = [t for t, _ in r.generate_tokens(prompt, max_tokens=8, temperature=0.0, stop_at_eos=False)
                if t >= 0]
        monkeypatch.setattr(type(r), "tokenizer", property(lambda self: pytest.fail("tokenizer asked for")))
        got = list(r.generate_tokens(prompt, max_tokens=8, temperature=0.0, stop_at_eos=False,
                                     detokenize=False))
        assert [t for t, _ in got] == want and all(p == "" for _, p in got) and len(want) == 8
        with pytest.raises(ValueError, match="stop strings"):
            next(r.generate_tokens(prompt, stop=["x"], detokenize=False))


# ----------------------------------------------------------------------------- native pieces


def test_quant_linear_matches_dequantized_torch():
    import hybrid._native  # noqa: F401
    import gguf

    from hybrid.backends import dequant
    from hybrid.backends.native import QuantLinear
    from hybrid.runtime.loader import TorchLinear

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)      # [96, row_bytes]
    x = torch.from_numpy(rng.standard_normal((5, 256)).astype(np.float32))
    ql = QuantLinear(q, dequant.Q8_0, 256, threads=2)
    tl = TorchLinear(dequant.dequantize(q, dequant.Q8_0))
    y, ref = ql(x), tl(x)
    assert y.shape == (5, 96)
    # the native kernel quantizes x to 8 bits per block: ~1e-2 relative, far below the
    # difference a wrong row or block order makes (O(1))
    err = (y - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, err


def test_hot_expert_split_equals_all_on_one_side(tiny_f32):
    """Plan-assigned hot experts computed by torch (on the device; here the CPU) plus the CPU
    engine skipping them equal all experts computed in one place."""
    import hybrid._native  # noqa: F401
    from hybrid.backends.experts import ExpertEngine
    from hybrid.gguf_file import GGUFFile
    from hybrid.backends.gpu import Bridge, OverlappedExperts
    from hybrid.backends.torch_experts import TorchExperts

    with GGUFFile(tiny_f32) as g:
        layer = 1
        names = [f"blk.{layer}.ffn_{k}_exps.weight" for k in ("gate", "up", "down")]
        infos = [g.tensors[n] for n in names]
        E, D = infos[0].ne[2], infos[0].ne[0]
        full = TorchExperts.from_gguf(g, layer)
        eng = ExpertEngine(D, max_tokens=64, max_k=4, threads=2)
        try:
            cpu = eng.add_layer(E, g.view(names[0]), infos[0].ggml_type, g.view(names[1]),
                                infos[1].ggml_type, g.view(names[2]), infos[2].ggml_type)
            hot = [1, 4, 9, 15]
            mask = np.zeros(E, np.uint8)
            mask[hot] = 1
            cpu.set_skip(mask)
            lut = torch.full((E,), -1, dtype=torch.long)
            lut[hot] = torch.arange(len(hot))
            split = OverlappedExperts(cpu, Bridge(D, 64, 4, "cpu"), layer,
                                      hot=TorchExperts.from_gguf(g, layer, experts=hot), lut=lut)
            rng = np.random.default_rng(0)
            x = torch.from_numpy(rng.standard_normal((6, D)).astype(np.float32))
            ids = torch.stack([torch.randperm(E)[:4] for _ in range(6)])
            ids[0, 0] = -1  # skipped slot
            w = torch.rand(6, 4)
            ref = full(x, ids, w)
            y = split(x, ids, w).clone()
            # the fixed-shape (CUDA graph) form of the hot part equals the sorted one
            local = split.local_ids(ids)
            torch.testing.assert_close(split.hot.static(x, local, w), split.hot(x, local, w),
                                       rtol=1e-5, atol=1e-5)
            del cpu, split
        finally:
            eng.close()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_load_reports_progress_per_layer(tiny_f32):
    seen = []
    with hybrid.load(tiny_f32, device="cpu", threads=2, ctx=32, experts="torch",
                     progress=lambda done, total: seen.append((done, total))):
        pass
    assert seen == [(1, 3), (2, 3), (3, 3)]


class _Bf16Plan(MinimalPlan):
    """CPU stand-in for the GPU layout: bf16 weights and KV cache, experts overlapped."""

    def placement_of(self, name):
        dev, fmt = super().placement_of(name)
        return (dev, fmt) if name.startswith("token_embd") or name.endswith("_exps.weight") \
            else ("cpu", "bf16")


def test_bf16_layout_and_overlapped_experts_agree_with_f32(tiny_f32):
    """The GPU path's numerics (bf16 weights, bf16 latent cache, routed experts submitted
    before the shared expert and waited for after, through the staging Bridge), exercised
    on the CPU."""
    import hybrid._native  # noqa: F401
    from hybrid.backends.gpu import OverlappedExperts

    toks = np.random.default_rng(5).integers(3, 500, 48).tolist()
    with hybrid.load(tiny_f32, device="cpu", threads=2, ctx=64) as r:
        ref = r.logits(toks)
    plan = _Bf16Plan(kv_cache_tokens=64, kv_cache_dtype="bf16")
    with hybrid.load(tiny_f32, threads=2, plan=plan, gpu_paths=True) as r:
        assert r.cache.data.dtype == torch.bfloat16
        assert r.model.blocks[0].attn.wo.weight.dtype == torch.bfloat16
        for b in r.model.blocks[r.args.n_dense_lead:]:
            assert isinstance(b.ffn.experts, OverlappedExperts)
        got = r.logits(toks)
        step = r.decode_logits(toks[:16])
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    # bf16 rounds weights and cache by ~0.4%; the fixture's routing margins absorb that
    assert cos.min() >= 0.999, np.sort(cos)[:5]
    c2 = (step * got[:16]).sum(-1) / (np.linalg.norm(step, axis=-1) * np.linalg.norm(got[:16], axis=-1))
    assert c2.min() >= 0.9999, c2  # same rounding both ways: cached decode = full pass
