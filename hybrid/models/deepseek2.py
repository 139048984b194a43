"""DeepSeek-V2/V3/R1 (GGUF architecture `deepseek2`): ModelArgs, MLA attention, MoE, model.

The graph follows llama.cpp's `llm_build_deepseek2` (src/models/deepseek2.cpp) so that logits
agree with it on the same file: RMS norms, normal (adjacent-pair) RoPE on the last
`rope.dimension_count` dims of each head with YaRN, its kq_scale / mscale arithmetic, the
router order (gating -> bias for selection only -> group top-k -> top-k -> weights from the
unbiased probs -> normalize -> scale), shared experts added to the routed ones.

Attention keeps a latent KV cache: per token and layer only the normalized latent (C) and
the roped shared key part (R). The per-head K/V up-projections are applied either to the
query and the attention output ("absorbed", cheap per new token: decode) or to the cached
latents ("decompressed", cheap for long prefill chunks); both read the same cache.

Weights come from a loader (see WeightLoader): this file never mentions devices.

Shape legend: T tokens in this call, S tokens attended (cache length after this call),
D model dim, H heads, N no-rope query/key dims per head, R rope dims, C kv_lora_rank
(latent), V value dims per head, Q q_lora_rank, E experts, K experts per token,
G expert groups, F FFN dim, B vocabulary.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from hybrid.models.args import DeepSeek2Args, mla_decompress_min_tokens, mla_expand_heads
from hybrid.models.layers import (QUERY_BLOCK, HeadLinear, ModelConfigError, Rope, WeightLoader,  # noqa: F401
                                  attend, causal_mask, norm, query_blocks)
from hybrid.models.moe import GATING_SIGMOID, GATING_SOFTMAX, MoE, Router  # noqa: F401 (re-exported)
from hybrid.models.transformer import Transformer

log = logging.getLogger(__name__)

ARCH = "deepseek2"


# the header facts (ModelArgs, tensor specs) live, torch-free, in hybrid.models.args
ModelArgs = DeepSeek2Args


class MLAttention:
    """Multi-head latent attention over a latent KV cache."""

    def __init__(self, args: ModelArgs, w: WeightLoader, il: int):
        p = f"blk.{il}."
        self.args = args
        self.il = il
        H, N, V, C = args.n_head, args.qk_nope_dim, args.v_head_dim, args.kv_lora_rank
        self.attn_norm = norm(w, p + "attn_norm.weight", args.rms_eps)
        if args.q_lora_rank > 0:
            self.wq_a = w.linear(p + "attn_q_a.weight")
            self.q_a_norm = norm(w, p + "attn_q_a_norm.weight", args.rms_eps)
            self.wq_b = w.linear(p + "attn_q_b.weight")
            self.wq = None
        else:
            self.wq = w.linear(p + "attn_q.weight")
        self.wkv_a = w.linear(p + "attn_kv_a_mqa.weight")
        self.kv_a_norm = norm(w, p + "attn_kv_a_norm.weight", args.rms_eps)
        self.wo = w.linear(p + "attn_output.weight")
        # weight surgery: per-head up-projections wk [H, N, C] (k_nope = wk @ latent) and
        # wv [H, V, C] (v = wv @ latent), from either tensor layout
        if w.has(p + "attn_k_b.weight"):
            src = p + "attn_k_b.weight"
            wk = w.tensor(p + "attn_k_b.weight")           # ne {N, C, H} -> [H, C, N]
            wv = w.tensor(p + "attn_v_b.weight")           # ne {C, V, H} -> [H, V, C]
            wk = wk.reshape(H, C, N).transpose(1, 2)
            wv = wv.reshape(H, V, C)
        else:
            src = p + "attn_kv_b.weight"
            kv_b = w.tensor(src)                           # ne {C, H*(N+V)} -> [H*(N+V), C]
            kv_b = kv_b.reshape(H, N + V, C)
            wk, wv = kv_b[:, :N], kv_b[:, N:]
        # as per-head linears x[h] @ W[h] (the loader picks their format): the query into
        # latent space (W = wk [H, N, C]) and the latent output to values (W = wv^T [H, C, V])
        head_linear = getattr(w, "head_linear", None) or (lambda name, W: HeadLinear(W))
        self.k_up = head_linear(src, wk.contiguous())
        self.v_up = head_linear(src, wv.transpose(1, 2).contiguous())
        self.scale = args.kq_scale()
        # chunks at least this long attend decompressed (the solver sizes its workspace by the
        # same rule)
        self.decompress_min_tokens = mla_decompress_min_tokens(C, N, V)
        self.query_block = getattr(w, "attn_query_block", QUERY_BLOCK)
        # the loader may give a native causal attention for the decompressed path's chunks
        causal = getattr(w, "causal_attention", None)
        self.causal = causal() if causal is not None else None
        # the loader may run the whole absorbed path as one fused call (same weights)
        fused = getattr(w, "fused_attention", None)
        self.fused = fused(self) if fused is not None else None

    def _project(self, x: torch.Tensor):
        """x [T, D] -> q_nope [T,H,N], q_pe [T,H,R] (not roped), latent [T,C], k_pe [T,R]."""
        a = self.args
        T = x.shape[0]
        H, N, R, C = a.n_head, a.qk_nope_dim, a.qk_rope_dim, a.kv_lora_rank
        h = self.attn_norm(x)
        if self.wq is None:
            q = self.wq_b(self.q_a_norm(self.wq_a(h)))
        else:
            q = self.wq(h)
        q = q.view(T, H, N + R)
        kv = self.wkv_a(h)                                                 # [T, C+R]
        latent = self.kv_a_norm(kv[:, :C])                                 # [T, C]
        return q[..., :N], q[..., N:], latent, kv[:, C:]

    def __call__(self, x: torch.Tensor, pos0: int, cache, rope: Rope, mode: str = "auto"):
        T = x.shape[0]
        if mode == "auto":
            mode = "decompress" if T >= self.decompress_min_tokens else "absorb"
        if mode == "absorb" and self.fused is not None and self.fused.accepts(x, cache):
            return self.fused(x, pos0, cache, rope)
        q_nope, q_pe, latent, k_pe = self._project(x)
        q_pe, k_pe = rope(q_pe, pos0), rope(k_pe, pos0)                    # [T,H,R], [T,R]
        kv_all = cache.append(self.il, pos0, latent, k_pe)                 # [S, C+R]
        if mode == "absorb":
            o = self._absorbed(q_nope, q_pe, kv_all, pos0=pos0)
        else:
            o = self._decompressed(q_nope, q_pe, kv_all, pos0=pos0)
        return self.wo(o.reshape(T, -1))

    def static(self, x: torch.Tensor, pos: torch.Tensor, cache, rope: Rope, S: int):
        """Absorbed attention of T tokens at positions pos [T] (a tensor) over the first S
        cache rows, masked beyond each token's position: shapes depend on (T, S) only."""
        T = x.shape[0]
        q_nope, q_pe, latent, k_pe = self._project(x)
        q_pe, k_pe = rope.at(q_pe, pos), rope.at(k_pe, pos)
        kv_all = cache.write_at(self.il, pos, latent, k_pe, S)             # [S, C+R]
        mask = torch.arange(S, device=x.device)[None, :] <= pos[:, None]   # [T, S]
        o = self._absorbed(q_nope, q_pe, kv_all, mask=mask)
        return self.wo(o.reshape(T, -1))

    def _absorbed(self, q_nope, q_pe, kv_all, *, pos0=None, mask=None):
        """Attention in latent space: MQA with one shared K=[latent|k_pe], V=latent, in blocks of
        queries (all heads): one [H, block, S] block of scores at a time, the Plan's workspace.
        Masking as layers.attend: causal from pos0, or an explicit mask [T, S]."""
        T, H, _ = q_nope.shape
        C = self.args.kv_lora_rank
        cd = kv_all.dtype  # matmuls against the cache in its dtype, softmax in float32
        q_abs = self.k_up(q_nope.transpose(0, 1))                          # [H, T, C]
        qc = torch.cat((q_abs, q_pe.transpose(0, 1)), dim=-1).to(cd)       # [H, T, C+R]
        o_lat = torch.empty(H, T, C, dtype=cd, device=kv_all.device)
        for t0, t1 in query_blocks(T, self.query_block):
            n = t1 - t0
            kv, m = kv_all, None
            if pos0 is not None:
                kv = kv_all[:min(kv_all.shape[0], pos0 + t1)]             # keys the block can see
                if n > 1:
                    m = causal_mask(t0, t1, pos0, kv.shape[0], kv.device)
            elif mask is not None:
                m = mask[t0:t1]
            scores = (qc[:, t0:t1].reshape(H * n, -1) @ kv.t()).view(H, n, -1)   # [H, n, S]
            scores = scores.float().mul_(self.scale)
            if m is not None:
                scores.masked_fill_(~m, float("-inf"))
            p = torch.softmax(scores, dim=-1).to(cd)
            o_lat[:, t0:t1] = (p.view(H * n, -1) @ kv[:, :C]).view(H, n, C)
        o = self.v_up(o_lat)                                               # [H, T, V]
        return o.transpose(0, 1)                                           # [T, H, V]

    def _decompressed(self, q_nope, q_pe, kv_all, *, pos0=None):
        """Expand the cached latents to per-head K and V, a group of mla_expand_heads heads at a
        time (the Plan's workspace counts one group's expansion), and attend with each group:
        the loader's native causal attention on the CPU where it has one (the rope keys read in
        place, shared by every head), else in query blocks (layers.attend), float32 on the CPU,
        the weights' 16-bit type on CUDA so the fused kernels apply."""
        S, T = kv_all.shape[0], q_nope.shape[0]
        C, R, H, V = self.args.kv_lora_rank, self.args.qk_rope_dim, q_nope.shape[1], self.args.v_head_dim
        wk, wv_t = self.k_up.weight, self.v_up.weight                      # [H,N,C], [H,C,V]
        cd = wk.dtype if (kv_all.is_cuda and wk.dtype in (torch.bfloat16, torch.float16)) else torch.float32
        lat = kv_all[:, :C].to(wk.dtype)
        native = (pos0 is not None and self.causal is not None
                  and self.causal.accepts(q_nope, q_pe, kv_all) and wk.dtype == torch.float32)
        o = torch.empty(T, H, V, dtype=cd, device=q_nope.device)
        step = mla_expand_heads(H)
        for h0 in range(0, H, step):
            h1 = min(H, h0 + step)
            k_nope = torch.matmul(lat, wk[h0:h1].transpose(1, 2)).to(cd)     # [h, S, N]
            v = torch.matmul(lat, wv_t[h0:h1]).to(cd)                        # [h, S, V]
            if native:
                self.causal(q_nope[:, h0:h1], k_nope, v, self.scale, pos0, q_pe[:, h0:h1],
                            kv_all[:, C:].unsqueeze(0), out=o[:, h0:h1])
                continue
            k = torch.cat((k_nope, kv_all[:, C:].to(cd).expand(h1 - h0, S, R)), dim=-1)   # [h, S, N+R]
            del k_nope
            q = torch.cat((q_nope[:, h0:h1], q_pe[:, h0:h1]), dim=-1).transpose(0, 1).to(cd)
            o[:, h0:h1] = attend(q, k, v, self.scale, self.query_block, pos0=pos0).transpose(0, 1)
        return o.to(q_nope.dtype)                                          # [T, H, V]


class DeepSeek2(Transformer):
    """The whole model: MLA attention, leading dense FFN blocks, then MoE blocks."""

    def __init__(self, args: ModelArgs, w: WeightLoader, max_pos: int, rope_device=None,
                 progress=None):
        if args.n_nextn_layer:
            log.info("deepseek2: ignoring %d MTP/nextn layer(s) (not used for generation)",
                     args.n_nextn_layer)
        super().__init__(args, w, max_pos, rope_device, progress)

    def make_attention(self, w: WeightLoader, il: int):
        return MLAttention(self.args, w, il)

    @staticmethod
    def tensor_specs(a: ModelArgs) -> list:
        return a.tensor_specs()

    def make_rope(self, max_pos: int, device):
        a = self.args
        ext, attn = a.rope_params()
        return Rope(a.qk_rope_dim, max_pos, base=a.rope_freq_base, freq_scale=a.rope_freq_scale,
                    ext_factor=ext, attn_factor=attn, orig_ctx=a.rope_orig_ctx,
                    beta_fast=a.yarn_beta_fast, beta_slow=a.yarn_beta_slow, neox=False,
                    device=device)

    @staticmethod
    def cache_bytes_per_token(a: ModelArgs, dtype: torch.dtype) -> int:
        """What new_cache holds per position: the latent and the rope key of every layer."""
        return a.n_layer * (a.kv_lora_rank + a.qk_rope_dim) * dtype.itemsize

    def new_cache(self, tokens: int, dtype: torch.dtype, device):
        from hybrid.runtime.kv_cache import LatentKVCache

        a = self.args
        return LatentKVCache(a.n_layer, tokens, a.kv_lora_rank, a.qk_rope_dim, dtype=dtype,
                             device=device)


Model = DeepSeek2
