"""Batched forwards over per-request KV slots, for the server's continuous batching.

A slot is one KV cache of the model's own kind (the latent cache for MLA, per-head K/V for
GQA) holding one request's sequence. A decode step runs the next token of every decoding
request as one [T, D] batch through everything that works per token (linears, norms, the
router, the routed and shared experts, the head): the expert engine sees T tokens and reads
each expert's weights once for all of them. Attention runs per row, each token against its
own slot at its own position, through the same call a single-sequence decode makes, so a row's
result does not depend on which other requests share the step.

Prompts are prefilled per slot, in chunks, through the model's ordinary forward.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["Slot", "SlotEngine"]


class Slot:
    """One KV cache and the tokens it holds (in order), for prefix reuse."""

    def __init__(self, index: int, cache):
        self.index = index
        self.cache = cache
        self.tokens: list[int] = []
        self.last_used = 0.0

    def truncate(self, n: int) -> None:
        """Keep the first n cached tokens."""
        self.cache.truncate(n)
        del self.tokens[n:]

    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ids this slot holds already."""
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n


class SlotEngine:
    """Forwards of a loaded Runtime over `n_slots` KV slots of `ctx` tokens each.

    Not thread-safe: one thread (the scheduler's) calls it. The runtime's own cache serves
    as slot 0, so a server with one slot allocates nothing more."""

    def __init__(self, rt, n_slots: int, ctx: int | None = None):
        if n_slots < 1:
            raise ValueError(f"--parallel {n_slots}: at least 1 slot")
        self.rt = rt
        self.model = rt.model
        self.ctx = int(ctx or rt.ctx)
        cache = rt.cache
        dtype = getattr(cache, "data", None)
        dtype = (dtype if dtype is not None else cache.k).dtype
        device = rt.device
        caches = [cache] if self.ctx == cache.max_tokens else []
        while len(caches) < n_slots:
            caches.append(self.model.new_cache(self.ctx, dtype=dtype, device=device))
        self.slots = [Slot(i, c) for i, c in enumerate(caches)]
        rt.reset()   # slot 0's cache no longer belongs to generate()

    @property
    def nbytes(self) -> int:
        return sum(s.cache.nbytes for s in self.slots)

    @torch.inference_mode()
    def prefill(self, slot: Slot, ids: Sequence[int]) -> torch.Tensor:
        """Run ids after the slot's cached tokens; returns the last token's logits [B]."""
        rt = self.rt
        T = len(ids)
        slot.cache.check_room(T)
        rt._set_threads_for(T)
        tokens = torch.tensor(list(ids), dtype=torch.long)
        pos0 = slot.cache.length
        logits = self.model(tokens.to(rt.device), pos0, slot.cache, last_only=True)
        slot.cache.advance(T)
        slot.tokens.extend(ids)
        return logits[-1]

    @torch.inference_mode()
    def decode(self, slots: Sequence[Slot], tokens: Sequence[int]) -> torch.Tensor:
        """One token per slot (slot i's next token is tokens[i]); returns logits [T, B]."""
        rt, m = self.rt, self.model
        for s in slots:
            s.cache.check_room(1)
        # a decode step's torch ops are tiny whatever T is: decode's thread settings
        rt._set_threads_for(1)
        x = m.embed(torch.tensor(list(tokens), dtype=torch.long).to(rt.device))      # [T, D]
        pos = [s.cache.length for s in slots]
        for blk in m.blocks:
            a = [blk.attn(x[i:i + 1], pos[i], s.cache, m.rope, m.attn_mode) for i, s in enumerate(slots)]
            x = x + (a[0] if len(a) == 1 else torch.cat(a))
            x = x + blk.ffn(blk.ffn_norm(x))
        logits = m.lm_head(m.norm(x))                                                 # [T, B]
        for s, t in zip(slots, tokens):
            s.cache.advance(1)
            s.tokens.append(int(t))
        return logits
