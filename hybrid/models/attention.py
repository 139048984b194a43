"""Grouped-query attention (GQA) as llama.cpp builds it for llama, qwen2/3(moe) and glm4moe:
RMSNorm -> q/k/v projections (+ optional biases) -> optional per-head q/k RMSNorm -> RoPE
(NORMAL or NEOX pairs, possibly on only the first R dims of a head) -> causal softmax
attention with H/Hkv query heads per K/V head -> output projection.

K and V of every head are cached per position (hybrid.runtime.kv_cache.KVCache), after the
k norm and RoPE. The loader may hand back one fused native call for the whole layer
(`fused_attention`); it must compute what `__call__` computes.

Shape legend: T tokens in this call, S tokens attended (cache length after this call),
D model dim, H query heads, Hkv K/V heads, G = H/Hkv query heads per K/V head,
Dk query/key head dim, Dv value head dim, R rope dims (<= Dk).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hybrid.models.layers import QUERY_BLOCK, Rope, WeightLoader, attend, norm

__all__ = ["GQAttention"]


class GQAttention:
    def __init__(self, args, w: WeightLoader, il: int):
        p = f"blk.{il}."
        self.args, self.il = args, il
        self.attn_norm = norm(w, p + "attn_norm.weight", args.rms_eps)
        self.wq = w.linear(p + "attn_q.weight")
        self.wk = w.linear(p + "attn_k.weight")
        self.wv = w.linear(p + "attn_v.weight")
        self.wo = w.linear(p + "attn_output.weight")

        def opt(name):
            return w.tensor(p + name) if w.has(p + name) else None

        self.bq, self.bk, self.bv = opt("attn_q.bias"), opt("attn_k.bias"), opt("attn_v.bias")
        self.q_norm = norm(w, p + "attn_q_norm.weight", args.rms_eps) if w.has(p + "attn_q_norm.weight") else None
        self.k_norm = norm(w, p + "attn_k_norm.weight", args.rms_eps) if w.has(p + "attn_k_norm.weight") else None
        self.scale = 1.0 / math.sqrt(args.head_dim_k)
        self.query_block = getattr(w, "attn_query_block", QUERY_BLOCK)
        # the loader may give a native causal attention for prompt chunks (CPU)
        causal = getattr(w, "causal_attention", None)
        self.causal = causal() if causal is not None else None
        # the loader may run the whole layer as one fused call (same weights, same arithmetic)
        fused = getattr(w, "fused_attention", None)
        self.fused = fused(self) if fused is not None else None

    def _project(self, x: torch.Tensor):
        """x [T, D] -> q [T, H, Dk], k [T, Hkv, Dk] (normed, not roped), v [T, Hkv, Dv]."""
        a = self.args
        T = x.shape[0]
        H, Hkv, Dk, Dv = a.n_head, a.n_head_kv, a.head_dim_k, a.head_dim_v
        h = self.attn_norm(x)
        q, k, v = self.wq(h), self.wk(h), self.wv(h)
        if self.bq is not None:
            q = q + self.bq
        if self.bk is not None:
            k = k + self.bk
        if self.bv is not None:
            v = v + self.bv
        if self.q_norm is not None:                   # per head, over Dk
            q = self.q_norm(q.reshape(T * H, Dk))
        if self.k_norm is not None:
            k = self.k_norm(k.reshape(T * Hkv, Dk))
        return q.reshape(T, H, Dk), k.reshape(T, Hkv, Dk), v.reshape(T, Hkv, Dv)

    def __call__(self, x: torch.Tensor, pos0: int, cache, rope: Rope, mode: str = "auto"):
        if self.fused is not None and self.fused.accepts(x, cache):
            return self.fused(x, pos0, cache, rope)
        T = x.shape[0]
        q, k, v = self._project(x)
        q, k = rope(q, pos0), rope(k, pos0)
        k_all, v_all = cache.append(self.il, pos0, k, v)                  # [S, Hkv, Dk|Dv]
        o = self._attend(q, k_all, v_all, pos0=pos0)                       # [T, H, Dv]
        return self.wo(o.reshape(T, -1))

    def static(self, x: torch.Tensor, pos: torch.Tensor, cache, rope: Rope, S: int):
        """T tokens at positions pos [T] (a tensor) over the first S cache rows, masked beyond
        each token's position: shapes depend on (T, S) only (CUDA graphs)."""
        T = x.shape[0]
        q, k, v = self._project(x)
        q, k = rope.at(q, pos), rope.at(k, pos)
        k_all, v_all = cache.write_at(self.il, pos, k, v, S)
        mask = torch.arange(S, device=x.device)[None, :] <= pos[:, None]   # [T, S]
        return self.wo(self._attend(q, k_all, v_all, mask=mask).reshape(T, -1))

    def _attend(self, q, k_all, v_all, *, pos0=None, mask=None):
        """Softmax attention: causal chunks on the loader's native causal attention where it
        has one (CPU float32), else in query blocks (layers.attend), on the CPU in float32, on
        CUDA in the cache's 16-bit type when it has one, so the fused kernels apply."""
        if pos0 is not None and self.causal is not None and self.causal.accepts(q, k_all, v_all):
            return self.causal(q, k_all.transpose(0, 1), v_all.transpose(0, 1), self.scale, pos0)
        cd = torch.float32
        if q.is_cuda and k_all.dtype in (torch.bfloat16, torch.float16):
            cd = k_all.dtype
        o = attend(q.transpose(0, 1).to(cd), k_all.transpose(0, 1).to(cd), v_all.transpose(0, 1).to(cd),
                   self.scale, self.query_block, pos0=pos0, mask=mask)    # [H, T, Dv]
        return o.transpose(0, 1).to(q.dtype)                               # [T, H, Dv]
