"""Routed experts computed by torch from dequantized weights.

The reference for the native expert engine (same call signature as hybrid.backends.experts'
NativeExperts), the fallback when the native module is not built, and the "hot" experts kept
on the GPU as bf16 copies (hybrid.backends.gpu.QuantExperts keeps them in their GGUF
blocks). Computes, per token t:

    y[t] = sum_k weights[t, k] * down_e( silu(gate_e x[t]) * up_e x[t] ),  e = ids[t, k]

with ids < 0 skipped.

Shape legend: T tokens, D model dim, F expert FFN dim, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid.backends import dequant

__all__ = ["TorchExperts", "expert_ffn", "grouped_experts"]


def expert_ffn(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    """down(silu(gate h) * up h) for h [n, D], gate/up [F, D], down [D, F]: [n, D]."""
    return (F.silu(h @ gate.t()) * (h @ up.t())) @ down.t()


def grouped_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, counts: list,
                    ffn, dtype) -> torch.Tensor:
    """y[t] = sum_k weights[t, k] * down_e(silu(gate_e x[t]) * up_e x[t]), e = ids[t, k] (< 0:
    skipped), with the tokens of each expert gathered into one call ffn(e, h [n, D]) -> [n, D].
    counts[e]: tokens routed to e (a host list: the loop needs it); x is cast to `dtype`.
    Returns float32 [T, D]."""
    T, K = ids.shape
    flat = ids.reshape(-1)                                            # [T*K]
    order = torch.argsort(torch.where(flat >= 0, flat, len(counts)), stable=True)
    tok = order // K                                                  # token of each slot
    xs = x.to(dtype)
    ys = torch.zeros(T * K, x.shape[1], dtype=torch.float32, device=x.device)  # per slot
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start:start + n]
        h = xs[tok[start:start + n]]                                  # [n, D]
        start += n
        ys[slots] = ffn(e, h).float()                                 # [n, D]
    w = torch.where(ids >= 0, weights.float(), 0.0)                   # [T, K]
    return torch.bmm(w.unsqueeze(1), ys.view(T, K, -1)).squeeze(1)    # [T, D]


class TorchExperts:
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        """gate, up [E, F, D]; down [E, D, F] (numpy order of the GGUF tensors)."""
        self.gate, self.up, self.down = gate, up, down
        self.n_expert = gate.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the held matrices (bf16 hot experts: what the Plan counts for them)."""
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))

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

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 host_ids: torch.Tensor | None = None) -> torch.Tensor:
        """host_ids: the same ids already on the host (the CPU engine's staging copy): the
        per-expert token counts come from them instead of a device->host sync."""
        src = ids if host_ids is None else host_ids
        flat = src.reshape(-1).long()
        counts = torch.bincount(flat[flat >= 0], minlength=self.n_expert).tolist()  # one sync
        return grouped_experts(x, ids, weights, counts,
                               lambda e, h: expert_ffn(h, self.gate[e], self.up[e], self.down[e]),
                               self.gate.dtype)

    # bytes of gathered expert matrices static() holds at once (per slot: gate, up and down of
    # each token's expert); tokens go through in blocks that fit, at least one at a time
    static_gather_bytes = 64 << 20

    def static(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sum with fixed shapes and no host sync (capturable in a CUDA graph): every
        slot k gathers its expert's matrices and computes; slots with ids < 0 add nothing.
        Reads the same bytes as __call__ for decode (T=1) but costs a copy of each gathered
        expert, so it is for decode graphs, not prefill; the copies are bounded by
        static_gather_bytes (token blocks: a fixed trip count for a fixed T)."""
        T, K = ids.shape
        wdt = self.gate.dtype
        xs = x.to(wdt)                                                # [T, D]
        y = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        F_, D = self.gate.shape[1], self.gate.shape[2]
        per_token = 3 * F_ * D * self.gate.element_size()
        tb = max(1, min(T, self.static_gather_bytes // max(per_token, 1)))
        for t0 in range(0, T, tb):
            t1 = min(T, t0 + tb)
            xb = xs[t0:t1, :, None]                                   # [b, D, 1]
            for k in range(K):   # fixed trip count: K slots, not a loop over experts
                e = ids[t0:t1, k].clamp(min=0)                        # [b]
                a = F.silu(torch.bmm(self.gate[e], xb)) * torch.bmm(self.up[e], xb)   # [b, F, 1]
                o = torch.bmm(self.down[e], a).squeeze(-1).float()   # [b, D]
                w = torch.where(ids[t0:t1, k] >= 0, weights[t0:t1, k].float(), 0.0)
                y[t0:t1] += w[:, None] * o
        return y
