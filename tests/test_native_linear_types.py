"""CPU linears (attention projections, dense FFN, shared experts, output head) in every GGML
type the native matmul computes: held in their GGUF blocks, counted at their file bytes by
the solver, and computing what llama.cpp computes on the same file."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

import hybrid
from hybrid import _native
from placement.ggml import TYPES
from placement.solver import CPU_NATIVE_TYPES
from test_deepseek2 import blocks_decide  # noqa: F401  (a fixture)

# the quantized types hybrid had before issue 14, and those it added
OLD_TYPES = [QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
NEW_TYPES = [QT.Q4_1, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.IQ4_NL, QT.IQ4_XS, QT.IQ1_S, QT.IQ1_M,
             QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S]
_LINEAR_ROLES = ("attention", "dense_ffn", "shared_expert", "output")


def test_one_list_of_native_linear_types():
    """The solver's list is the loader's, and it is every quantized type the native module
    computes (Q8_K is an activation format): a type added to the kernels without the list (or
    the reverse) would plan f32 copies the runtime does not make, or the other way round."""
    from hybrid.runtime.loader import Loader

    quantized = {t for t in _native.supported_types() if TYPES[t].quantized and t != int(QT.Q8_K)}
    assert CPU_NATIVE_TYPES == quantized
    assert {int(t) for t in OLD_TYPES + NEW_TYPES} == quantized
    assert Loader.__init__.__globals__["CPU_NATIVE_TYPES"] is CPU_NATIVE_TYPES
    assert not hasattr(hybrid.backends.native, "_NATIVE_LINEAR_TYPES")


def _cpu_linears(path):
    """The tensors the CPU runs as linears (placement.inventory's roles; kv_b is split into
    per-head float copies at load, whatever its type)."""
    from placement.inventory import from_gguf

    return [t for t in from_gguf(path).tensors if t.role in _LINEAR_ROLES and t.group != "attention.kv_b"]


@pytest.fixture(scope="module")
def linear_model(blocks_decide, fixture_cache):
    """qtype -> (path, names): the Q8_0 model of test_deepseek2.blocks_decide with every CPU linear whose
    rows hold whole qtype blocks replaced (`names`): quantized from the F32 model by gguf where
    gguf-py quantizes the type (Q4_1, Q5_1), else random valid blocks (llama.cpp quantizes the
    lattice types only with an importance matrix) scaled to the RMS of the weights they
    replace. (Random Q4_1 / Q5_1 blocks are no good: their weights d*q + m are all of one
    sign, which leaves some positions of the model on a knife edge where any rounding
    decides the KL, ours and llama.cpp's alike.)"""
    import os

    from gguf.quants import dequantize, quantize

    from hybrid.gguf_file import GGUFFile
    from quantdata import random_rows, scale_blocks
    from test_quant_types import replace_tensors

    def make(qtype):
        src, _ = blocks_decide("Q8_0")
        names = [t.name for t in _cpu_linears(src) if t.ne[0] % GGML_QUANT_SIZES[qtype][0] == 0]
        dst = fixture_cache / f"{src.stem}-linears-{qtype.name}.gguf"
        if dst.exists():
            return dst, names
        new = {}
        f32 = GGUFFile(blocks_decide("F32")[0])
        with GGUFFile(src) as g, f32:
            for i, name in enumerate(names):
                t = g.tensors[name]
                if qtype in (QT.Q4_1, QT.Q5_1):
                    w = np.asarray(f32.view(name)).view(np.float32).reshape(-1, t.ne[0])
                    new[name] = (qtype, quantize(w, qtype))
                    continue
                rms = float(np.sqrt(np.mean(dequantize(np.asarray(g.view(name)), QT(t.ggml_type)) ** 2)))
                rows = random_rows(qtype, int(np.prod(t.ne[1:])), t.ne[0], np.random.default_rng(i))
                factor = rms / float(np.sqrt(np.mean(dequantize(rows, qtype) ** 2)))
                scale_blocks(rows.reshape(-1, GGML_QUANT_SIZES[qtype][1]), qtype, factor)
                new[name] = (qtype, rows)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        replace_tensors(src, tmp, new)
        os.replace(tmp, dst)
        return dst, names

    return make


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_linears_in_new_types_match_llama_cpp(linear_model, monkeypatch, qtype):
    """A model whose CPU linears are random valid blocks of a new type: every one of them
    runs on the native kernels in its GGUF blocks (no float copy placed; the loader counts
    none as torch), and our mean KL against the float64 reference of the same (dequantized)
    model is within 1.25x of llama.cpp's, prefill (T > 1: per-token dots, the tile kernels
    cover only the older types) and logits of every position."""
    from hybrid.runtime import loader as L
    from test_deepseek2 import _tokens, llama_cpp_logits, reference_logits
    from test_quant_types import mean_kl

    path, names = linear_model(qtype)
    held = {}

    class SpyLinear(L.QuantLinear):
        def __init__(self, view, ggml_type, *a, **k):
            super().__init__(view, ggml_type, *a, **k)
            held[self.name] = (ggml_type, view.nbytes)

    fused = L.Loader.fused_ffn

    def spy_fused(self, prefix, suffix):
        fn = fused(self, prefix, suffix)
        for k in ("gate", "up", "down") if fn is not None else ():
            n = f"{prefix}ffn_{k}{suffix}.weight"
            held[n] = (self._info(n).ggml_type, self.g.view(n).nbytes)
        return fn

    monkeypatch.setattr(L, "QuantLinear", SpyLinear)
    monkeypatch.setattr(L.Loader, "fused_ffn", spy_fused)
    with hybrid.load(path, device="cpu", threads=2, ctx=128) as rt:
        toks = _tokens(rt.n_vocab)
        ours = rt.logits(toks)
        file_bytes = {n: rt.gguf.tensors[n].n_bytes for n in names}
        assert rt.loader.stats["torch_linears"] == 0
        assert not set(names) & set(rt.loader._tensor_bytes), "a float copy of a quantized linear"
    assert {n: held.get(n) for n in names} == {n: (int(qtype), file_bytes[n]) for n in names}
    ref = reference_logits(path, toks)
    kl_ours, kl_llama = mean_kl(ref, ours), mean_kl(ref, llama_cpp_logits(path, toks))
    print(f"{qtype.name}: {len(names)} linears, mean KL ours {kl_ours:.3e}, llama.cpp {kl_llama:.3e}")
    assert kl_ours <= 1.25 * kl_llama, f"{qtype.name}: mean KL ours {kl_ours:.3e}, llama.cpp {kl_llama:.3e}"


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_solver_counts_new_type_linears_at_file_bytes(linear_model, qtype):
    """The plan of a CPU run holds those linears at their file bytes, as the loader does
    (kv_b: float32 per-head copies)."""
    from placement import hardware
    from placement.inventory import from_gguf
    from placement.solver import Policy, Workload, solve

    path, names = linear_model(qtype)
    inv = from_gguf(path)
    plan = solve(inv, hardware.detect(), Workload(context=512), Policy(use_gpu=False))
    cpu = plan.devices["cpu"].breakdown
    assert plan.cpu_linear_min_bytes == 0
    for role in _LINEAR_ROLES:
        ts = [t for t in inv.tensors if t.role == role]
        want = sum(t.n_elements * 4 if t.group == "attention.kv_b" else t.n_bytes for t in ts)
        assert cpu[role] == want, role
    assert {t.ggml_type for t in inv.tensors if t.name in names} == {int(qtype)}
