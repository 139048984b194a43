"""hybrid.backends.dequant vs gguf.quants.dequantize (numpy reference): bit-exact, every type."""

import gguf
import numpy as np
import pytest
import torch

from hybrid.backends import dequant as dq
from hybrid.gguf_file import GGUFFile

ALL_TYPES = sorted(dq.SUPPORTED_TYPES)


def _ref(raw, ggml_type):
    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(ggml_type))
    return np.asarray(out, dtype=np.float32).reshape(raw.shape[0], -1)


def _random_blocks(ggml_type, n_rows=5, blocks_per_row=3, seed=0):
    """Random bytes with every f16 scale field forced finite and moderate, so the values
    are ordinary numbers (random bytes would make many infs/NaNs)."""
    blk, nb = dq.BLOCK[ggml_type]
    rng = np.random.default_rng(seed + ggml_type)
    raw = rng.integers(0, 256, size=(n_rows, blocks_per_row, nb), dtype=np.uint8)
    if ggml_type in (dq.F16, dq.BF16, dq.F32):
        vals = rng.standard_normal((n_rows, blocks_per_row * blk)).astype(np.float32)
        conv = {dq.F32: np.float32, dq.F16: np.float16}.get(ggml_type)
        if conv is not None:
            return np.ascontiguousarray(vals.astype(conv).view(np.uint8))
        return np.ascontiguousarray((vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
    # byte offsets of f16 fields per block layout
    f16_at = {dq.Q4_0: [0], dq.Q4_1: [0, 2], dq.Q5_0: [0], dq.Q5_1: [0, 2], dq.Q8_0: [0],
              dq.Q2_K: [80, 82], dq.Q3_K: [108], dq.Q4_K: [0, 2], dq.Q5_K: [0, 2], dq.Q6_K: [208],
              dq.IQ4_NL: [0], dq.IQ4_XS: [0], dq.IQ2_XXS: [0], dq.IQ3_S: [0], dq.IQ1_S: [0],
              dq.IQ2_XS: [0], dq.IQ2_S: [0], dq.IQ3_XXS: [0], dq.IQ1_M: []}
    for off in f16_at[ggml_type]:
        d = (rng.standard_normal((n_rows, blocks_per_row)) * 0.01).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(n_rows, blocks_per_row, 2)
    if ggml_type == dq.IQ1_M:   # d lives in the top nibbles of the scales
        from quantdata import _set_iq1_m_d

        _set_iq1_m_d(raw, (rng.standard_normal((n_rows, blocks_per_row)) * 0.01).astype(np.float16))
    return raw.reshape(n_rows, -1)


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=[dq.type_name(t) for t in ALL_TYPES])
def test_random_blocks_bit_exact(ggml_type):
    raw = _random_blocks(ggml_type)
    ours = dq.dequantize(raw, ggml_type).numpy()
    ref = _ref(raw, ggml_type)
    assert ours.shape == ref.shape
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.isfinite(ours).all() and np.abs(ours).max() > 0


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=[dq.type_name(t) for t in ALL_TYPES])
def test_garbage_bytes_match_including_nan_and_inf(ggml_type):
    blk, nb = dq.BLOCK[ggml_type]
    raw = np.random.default_rng(7).integers(0, 256, size=(4, 2 * nb), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ref = _ref(raw, ggml_type)
    assert np.array_equal(dq.dequantize(raw, ggml_type).numpy(), ref, equal_nan=True)


def test_chunking_and_bf16_output():
    raw = _random_blocks(dq.Q4_K, n_rows=9, blocks_per_row=2)
    full = dq.dequantize(raw, dq.Q4_K)
    assert torch.equal(dq.dequantize(raw, dq.Q4_K, chunk_elements=300), full)
    bf = dq.dequantize(raw, dq.Q4_K, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, full.to(torch.bfloat16))


def test_one_dimensional_input_with_row_length():
    raw = _random_blocks(dq.Q8_0, n_rows=4, blocks_per_row=2)
    out = dq.dequantize(raw.reshape(-1), dq.Q8_0, 32)
    assert out.shape == (8, 32)
    assert torch.equal(out.reshape(4, 64), dq.dequantize(raw, dq.Q8_0))


def test_unsupported_type_names_tensor_and_types():
    with pytest.raises(dq.DequantError, match=r"blk\.0\.x.*not supported.*Q4_K"):
        dq.dequantize(np.zeros((1, 54), np.uint8), 34, name="blk.0.x")  # 34 = TQ1_0


def test_ragged_bytes_are_refused():
    with pytest.raises(ValueError, match="whole"):
        dq.dequantize(np.zeros((2, 143), np.uint8), dq.Q4_K, name="w")


# llama.cpp-quantized fixtures: every tensor of each file, all types the quantizer chose
FTYPES = ["Q4_K_M", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q5_K_M", "Q6_K", "Q2_K", "Q3_K_M",
          "IQ4_NL", "IQ4_XS", "F16", "BF16"]


@pytest.mark.parametrize("ftype", FTYPES)
def test_llama_cpp_quantized_tensors_bit_exact(tiny_gguf, ftype):
    path = tiny_gguf(ftype, n_layer=2, n_expert=8, n_group=2, n_group_used=1)
    seen = set()
    with GGUFFile(path) as g:
        for name, info in g.tensors.items():
            if info.ggml_type not in dq.SUPPORTED_TYPES:
                pytest.fail(f"{name}: llama.cpp chose {info.type_name}, not handled by dequant")
            v = np.asarray(g.view(name))
            ours = dq.dequantize(v, info.ggml_type, name=name).numpy()
            ref = _ref(v, info.ggml_type)
            assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), name
            seen.add(info.type_name)
    assert seen - {"F32"}, f"{ftype}: no quantized tensors in the file"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=[dq.type_name(t) for t in ALL_TYPES])
def test_cuda_matches_cpu(ggml_type):
    raw = _random_blocks(ggml_type, n_rows=64, blocks_per_row=4)
    cpu = dq.dequantize(raw, ggml_type)
    gpu = dq.dequantize(raw, ggml_type, device="cuda").cpu()
    # the GPU may contract a*b-c into one FMA: allow 1 ulp
    np.testing.assert_array_max_ulp(gpu.numpy(), cpu.numpy(), maxulp=1)
    bf = dq.dequantize(raw, ggml_type, device="cuda", dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and bf.device.type == "cuda"
