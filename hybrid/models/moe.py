"""The MoE block every architecture shares: router kinds (softmax or sigmoid gating, selection
bias, group-limited top-k, weight normalization and scale) as llama.cpp's build_moe_ffn
computes them, routed experts from the loader, and shared experts (plain, as deepseek2 and
glm4moe add them, or scaled by a sigmoid gate, as qwen2moe does).

Router arguments are read from the model's args by name (gating_func, n_expert_used,
n_group, n_group_used, expert_weights_norm, expert_weights_scale), so every architecture's
ModelArgs carries those fields.

Shape legend: T tokens, D model dim, E experts, K experts per token, G expert groups.
"""

from __future__ import annotations

import torch

from hybrid.models.layers import FFN, WeightLoader

__all__ = ["GATING_SIGMOID", "GATING_SOFTMAX", "MoE", "Router"]

from hybrid.models.args import GATING_SIGMOID, GATING_SOFTMAX  # noqa: E402 (torch-free)


class Router:
    """Expert selection exactly as llama.cpp's build_moe_ffn does it: gating -> bias for the
    selection only -> group top-k -> top-k -> weights from the unbiased probabilities ->
    normalize -> scale."""

    def __init__(self, args, w: WeightLoader, il: int):
        p = f"blk.{il}."
        self.args = args
        self.gate_inp = w.tensor(p + "ffn_gate_inp.weight")               # [E, D], float32
        self.bias = w.tensor(p + "exp_probs_b.bias") if w.has(p + "exp_probs_b.bias") else None
        # the loader may give the selection below as one native call (same arithmetic)
        select = getattr(w, "expert_select", None)
        self.select = select(args, self.bias) if select is not None else None

    def __call__(self, h: torch.Tensor):
        a = self.args
        if self.select is not None:
            return self.select(self.select.logits(h, self.gate_inp))
        logits = h.float() @ self.gate_inp.t()                             # [T, E]
        if a.gating_func == GATING_SIGMOID:
            probs = torch.sigmoid(logits)
        else:
            probs = torch.softmax(logits, dim=-1)
        sel = probs if self.bias is None else probs + self.bias            # selection only
        T, E = sel.shape
        if a.n_group > 1:
            G = a.n_group
            groups = sel.view(T, G, E // G)
            g_score = groups.topk(2, dim=-1).values.sum(-1)                # [T, G]
            keep = g_score.topk(a.n_group_used, dim=-1).indices            # [T, n_group_used]
            gmask = torch.zeros(T, G, dtype=torch.bool, device=sel.device)
            gmask.scatter_(1, keep, True)
            sel = groups.masked_fill(~gmask[..., None], float("-inf")).view(T, E)
        ids = sel.topk(a.n_expert_used, dim=-1).indices                    # [T, K]
        weights = probs.gather(1, ids)                                     # [T, K]
        if a.expert_weights_norm:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
        if a.expert_weights_scale not in (0.0, 1.0):
            weights = weights * a.expert_weights_scale
        return ids, weights


class _GatedShared:
    """qwen2moe's shared expert: FFN(h) * sigmoid(h @ ffn_gate_inp_shexp)."""

    def __init__(self, ffn, gate: torch.Tensor):
        self.ffn, self.gate = ffn, gate                                    # gate [1, D]

    def __call__(self, h):
        return self.ffn(h) * torch.sigmoid(h.float() @ self.gate.t())      # [T, D] * [T, 1]


class MoE:
    """Routed experts (+ shared experts when the layer has `ffn_*_shexp` tensors)."""

    def __init__(self, args, w: WeightLoader, il: int):
        p = f"blk.{il}."
        self.router = Router(args, w, il)
        self.experts = w.experts(il)
        self.shared = None
        if w.has(p + "ffn_gate_shexp.weight"):
            gate = p + "ffn_gate_inp_shexp.weight"
            if w.has(gate):
                self.shared = _GatedShared(FFN(w, p, "_shexp"), w.tensor(gate).view(1, -1))
            else:
                # the loader may run the shared experts as one fused native call (same weights)
                fused = getattr(w, "fused_ffn", None)
                self.shared = (fused(p, "_shexp") if fused is not None else None) or FFN(w, p, "_shexp")
                # the routed experts may take the shared ones into their own call
                # (y = routed + shared)
                absorb = getattr(self.experts, "absorb_shared", None)
                if absorb is not None and absorb(self.shared):
                    self.shared = None

    def __call__(self, h):
        ids, weights = self.router(h)
        if getattr(self.experts, "overlap_shared", False):
            # routed experts on another processor: the shared expert runs meanwhile
            self.experts.submit(h, ids, weights)
            s = self.shared(h) if self.shared is not None else 0
            return self.experts.wait() + s
        y = self.experts(h, ids, weights)
        if self.shared is not None:
            y = y + self.shared(h)
        return y
