"""Routing statistics of a run: how often each routed expert of each MoE layer was chosen.

Saved for the next Plan: `hybrid-run MODEL --save-expert-stats FILE`, then
`python -m placement MODEL --expert-stats FILE` caches the most used experts on the GPU.
The counting is a scatter-add on the device of the routing ids (no host sync, so it also
runs inside captured CUDA graphs); the counts reach the host only when saved.

File format (JSON), what placement.solver.load_expert_stats reads:

    {"format": "hybrid-expert-stats", "version": 1, "model": "<general.name>",
     "n_expert": E, "tokens": <tokens routed, the busiest layer's count / K>,
     "layers": {"<layer>": [count of expert 0, ..., count of expert E-1], ...}}

Only MoE layers appear under "layers" (the solver spreads what is left over layers
without statistics). Shape legend: L layers, E experts, T tokens, K experts per token.
"""

from __future__ import annotations

import json
import os

import torch

__all__ = ["ExpertStats", "FORMAT"]

FORMAT = "hybrid-expert-stats"


class ExpertStats:
    def __init__(self, n_layer: int, n_expert: int, moe_layers, n_expert_used: int = 1,
                 device=None, model: str = ""):
        self.n_expert = n_expert
        self.n_expert_used = max(1, int(n_expert_used))
        self.moe_layers = sorted(int(l) for l in moe_layers)
        self.model = model
        self.counts = torch.zeros(n_layer, n_expert, dtype=torch.int64, device=device)  # [L, E]
        self._ones = torch.ones(1, dtype=torch.int64, device=device)

    def record(self, layer: int, ids: torch.Tensor) -> None:
        """Count ids [T, K] of one layer (ids < 0, skipped slots, are not counted)."""
        flat = ids.reshape(-1).to(torch.int64)                            # [T*K]
        ones = self._ones.expand(flat.numel()) * (flat >= 0)
        self.counts[layer].scatter_add_(0, flat.clamp(min=0), ones)

    def reset(self) -> None:
        self.counts.zero_()

    def to_dict(self) -> dict:
        counts = self.counts.cpu()
        layers = {str(l): counts[l].tolist() for l in self.moe_layers}
        routed = max((sum(v) for v in layers.values()), default=0)
        return {"format": FORMAT, "version": 1, "model": self.model, "n_expert": self.n_expert,
                "tokens": routed // self.n_expert_used, "layers": layers}

    def save(self, path) -> None:
        """Write the JSON file (via a temporary name, so a reader never sees half of it)."""
        from hybrid.atomic import write_text

        write_text(os.fspath(path), json.dumps(self.to_dict()))

    @staticmethod
    def load(path) -> dict:
        """{layer: [counts]} of a saved file (checks the format tag)."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {d.get('format')!r})")
        return {int(k): v for k, v in d["layers"].items()}
