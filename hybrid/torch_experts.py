"""Routed experts computed by torch from dequantized weights.

The reference for the native expert engine (same call signature as hybrid.experts'
NativeExperts), the fallback when the native module is not built, and later the home of
"hot" experts kept on the GPU. Computes, per token t:

    y[t] = sum_k weights[t, k] * down_e( silu(gate_e x[t]) * up_e x[t] ),  e = ids[t, k]

with ids < 0 skipped.

Shape legend: T tokens, D model dim, F expert FFN dim, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid import dequant

__all__ = ["TorchExperts"]


class TorchExperts:
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        """gate, up [E, F, D]; down [E, D, F] (numpy order of the GGUF tensors)."""
        self.gate, self.up, self.down = gate, up, down
        self.n_expert = gate.shape[0]

    @classmethod
    def from_gguf(cls, gguf, layer: int, dtype=torch.float32, device=None, experts=None):
        """Dequantize one layer's routed experts (all, or the `experts` ids given)."""
        mats = []
        for k in ("gate", "up", "down"):
            name = f"blk.{layer}.ffn_{k}_exps.weight"
            info = gguf.tensors[name]
            E, rows = info.shape[0], info.shape[1]
            v = gguf.view(name).reshape(E, rows, -1)
            if experts is not None:
                v = v[list(experts)]
            w = dequant.dequantize(v.reshape(-1, v.shape[-1]), info.ggml_type, dtype=dtype,
                                   device=device, name=name)
            mats.append(w.view(v.shape[0], rows, -1))
        return cls(*mats)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, K = ids.shape
        wdt = self.gate.dtype
        flat = ids.reshape(-1)                                        # [T*K]
        valid = flat >= 0
        order = torch.argsort(torch.where(valid, flat, self.n_expert), stable=True)
        counts = torch.bincount(flat[valid], minlength=self.n_expert).tolist()  # one sync
        tok = order // K                                              # token of each slot
        xs = x.to(wdt)
        ys = torch.zeros(T * K, x.shape[1], dtype=torch.float32, device=x.device)  # per slot
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            slots = order[start:start + n]
            h = xs[tok[start:start + n]]                              # [n, D]
            start += n
            a = F.silu(h @ self.gate[e].t()) * (h @ self.up[e].t())   # [n, F]
            ys[slots] = (a @ self.down[e].t()).float()                # [n, D]
        w = torch.where(ids >= 0, weights.float(), 0.0)               # [T, K]
        return torch.bmm(w.unsqueeze(1), ys.view(T, K, -1)).squeeze(1)  # [T, D]
