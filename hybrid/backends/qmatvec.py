"""Quantized matrices times a few activation rows on the GPU, the GGUF blocks read in place (Triton).

    out[s, n] = sum_d W[e_s][n, d] * x[r_s, d]        for every slot s and row n

W: uint8 [E, N, row_bytes] (or [N, row_bytes]: E = 1) in one of FUSED_TYPES; e_s the slot's
matrix (-1: its output row is zero and its weights are not read); r_s its activation row.
A program decodes a [BLOCK_N x 256] tile of one slot's matrix in registers, one 32- or
16-weight sub-block per scale, and multiplies it with the 256 activations it covers: the
weights are read once, nothing is written back. The unfused way (hybrid.backends.gpu's
dequantize-then-matmul) writes a bf16 copy and f32 temporaries and reads them again, ~12
bytes per weight beside the blocks; it stays the way for many tokens per matrix, where
tensor cores pay for the copy.

Used for decode: hot experts kept in their GGUF blocks (hybrid.backends.gpu.QuantExperts, one
launch per matrix for all slots, the expert ids read on the device: capturable in a CUDA
graph) and quantized GPU weights (DequantLinear, E = 1).

Without CUDA, Triton's interpreter (TRITON_INTERPRET=1 in the environment before this module
is imported) runs the same kernels on CPU tensors: how tests/test_qmatvec.py checks them
against hybrid.backends.dequant and gguf-py here. Without Triton, available() is False and
the callers take the unfused path.

Shape legend: S slots, N rows of a matrix, D its input width, E matrices, R activation rows.
"""

from __future__ import annotations

import os

import torch

from hybrid.backends.dequant import Q4_K, Q5_K, Q6_K, Q8_0, row_bytes

try:
    import triton
    import triton.language as tl
except ImportError:     # CPU machines without Triton: the unfused path
    triton = None

__all__ = ["FUSED_TYPES", "available", "qmatvec"]

# The block formats with a fused kernel: the K-quant family a Q4_K_M / Q5_K_M / Q6_K / Q8_0
# model's experts and linears are made of (hot experts of other types stay bf16: the solver's
# hot_expert_format). Kept in sync with placement.solver.FUSED_GPU_TYPES (a test holds it).
FUSED_TYPES = frozenset({Q8_0, Q4_K, Q5_K, Q6_K})

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"

BLOCK_N = 32    # rows a program computes


def available(device) -> bool:
    """The fused kernels run on `device`: Triton on CUDA, or its interpreter on the CPU."""
    kind = torch.device(device).type
    return triton is not None and (kind == "cuda" or (INTERPRET and kind == "cpu"))


if triton is not None:

    @triton.jit
    def _f16(p, mask):
        """Little-endian f16 at byte pointers p -> float32."""
        lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _u8(p, mask):
        return tl.load(p, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _scale_min_k4(bp, m2):
        """Q4_K / Q5_K: the 8 six-bit scales and mins packed in 12 bytes at bp + 4 -> [BN, 8]."""
        sub = tl.arange(0, 8)
        a = _u8(bp[:, None] + 4 + sub[None, :], m2)                   # s[sub]
        b = _u8(bp[:, None] + 8 + (sub % 4)[None, :], m2)             # s[sub % 4 + 4]
        c = _u8(bp[:, None] + 4 + (sub % 4)[None, :], m2)             # s[sub % 4]
        e = _u8(bp[:, None] + 12 + (sub % 4)[None, :], m2)            # s[sub % 4 + 8]
        low = (sub < 4)[None, :]
        sc = tl.where(low, a & 63, (e & 15) | ((c >> 6) << 4))
        mn = tl.where(low, b & 63, (e >> 4) | ((a >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    @triton.jit
    def _qmv_kernel(w_ptr, x_ptr, out_ptr, eid_ptr, xrow_ptr, N, D, row_bytes, expert_stride,
                    x_stride, out_stride, QTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_IDS: tl.constexpr):
        s = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)      # [BN]
        if HAS_IDS:
            e = tl.load(eid_ptr + s)
            xrow = tl.load(xrow_ptr + s).to(tl.int64)
        else:                                    # one matrix, slot s reads row s
            e = s * 0
            xrow = s.to(tl.int64)
        rmask = rows < tl.where(e >= 0, N, 0)    # a slot without a matrix reads nothing
        base = w_ptr + tl.maximum(e, 0).to(tl.int64) * expert_stride + rows.to(tl.int64) * row_bytes
        xbase = x_ptr + xrow * x_stride
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        m2 = rmask[:, None]
        m3 = rmask[:, None, None]
        n_super = tl.cdiv(D, 256)
        for kb in range(0, n_super):
            if QTYPE == 8:      # Q8_0: 8 blocks of 32 per 256 weights, 34 B each (f16 d, 32 x int8)
                sub = tl.arange(0, 8)
                l32 = tl.arange(0, 32)
                blk = kb * 8 + sub                                    # [8]
                bvalid = blk * 32 < D
                bp = base[:, None] + blk[None, :].to(tl.int64) * 34   # [BN, 8]
                bm = m2 & bvalid[None, :]
                d = _f16(bp, bm)
                q = tl.load(bp[:, :, None] + 2 + l32[None, None, :], mask=bm[:, :, None], other=0)
                q = q.to(tl.int8, bitcast=True).to(tl.float32)        # [BN, 8, 32]
                xv = tl.load(xbase + kb * 256 + sub[:, None] * 32 + l32[None, :],
                             mask=bvalid[:, None], other=0).to(tl.float32)   # [8, 32]
                acc += tl.sum(d * tl.sum(q * xv[None, :, :], axis=2), axis=1)
            elif QTYPE == 12 or QTYPE == 13:
                # Q4_K (144 B): f16 d, f16 dmin, 12 B scales/mins, 128 B nibbles;
                # Q5_K (176 B): the same with 32 B of fifth bits before the nibbles.
                # Weight j of sub-block sub: nibble (sub % 2) of byte (sub // 2) * 32 + j.
                sub = tl.arange(0, 8)
                l32 = tl.arange(0, 32)
                if QTYPE == 12:
                    bp = base + kb * 144
                    qs_off = 16
                else:
                    bp = base + kb * 176
                    qs_off = 48
                d = _f16(bp, rmask)
                dmin = _f16(bp + 2, rmask)
                sc, mn = _scale_min_k4(bp, m2)
                byte = (sub // 2)[:, None] * 32 + l32[None, :]              # [8, 32]
                shift = ((sub % 2) * 4)[:, None]
                q = (_u8(bp[:, None, None] + qs_off + byte[None, :, :], m3) >> shift[None, :, :]) & 15
                if QTYPE == 13:
                    hb = _u8(bp[:, None, None] + 16 + l32[None, None, :], m3)
                    q = q | (((hb >> sub[None, :, None]) & 1) << 4)
                xv = tl.load(xbase + kb * 256 + sub[:, None] * 32 + l32[None, :]).to(tl.float32)
                qx = tl.sum(q.to(tl.float32) * xv[None, :, :], axis=2)     # [BN, 8]
                xs = tl.sum(xv, axis=1)                                     # [8]
                acc += tl.sum(d[:, None] * sc * qx - dmin[:, None] * mn * xs[None, :], axis=1)
            else:
                # Q6_K (210 B): 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales, f16 d.
                # Weight j (half h = j // 128, w = j % 128): low nibble (w // 64) of byte
                # h * 64 + w % 64, high bits (w // 32) * 2 of byte 128 + h * 32 + j % 32.
                g = tl.arange(0, 16)
                l16 = tl.arange(0, 16)
                bp = base + kb * 210
                j = g[:, None] * 16 + l16[None, :]                          # [16, 16]
                h = j // 128
                w = j % 128
                lo = (_u8(bp[:, None, None] + (h * 64 + w % 64)[None, :, :], m3)
                      >> ((w // 64) * 4)[None, :, :]) & 15
                hi = (_u8(bp[:, None, None] + (128 + h * 32 + j % 32)[None, :, :], m3)
                      >> ((w // 32) * 2)[None, :, :]) & 3
                q = ((lo | (hi << 4)) - 32).to(tl.float32)                  # [BN, 16, 16]
                sc = tl.load(bp[:, None] + 192 + g[None, :], mask=m2, other=0)
                sc = sc.to(tl.int8, bitcast=True).to(tl.float32)            # [BN, 16]
                d = _f16(bp + 208, rmask)
                xv = tl.load(xbase + kb * 256 + j).to(tl.float32)          # [16, 16]
                acc += d * tl.sum(sc * tl.sum(q * xv[None, :, :], axis=2), axis=1)
        tl.store(out_ptr + s.to(tl.int64) * out_stride + rows, acc, mask=rows < N)


def qmatvec(w: torch.Tensor, ggml_type: int, in_features: int, x: torch.Tensor,
            eids: torch.Tensor | None = None, xrows: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """out[s] = W[eids[s]] @ x[xrows[s]] (float32 [S, N]).

    w: uint8 [E, N, row_bytes] or [N, row_bytes]; x: [R, in_features] (any float dtype);
    eids: int32/int64 [S] matrix per slot, < 0 for a zero row; xrows: [S] row of x per slot
    (both or neither; neither: slot s is row s of x times matrix 0). No host sync, no
    allocation but `out` when not given: capturable in a CUDA graph."""
    if not available(w.device):
        raise RuntimeError("qmatvec: no Triton for this device (check qmatvec.available first)")
    if ggml_type not in FUSED_TYPES:
        raise ValueError(f"qmatvec: GGML type {ggml_type} has no fused kernel")
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    E, N, rb = w3.shape
    if rb != row_bytes(ggml_type, in_features) or in_features % (32 if ggml_type == Q8_0 else 256):
        raise ValueError(f"qmatvec: rows of {rb} B do not hold {in_features} weights of type {ggml_type}")
    if not w3.is_contiguous():
        raise ValueError("qmatvec: the blocks must be contiguous")
    x = x.contiguous()   # (Q8_0 rows need not be whole 256s: the kernel masks the last blocks)
    if (eids is None) != (xrows is None):
        raise ValueError("qmatvec: eids and xrows go together")
    S = x.shape[0] if eids is None else eids.shape[0]
    if out is None:
        out = torch.empty(S, N, dtype=torch.float32, device=x.device)
    if S == 0:
        return out
    grid = (S, triton.cdiv(N, BLOCK_N))
    has_ids = eids is not None
    if has_ids:
        eids, xrows = eids.contiguous(), xrows.contiguous()
    else:   # no index tensors to make (none allocated inside a captured graph)
        eids = xrows = x
    _qmv_kernel[grid](w3, x, out, eids, xrows, N, in_features, rb, N * rb, x.stride(0),
                      out.stride(0), QTYPE=ggml_type, BLOCK_N=BLOCK_N, HAS_IDS=has_ids)
    return out
