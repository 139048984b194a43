"""Torch dequantization of GGML blocks: GGUF bytes -> float tensors on any device.

Used for every weight that is not a routed expert: on a GPU the bytes are copied to the
device and decoded there (much less transfer than float weights); on the CPU they feed the
float reference and the small torch linears. Results match `gguf.quants.dequantize`
bit for bit: the arithmetic is done in float32 in the same order.

Block layouts (ggml-common.h; f16 = IEEE half, little endian; QK_K = 256):

    Q4_0   18 B / 32:  f16 d; u8 qs[16]            w = d * (nibble - 8); low nibbles are
                                                    elements 0..15, high nibbles 16..31
    Q4_1   20 B / 32:  f16 d; f16 m; u8 qs[16]     w = d * nibble + m
    Q5_0   22 B / 32:  f16 d; u8 qh[4]; u8 qs[16]  5th bit j of element j in qh (LE u32);
                                                    w = d * (q - 16)
    Q5_1   24 B / 32:  f16 d; f16 m; u8 qh[4]; u8 qs[16]   w = d * q + m
    Q8_0   34 B / 32:  f16 d; i8 qs[32]            w = d * q
    Q2_K   84 B / 256: u8 scales[16] (lo 4 bits scale, hi 4 bits min); u8 qs[64];
                       f16 d; f16 dmin             16 sub-blocks of 16; 2-bit q in 4 planes
                                                    of 32 per 32 bytes; w = d*sc*q - dmin*m
    Q3_K  110 B / 256: u8 hmask[32]; u8 qs[64]; u8 scales[12] (6-bit, signed - 32); f16 d
                       q = (2 low bits) - (4 if the hmask bit is clear)
    Q4_K  144 B / 256: f16 d; f16 dmin; u8 scales[12] (8 x 6-bit scale, 8 x 6-bit min);
                       u8 qs[128]: 4 chunks of 32 bytes, low nibbles = sub-block 2c,
                       high nibbles = 2c+1; w = d*sc*q - dmin*m
    Q5_K  176 B / 256: f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]
                       bit s of qh[i] is the 5th bit of element i of sub-block s
    Q6_K  210 B / 256: u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d
                       16 sub-blocks of 16; q = (4 low | 2 high << 4) - 32; w = d*sc*q
    IQ4_NL  18 B / 32: f16 d; u8 qs[16]            w = d * IQ4_NL_VALUES[nibble]; nibbles
                                                    as in Q4_0
    IQ4_XS 136 B / 256: f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]
                       8 sub-blocks of 32; scale i = (nibble i of scales_l | 2 bits i of
                       scales_h << 4) - 32; sub-block i: qs[16i..], low nibbles then high;
                       w = d * scale * IQ4_NL_VALUES[nibble]
    IQ2_XXS 66 B / 256: f16 d; 8 x (u32 4 grid indices; u32 4 x 7-bit sign indices, scale
                       in bits 28-31); w = d * (0.5 + scale) / 4 * grid[8 values] * sign
    IQ3_S 110 B / 256: f16 d; u8 qs[64]; u8 qh[8]; u8 signs[32]; u8 scales[4]: group k of
                       sub-block i indexes grid[qs[8i+k] | bit k of qh[i] << 8] (4 values);
                       w = d * (1 + 2 * scale) * grid * sign
    IQ1_S  50 B / 256: f16 d; u8 qs[32]; u16 qh[8]: group l of sub-block i indexes
                       grid[qs[4i+l] | bits 3l..3l+2 of qh[i] << 8] (8 values of -1/0/1);
                       w = d * (2 * scale + 1) * (grid + delta), delta = -+1/8 by bit 15
    IQ2_XS 74 B / 256: f16 d; u16 qs[32] (9-bit grid index, 7-bit sign index); u8 scales[8]
                       (a nibble per 16 values); w = d * (0.5 + scale) / 4 * grid * sign
    IQ2_S  82 B / 256: f16 d; u8 qs[32] + u8 signs[32]; u8 qh[8] (2 index bits per group);
                       u8 scales[8]; as IQ2_XS with a 10-bit index and plain sign bits
    IQ3_XXS 98 B / 256: f16 d; u8 qs[64] (grid of 4 values); 8 x u32 (4 sign indices, scale
                       in bits 28-31); w = d * (0.5 + scale) / 2 * grid * sign
    IQ1_M  56 B / 256: u8 qs[32]; u8 qh[16] (a nibble per group: 3 index bits, delta sign);
                       u16 scales[4]: 3-bit scales per 16 values, d = their top nibbles;
                       w = d * (2 * scale + 1) * (grid + delta)
    (the lattice grids are ggml's, as gguf-py publishes them: _grid())
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

QK_K = 256

# GGML type ids (ggml.h enum ggml_type); only the ones handled here.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 10, 11, 12, 13, 14, 30
IQ4_NL, IQ4_XS = 20, 23
IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ3_S, IQ2_S, IQ1_M = 16, 17, 18, 19, 21, 22, 29

# IQ4_NL / IQ4_XS's non-linear 4-bit code: ggml's kvalues_iq4nl (as gguf-py publishes it)
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

TYPE_NAMES = {
    F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0",
    Q5_1: "Q5_1", Q8_0: "Q8_0", Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K",
    Q6_K: "Q6_K", IQ4_NL: "IQ4_NL", IQ4_XS: "IQ4_XS", IQ2_XXS: "IQ2_XXS", IQ3_S: "IQ3_S",
    IQ1_S: "IQ1_S", IQ2_XS: "IQ2_XS", IQ2_S: "IQ2_S", IQ3_XXS: "IQ3_XXS", IQ1_M: "IQ1_M",
}

# ggml_type -> (elements per block, bytes per block)
BLOCK = {
    F32: (1, 4), F16: (1, 2), BF16: (1, 2),
    Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34),
    Q2_K: (256, 84), Q3_K: (256, 110), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210),
    IQ4_NL: (32, 18), IQ4_XS: (256, 136), IQ2_XXS: (256, 66), IQ3_S: (256, 110), IQ1_S: (256, 50),
    IQ2_XS: (256, 74), IQ2_S: (256, 82), IQ3_XXS: (256, 98), IQ1_M: (256, 56),
}


class DequantError(ValueError):
    """A tensor cannot be dequantized (unsupported type or inconsistent size)."""


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


_SHIFTS: dict = {}


def _shifts(values, device) -> torch.Tensor:
    """A small constant tensor, made once per device: building it per call would copy from
    the host each time (a sync on CUDA that also breaks graph capture)."""
    values = tuple(values)
    key = (values, str(torch.device(device)))
    t = _SHIFTS.get(key)
    if t is None:
        t = _SHIFTS[key] = torch.tensor(values, dtype=torch.uint8, device=device)
    return t


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, c, 32] bytes -> [n, c, 2, 32]: low nibbles first, then high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _deq_f32(b):
    return b.contiguous().view(torch.float32)


def _deq_f16(b):
    return b.contiguous().view(torch.float16).float()


def _deq_bf16(b):
    return b.contiguous().view(torch.bfloat16).float()


def _deq_q4_0(b):
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 2:18]).reshape(-1, 32).to(torch.int8) - 8
    return d * q.float()


def _deq_q4_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:20]).reshape(-1, 32).float()
    return d * q + m


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian u32 -> [n, 32] bits (bit j = element j)."""
    sh = _shifts(range(8), qh.device)
    return ((qh.unsqueeze(-1) >> sh) & 1).reshape(-1, 32)


def _deq_q5_0(b):
    d = _f16(b[:, 0:2])
    ql = _nibbles(b[:, 6:22]).reshape(-1, 32)
    q = (ql | (_bits32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def _deq_q5_1(b):
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    ql = _nibbles(b[:, 8:24]).reshape(-1, 32)
    q = (ql | (_bits32(b[:, 4:8]) << 4)).float()
    return d * q + m


def _deq_q8_0(b):
    d = _f16(b[:, 0:2])
    q = b[:, 2:34].contiguous().view(torch.int8).float()
    return q * d


def _deq_q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    sh = _shifts([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> sh) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q3_k(b):
    n = b.shape[0]
    hmask, qs, sc, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lo = (sc[:, 0:8].reshape(n, 1, 8) >> _shifts([0, 4], b.device).reshape(1, 2, 1)).reshape(n, 16)
    hi = (sc[:, 8:12].reshape(n, 1, 4) >> _shifts([0, 2, 4, 6], b.device).reshape(1, 4, 1))
    hi = hi.reshape(n, 16)
    scales = ((lo & 0x0F) | ((hi & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * scales.float()).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1))
    ql = (ql.reshape(n, 16, 16) & 3).to(torch.int8)
    qh = (hmask.reshape(n, 1, 1, 32) >> _shifts(range(8), b.device).reshape(1, 1, 8, 1))
    qh = ((qh.reshape(n, 16, 16) & 1) ^ 1).to(torch.int8)
    q = (ql - (qh << 2)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor):
    """[n, 12] packed 6-bit scales/mins of Q4_K / Q5_K -> two [n, 8] uint8."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _deq_q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = (b[:, 16:48].reshape(n, 1, 32) >> _shifts(range(8), b.device).reshape(1, 8, 1)) & 1
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    dl = (d * scales).reshape(n, 16, 1)
    lo = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    hi = (qh.reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1)) & 3
    q = (lo | (hi.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


_TABLES: dict = {}


def _table(values, device) -> torch.Tensor:
    """A constant float32 lookup table, made once per device (see _shifts)."""
    key = (values, str(torch.device(device)))
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return t


def _deq_iq4_nl(b):
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 2:18]).reshape(-1, 32).long()
    return d * _table(IQ4_NL_VALUES, b.device)[q]


def _deq_iq4_xs(b):
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    sh = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32).reshape(n, 1)       # [n, 1]
    lo = (b[:, 4:8].reshape(n, 4, 1) >> _shifts([0, 4], b.device).reshape(1, 1, 2)).reshape(n, 8) & 0x0F
    hi = (sh >> (2 * torch.arange(8, device=b.device, dtype=torch.int32)).reshape(1, 8)) & 3
    scales = (lo.to(torch.int32) | (hi << 4)) - 32
    dl = (d * scales.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 8:136].reshape(n, 8, 16)).reshape(n, 8, 32).long()
    return (dl * _table(IQ4_NL_VALUES, b.device)[q]).reshape(n, QK_K)


def _grid(ggml_type: int, device) -> torch.Tensor:
    """float32 [entries, values] lattice grid of an IQ type: ggml's, decoded from the tables
    gguf-py publishes; made once per device."""
    key = ("grid", ggml_type, str(torch.device(device)))
    t = _TABLES.get(key)
    if t is None:
        from gguf import GGMLQuantizationType, quants

        cls = getattr(quants, GGMLQuantizationType(ggml_type).name)
        cls.init_grid()
        g = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
        t = _TABLES[key] = torch.from_numpy(g.copy()).to(device)
    return t


def _ksign_bits(device) -> torch.Tensor:
    """[128, 8] float32 +1 / -1: ggml's ksigns (7 stored sign bits, the 8th making the count
    of negative values even), one row per 7-bit index."""
    key = ("ksigns", str(torch.device(device)))
    t = _TABLES.get(key)
    if t is None:
        i = np.arange(128)
        parity = np.array([bin(v).count("1") & 1 for v in i])
        s = i | (parity << 7)
        bits = (s[:, None] >> np.arange(8)[None, :]) & 1
        t = _TABLES[key] = torch.from_numpy(np.where(bits == 1, -1.0, 1.0).astype(np.float32)).to(device)
    return t


def _bit_signs(b: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, k * 8] float32 +1 / -1 (bit j of byte i: element 8i + j negative)."""
    bits = (b.unsqueeze(-1) >> _shifts(range(8), b.device)) & 1
    return (1 - 2 * bits.to(torch.int8)).float().reshape(b.shape[0], -1)


def _deq_iq2_xxs(b):
    n = b.shape[0]
    d = _f16(b[:, 0:2]).reshape(n, 1, 1, 1)
    words = b[:, 2:66].reshape(n, 8, 8)
    idx = words[:, :, 0:4].long()                                             # [n, 8, 4]
    w1 = words[:, :, 4:8].contiguous().view(torch.int32).reshape(n, 8, 1)     # signs + scale
    scale = ((w1 >> 28) & 15).float().reshape(n, 8, 1, 1)
    sidx = ((w1 >> (7 * torch.arange(4, device=b.device, dtype=torch.int32))) & 127).long()
    db = d * (0.5 + scale) * 0.25
    grid = _grid(IQ2_XXS, b.device)[idx]                                      # [n, 8, 4, 8]
    return (db * grid * _ksign_bits(b.device)[sidx]).reshape(n, QK_K)


def _deq_iq3_s(b):
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    qs, qh, signs, sc = b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
    scales = (sc.reshape(n, 4, 1) >> _shifts([0, 4], b.device).reshape(1, 1, 2)).reshape(n, 8) & 0x0F
    db = (d * (1 + 2 * scales.to(torch.int32)).float()).reshape(n, 8, 1)
    hi = ((qh.unsqueeze(-1) >> _shifts(range(8), b.device)) & 1).reshape(n, 64).long()
    idx = qs.long() | (hi << 8)
    grid = _grid(IQ3_S, b.device)[idx].reshape(n, 8, 32)
    return (db * grid * _bit_signs(signs).reshape(n, 8, 32)).reshape(n, QK_K)


def _deq_iq1_s(b):
    n = b.shape[0]
    d = _f16(b[:, 0:2])
    qs = b[:, 2:34].reshape(n, 8, 4).long()
    qh = b[:, 34:50].contiguous().view(torch.int16).to(torch.int32).reshape(n, 8) & 0xFFFF
    dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, 0.125, -0.125).float().reshape(n, 8, 1, 1)
    hi = (qh.unsqueeze(-1) >> (3 * torch.arange(4, device=b.device, dtype=torch.int32))) & 7
    grid = _grid(IQ1_S, b.device)[qs | (hi.long() << 8)]                      # [n, 8, 4, 8]
    return (dl * (grid + delta)).reshape(n, QK_K)


def _nibble_scales(sc: torch.Tensor) -> torch.Tensor:
    """[n, 8] bytes -> [n, 16] float32 scale nibbles, low nibble first."""
    n = sc.shape[0]
    return ((sc.reshape(n, 8, 1) >> _shifts([0, 4], sc.device).reshape(1, 1, 2)) & 0x0F).reshape(n, 16).float()


def _deq_iq2_xs(b):
    n = b.shape[0]
    d = _f16(b[:, 0:2]).reshape(n, 1, 1)
    qs = b[:, 2:66].contiguous().view(torch.int16).to(torch.int32).reshape(n, 32) & 0xFFFF
    db = (d * (0.5 + _nibble_scales(b[:, 66:74]).reshape(n, 16, 1)) * 0.25).reshape(n, 16, 1, 1)
    grid = _grid(IQ2_XS, b.device)[(qs & 511).long()].reshape(n, 16, 2, 8)
    signs = _ksign_bits(b.device)[(qs >> 9).long()].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _deq_iq2_s(b):
    n = b.shape[0]
    d = _f16(b[:, 0:2]).reshape(n, 1, 1)
    qs, signs, qh = b[:, 2:34], b[:, 34:66], b[:, 66:74]
    db = (d * (0.5 + _nibble_scales(b[:, 74:82]).reshape(n, 16, 1)) * 0.25).reshape(n, 16, 1, 1)
    hi = ((qh.reshape(n, 8, 1) >> _shifts([0, 2, 4, 6], b.device).reshape(1, 1, 4)) & 3).reshape(n, 32)
    grid = _grid(IQ2_S, b.device)[qs.long() | (hi.long() << 8)].reshape(n, 16, 2, 8)
    return (db * grid * _bit_signs(signs).reshape(n, 16, 2, 8)).reshape(n, QK_K)


def _deq_iq3_xxs(b):
    n = b.shape[0]
    d = _f16(b[:, 0:2]).reshape(n, 1, 1, 1)
    qs = b[:, 2:66]
    aux = b[:, 66:98].contiguous().view(torch.int32).reshape(n, 8, 1)
    db = d * (0.5 + ((aux >> 28) & 15).float().reshape(n, 8, 1, 1)) * 0.5
    sidx = ((aux >> (7 * torch.arange(4, device=b.device, dtype=torch.int32))) & 127).long()
    grid = _grid(IQ3_XXS, b.device)[qs.long()].reshape(n, 8, 4, 8)
    return (db * grid * _ksign_bits(b.device)[sidx]).reshape(n, QK_K)


def _deq_iq1_m(b):
    n = b.shape[0]
    qs, qh = b[:, 0:32].reshape(n, 8, 4).long(), b[:, 32:48]
    sc = b[:, 48:56].contiguous().view(torch.int16).to(torch.int32).reshape(n, 4) & 0xFFFF
    dbits = ((sc >> 12) & 0xF) << (4 * torch.arange(4, device=b.device, dtype=torch.int32))
    d = dbits.sum(-1).to(torch.int16).view(torch.float16).float().reshape(n, 1)  # < 2^16: fits
    s = (sc.reshape(n, 4, 1) >> (3 * torch.arange(4, device=b.device, dtype=torch.int32)).reshape(1, 1, 4)) & 7
    dl = (d * (2 * s.reshape(n, 16) + 1).float()).reshape(n, 8, 2, 1, 1)
    nib = ((qh.reshape(n, 16, 1) >> _shifts([0, 4], b.device).reshape(1, 1, 2)) & 0x0F).reshape(n, 8, 4)
    delta = torch.where((nib & 8) == 0, 0.125, -0.125).float().reshape(n, 8, 2, 2, 1)
    grid = _grid(IQ1_S, b.device)[qs | ((nib & 7).long() << 8)].reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


# Dispatch table indexed by GGML type: [n_blocks, block_bytes] uint8 -> [n_blocks, block] f32.
_DEQUANT = {
    F32: _deq_f32, F16: _deq_f16, BF16: _deq_bf16,
    Q4_0: _deq_q4_0, Q4_1: _deq_q4_1, Q5_0: _deq_q5_0, Q5_1: _deq_q5_1, Q8_0: _deq_q8_0,
    Q2_K: _deq_q2_k, Q3_K: _deq_q3_k, Q4_K: _deq_q4_k, Q5_K: _deq_q5_k, Q6_K: _deq_q6_k,
    IQ4_NL: _deq_iq4_nl, IQ4_XS: _deq_iq4_xs, IQ2_XXS: _deq_iq2_xxs, IQ3_S: _deq_iq3_s,
    IQ1_S: _deq_iq1_s, IQ2_XS: _deq_iq2_xs, IQ2_S: _deq_iq2_s, IQ3_XXS: _deq_iq3_xxs,
    IQ1_M: _deq_iq1_m,
}

SUPPORTED_TYPES = frozenset(_DEQUANT)


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy uint8 tensor over a (possibly read-only mmap) array; only ever read."""
    a = np.ascontiguousarray(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we never write
        return torch.from_numpy(a)


def type_name(ggml_type: int) -> str:
    return TYPE_NAMES.get(ggml_type, f"type {ggml_type}")


def row_bytes(ggml_type: int, n_per_row: int) -> int:
    blk, nb = BLOCK[ggml_type]
    return n_per_row // blk * nb


def dequantize(data, ggml_type: int, n_per_row: int | None = None, *,
               dtype: torch.dtype = torch.float32, device=None,
               chunk_elements: int = 1 << 24, name: str = "tensor") -> torch.Tensor:
    """Decode GGML bytes into a [n_rows, n_per_row] tensor of `dtype` on `device`.

    data: uint8 numpy array or torch tensor; 2-D [n_rows, row_bytes] (a GGUFFile view) or
    1-D (then n_per_row gives the row length; default: one row). The bytes are moved to
    `device` and decoded there in chunks of about `chunk_elements` so that a large tensor
    never needs a full float32 copy on top of the `dtype` result.
    """
    fn = _DEQUANT.get(ggml_type)
    if fn is None:
        raise DequantError(
            f"{name}: GGML {type_name(ggml_type)} is not supported by hybrid.backends.dequant "
            f"(supported: {', '.join(TYPE_NAMES[t] for t in sorted(SUPPORTED_TYPES))}); "
            f"re-quantize the model with one of these types")
    blk, nb = BLOCK[ggml_type]
    t = _as_tensor(data) if isinstance(data, np.ndarray) else data
    if t.dtype != torch.uint8:
        raise DequantError(f"{name}: expected uint8 bytes, got {t.dtype}")
    if t.dim() == 2 and n_per_row is None:
        if t.shape[1] % nb:
            raise DequantError(f"{name}: row of {t.shape[1]} bytes is not a whole number of "
                               f"{type_name(ggml_type)} blocks ({nb} B)")
        n_per_row = t.shape[1] // nb * blk
    t = t.reshape(-1)
    if n_per_row is None:
        n_per_row = t.numel() // nb * blk
    if n_per_row % blk or t.numel() % row_bytes(ggml_type, n_per_row):
        raise DequantError(f"{name}: {t.numel()} bytes do not hold whole rows of {n_per_row} "
                           f"{type_name(ggml_type)} elements")
    n_rows = t.numel() // row_bytes(ggml_type, n_per_row)
    dev = torch.device(device) if device is not None else t.device
    out = torch.empty(n_rows, n_per_row, dtype=dtype, device=dev)
    blocks = t.reshape(-1, nb)
    n_blocks = blocks.shape[0]
    per_chunk = max(1, chunk_elements // blk)
    flat = out.view(-1, blk)
    for b0 in range(0, n_blocks, per_chunk):
        b = blocks[b0:b0 + per_chunk].to(dev, non_blocking=True)
        flat[b0:b0 + b.shape[0]] = fn(b)
    return out
