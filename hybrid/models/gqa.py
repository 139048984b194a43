"""The GQA transformer the llama-family MoE architectures share (llama/Mixtral, qwen2moe,
qwen3moe, glm4moe): GQA attention, optional leading dense FFN blocks, MoE blocks with the
shared router kinds, per-head K/V cache. An architecture file states only what differs: its
GGUF prefix, RoPE pair layout and router defaults (`GQAArgs.read`), and any tensor it adds.

Shape legend: as in hybrid.models.attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hybrid.models.attention import GQAttention
from hybrid.models.layers import ModelConfigError, Rope, WeightLoader
from hybrid.models.moe import GATING_SIGMOID, GATING_SOFTMAX
from hybrid.models.specs import transformer_specs
from hybrid.models.transformer import Transformer

__all__ = ["GQAArgs", "GQATransformer"]


@dataclass
class GQAArgs:
    arch: str
    n_vocab: int
    dim: int                        # D
    n_layer: int                    # blocks run for generation (MTP/nextn blocks excluded)
    n_head: int                     # H
    n_head_kv: int                  # Hkv
    head_dim_k: int                 # Dk
    head_dim_v: int                 # Dv
    rope_dim: int                   # R, the first R of Dk dims are rotated
    rope_neox: bool                 # pairs (i, i + R/2) instead of (2i, 2i + 1)
    rms_eps: float
    rope_freq_base: float = 10000.0
    rope_scaling_type: str = "none"  # none / linear / yarn
    rope_freq_scale: float = 1.0
    rope_orig_ctx: int = 0
    rope_attn_factor: float = 1.0
    n_ff: int = 0                   # dense FFN dim
    n_dense_lead: int = 0           # leading dense blocks (glm4moe)
    n_expert: int = 0               # E (0: a dense model)
    n_expert_used: int = 0          # K
    n_ff_exp: int = 0               # F of a routed expert
    n_expert_shared: int = 0
    n_ff_shexp: int = 0             # shared expert FFN dim (0: not in the metadata)
    gating_func: int = GATING_SOFTMAX
    expert_weights_norm: bool = False
    expert_weights_scale: float = 0.0
    n_group: int = 0
    n_group_used: int = 0
    context_length: int = 0
    n_nextn_layer: int = 0

    @classmethod
    def read(cls, arch: str, metadata: dict, tensors: dict, source: str, *, rope_neox: bool,
             gating_func: int | None = None, expert_weights_norm: bool | None = None) -> "GQAArgs":
        """Args from GGUF metadata keys `arch`.*; gating_func / expert_weights_norm given here
        are what llama.cpp hard-codes for the architecture, None reads the file's key."""
        p = arch + "."

        def key(name, default=None, required=False):
            v = metadata.get(p + name)
            if v is None:
                if required:
                    raise ModelConfigError(f"{source}: metadata key {p + name} is missing; the "
                                           f"GGUF is incomplete or not a {arch} model")
                return default
            if isinstance(v, np.ndarray):     # per-layer arrays (llama.cpp get_key_or_arr)
                vals = set(v.tolist())
                if len(vals) != 1:
                    raise ModelConfigError(f"{source}: {p + name} differs between layers "
                                           f"({sorted(vals)}); not supported")
                v = vals.pop()
            return v

        dim = int(key("embedding_length", required=True))
        n_head = int(key("attention.head_count", required=True))
        if n_head <= 0:
            raise ModelConfigError(f"{source}: {p}attention.head_count is {n_head}; must be > 0")
        n_head_kv = int(key("attention.head_count_kv", n_head))
        head_k = int(key("attention.key_length", dim // n_head))
        head_v = int(key("attention.value_length", head_k))
        rope_dim = int(key("rope.dimension_count", head_k))
        if n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelConfigError(f"{source}: {p}attention.head_count_kv {n_head_kv} must divide "
                                   f"attention.head_count {n_head}")
        if rope_dim <= 0 or rope_dim % 2 or rope_dim > head_k:
            raise ModelConfigError(f"{source}: {p}rope.dimension_count {rope_dim} must be even and "
                                   f"within 2..{head_k} (the key length)")
        n_vocab = key("vocab_size")
        if n_vocab is None:
            toks = metadata.get("tokenizer.ggml.tokens")
            n_vocab = len(toks) if toks is not None else tensors["token_embd.weight"].ne[1]
        n_nextn = int(key("nextn_predict_layers", 0) or 0)
        n_layer = int(key("block_count", required=True)) - n_nextn
        if n_layer <= 0:
            raise ModelConfigError(f"{source}: {p}block_count leaves no layers after "
                                   f"{n_nextn} nextn_predict_layers")
        scaling = str(key("rope.scaling.type", "none") or "none")
        if scaling not in ("none", "linear", "yarn"):
            raise ModelConfigError(f"{source}: {p}rope.scaling.type {scaling!r} is not supported "
                                   f"(none, linear, yarn)")
        factor = float(key("rope.scaling.factor", 0.0) or 0.0)
        ctx_train = int(key("context_length", 0) or 0)
        gating = gating_func if gating_func is not None else int(key("expert_gating_func", 0) or 0)
        if gating == 0:
            gating = GATING_SOFTMAX
        if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
            raise ModelConfigError(f"{source}: {p}expert_gating_func {gating} is not supported "
                                   f"(1 softmax, 2 sigmoid)")
        n_expert = int(key("expert_count", 0) or 0)
        n_used = int(key("expert_used_count", 0) or 0)
        if n_expert and not 0 < n_used <= n_expert:
            raise ModelConfigError(f"{source}: {p}expert_used_count {n_used} must be within "
                                   f"1..expert_count ({n_expert})")
        return cls(
            arch=arch, n_vocab=int(n_vocab), dim=dim, n_layer=n_layer, n_head=n_head,
            n_head_kv=n_head_kv, head_dim_k=head_k, head_dim_v=head_v, rope_dim=rope_dim,
            rope_neox=rope_neox,
            rms_eps=float(key("attention.layer_norm_rms_epsilon", required=True)),
            rope_freq_base=float(key("rope.freq_base", 10000.0)),
            rope_scaling_type=scaling,
            rope_freq_scale=1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor,
            rope_orig_ctx=int(key("rope.scaling.original_context_length", 0) or ctx_train),
            rope_attn_factor=float(key("rope.scaling.attn_factor", 1.0) or 1.0),
            n_ff=int(key("feed_forward_length", 0) or 0),
            n_dense_lead=int(key("leading_dense_block_count", 0) or 0),
            n_expert=n_expert, n_expert_used=n_used,
            n_ff_exp=int(key("expert_feed_forward_length", 0) or 0),
            n_expert_shared=int(key("expert_shared_count", 0) or 0),
            n_ff_shexp=int(key("expert_shared_feed_forward_length", 0) or 0),
            gating_func=gating,
            expert_weights_norm=(bool(key("expert_weights_norm", False))
                                 if expert_weights_norm is None else expert_weights_norm),
            expert_weights_scale=float(key("expert_weights_scale", 0.0) or 0.0),
            n_group=int(key("expert_group_count", 0) or 0),
            n_group_used=int(key("expert_group_used_count", 0) or 0),
            context_length=ctx_train, n_nextn_layer=n_nextn,
        )

    def rope(self, max_pos: int, device=None) -> Rope:
        ext = 1.0 if self.rope_scaling_type == "yarn" else 0.0
        return Rope(self.rope_dim, max_pos, base=self.rope_freq_base,
                    freq_scale=self.rope_freq_scale, ext_factor=ext,
                    attn_factor=self.rope_attn_factor, orig_ctx=self.rope_orig_ctx,
                    neox=self.rope_neox, device=device)


class GQATransformer(Transformer):
    @classmethod
    def tensor_specs(cls, a: GQAArgs) -> list:
        H, Hkv, Dk, Dv, D = a.n_head, a.n_head_kv, a.head_dim_k, a.head_dim_v, a.dim
        heads = f"{a.arch}.attention.head_count(_kv), key_length, value_length"
        kl = f"{a.arch}.attention.key_length"

        def attention(il):
            return [("attn_norm.weight", (D,), f"{a.arch}.embedding_length", True),
                    ("attn_q.weight", (D, H * Dk), heads, True),
                    ("attn_k.weight", (D, Hkv * Dk), heads, True),
                    ("attn_v.weight", (D, Hkv * Dv), heads, True),
                    ("attn_output.weight", (H * Dv, D), heads, True),
                    ("attn_q.bias", (H * Dk,), heads, False),
                    ("attn_k.bias", (Hkv * Dk,), heads, False),
                    ("attn_v.bias", (Hkv * Dv,), heads, False),
                    ("attn_q_norm.weight", (Dk,), kl, False),
                    ("attn_k_norm.weight", (Dk,), kl, False)]

        # the shared expert's width from whichever key the architecture writes
        return transformer_specs(a, a.arch, attention, ffn_norm=cls.FFN_NORM,
                                 shexp_ff=a.n_ff_shexp or (a.n_ff_exp * a.n_expert_shared) or None,
                                 shexp_required=bool(a.n_expert_shared))

    def make_attention(self, w: WeightLoader, il: int):
        return GQAttention(self.args, w, il)

    def make_rope(self, max_pos: int, device):
        return self.args.rope(max_pos, device)

    def new_cache(self, tokens: int, dtype: torch.dtype, device):
        from hybrid.runtime.kv_cache import KVCache

        a = self.args
        return KVCache(a.n_layer, tokens, a.n_head_kv, a.head_dim_k, a.head_dim_v, dtype=dtype,
                       device=device)

