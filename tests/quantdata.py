"""Random but valid GGML blocks for kernel tests (every bit pattern of the quants, sane scales)."""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

# Byte offsets of the fp16 scale fields inside one block, per type.
_FP16_FIELDS = {
    QT.Q4_0: [0],
    QT.Q4_1: [0, 2],
    QT.Q5_0: [0],
    QT.Q5_1: [0, 2],
    QT.Q2_K: [80, 82],
    QT.Q3_K: [108],
    QT.IQ4_NL: [0],
    QT.IQ4_XS: [0],
    QT.IQ2_XXS: [0],
    QT.IQ3_S: [0],
    QT.IQ1_S: [0],
    QT.Q8_0: [0],
    QT.Q4_K: [0, 2],
    QT.Q5_K: [0, 2],
    QT.Q6_K: [208],
}

ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K,
             QT.Q4_1, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.IQ4_NL, QT.IQ4_XS,
             QT.IQ2_XXS, QT.IQ3_S, QT.IQ1_S]


def row_bytes(qtype, k):
    block, size = GGML_QUANT_SIZES[qtype]
    assert k % block == 0, (qtype, k)
    return k // block * size


def random_rows(qtype, n, k, rng):
    """uint8 [n, row_bytes] holding n rows of k weights of type qtype."""
    qtype = QT(qtype)
    if qtype == QT.F32:
        return rng.standard_normal((n, k)).astype(np.float32).view(np.uint8)
    if qtype == QT.F16:
        return rng.standard_normal((n, k)).astype(np.float16).view(np.uint8)
    if qtype == QT.BF16:
        f = rng.standard_normal((n, k)).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, size = GGML_QUANT_SIZES[qtype]
    nb = k // block
    raw = rng.integers(0, 256, size=(n, nb, size), dtype=np.uint8)
    for off in _FP16_FIELDS[qtype]:
        d = rng.uniform(0.002, 0.05, size=(n, nb)).astype(np.float16)
        raw[:, :, off : off + 2] = d.view(np.uint8).reshape(n, nb, 2)
    return raw.reshape(n, nb * size)
