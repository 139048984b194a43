"""Next-token sampling: repetition penalty, temperature, top-k, top-p, seeded draws; greedy
when temperature is 0.

Order as in transformers' generate: penalty on the raw logits, then temperature, then top-k
and top-p on the tempered distribution, then one draw from a seeded torch.Generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Sampler", "SamplingParams"]


@dataclass
class SamplingParams:
    temperature: float = 0.6
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1.0: off
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64        # tokens of history the penalty looks at (llama.cpp's default)
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams | None = None, **kw):
        self.p = params if params is not None else SamplingParams(**kw)
        self.p.check()
        self.gen = torch.Generator()
        if self.p.seed is not None:
            self.gen.manual_seed(int(self.p.seed))
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """logits [B] (any device) -> token id."""
        p = self.p
        x = logits.detach().float().cpu().clone()
        if p.repetition_penalty != 1.0 and history:
            recent = torch.tensor(sorted(set(history[-p.repeat_last_n:])), dtype=torch.long)
            v = x[recent]
            x[recent] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if p.temperature == 0.0:
            return int(torch.argmax(x))
        x = x / p.temperature
        if p.top_k > 0 and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            cum = torch.cumsum(probs, dim=-1)
            # drop a token when the mass before it already reaches top_p (keeps at least one)
            drop = (cum - probs) >= p.top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(0, idx, sorted_x)
        probs = torch.softmax(x, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.gen))
