"""Batched forwards over per-request KV slots, for the server's continuous batching.

A slot is one KV cache of the model's own kind (the latent cache for MLA, per-head K/V for
GQA) holding one request's sequence. A decode step runs the next token of every decoding
request as one [T, D] batch through everything that works per token (linears, norms, the
router, the routed and shared experts, the head): the expert engine sees T tokens and reads
each expert's weights once for all of them. Attention runs per row, each token against its
own slot at its own position, through the same call a single-sequence decode makes, so a row's
result does not depend on which other requests share the step.

Prompts are prefilled in chunks; the chunks of several new requests go through one forward
together (prefill_many), attention again per chunk against its own slot.
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
    """Forwards of a loaded Runtime over its KV slots (the plan's kv_slots, allocated at load;
    hybrid.load(parallel=N), hybrid-run --parallel N), or the first n_slots of them.

    Not thread-safe: one thread (the scheduler's) calls it. Allocates nothing: the slots'
    memory is the plan's, counted and checked at load."""

    def __init__(self, rt, n_slots: int | None = None):
        have = len(rt.slot_caches)
        n_slots = have if n_slots is None else int(n_slots)
        if n_slots < 1:
            raise ValueError(f"--parallel {n_slots}: at least 1 slot")
        if n_slots > have:
            raise ValueError(f"{n_slots} slots asked for, the runtime's plan has {have} KV slot(s): "
                             f"load with parallel={n_slots} (hybrid-run --parallel {n_slots})")
        if n_slots > rt.prefill_chunk:
            # a decode step is one call of n_slots tokens: the engine's buffers hold a chunk
            raise ValueError(f"--parallel {n_slots}: at most {rt.prefill_chunk} slots (the "
                             f"runtime's prefill chunk, which sizes the expert engine's buffers)")
        self.rt = rt
        self.model = rt.model
        self.ctx = int(rt.ctx)
        self.slots = [Slot(i, c) for i, c in enumerate(rt.slot_caches[:n_slots])]
        # Attention of a decode step: batched (projections once over all rows, see
        # attention_rows), not per row through the call a single-sequence decode makes. On
        # the CPU too: per row, each row's fused native layer is a job for the engine's
        # workers, 16 rows x L layers jobs a step, and on a busy machine a worker that lost
        # its core stalls every one of them (TinyConfig.mid, 2 shared cores, load ~4: 16
        # requests 12-14 tok/s per row vs 28-61 batched; one request alone 20 vs 14-17 tok/s).
        # The same path at every T keeps a request's numbers independent of its company.
        self.batched_attention = True
        rt.reset()   # slot 0's cache no longer belongs to generate()

    @property
    def nbytes(self) -> int:
        return sum(s.cache.nbytes for s in self.slots)

    def prefill(self, slot: Slot, ids: Sequence[int]) -> torch.Tensor:
        """Run ids after the slot's cached tokens; returns the last token's logits [B]."""
        return self.prefill_many([slot], [ids])[0]

    @torch.inference_mode()
    def prefill_many(self, slots: Sequence[Slot], chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run chunks[i] after slots[i]'s cached tokens, all in one forward: the tokens of every
        chunk go through the per-token layers together (the expert engine reads each expert
        once for all of them), attention runs per chunk against its own slot, through the
        call a single-sequence prefill makes. Returns each chunk's last-token logits [n, B]."""
        rt, m = self.rt, self.model
        T = sum(len(c) for c in chunks)
        if T > rt.prefill_chunk:
            raise ValueError(f"{T} prompt tokens in one forward; the runtime's buffers hold "
                             f"{rt.prefill_chunk} (prefill_chunk)")
        for s, c in zip(slots, chunks):
            s.cache.check_room(len(c))
        rt._set_threads_for(T)
        tokens = torch.tensor([t for c in chunks for t in c], dtype=torch.long)
        ends = torch.tensor([len(c) for c in chunks]).cumsum(0).tolist()
        segs = list(zip([0] + ends[:-1], ends, [s.cache for s in slots]))
        pos = [c.length for _, _, c in segs]
        x = m.embed(tokens.to(rt.device))                                            # [T, D]
        for blk in m.blocks:
            if len(segs) == 1:
                x = x + blk.attn(x, pos[0], segs[0][2], m.rope, m.attn_mode)
            else:
                x = x + torch.cat([blk.attn(x[a:b], p, c, m.rope, m.attn_mode)
                                   for (a, b, c), p in zip(segs, pos)])
            x = x + blk.ffn(blk.ffn_norm(x))
        last = torch.tensor([b - 1 for b in ends], device=x.device)
        logits = m.lm_head(m.norm(x.index_select(0, last)))                           # [n, B]
        for s, c in zip(slots, chunks):
            s.cache.advance(len(c))
            s.tokens.extend(c)
        return logits

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
        caches = [s.cache for s in slots]
        for blk in m.blocks:
            x = x + attention_rows(blk.attn, x, pos, caches, m.rope, self.batched_attention)
            x = x + blk.ffn(blk.ffn_norm(x))
        logits = m.lm_head(m.norm(x))                                                 # [T, B]
        for s, t in zip(slots, tokens):
            s.cache.advance(1)
            s.tokens.append(int(t))
        return logits


def attention_rows(attn, x: torch.Tensor, pos: Sequence[int], caches: Sequence, rope,
                   batched: bool = True) -> torch.Tensor:
    """One decode token per row, row i at position pos[i] of caches[i] -> [T, D].

    MLA (absorbed) and GQA: the projections, the absorbed head matrices and the output
    projection run once over all rows (each reads its weights once per step, and every one
    computes row by row: a row's numbers do not depend on the others); only the scores
    against each row's own cache are per row. Other attentions: one call per row."""
    from hybrid.models.attention import GQAttention
    from hybrid.models.deepseek2 import MLAttention

    if batched and isinstance(attn, MLAttention):
        return _mla_rows(attn, x, pos, caches, rope)
    if batched and isinstance(attn, GQAttention):
        return _gqa_rows(attn, x, pos, caches, rope)
    rows = [attn(x[i:i + 1], p, c, rope) for i, (p, c) in enumerate(zip(pos, caches))]
    return torch.cat(rows)


def _mla_rows(attn, x, pos, caches, rope):
    """MLAttention's absorbed path (MLAttention._absorbed) with a cache per row."""
    T = x.shape[0]
    C = attn.args.kv_lora_rank
    where = torch.tensor(list(pos), device=x.device)
    q_nope, q_pe, latent, k_pe = attn._project(x)
    q_pe, k_pe = rope.at(q_pe, where), rope.at(k_pe, where)              # [T,H,R], [T,R]
    q_abs = attn.k_up(q_nope.transpose(0, 1))                            # [H, T, C]
    o_lat = []
    for i, cache in enumerate(caches):
        kv_all = cache.append(attn.il, pos[i], latent[i:i + 1], k_pe[i:i + 1])   # [S, C+R]
        cd = kv_all.dtype
        qc = torch.cat((q_abs[:, i], q_pe[i]), dim=-1).to(cd)             # [H, C+R]
        scores = (qc @ kv_all.t()).float().mul_(attn.scale)              # [H, S]
        p = torch.softmax(scores, dim=-1).to(cd)
        o_lat.append(p @ kv_all[:, :C])                                  # [H, C]
    o = attn.v_up(torch.stack(o_lat, dim=1).float())                     # [H, T, V]
    return attn.wo(o.transpose(0, 1).reshape(T, -1))


def _gqa_rows(attn, x, pos, caches, rope):
    """GQAttention's path with a cache per row."""
    T = x.shape[0]
    where = torch.tensor(list(pos), device=x.device)
    q, k, v = attn._project(x)
    q, k = rope.at(q, where), rope.at(k, where)
    o = []
    for i, cache in enumerate(caches):
        k_all, v_all = cache.append(attn.il, pos[i], k[i:i + 1], v[i:i + 1])
        o.append(attn._attend(q[i:i + 1], k_all, v_all))            # [1, H, Dv]
    return attn.wo(torch.cat(o).reshape(T, -1))
