"""Routed experts in every GGML type a file may hold: run natively in their blocks, or
refused before loading, never silently dequantized to float copies the Plan did not count."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

import hybrid
from hybrid import _native
from hybrid.fixtures.gguf_writer import _parse_header, _raw_kv, write_gguf


def replace_tensors(src, dst, new):
    """Copy GGUF `src` to `dst` with tensors replaced: new {name: (ggml_type, uint8 bytes)}
    (same shape, any type whose blocks fit the rows)."""
    h = _parse_header(src)
    kv = _raw_kv(src, h)
    tensors = [(t.name, int(new[t.name][0]) if t.name in new else t.ggml_type, t.ne) for t in h.tensors]

    def produce(i):
        t = h.tensors[i]
        if t.name in new:
            return np.ascontiguousarray(new[t.name][1]).reshape(-1)
        return np.fromfile(src, np.uint8, count=t.n_bytes, offset=t.offset)

    return write_gguf(dst, kv, len(h.metadata), tensors, produce, alignment=h.alignment)


def _expert_names(g, layer):
    return [f"blk.{layer}.ffn_{k}_exps.weight" for k in ("gate", "up", "down")]


def test_unsupported_type_is_refused_before_loading(tiny_gguf, tmp_path):
    """TQ1_0 (no kernel anywhere): hybrid.load refuses the file naming the tensor and the type."""
    from hybrid.gguf_file import GGUFFile

    src = tiny_gguf("Q8_0")
    name = "blk.1.ffn_gate_exps.weight"
    with GGUFFile(src) as g:
        t = g.tensors[name]
        block, size = GGML_QUANT_SIZES[QT.TQ1_0]
        n = int(np.prod(t.ne)) // block * size
    dst = replace_tensors(src, tmp_path / "tq1.gguf", {name: (QT.TQ1_0, np.zeros(n, np.uint8))})
    with pytest.raises(ValueError, match=rf"{name}.*TQ1_0"):
        hybrid.load(dst, device="cpu", threads=2, ctx=64)


def test_experts_the_engine_cannot_run_are_refused_not_dequantized(tiny_gguf, monkeypatch):
    """A type the native engine lacks (simulated: Q2_K / Q3_K taken out of its list): the load
    stops before anything is placed, naming the tensors, their types and the float32 cost."""
    path = tiny_gguf("Q2_K")
    native_types = set(_native.supported_types()) - {int(QT.Q2_K), int(QT.Q3_K)}
    monkeypatch.setattr(_native, "supported_types", lambda: sorted(native_types))
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_gate_exps\.weight \(Q2_K\).*native expert engine "
                                         r"cannot run.*GiB of float32.*experts='torch'"):
        hybrid.load(path, device="cpu", threads=2, ctx=64)


def test_chosen_dequantized_experts_are_counted(tiny_gguf):
    """experts='torch' (the caller's choice): the float copies appear in the placed bytes."""
    path = tiny_gguf("Q8_0")
    with hybrid.load(path, device="cpu", threads=2, ctx=64, experts="torch") as rt:
        a = rt.args
        names = [n for L in range(a.n_dense_lead, a.n_layer) for n in _expert_names(None, L)]
        elems = sum(int(np.prod(rt.gguf.tensors[n].ne)) for n in names)
        placed = rt.loader.placed_bytes["cpu"]["weights.f32"]
        assert rt.loader.stats["torch_experts"] == a.n_layer - a.n_dense_lead
    assert placed >= 4 * elems


# ----------------------------------------------------------------------------- kernels on real blocks

from test_kernels import isa, reference_weights, ulp_distance  # noqa: E402,F401  (isa is a fixture)

NEW_TYPES = {QT.Q4_1, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.IQ4_NL, QT.IQ4_XS}
LLAMA_FTYPES = ["Q2_K", "Q3_K_M", "Q4_1", "Q5_1", "IQ4_NL", "IQ4_XS"]


@pytest.mark.parametrize("ftype", LLAMA_FTYPES)
def test_native_dequant_of_llama_cpp_blocks(isa, tiny_gguf, ftype):
    """Blocks llama.cpp's quantizer made (no importance matrix): the native dequantization is
    gguf's within 1 ulp, on every ISA path; and the dots agree with float64 on them."""
    from gguf.quants import dequantize

    from hybrid.gguf_file import GGUFFile

    seen = set()
    with GGUFFile(tiny_gguf(ftype)) as g:
        for name, t in g.tensors.items():
            if t.ggml_type not in NEW_TYPES:
                continue
            rows = np.asarray(g.view(name))
            want = dequantize(rows, QT(t.ggml_type)).astype(np.float32).ravel()
            got = _native.dequantize(rows, t.ggml_type, want.size)
            assert ulp_distance(got, want).max() <= 1, name
            seen.add(QT(t.ggml_type))
            if len(seen) == 1 or name.endswith("_exps.weight"):
                sub = rows[:64]
                x = np.random.default_rng(len(name)).standard_normal((3, t.ne[0])).astype(np.float32)
                y = _native.matmul(np.ascontiguousarray(sub), t.ggml_type, x)
                ref = x.astype(np.float64) @ reference_weights(QT(t.ggml_type), sub).T
                assert np.mean((y - ref) ** 2) / np.mean(ref ** 2) < 3e-4, name
    assert seen & NEW_TYPES, f"{ftype}: no tensor of {sorted(t.name for t in NEW_TYPES)}"


# ----------------------------------------------------------------------------- expert engine, mixed types

EXPERT_MIXES = [(QT.Q2_K, QT.Q2_K, QT.Q3_K),     # what Q2_K does to a layer
                (QT.Q3_K, QT.Q4_1, QT.Q5_1),
                (QT.Q5_1, QT.Q4_K, QT.Q2_K),
                (QT.IQ4_XS, QT.IQ4_NL, QT.IQ4_XS),
                (QT.IQ2_XXS, QT.IQ1_S, QT.IQ3_S),         # UD files mix these in one layer
                (QT.IQ1_M, QT.IQ2_XS, QT.IQ3_XXS),
                (QT.IQ2_S, QT.IQ2_S, QT.IQ1_M)]


@pytest.fixture(scope="module")
def mixed_sets():
    from test_moe import ExpertSet

    return [ExpertSet(8, types, seed=100 + i) for i, types in enumerate(EXPERT_MIXES)]


@pytest.mark.parametrize("T", [1, 3, 64, 300])
def test_expert_engine_mixed_types_vs_float64(isa, mixed_sets, T):
    """Three layers of one engine, each mixing the new types (and older ones) within the
    layer, vs the float64 reference on the dequantized weights. Bound: test_moe's 5e-4 (two
    activation quantizations; the Q4_1 / Q5_1 min term adds ~1e-4, see test_kernels)."""
    import torch

    from hybrid.backends.experts import ExpertEngine
    from test_moe import D, nmse, routing

    engine = ExpertEngine(D, max_tokens=128, max_k=4, threads=2)
    try:
        layers = [s.add_to(engine) for s in mixed_sets]
        for i, (s, layer) in enumerate(zip(mixed_sets, layers)):
            rng = np.random.default_rng(T * 10 + i)
            x = rng.standard_normal((T, D)).astype(np.float32)
            ids, w = routing(T, 4, s.E, rng)
            y = layer(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(w)).numpy()
            err = nmse(y, s.reference(x, ids, w))
            assert err < 5e-4, f"{[t.name for t in s.types]} T={T}: nmse {err:.2e}"
    finally:
        engine.close()


# ----------------------------------------------------------------------------- whole models

def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def mean_kl(ref_logits, logits):
    """Mean over positions of KL(softmax(ref) || softmax(logits))."""
    p = _log_softmax(ref_logits)
    return float((np.exp(p) * (p - _log_softmax(logits))).sum(-1).mean())


from test_deepseek2 import blocks_decide  # noqa: E402,F401  (a fixture)


@pytest.fixture(scope="module")
def float_reference(blocks_decide):
    """float64 logits of the unquantized model the files below are quantized from: the
    fixture with its planted next-token peak cut (test_deepseek2.blocks_decide), so the
    blocks, experts included, decide the distributions the KL compares."""
    from test_deepseek2 import _tokens, reference_logits

    path, _ = blocks_decide("F32")
    with hybrid.load(path, device="cpu", threads=2, ctx=128) as rt:
        toks = _tokens(rt.n_vocab)
    return toks, reference_logits(path, toks)


@pytest.mark.parametrize("ftype", LLAMA_FTYPES)
def test_whole_model_kl_within_llama_cpps(blocks_decide, float_reference, ftype):
    """The deepseek2 fixture quantized by llama.cpp: with its routed experts on the native
    engine (no torch fallback) our mean KL against the float model is within 1.25x of
    llama.cpp's own on the same file."""
    from test_deepseek2 import llama_cpp_logits

    toks, ref = float_reference
    path, _ = blocks_decide(ftype)
    with hybrid.load(path, device="cpu", threads=2, ctx=128) as rt:
        ours = rt.logits(toks)
        assert rt.loader.stats["torch_experts"] == 0
        assert rt.loader.stats["native_experts"] == rt.args.n_layer - rt.args.n_dense_lead
    kl_ours = mean_kl(ref, ours)
    kl_llama = mean_kl(ref, llama_cpp_logits(path, toks))
    print(f"{ftype}: mean KL ours {kl_ours:.3e}, llama.cpp {kl_llama:.3e}")
    assert kl_ours <= 1.25 * kl_llama, f"{ftype}: mean KL ours {kl_ours:.3e}, llama.cpp {kl_llama:.3e}"


# ----------------------------------------------------------------------------- lattice types (IQ1 / IQ2 / IQ3)

from quantdata import LATTICE_TYPES, every_index_rows  # noqa: E402


@pytest.mark.parametrize("qtype", LATTICE_TYPES, ids=lambda t: t.name)
def test_every_grid_entry_dequantizes_like_gguf(isa, qtype):
    """Random valid blocks using every grid index once: native (each ISA path) and torch
    dequantization equal gguf's within 1 ulp, and the dots match float64 on them."""
    from gguf.quants import dequantize

    from hybrid.backends import dequant as dq

    rows = every_index_rows(qtype, np.random.default_rng(int(qtype)))
    want = dequantize(rows, qtype).astype(np.float32)
    assert len(np.unique(want.reshape(-1, 4 if qtype in (QT.IQ3_S, QT.IQ3_XXS) else 8), axis=0)) > 100
    got = _native.dequantize(rows, int(qtype), want.size)
    assert ulp_distance(got, want.ravel()).max() <= 1
    assert ulp_distance(dq.dequantize(rows, int(qtype)).numpy().ravel(), want.ravel()).max() <= 1
    x = np.random.default_rng(5).standard_normal((3, 256)).astype(np.float32)
    y = _native.matmul(rows, int(qtype), x)
    ref = x.astype(np.float64) @ want.astype(np.float64).T
    assert np.mean((y - ref) ** 2) / np.mean(ref ** 2) < 2.5e-4


@pytest.fixture(scope="module")
def lattice_model(blocks_decide, fixture_cache):
    """qtype -> path: the Q8_0 model of blocks_decide with every routed-expert tensor replaced
    by random valid blocks of qtype (llama.cpp quantizes these types only with an importance
    matrix), block scales set so each tensor keeps the RMS of the weights it replaces."""
    import os

    from gguf.quants import dequantize

    from hybrid.gguf_file import GGUFFile
    from quantdata import random_rows, scale_blocks

    def make(qtype):
        src, _ = blocks_decide("Q8_0")
        dst = fixture_cache / f"{src.stem}-experts2-{qtype.name}.gguf"   # 2: IQ1_M scaled in its nibbles
        if dst.exists():
            return dst
        new = {}
        with GGUFFile(src) as g:
            for i, (name, t) in enumerate(g.tensors.items()):
                if not name.endswith("_exps.weight"):
                    continue
                rms = float(np.sqrt(np.mean(dequantize(np.asarray(g.view(name)), QT(t.ggml_type)) ** 2)))
                rows = random_rows(qtype, int(np.prod(t.ne[1:])), t.ne[0], np.random.default_rng(i))
                factor = rms / float(np.sqrt(np.mean(dequantize(rows, qtype) ** 2)))
                scale_blocks(rows.reshape(-1, GGML_QUANT_SIZES[qtype][1]), qtype, factor)
                new[name] = (qtype, rows)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        replace_tensors(src, tmp, new)
        os.replace(tmp, dst)
        return dst

    return make


@pytest.mark.parametrize("qtype", LATTICE_TYPES, ids=lambda t: t.name)
def test_lattice_expert_model_kl_within_llama_cpps(lattice_model, qtype):
    """A whole model whose routed experts are random valid blocks of a lattice type: our mean
    KL against the float64 reference of the same (dequantized) model is within 1.25x of
    llama.cpp's, with every MoE layer on the native engine."""
    from test_deepseek2 import _tokens, llama_cpp_logits, reference_logits

    path = lattice_model(qtype)
    with hybrid.load(path, device="cpu", threads=2, ctx=128) as rt:
        toks = _tokens(rt.n_vocab)
        ours = rt.logits(toks)
        assert rt.loader.stats["torch_experts"] == 0
        assert rt.loader.stats["native_experts"] == rt.args.n_layer - rt.args.n_dense_lead
    ref = reference_logits(path, toks)
    kl_ours, kl_llama = mean_kl(ref, ours), mean_kl(ref, llama_cpp_logits(path, toks))
    print(f"{qtype.name}: mean KL ours {kl_ours:.3e}, llama.cpp {kl_llama:.3e}")
    assert kl_ours <= 1.25 * kl_llama, f"{qtype.name}: mean KL ours {kl_ours:.3e}, llama.cpp {kl_llama:.3e}"


@pytest.mark.parametrize("mode,parts", [("interleave", None), ("distribute", 2), ("replicate", 2)])
def test_numa_modes_with_low_bit_experts_match_off(tiny_gguf, lattice_model, mode, parts):
    """The NUMA placements copy and split expert rows of any block type: on files mixing the
    new types (Q2_K gate/up + Q3_K down; IQ1_S experts) every mode gives numa off's logits."""
    toks = [5, 17, 99, 3, 250, 42, 7, 300]
    for path in (tiny_gguf("Q2_K"), lattice_model(QT.IQ1_S)):
        with hybrid.load(path, device="cpu", threads=2, ctx=32, numa="off") as r:
            want = r.logits(toks)
        with hybrid.load(path, device="cpu", threads=2, ctx=32, numa=mode, numa_partitions=parts,
                         copy_progress=False) as r:
            assert r.loader._placed.placed_bytes > 0 and r.loader.stats["torch_experts"] == 0
            np.testing.assert_array_equal(r.logits(toks), want)


def test_generated_grid_tables_are_ggmls():
    """native/iq_tables.h is what scripts/gen_iq_tables.py makes from gguf-py's published grids."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "scripts" / "gen_iq_tables.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout


def test_gpu_prefill_path_dequantizes_low_bit_experts(tiny_gguf, lattice_model):
    """GPU prefill (the CPU playing the device): long chunks' experts are dequantized by the
    torch dequantizer, for Q2_K / Q3_K and lattice experts alike; the logits agree with the
    native engine's."""
    from test_gpu_path import assert_close_everywhere

    toks = [5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 21, 9]
    for path in (tiny_gguf("Q2_K"), lattice_model(QT.IQ1_S), lattice_model(QT.IQ2_XXS)):
        with hybrid.load(path, device="cpu", threads=2, ctx=64) as r:
            want = r.logits(toks)
        with hybrid.load(path, device="cpu", threads=2, ctx=64, gpu_paths=True, prefill_chunk=4,
                         gpu_prefill_tokens=8, gpu_prefill_chunk=8, decode_graphs="off") as r:
            got = r.logits(toks)
            assert r.loader.offload.calls == len(r.loader.offload.layers) > 0
        assert_close_everywhere(got, want, 0.999)
