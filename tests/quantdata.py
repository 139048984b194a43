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
    QT.IQ2_XS: [0],
    QT.IQ2_S: [0],
    QT.IQ3_XXS: [0],
    QT.IQ1_M: [],        # d is spread over the scales' top nibbles: _set_iq1_m_d
    QT.Q8_0: [0],
    QT.Q4_K: [0, 2],
    QT.Q5_K: [0, 2],
    QT.Q6_K: [208],
}

ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K,
             QT.Q4_1, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.IQ4_NL, QT.IQ4_XS,
             QT.IQ2_XXS, QT.IQ3_S, QT.IQ1_S, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ1_M]


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
    if qtype == QT.IQ1_M:
        _set_iq1_m_d(raw, rng.uniform(0.002, 0.05, size=(n, nb)).astype(np.float16))
    return raw.reshape(n, nb * size)


def scale_blocks(blocks, qtype, factor):
    """Multiply the weights of GGML blocks (uint8 [nb, block bytes], in place) by `factor`:
    every weight is linear in its block's fp16 scales (IQ1_M's d sits in the top nibbles of
    its 4 u16 scales)."""
    qtype = QT(qtype)
    if qtype == QT.IQ1_M:
        sc = blocks[:, 48:56].copy().view(np.uint16)                  # [nb, 4]
        dh = ((sc >> np.uint16(12)) << (4 * np.arange(4, dtype=np.uint16))).sum(-1, dtype=np.uint16)
        _set_iq1_m_d(blocks, (dh.view(np.float16).astype(np.float32) * factor).astype(np.float16))
        return
    for off in _FP16_FIELDS[qtype]:
        d = blocks[:, off:off + 2].copy().view(np.float16).astype(np.float32) * factor
        blocks[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _set_iq1_m_d(raw, d):
    """IQ1_M: the fp16 d's 4 nibbles go to the top nibbles of the 4 u16 scales (bytes 48-55)."""
    sc = raw[..., 48:56].copy().view(np.uint16)                       # [..., 4]
    dh = d.view(np.uint16)[..., None] >> (4 * np.arange(4, dtype=np.uint16))
    sc = (sc & np.uint16(0x0FFF)) | ((dh & np.uint16(0xF)) << np.uint16(12))
    raw[..., 48:56] = sc.astype(np.uint16).view(np.uint8)


# Lattice types: (grid entries, index fields per block) and how to write field k of a block.
def _set_iq2_xxs(blk, k, v):        # byte l of sub-block i's first word
    blk[2 + 8 * (k // 4) + k % 4] = v


def _set_iq3_s(blk, k, v):          # qs[k], bit k % 8 of qh[k // 8]
    blk[2 + k] = v & 0xFF
    blk[66 + k // 8] = (int(blk[66 + k // 8]) & ~(1 << (k % 8)) & 0xFF) | ((v >> 8) << (k % 8))


def _set_iq1_s(blk, k, v):          # qs[k], bits 3l..3l+2 of qh[k // 4]
    blk[2 + k] = v & 0xFF
    i, sh = k // 4, 3 * (k % 4)
    qh = int(blk[34 + 2 * i]) | int(blk[35 + 2 * i]) << 8
    qh = (qh & ~(7 << sh)) | ((v >> 8) << sh)
    blk[34 + 2 * i], blk[35 + 2 * i] = qh & 0xFF, qh >> 8


def _set_iq2_xs(blk, k, v):         # bits 0-8 of u16 qs[k]
    q = int(blk[2 + 2 * k]) | int(blk[3 + 2 * k]) << 8
    q = (q & ~511) | v
    blk[2 + 2 * k], blk[3 + 2 * k] = q & 0xFF, q >> 8


def _set_iq2_s(blk, k, v):          # qs[k], bits 2(k%4).. of qh[k // 4]
    blk[2 + k] = v & 0xFF
    sh = 2 * (k % 4)
    blk[66 + k // 4] = (int(blk[66 + k // 4]) & ~(3 << sh) & 0xFF) | ((v >> 8) << sh)


def _set_iq3_xxs(blk, k, v):        # qs[k]
    blk[2 + k] = v


def _set_iq1_m(blk, k, v):          # qs[k], bits 0-2 of nibble k % 2 of qh[k // 2]
    blk[k] = v & 0xFF
    sh = 4 * (k % 2)
    blk[32 + k // 2] = (int(blk[32 + k // 2]) & ~(7 << sh) & 0xFF) | ((v >> 8) << sh)


_GRID_FIELDS = {QT.IQ2_XXS: (256, 32, _set_iq2_xxs), QT.IQ3_S: (512, 64, _set_iq3_s),
                QT.IQ1_S: (2048, 32, _set_iq1_s), QT.IQ2_XS: (512, 32, _set_iq2_xs),
                QT.IQ2_S: (1024, 32, _set_iq2_s), QT.IQ3_XXS: (256, 64, _set_iq3_xxs),
                QT.IQ1_M: (2048, 32, _set_iq1_m)}
LATTICE_TYPES = list(_GRID_FIELDS)


def every_index_rows(qtype, rng):
    """Random valid blocks of a lattice type whose grid indices cover every grid entry once,
    in random order (so the high index bits differ within a block): uint8 [blocks, block
    bytes] (one 256-row per block)."""
    n_entries, per_block, put = _GRID_FIELDS[QT(qtype)]
    rows = random_rows(qtype, n_entries // per_block, 256, rng)
    order = rng.permutation(n_entries)
    for b in range(rows.shape[0]):
        for k in range(per_block):
            put(rows[b], k, int(order[b * per_block + k]))
    return rows
