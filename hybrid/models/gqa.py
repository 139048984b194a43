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
from hybrid.models.specs import TensorSpec
from hybrid.models.transformer import Transformer, moe_layer

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
        D, V, H, Hkv, Dk, Dv = a.dim, a.n_vocab, a.n_head, a.n_head_kv, a.head_dim_k, a.head_dim_v
        E, F = a.n_expert, a.n_ff_exp
        p_ = a.arch + "."
        heads = f"{p_}attention.head_count(_kv), key_length, value_length"
        specs = [TensorSpec("token_embd.weight", (D, V), f"{p_}embedding_length and the vocabulary"),
                 TensorSpec("output_norm.weight", (D,), f"{p_}embedding_length"),
                 TensorSpec("output.weight", (D, V), "the embedding", required=False)]
        for il in range(a.n_layer):
            b = f"blk.{il}."

            def t(name, ne, why, required=True):
                specs.append(TensorSpec(b + name, ne, why, required))

            t("attn_norm.weight", (D,), f"{p_}embedding_length")
            t("attn_q.weight", (D, H * Dk), heads)
            t("attn_k.weight", (D, Hkv * Dk), heads)
            t("attn_v.weight", (D, Hkv * Dv), heads)
            t("attn_output.weight", (H * Dv, D), heads)
            t("attn_q.bias", (H * Dk,), heads, False)
            t("attn_k.bias", (Hkv * Dk,), heads, False)
            t("attn_v.bias", (Hkv * Dv,), heads, False)
            t("attn_q_norm.weight", (Dk,), f"{p_}attention.key_length", False)
            t("attn_k_norm.weight", (Dk,), f"{p_}attention.key_length", False)
            t(cls.FFN_NORM + ".weight", (D,), f"{p_}embedding_length")
            if not moe_layer(a, il):
                ff = f"{p_}feed_forward_length"
                t("ffn_gate.weight", (D, a.n_ff), ff)
                t("ffn_up.weight", (D, a.n_ff), ff)
                t("ffn_down.weight", (a.n_ff, D), ff)
                continue
            ex = f"{p_}expert_count and expert_feed_forward_length"
            t("ffn_gate_inp.weight", (D, E), f"{p_}expert_count")
            t("exp_probs_b.bias", (E,), f"{p_}expert_count", False)
            t("ffn_gate_exps.weight", (D, F, E), ex)
            t("ffn_up_exps.weight", (D, F, E), ex)
            t("ffn_down_exps.weight", (F, D, E), ex)
            # the shared expert: its size from whichever key the architecture writes
            fs = a.n_ff_shexp or (F * a.n_expert_shared) or None
            need = bool(a.n_expert_shared)
            sh = f"{p_}expert_shared_feed_forward_length / expert_shared_count"
            t("ffn_gate_shexp.weight", (D, fs), sh, need)
            t("ffn_up_shexp.weight", (D, fs), sh, need)
            t("ffn_down_shexp.weight", (fs, D), sh, need)
            t("ffn_gate_inp_shexp.weight", (D,), f"{p_}embedding_length", False)
        return specs

    def make_attention(self, w: WeightLoader, il: int):
        return GQAttention(self.args, w, il)

    def make_rope(self, max_pos: int, device):
        return self.args.rope(max_pos, device)

    def new_cache(self, tokens: int, dtype: torch.dtype, device):
        from hybrid.runtime.kv_cache import KVCache

        a = self.args
        return KVCache(a.n_layer, tokens, a.n_head_kv, a.head_dim_k, a.head_dim_v, dtype=dtype,
                       device=device)

