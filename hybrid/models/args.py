"""What each architecture reads from a GGUF header, without torch: its ModelArgs (from the
metadata, every value range-checked) and the shape of every tensor it reads
(`args.tensor_specs()`), so that the loader and the dry-run (placement, which must never
import torch) refuse an inconsistent file with the same one line.

Why a file of its own: an architecture's graph (hybrid/models/<arch>.py) needs torch; its
header facts must not. Each architecture file re-exports its class from here as `ModelArgs`,
so `get_model_module(arch).ModelArgs` stays the one way in; `header_args` is the torch-free
way in for the same classes (ARGS below).

Bounds: no real model comes near them (DeepSeek-V3: 61 blocks, 128 heads, 256 experts,
163840 context); they stop a hostile value before anything is sized by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hybrid.models.specs import ModelConfigError, blocks_present, check_range, transformer_specs

__all__ = ["ARGS", "DeepSeek2Args", "GATING_SIGMOID", "GATING_SOFTMAX", "GQAArgs", "header_args",
           "MAX_BLOCKS", "MAX_CONTEXT", "MAX_EXPERTS", "MAX_HEADS"]

GATING_SOFTMAX, GATING_SIGMOID = 1, 2   # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_*

MAX_BLOCKS = 1024
MAX_HEADS = 4096
MAX_HEAD_DIM = 1 << 16
MAX_DIM = 1 << 20          # embedding, FFN and LoRA widths
MAX_EXPERTS = 1 << 16
MAX_CONTEXT = 1 << 24
MAX_VOCAB = 1 << 24

DEEPSEEK2 = "deepseek2"


def mla_decompress_min_tokens(kv_lora_rank: int, qk_nope_dim: int, v_head_dim: int) -> int:
    """Chunks of at least this many queries attend MLA decompressed: expanding K and V for the
    S cached tokens once beats absorbing per query when T > C*(N+V) / (2C - N - V).
    The runtime (models/deepseek2.py) picks its path by it, the solver sizes the expansion's
    workspace by it."""
    C, N, V = kv_lora_rank, qk_nope_dim, v_head_dim
    return max(1, (C * (N + V)) // max(1, 2 * C - N - V) + 1)


# A decompressed MLA chunk expands K and V for this many groups of heads, one group at a time,
# attending with each before the next: the expansion's workspace is a group's, not every
# head's (R1 at a 32K context: 336 MB instead of 2.7 GB in bf16 on a GPU, 5.4 GB in fp32 on the
# CPU) for the same arithmetic.
MLA_EXPAND_STEPS = 8


def mla_expand_heads(n_head: int) -> int:
    """Heads whose K and V a decompressed MLA chunk holds at once (the runtime's step, the
    solver's workspace)."""
    return max(1, -(-n_head // MLA_EXPAND_STEPS))


def _int(source, key, value, lo, hi, why=""):
    return check_range(source, key, value, lo, hi, why)


def _vocab(metadata, tensors, source, p) -> int:
    """The vocabulary: the vocab_size key, else the tokenizer's tokens, else the embedding's
    rows; all that are present must agree with the embedding's rows (llama.cpp's rule)."""
    embd = tensors.get("token_embd.weight")
    rows = int(embd.ne[1]) if embd is not None and len(embd.ne) > 1 else None
    toks = metadata.get("tokenizer.ggml.tokens")
    n = metadata.get(p + "vocab_size")
    if n is not None:
        n = _int(source, p + "vocab_size", n, 1, MAX_VOCAB)
    elif toks is not None:
        n = len(toks)
    elif rows is not None:
        n = rows
    else:
        raise ModelConfigError(f"{source}: no vocabulary size: neither {p}vocab_size, "
                               f"tokenizer.ggml.tokens nor tensor 'token_embd.weight'")
    if toks is not None and len(toks) != n:
        raise ModelConfigError(f"{source}: metadata tokenizer.ggml.tokens has {len(toks)} entries, "
                               f"expected {n} ({p}vocab_size)")
    if rows is not None and rows != n:
        raise ModelConfigError(f"{source}: tensor 'token_embd.weight' has {rows} rows, expected {n} "
                               f"(the vocabulary size)")
    return _int(source, p + "vocab_size", n, 1, MAX_VOCAB)


def _layers(key, tensors, source, p) -> tuple[int, int]:
    """(blocks run, MTP blocks): block_count counts the trunk and the trailing
    nextn_predict_layers, and must equal the blk.N blocks the file holds."""
    total = _int(source, p + "block_count", key("block_count", required=True), 1, MAX_BLOCKS)
    n_nextn = _int(source, p + "nextn_predict_layers", key("nextn_predict_layers", 0) or 0, 0, total - 1,
                   "fewer than block_count")
    present = blocks_present(tensors)
    if present != total:
        raise ModelConfigError(f"{source}: metadata {p}block_count is {total}, expected {present} "
                               f"(the file holds tensors of blocks 0..{present - 1})")
    return total - n_nextn, n_nextn


def _context(key, source, p) -> int:
    v = key("context_length")
    if v is None:
        return 0
    return _int(source, p + "context_length", v, 1, MAX_CONTEXT)


def _check_moe(a, source, p) -> None:
    """Router values no tensor shape pins down."""
    _int(source, p + "leading_dense_block_count", a.n_dense_lead, 0, a.n_layer)
    if a.n_expert > 1:
        _int(source, p + "expert_used_count", a.n_expert_used, 1, a.n_expert,
             f"expert_count is {a.n_expert}")
    if a.n_group > 1 and a.n_expert > 1:
        G, E = a.n_group, a.n_expert
        if E % G or E // G < 2:
            raise ModelConfigError(f"{source}: metadata {p}expert_group_count is {G}, expected a divisor "
                                   f"of expert_count {E} leaving >= 2 experts per group")
        _int(source, p + "expert_group_used_count", a.n_group_used, 1, G - 1,
             f"expert_group_count is {G}")
        if a.n_expert_used > a.n_group_used * (E // G):
            raise ModelConfigError(
                f"{source}: metadata {p}expert_used_count is {a.n_expert_used}, expected <= "
                f"{a.n_group_used * (E // G)} (the experts in expert_group_used_count groups)")


def _check_tokens(metadata, n_vocab, source) -> None:
    """Special token ids index the vocabulary."""
    for k, v in metadata.items():
        if k.startswith("tokenizer.ggml.") and k.endswith("_token_id") and not isinstance(v, (str, np.ndarray)):
            _int(source, k, v, 0, n_vocab - 1, f"a token of the {n_vocab}-token vocabulary")


@dataclass
class DeepSeek2Args:
    n_vocab: int
    dim: int                       # D
    n_layer: int
    n_ff: int                      # dense FFN dim
    n_head: int                    # H
    qk_nope_dim: int               # N
    qk_rope_dim: int               # R
    v_head_dim: int                # V
    q_lora_rank: int               # Q (0: one attn_q linear)
    kv_lora_rank: int              # C
    rms_eps: float
    n_dense_lead: int
    n_ff_exp: int                  # F of routed / shared experts
    n_expert: int                  # E
    n_expert_used: int             # K
    n_expert_shared: int
    expert_weights_scale: float
    expert_weights_norm: bool
    gating_func: int               # GATING_SOFTMAX / GATING_SIGMOID
    n_group: int                   # G (0/1: no group limit)
    n_group_used: int
    rope_freq_base: float
    rope_scaling_type: str         # none / linear / yarn
    rope_freq_scale: float         # 1 / rope.scaling.factor
    rope_orig_ctx: int
    rope_attn_factor: float
    yarn_log_mul: float            # rope.scaling.yarn_log_multiplier / 0.1 (llama.cpp's fix)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    context_length: int = 0
    n_nextn_layer: int = 0
    mla_split: bool = False        # file has attn_k_b / attn_v_b (else attn_kv_b)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    @property
    def kv_cache_dim(self) -> int:
        """Floats cached per token and layer: latent + rope key."""
        return self.kv_lora_rank + self.qk_rope_dim

    @classmethod
    def from_gguf(cls, metadata: dict, tensors: dict, source: str = "model") -> "DeepSeek2Args":
        p = DEEPSEEK2 + "."

        def key(name, default=None, required=False):
            v = metadata.get(p + name)
            if v is None:
                if required:
                    raise ModelConfigError(f"{source}: metadata key {p + name} is missing; "
                                           f"the GGUF is incomplete or not a deepseek2 model")
                return default
            return v

        def scalar(v, il=None):
            # some keys may be per-layer arrays (llama.cpp get_key_or_arr)
            if isinstance(v, np.ndarray):
                return v.tolist()[il or 0]
            return v

        n_vocab = _vocab(metadata, tensors, source, p)
        n_layer, n_nextn = _layers(key, tensors, source, p)
        n_head = _int(source, p + "attention.head_count", scalar(key("attention.head_count", required=True)),
                      1, MAX_HEADS)
        rope_dim = _int(source, p + "rope.dimension_count", key("rope.dimension_count", required=True),
                        0, MAX_HEAD_DIM)
        # head sizes "as MHA": the *_mla keys of MLA-aware converters, else (early-2025 files
        # with one attn_kv_b) the plain key/value lengths
        k_len = key("attention.key_length_mla")
        if k_len is None:
            k_len = key("attention.key_length", required=True)
        v_len = key("attention.value_length_mla")
        if v_len is None:
            v_len = key("attention.value_length", required=True)
        k_key = p + ("attention.key_length_mla" if key("attention.key_length_mla") is not None
                     else "attention.key_length")
        v_key = p + ("attention.value_length_mla" if key("attention.value_length_mla") is not None
                     else "attention.value_length")
        k_len = _int(source, k_key, scalar(k_len), 1, MAX_HEAD_DIM)
        v_len = _int(source, v_key, scalar(v_len), 1, MAX_HEAD_DIM)
        if rope_dim % 2 or not 0 < rope_dim < k_len:
            raise ModelConfigError(f"{source}: metadata {p}rope.dimension_count is {rope_dim}, expected "
                                   f"an even number within 2..{k_len - 1} (below {k_key} {k_len})")
        mla_split = "blk.0.attn_k_b.weight" in tensors

        scaling_type = str(key("rope.scaling.type", "linear") or "linear")
        factor = float(key("rope.scaling.factor", 0.0) or 0.0)
        freq_scale = 1.0 if factor == 0.0 else 1.0 / factor
        if scaling_type == "none":
            freq_scale = 1.0
        if scaling_type not in ("none", "linear", "yarn"):
            raise ModelConfigError(f"{source}: {p}rope.scaling.type {scaling_type!r} is not "
                                   f"supported for deepseek2 (none, linear, yarn)")
        ctx_train = _context(key, source, p)
        log_mul = float(key("rope.scaling.yarn_log_multiplier", 0.0) or 0.0) / 0.1
        gating = int(key("expert_gating_func", 0) or 0)
        if gating == 0:
            gating = GATING_SOFTMAX  # llama.cpp's default for old V2 files without the key
        if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
            raise ModelConfigError(f"{source}: {p}expert_gating_func {gating} is not supported "
                                   f"(1 softmax, 2 sigmoid)")
        q_lora = _int(source, p + "attention.q_lora_rank", key("attention.q_lora_rank", 0) or 0, 0, MAX_DIM)
        if "blk.0.attn_q.weight" in tensors:
            q_lora = 0
        a = cls(
            n_vocab=n_vocab,
            dim=_int(source, p + "embedding_length", key("embedding_length", required=True), 1, MAX_DIM),
            n_layer=n_layer,
            n_ff=_int(source, p + "feed_forward_length", scalar(key("feed_forward_length", 0)), 0, MAX_DIM),
            n_head=n_head,
            qk_nope_dim=k_len - rope_dim,
            qk_rope_dim=rope_dim,
            v_head_dim=v_len,
            q_lora_rank=q_lora,
            kv_lora_rank=_int(source, p + "attention.kv_lora_rank", key("attention.kv_lora_rank", required=True),
                              1, MAX_DIM),
            rms_eps=float(key("attention.layer_norm_rms_epsilon", required=True)),
            n_dense_lead=_int(source, p + "leading_dense_block_count", key("leading_dense_block_count", 0) or 0, 0, MAX_EXPERTS),
            n_ff_exp=_int(source, p + "expert_feed_forward_length",
                          scalar(key("expert_feed_forward_length", 0)), 0, MAX_DIM),
            n_expert=_int(source, p + "expert_count", key("expert_count", 0) or 0, 0, MAX_EXPERTS),
            n_expert_used=_int(source, p + "expert_used_count", key("expert_used_count", 0) or 0, 0, MAX_EXPERTS),
            n_expert_shared=_int(source, p + "expert_shared_count", key("expert_shared_count", 0) or 0, 0, MAX_EXPERTS),
            expert_weights_scale=float(key("expert_weights_scale", 0.0) or 0.0),
            expert_weights_norm=bool(key("expert_weights_norm", False)),
            gating_func=gating,
            n_group=_int(source, p + "expert_group_count", key("expert_group_count", 0) or 0, 0, MAX_EXPERTS),
            n_group_used=_int(source, p + "expert_group_used_count", key("expert_group_used_count", 0) or 0, 0, MAX_EXPERTS),
            rope_freq_base=float(key("rope.freq_base", 10000.0)),
            rope_scaling_type=scaling_type,
            rope_freq_scale=freq_scale,
            rope_orig_ctx=_int(source, p + "rope.scaling.original_context_length",
                               key("rope.scaling.original_context_length", 0) or ctx_train, 0, MAX_CONTEXT),
            rope_attn_factor=float(key("rope.scaling.attn_factor", 1.0) or 1.0),
            yarn_log_mul=log_mul,
            context_length=ctx_train,
            n_nextn_layer=n_nextn,
            mla_split=mla_split,
        )
        _check_moe(a, source, p)
        _check_tokens(metadata, a.n_vocab, source)
        return a

    # -- llama.cpp's YaRN / attention-scale arithmetic (llama-context.cpp + deepseek2.cpp) ----

    def rope_params(self) -> tuple[float, float]:
        """(ext_factor, attn_factor) as llama.cpp passes them to ggml_rope_ext."""
        ext = 1.0 if self.rope_scaling_type == "yarn" else 0.0
        attn = 1.0
        if ext != 0.0:
            s = 1.0 / self.rope_freq_scale

            def get_mscale(scale, m):
                return 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0

            if self.yarn_log_mul != 0.0:
                # llama.cpp takes mscale = mscale_all_dims for deepseek2: the ratio is 1
                attn = get_mscale(s, self.yarn_log_mul) / get_mscale(s, self.yarn_log_mul)
            else:
                attn = get_mscale(s, 1.0)
            attn *= 1.0 / (1.0 + 0.1 * math.log(s))
        return ext, attn * self.rope_attn_factor

    def kq_scale(self) -> float:
        _, attn = self.rope_params()
        s = 1.0 / self.rope_freq_scale
        attn_org = attn * (1.0 + 0.1 * math.log(s))
        mscale = attn_org * (1.0 + 0.1 * self.yarn_log_mul * math.log(s))
        return mscale * mscale / math.sqrt(self.qk_head_dim)


    def tensor_specs(self) -> list:
        """Every tensor llm_build_deepseek2 reads, with its shape from these args."""
        a = self
        D, H = a.dim, a.n_head
        N, R, Vd, C, Q = a.qk_nope_dim, a.qk_rope_dim, a.v_head_dim, a.kv_lora_rank, a.q_lora_rank
        p = DEEPSEEK2 + "."
        heads = f"{p}attention.head_count, key_length(_mla), value_length(_mla), rope.dimension_count"

        def attention(il):
            rows = [("attn_norm.weight", (D,), f"{p}embedding_length", True)]
            if Q:
                rows += [("attn_q_a.weight", (D, Q), f"{p}attention.q_lora_rank", True),
                         ("attn_q_a_norm.weight", (Q,), f"{p}attention.q_lora_rank", True),
                         ("attn_q_b.weight", (Q, H * (N + R)), heads, True)]
            else:
                rows.append(("attn_q.weight", (D, H * (N + R)), heads, True))
            rows += [("attn_kv_a_mqa.weight", (D, C + R), f"{p}attention.kv_lora_rank, rope.dimension_count", True),
                     ("attn_kv_a_norm.weight", (C,), f"{p}attention.kv_lora_rank", True)]
            if a.mla_split:
                rows += [("attn_k_b.weight", (N, C, H), heads, True), ("attn_v_b.weight", (C, Vd, H), heads, True)]
            else:
                rows.append(("attn_kv_b.weight", (C, H * (N + Vd)), heads, True))
            return rows + [("attn_output.weight", (H * Vd, D), heads, True)]

        fs = a.n_ff_exp * a.n_expert_shared
        return transformer_specs(a, DEEPSEEK2, attention, shexp_ff=fs or None, shexp_required=bool(fs))


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

    FFN_NORM = "ffn_norm"   # a block's norm before its FFN (glm4moe: post_attention_norm)

    @classmethod
    def read(cls, arch: str, metadata: dict, tensors: dict, source: str, *, rope_neox: bool,
             gating_func: int | None = None, expert_weights_norm: bool | None = None,
             fixup=None) -> "GQAArgs":
        """Args from GGUF metadata keys `arch`.*; gating_func / expert_weights_norm given here
        are what llama.cpp hard-codes for the architecture, None reads the file's key; fixup(args)
        adjusts the args before they are validated."""
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

        n_vocab = _vocab(metadata, tensors, source, p)
        n_layer, n_nextn = _layers(key, tensors, source, p)
        dim = _int(source, p + "embedding_length", key("embedding_length", required=True), 1, MAX_DIM)
        n_head = _int(source, p + "attention.head_count", key("attention.head_count", required=True),
                      1, MAX_HEADS)
        n_head_kv = _int(source, p + "attention.head_count_kv", key("attention.head_count_kv", n_head),
                         1, MAX_HEADS)
        head_k = _int(source, p + "attention.key_length", key("attention.key_length", dim // n_head),
                      1, MAX_HEAD_DIM, "default: embedding_length / attention.head_count")
        head_v = _int(source, p + "attention.value_length", key("attention.value_length", head_k),
                      1, MAX_HEAD_DIM)
        rope_dim = _int(source, p + "rope.dimension_count", key("rope.dimension_count", head_k),
                        0, MAX_HEAD_DIM)
        if n_head % n_head_kv:
            raise ModelConfigError(f"{source}: metadata {p}attention.head_count_kv is {n_head_kv}, "
                                   f"expected a divisor of attention.head_count {n_head}")
        if rope_dim <= 0 or rope_dim % 2 or rope_dim > head_k:
            raise ModelConfigError(f"{source}: metadata {p}rope.dimension_count is {rope_dim}, expected "
                                   f"an even number within 2..{head_k} (the key length)")
        scaling = str(key("rope.scaling.type", "none") or "none")
        if scaling not in ("none", "linear", "yarn"):
            raise ModelConfigError(f"{source}: {p}rope.scaling.type {scaling!r} is not supported "
                                   f"(none, linear, yarn)")
        factor = float(key("rope.scaling.factor", 0.0) or 0.0)
        ctx_train = _context(key, source, p)
        gating = gating_func if gating_func is not None else int(key("expert_gating_func", 0) or 0)
        if gating == 0:
            gating = GATING_SOFTMAX
        if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
            raise ModelConfigError(f"{source}: {p}expert_gating_func {gating} is not supported "
                                   f"(1 softmax, 2 sigmoid)")
        n_expert = _int(source, p + "expert_count", key("expert_count", 0) or 0, 0, MAX_EXPERTS)
        n_used = _int(source, p + "expert_used_count", key("expert_used_count", 0) or 0, 0, MAX_EXPERTS)
        a = cls(
            arch=arch, n_vocab=n_vocab, dim=dim, n_layer=n_layer, n_head=n_head,
            n_head_kv=n_head_kv, head_dim_k=head_k, head_dim_v=head_v, rope_dim=rope_dim,
            rope_neox=rope_neox,
            rms_eps=float(key("attention.layer_norm_rms_epsilon", required=True)),
            rope_freq_base=float(key("rope.freq_base", 10000.0)),
            rope_scaling_type=scaling,
            rope_freq_scale=1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor,
            rope_orig_ctx=_int(source, p + "rope.scaling.original_context_length",
                               key("rope.scaling.original_context_length", 0) or ctx_train, 0, MAX_CONTEXT),
            rope_attn_factor=float(key("rope.scaling.attn_factor", 1.0) or 1.0),
            n_ff=_int(source, p + "feed_forward_length", key("feed_forward_length", 0) or 0, 0, MAX_DIM),
            n_dense_lead=_int(source, p + "leading_dense_block_count", key("leading_dense_block_count", 0) or 0, 0, MAX_EXPERTS),
            n_expert=n_expert, n_expert_used=n_used,
            n_ff_exp=_int(source, p + "expert_feed_forward_length", key("expert_feed_forward_length", 0) or 0, 0, MAX_DIM),
            n_expert_shared=_int(source, p + "expert_shared_count", key("expert_shared_count", 0) or 0, 0, MAX_EXPERTS),
            n_ff_shexp=_int(source, p + "expert_shared_feed_forward_length", key("expert_shared_feed_forward_length", 0) or 0, 0, MAX_DIM),
            gating_func=gating,
            expert_weights_norm=(bool(key("expert_weights_norm", False))
                                 if expert_weights_norm is None else expert_weights_norm),
            expert_weights_scale=float(key("expert_weights_scale", 0.0) or 0.0),
            n_group=_int(source, p + "expert_group_count", key("expert_group_count", 0) or 0, 0, MAX_EXPERTS),
            n_group_used=_int(source, p + "expert_group_used_count", key("expert_group_used_count", 0) or 0, 0, MAX_EXPERTS),
            context_length=ctx_train, n_nextn_layer=n_nextn,
        )
        if fixup is not None:
            fixup(a)
        _check_moe(a, source, p)
        _check_tokens(metadata, a.n_vocab, source)
        return a

    def rope(self, max_pos: int, device=None):
        from hybrid.models.layers import Rope

        ext = 1.0 if self.rope_scaling_type == "yarn" else 0.0
        return Rope(self.rope_dim, max_pos, base=self.rope_freq_base,
                    freq_scale=self.rope_freq_scale, ext_factor=ext,
                    attn_factor=self.rope_attn_factor, orig_ctx=self.rope_orig_ctx,
                    neox=self.rope_neox, device=device)

    def tensor_specs(self) -> list:
        """Every tensor the GQA transformer reads, with its shape from these args."""
        a = self
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
        return transformer_specs(a, a.arch, attention, ffn_norm=self.FFN_NORM,
                                 shexp_ff=a.n_ff_shexp or (a.n_ff_exp * a.n_expert_shared) or None,
                                 shexp_required=bool(a.n_expert_shared))


# -- the GQA family: what each architecture hard-codes (llama.cpp's llm_load_hparams) --------


class Qwen3MoeArgs(GQAArgs):
    @classmethod
    def from_gguf(cls, metadata: dict, tensors: dict, source: str = "model") -> GQAArgs:
        return cls.read("qwen3moe", metadata, tensors, source,
                        rope_neox=True, gating_func=GATING_SOFTMAX, expert_weights_norm=True)


class Qwen2MoeArgs(GQAArgs):
    @classmethod
    def from_gguf(cls, metadata: dict, tensors: dict, source: str = "model") -> GQAArgs:
        return cls.read("qwen2moe", metadata, tensors, source,
                        rope_neox=True, gating_func=GATING_SOFTMAX, expert_weights_norm=False)


class LlamaArgs(GQAArgs):
    @classmethod
    def from_gguf(cls, metadata: dict, tensors: dict, source: str = "model") -> GQAArgs:
        def mixtral(a):
            if a.n_expert and metadata.get("llama.expert_feed_forward_length") is None:
                # Mixtral files have no expert_feed_forward_length: llama.cpp sizes llama's
                # experts by feed_forward_length (not n_ff / K, the qwen*moe fallback)
                a.n_ff_exp = a.n_ff

        return cls.read("llama", metadata, tensors, source, rope_neox=False,
                        gating_func=GATING_SOFTMAX, expert_weights_norm=True, fixup=mixtral)


class Glm4MoeArgs(GQAArgs):
    FFN_NORM = "post_attention_norm"   # what the converter names the FFN's norm

    @classmethod
    def from_gguf(cls, metadata: dict, tensors: dict, source: str = "model") -> GQAArgs:
        # llama.cpp takes sigmoid gating when the file has no expert_gating_func
        gating = None if metadata.get("glm4moe.expert_gating_func") else GATING_SIGMOID
        return cls.read("glm4moe", metadata, tensors, source, rope_neox=True, gating_func=gating)


# general.architecture -> its args (hybrid.models.ARCHITECTURES lists the same names)
ARGS = {"deepseek2": DeepSeek2Args, "glm4moe": Glm4MoeArgs, "llama": LlamaArgs,
        "qwen2moe": Qwen2MoeArgs, "qwen3moe": Qwen3MoeArgs}


def header_args(arch: str, metadata: dict, tensors: dict, source: str = "model"):
    """The architecture's args, every value and tensor checked (ModelConfigError, one line,
    otherwise). Returns (args, names of tensors no spec declares)."""
    from hybrid.models.specs import check_tensors

    cls = ARGS.get(arch)
    if cls is None:
        raise ModelConfigError(f"{source}: architecture {arch!r} is not supported; supported: "
                               f"{', '.join(sorted(ARGS))}")
    args = cls.from_gguf(metadata, tensors, source)
    extra = check_tensors(args.tensor_specs(), tensors, source, arch, args.n_layer)
    return args, extra
