"""The decoder skeleton every architecture shares: embed -> blocks (attention, then a dense or
MoE FFN, each around a residual) -> norm -> lm_head, with the fixed-shape decode step the GPU
path captures in CUDA graphs. An architecture supplies its attention, which layers are MoE,
its RoPE and its KV cache (`make_attention`, `is_moe`, `make_rope`, `new_cache`).

Shape legend: T tokens in this call, D model dim, B vocabulary, S cache rows attended.
"""

from __future__ import annotations

import torch

from hybrid.models.layers import FFN, WeightLoader, norm
from hybrid.models.moe import MoE

__all__ = ["Block", "Transformer", "moe_layer"]


from hybrid.models.specs import moe_layer  # noqa: E402 (torch-free, re-exported)


class Block:
    def __init__(self, attn, ffn_norm, ffn):
        self.attn, self.ffn_norm, self.ffn = attn, ffn_norm, ffn

    def __call__(self, x, pos0, cache, rope, attn_mode="auto"):
        x = x + self.attn(x, pos0, cache, rope, attn_mode)
        return x + self.ffn(self.ffn_norm(x))


class Transformer:
    """The whole model. Subclasses set `make_attention(w, il)`, `make_rope(max_pos, device)`,
    `new_cache(tokens, dtype, device)`, `tensor_specs(args)` and, where it differs, `is_moe(il)`."""

    FFN_NORM = "ffn_norm"  # a block's norm before its FFN (glm4moe: post_attention_norm)

    def __init__(self, args, w: WeightLoader, max_pos: int, rope_device=None, progress=None):
        self.args = args
        self.embed = w.embedding("token_embd.weight")
        self.rope = self.make_rope(max_pos, rope_device)
        self.blocks = []
        for il in range(args.n_layer):
            p = f"blk.{il}."
            attn = self.make_attention(w, il)
            ffn_norm = norm(w, p + self.FFN_NORM + ".weight", args.rms_eps)
            self.blocks.append(Block(attn, ffn_norm, MoE(args, w, il) if self.is_moe(il) else FFN(w, p)))
            if progress is not None:
                progress(il + 1, args.n_layer)
        self.norm = norm(w, "output_norm.weight", args.rms_eps)
        # tied embeddings: models without `output` reuse the embedding table as the head
        self.lm_head = w.linear("output.weight" if w.has("output.weight") else "token_embd.weight")
        self.attn_mode = "auto"  # "absorb" / "decompress" force one MLA path (tests)

    def is_moe(self, il: int) -> bool:
        return moe_layer(self.args, il)

    @staticmethod
    def tensor_specs(args) -> list:
        """models.specs.TensorSpec of every tensor the model reads, from its args."""
        raise NotImplementedError

    def make_attention(self, w: WeightLoader, il: int):
        raise NotImplementedError

    def make_rope(self, max_pos: int, device):
        raise NotImplementedError

    @staticmethod
    def cache_bytes_per_token(a, dtype: torch.dtype) -> int:
        """Bytes new_cache holds per position (checked against the Plan before allocating)."""
        raise NotImplementedError

    def new_cache(self, tokens: int, dtype: torch.dtype, device):
        """The KV cache this model's attention reads and writes, for `tokens` positions."""
        raise NotImplementedError

    def decode_static(self, x: torch.Tensor, pos: torch.Tensor, cache, S: int):
        """One decode step with fixed shapes, as a generator cut at the routed experts (the
        engine runs them on the CPU, or replays CUDA graphs of the segments between them).

        x [T, D] embedded tokens at positions pos [T] (tensors the caller refills); S cache
        rows attended. Per MoE layer it yields ("submit", layer, h [T, D], ids [T, K],
        weights [T, K]), then, after the shared expert, ("wait", layer), which the caller
        answers with the routed experts' output [T, D] (gen.send). Returns logits [T, B]."""
        for il, blk in enumerate(self.blocks):
            x = x + blk.attn.static(x, pos, cache, self.rope, S)
            h = blk.ffn_norm(x)
            if isinstance(blk.ffn, MoE):
                ids, weights = blk.ffn.router(h)
                yield ("submit", il, h, ids, weights)
                s = blk.ffn.shared(h) if blk.ffn.shared is not None else None
                y = yield ("wait", il)
                x = x + (y if s is None else y + s)
            else:
                x = x + blk.ffn(h)
        return self.lm_head(self.norm(x))

    def forward(self, tokens: torch.Tensor, pos0: int, cache, last_only: bool = False):
        """tokens [T] at positions pos0.. -> logits [T, B] (or [1, B] with last_only)."""
        x = self.embed(tokens)                                             # [T, D]
        for blk in self.blocks:
            x = blk(x, pos0, cache, self.rope, self.attn_mode)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x))                                  # [T, B]

    __call__ = forward
