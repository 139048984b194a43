"""Building blocks every architecture shares: the loader protocol, RMSNorm, RoPE (normal and
NEOX pair layouts, partial, llama.cpp's YaRN), per-head linears and the SwiGLU FFN.

Model files build from these and never mention devices: weights come from a loader
(WeightLoader) that applies the placement Plan and may hand back a native equivalent of any
block (same attributes, same arithmetic).

Shape legend: T tokens in this call, D model dim, H heads, R rope dims, F FFN dim.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

__all__ = ["FFN", "HeadLinear", "ModelConfigError", "QUERY_BLOCK", "RMSNorm", "Rope", "WeightLoader",
           "attend", "causal_mask", "norm", "query_blocks"]


from hybrid.models.specs import ModelConfigError  # noqa: E402 (torch-free, re-exported)


class WeightLoader(Protocol):
    """What a model needs from the runtime's loader (which applies the Plan)."""

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...  # numpy order

    def tensor(self, name: str) -> torch.Tensor: ...  # float32 on the compute device

    def linear(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]: ...  # [T,in]->[T,out]

    def embedding(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]: ...  # ids->[T,D]

    def experts(self, layer: int) -> Callable: ...  # experts(x[T,D], ids[T,K], w[T,K]) -> [T,D]

    # optional, each returning a faster equivalent or None: norm(name, eps),
    # head_linear(source name, W [H, in, out]), expert_select(router spec, bias),
    # fused_ffn(prefix, suffix), fused_attention(attention block), causal_attention() (a
    # callable for long prompt chunks: see the models' use)
    # optional attribute: attn_query_block (the Plan's queries per attention step)


class RMSNorm:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim. The loader may give a faster
    equivalent with the same `weight` attribute."""

    def __init__(self, weight: torch.Tensor, eps: float):
        self.weight, self.eps = weight, eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def norm(w: WeightLoader, name: str, eps: float):
    """The RMSNorm of tensor `name`, native when the loader has one."""
    make = getattr(w, "norm", None)
    return make(name, eps) if make is not None else RMSNorm(w.tensor(name), eps)


class Rope:
    """RoPE as llama.cpp's ggml_rope_ext computes it: cos/sin tables for positions
    [0, max_pos) over the first `dims` (R) features of a head, the rest passing through.

    neox=False rotates adjacent pairs (x[2i], x[2i+1]) (llama.cpp's NORMAL: llama,
    deepseek2); neox=True rotates (x[i], x[i + R/2]) (NEOX: qwen2/3, glm4). YaRN
    (ext_factor != 0) ramps between interpolated and extrapolated angles and scales the
    magnitude; attn_factor multiplies it as llama.cpp's attn_factor does."""

    def __init__(self, dims: int, max_pos: int, *, base: float = 10000.0, freq_scale: float = 1.0,
                 ext_factor: float = 0.0, attn_factor: float = 1.0, orig_ctx: int = 0,
                 beta_fast: float = 32.0, beta_slow: float = 1.0, neox: bool = False, device=None):
        if dims <= 0 or dims % 2:
            raise ModelConfigError(f"rope dimension count {dims} must be even and > 0")
        self.dims, self.neox = dims, neox
        half = torch.arange(dims // 2, dtype=torch.float64)
        inv_freq = base ** (-2.0 * half / dims)                             # [R/2]
        pos = torch.arange(max_pos, dtype=torch.float64)[:, None]
        theta_extrap = pos * inv_freq                                       # [P, R/2]
        theta = freq_scale * theta_extrap
        mscale = attn_factor
        if ext_factor != 0.0:
            low, high = self._corr_dims(dims, orig_ctx, base, beta_fast, beta_slow)
            y = (half - low) / max(0.001, high - low)
            ramp = (1.0 - y.clamp(0.0, 1.0)) * ext_factor
            theta = theta * (1.0 - ramp) + theta_extrap * ramp
            mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
        # rotation of pair (x0, x1) = complex product (x0 + i x1) * mscale * e^(i theta)
        self.freqs = torch.polar(torch.full_like(theta, mscale), theta).to(torch.complex64)
        self.freqs = self.freqs.to(device)                                  # [P, R/2]

    @staticmethod
    def _corr_dims(n_dims, n_ctx_orig, base, beta_fast, beta_slow):
        def corr_dim(n_rot):
            return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        start = math.floor(corr_dim(beta_fast))
        end = math.ceil(corr_dim(beta_slow))
        return max(0, start), min(n_dims - 1, end)

    def __call__(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        """x [T, ..., >=R] -> roped copy; token t has position pos0 + t."""
        return self._apply(x, self.freqs[pos0:pos0 + x.shape[0]])

    def at(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [T, ..., >=R] -> roped copy at positions pos [T] (a tensor: fixed shapes, no host
        value, as CUDA graphs need)."""
        return self._apply(x, self.freqs.index_select(0, pos))

    def _apply(self, x, f):
        T, R = x.shape[0], self.dims
        f = f.view((T,) + (1,) * (x.dim() - 2) + (-1,))
        xr = x[..., :R]
        if self.neox:   # pairs (i, i + R/2): the halves as real and imaginary parts
            xc = torch.complex(xr[..., :R // 2].float(), xr[..., R // 2:].float())
            yc = xc * f
            y = torch.cat((yc.real, yc.imag), dim=-1).to(x.dtype)
        else:
            xc = torch.view_as_complex(xr.float().unflatten(-1, (-1, 2)))
            y = torch.view_as_real(xc * f).flatten(-2).to(x.dtype)
        return y if R == x.shape[-1] else torch.cat((y, x[..., R:]), dim=-1)


class HeadLinear:
    """Per-head linears y[h] = x[h] @ W[h], W [H, in, out], in torch (x may also be one
    [T, in] shared by every head). The loader may give a faster equivalent with the same
    `weight` attribute."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x.to(self.weight.dtype), self.weight).float()


class FFN:
    """SwiGLU FFN: dense layers and shared experts (`prefix`ffn_{gate,up,down}`suffix`)."""

    def __init__(self, w: WeightLoader, prefix: str, suffix: str = ""):
        self.gate = w.linear(f"{prefix}ffn_gate{suffix}.weight")
        self.up = w.linear(f"{prefix}ffn_up{suffix}.weight")
        self.down = w.linear(f"{prefix}ffn_down{suffix}.weight")

    def __call__(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


# Queries per attention step unless the Plan says otherwise (placement.solver Policy
# attn_query_block): the Plan's workspace holds one block of scores, heads x block x keys, fp32.
QUERY_BLOCK = 64


def query_blocks(T: int, block: int) -> list[tuple[int, int]]:
    """[t0, t1) spans of at most `block` queries covering 0..T."""
    block = max(1, int(block))
    return [(t0, min(T, t0 + block)) for t0 in range(0, T, block)]


def causal_mask(t0: int, t1: int, pos0: int, S: int, device) -> torch.Tensor:
    """[t1-t0, S] bool: query t (at position pos0 + t) sees keys 0..pos0 + t."""
    i = torch.arange(t0, t1, device=device)[:, None] + pos0
    return torch.arange(S, device=device)[None, :] <= i


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block: int, *,
           pos0: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q [Hq, T, Dk] over k [Hkv, S, Dk], v [Hkv, S, Dv] -> [Hq, T, Dv],
    query head h reading K/V head h // (Hq / Hkv), in blocks of `block` queries.

    Masking: `pos0` (query t at position pos0 + t sees keys 0..pos0 + t, and a block reads only
    the keys its last query sees), or an explicit `mask` [T, S] bool, or neither (every query
    sees every key). No more than Hq x block x S scores exist at once, whichever kernel
    scaled_dot_product_attention takes: the Plan budgets exactly one such block. The inputs are
    4-D, which the fused CUDA kernels need (3-D sends CUDA to the math kernel); the G query
    heads of a K/V head become G x block query rows of that head (no copy of K/V per query head).
    """
    Hq, T, Dk = q.shape
    Hkv, S, Dv = k.shape[0], k.shape[1], v.shape[2]
    G = Hq // Hkv
    out = torch.empty(Hq, T, Dv, dtype=v.dtype, device=v.device)
    for t0, t1 in query_blocks(T, block):
        n = t1 - t0
        qb = q[:, t0:t1].reshape(1, Hkv, G * n, Dk)
        kb, vb, m = k, v, None
        if pos0 is not None:
            s = min(S, pos0 + t1)                      # keys beyond the block's last query: unseen
            kb, vb = k[:, :s], v[:, :s]
            if n > 1:
                m = causal_mask(t0, t1, pos0, s, q.device)
        elif mask is not None:
            m = mask[t0:t1]
        if m is not None and G > 1:
            m = m.repeat(G, 1)                         # rows g * n + t: query t of head group g
        ob = F.scaled_dot_product_attention(qb, kb.unsqueeze(0), vb.unsqueeze(0), attn_mask=m, scale=scale)
        # row g * n + t of K/V head h is query head h * G + g: split both sides, no copy (the
        # fused CUDA kernels return ob over [1, n', H, D] memory, which no [Hq, n, Dv] view fits)
        out[:, t0:t1].view(Hkv, G, n, Dv).copy_(ob[0].view(Hkv, G, n, Dv))
    return out
