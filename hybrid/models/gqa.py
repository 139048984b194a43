"""The GQA transformer the llama-family MoE architectures share (llama/Mixtral, qwen2moe,
qwen3moe, glm4moe): GQA attention, optional leading dense FFN blocks, MoE blocks with the
shared router kinds, per-head K/V cache. An architecture file states only what differs: its
GGUF prefix, RoPE pair layout and router defaults (`GQAArgs.read`), and any tensor it adds.

Shape legend: as in hybrid.models.attention.
"""

from __future__ import annotations

import torch

from hybrid.models.attention import GQAttention
from hybrid.models.args import GQAArgs  # noqa: F401 (the args live, torch-free, in models.args)
from hybrid.models.layers import WeightLoader
from hybrid.models.transformer import Transformer

__all__ = ["GQAArgs", "GQATransformer"]


class GQATransformer(Transformer):
    @staticmethod
    def tensor_specs(a: GQAArgs) -> list:
        return a.tensor_specs()

    def make_attention(self, w: WeightLoader, il: int):
        return GQAttention(self.args, w, il)

    def make_rope(self, max_pos: int, device):
        return self.args.rope(max_pos, device)

    @staticmethod
    def cache_bytes_per_token(a, dtype: torch.dtype) -> int:
        """What new_cache holds per position: K and V of every KV head of every layer."""
        return a.n_layer * a.n_head_kv * (a.head_dim_k + a.head_dim_v) * dtype.itemsize

    def new_cache(self, tokens: int, dtype: torch.dtype, device):
        from hybrid.runtime.kv_cache import KVCache

        a = self.args
        return KVCache(a.n_layer, tokens, a.n_head_kv, a.head_dim_k, a.head_dim_v, dtype=dtype,
                       device=device)

