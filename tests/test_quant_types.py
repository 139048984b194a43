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
