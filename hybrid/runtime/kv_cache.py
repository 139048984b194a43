"""KV caches: MLA's latent cache (deepseek2) and per-head K/V (GQA attention). Both are
allocated once at load for `max_tokens`; nothing is allocated per step.

MLA latent cache: per token and layer the normalized latent (C) and roped key (R).
DeepSeek-V3/R1: C + R = 512 + 64 floats per token per layer, about 70 KB per token over 61
layers in bf16, against ~71x that for the full per-head K and V that llama.cpp caches for
early-2025 GGUFs.

Layout: data [L, max_tokens, C + R] with the latent first, then the rope part, so that a
layer's rows are at once the MQA key [latent | k_pe] and (first C columns) the value.
"""

from __future__ import annotations

import torch

__all__ = ["ContextFullError", "KVCache", "LatentKVCache"]


class ContextFullError(ValueError):
    """A sequence would grow past the cache (the context length given at load)."""


class _Positions:
    """The sequence length every cache keeps, and its bounds."""

    max_tokens: int
    length: int

    def reset(self) -> None:
        self.length = 0

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_tokens:
            raise ContextFullError(
                f"sequence of {self.length + n_new} tokens does not fit the context of "
                f"{self.max_tokens} tokens; load with a larger ctx= or shorten the prompt")

    def _check_end(self, end: int) -> None:
        if end > self.max_tokens:
            raise ContextFullError(f"position {end} is past the context of {self.max_tokens} "
                                   f"tokens; load with a larger ctx=")

    def advance(self, n: int) -> None:
        """Mark n more tokens as held (after every layer has appended them)."""
        self.length += n

    def truncate(self, n: int) -> None:
        """Keep only the first n tokens (reuse a shared prompt prefix)."""
        self.length = min(self.length, n)


class LatentKVCache(_Positions):
    def __init__(self, n_layer: int, max_tokens: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        self.n_layer = n_layer
        self.max_tokens = max_tokens
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.data = torch.zeros(n_layer, max_tokens, kv_lora_rank + rope_dim, dtype=dtype,
                                device=device)                      # [L, P, C+R]
        self.length = 0  # tokens of the current sequence held (all layers)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def append(self, layer: int, pos0: int, latent: torch.Tensor, k_pe: torch.Tensor):
        """Write rows [pos0, pos0+T) of `layer`; return the layer's rows [0, pos0+T)."""
        T = latent.shape[0]
        end = pos0 + T
        rows = self.layer_rows(layer, end)
        C = self.kv_lora_rank
        rows[pos0:end, :C] = latent
        rows[pos0:end, C:] = k_pe
        return rows[:end]

    def layer_rows(self, layer: int, end: int) -> torch.Tensor:
        """All rows of `layer` [max_tokens, C+R], for a writer of positions below `end`."""
        self._check_end(end)
        return self.data[layer]

    def write_at(self, layer: int, pos: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                 S: int) -> torch.Tensor:
        """Write the rows at positions pos [T] (a device tensor: fixed shapes and no host
        value, for CUDA graphs; the caller checked the room); return the layer's rows
        [0, S)."""
        rows = self.data[layer]
        rows.index_copy_(0, pos, torch.cat((latent, k_pe), dim=-1).to(rows.dtype))
        return rows[:S]


class KVCache(_Positions):
    """Per-head K (after norm and RoPE) and V of GQA attention: k [L, P, Hkv, Dk] and
    v [L, P, Hkv, Dv], so a layer's rows are contiguous per position for the native call."""

    def __init__(self, n_layer: int, max_tokens: int, n_head_kv: int, k_dim: int, v_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        self.n_layer, self.max_tokens = n_layer, max_tokens
        self.k = torch.zeros(n_layer, max_tokens, n_head_kv, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(n_layer, max_tokens, n_head_kv, v_dim, dtype=dtype, device=device)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()

    def layer_rows(self, layer: int, end: int):
        """All rows (k [P, Hkv, Dk], v [P, Hkv, Dv]) of `layer`, for a writer below `end`."""
        self._check_end(end)
        return self.k[layer], self.v[layer]

    def append(self, layer: int, pos0: int, k: torch.Tensor, v: torch.Tensor):
        """Write rows [pos0, pos0+T) of `layer`; return its rows [0, pos0+T) of k and v."""
        end = pos0 + k.shape[0]
        kr, vr = self.layer_rows(layer, end)
        kr[pos0:end] = k
        vr[pos0:end] = v
        return kr[:end], vr[:end]

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: int):
        """Write the rows at positions pos [T] (a device tensor, for CUDA graphs; the caller
        checked the room); return the layer's rows [0, S) of k and v."""
        kr, vr = self.k[layer], self.v[layer]
        kr.index_copy_(0, pos, k.to(kr.dtype))
        vr.index_copy_(0, pos, v.to(vr.dtype))
        return kr[:S], vr[:S]
