"""Native (C++) stand-ins for the model's building blocks on the CPU: quantized linears,
per-head linears, RMSNorm, the fused MLA attention, the router's selection and the shared
experts as a one-expert engine layer. The loader (hybrid.runtime.loader) hands them to a model
in place of the torch versions when the layer runs on the CPU; each computes exactly what its
torch twin in hybrid.models computes.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from hybrid.backends import dequant

__all__ = ["NativeFFN", "NativeGQA", "NativeHeadLinear", "NativeMLA", "NativeRMSNorm", "NativeRouter",
           "NativeWorkers", "QuantLinear", "check_native_expert_types", "native", "native_experts_cls"]

def native():
    """hybrid._native if it was built, else None."""
    try:
        from hybrid import _native as n
    except ImportError:
        return None
    return n


def check_native_expert_types(gguf, native_types) -> None:
    """Refuse, before anything is loaded, routed experts the native expert engine cannot run
    in their GGUF blocks. Run anyway they would be dequantized to float copies several times
    the file's bytes that the Plan never counted (a silent blow-up); the error names the
    tensors, their types and the cost, and how to choose those copies deliberately."""
    bad = [t for name, t in gguf.tensors.items()
           if name.endswith("_exps.weight") and t.ggml_type not in native_types]
    if not bad:
        return
    shown = ", ".join(f"{t.name} ({t.type_name})" for t in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    n_file = sum(t.n_bytes for t in bad)
    n_f32 = sum(t.n_rows * t.ne[0] * 4 for t in bad)
    raise ValueError(
        f"{gguf.paths[0]}: routed experts {shown}{more} are in a GGML type the native expert "
        f"engine cannot run; dequantized they would take {n_f32 / 2**30:.2f} GiB of float32 "
        f"instead of the file's {n_file / 2**30:.2f} GiB, which the plan does not count. Use a "
        f"file whose experts are in a supported type, or pass experts='torch' to run them from "
        f"dequantized copies")


def native_experts_cls():
    if native() is None:
        return None
    try:
        from hybrid.backends.experts import NativeExperts
    except ImportError:
        return None
    return NativeExperts



class NativeWorkers:
    """Where the native matmuls run. Once the expert engine exists: on its workers, all of
    them. One set of spinning threads then serves the experts and every linear of a decode
    step; with a second pool each would keep a worker spinning, more threads than cores (on
    TinyConfig.mid, 2 cores, linears on one thread of their own pool cost ~10 ms a token).
    Before that, while the engine is busy (its forward overlaps the GPU) or without native
    experts: the module's shared pool, `threads` wide."""

    def __init__(self):
        self.engine = None   # the native MoEEngine, set when the loader creates it

    def matmul(self, w, ggml_type: int, x, out, threads: int):
        e = self.engine
        if e is not None and not e.busy:
            return native().matmul(w, ggml_type, x, out, engine=e)
        return native().matmul(w, ggml_type, x, out, threads)

    @property
    def hot(self) -> bool:
        """True when calls go to the engine's (spinning) workers."""
        return self.engine is not None and not self.engine.busy


class QuantLinear:
    """y = x @ W^T on the native matmul, W kept in its GGUF bytes (CPU only).

    On the expert engine's workers when there is one (see NativeWorkers). Otherwise threads:
    all of them for more than a few tokens; for decode one per `bytes_per_thread` of
    weights, since a decode matmul of a few MB is over before a sleeping worker has woken up."""

    bytes_per_thread = 4 << 20
    few_tokens = 4

    def __init__(self, view: np.ndarray, ggml_type: int, in_features: int, threads: int = 0,
                 name: str = "linear", workers: NativeWorkers | None = None):
        if native() is None:
            raise RuntimeError("QuantLinear needs hybrid._native; build the extension")
        self.workers = workers or NativeWorkers()
        self.view = view                      # uint8 [out, row_bytes]
        self.ggml_type = ggml_type
        self.in_features = in_features
        self.out_features = view.shape[0]
        self.threads = threads
        self.decode_threads = max(1, min(threads or os.cpu_count() or 1,
                                         view.nbytes // self.bytes_per_thread))
        self.name = name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.in_features)
        if xs.dtype != torch.float32:
            xs = xs.float()
        xs = xs.contiguous()
        T = xs.shape[0]
        out = torch.empty(T, self.out_features, dtype=torch.float32)
        self.workers.matmul(self.view, self.ggml_type, xs.numpy(), out.numpy(),
                            self.decode_threads if T <= self.few_tokens else self.threads)
        return out.view(*lead, self.out_features)


class NativeHeadLinear:
    """Per-head linears y[h] = x[h] @ W[h] (MLA's absorbed up-projections) on the native
    matmul, W as Q8_0 rows: a quarter of the bytes of torch's f32 bmm (the largest torch
    cost of a decode step: 16 bmm of 4 MB on TinyConfig.mid), 2x faster measured. The fused
    attention (NativeMLA) computes with these Q8_0 rows; this object's own call (all heads in
    one batched matmul) serves the torch absorbed path where NativeMLA does not apply. The
    decompressed path of long chunks reads the f32 `weight`."""

    def __init__(self, weight: torch.Tensor, threads: int = 1, workers: NativeWorkers | None = None):
        import gguf

        self.weight = weight
        self.threads = threads
        self.workers = workers or NativeWorkers()
        H, K, N = weight.shape
        rows = weight.transpose(1, 2).reshape(H * N, K).float().contiguous().numpy()
        q = gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q8_0)
        self._rows = np.ascontiguousarray(q).reshape(H, N, -1)         # [H, out, row bytes]
        self.shape = (H, K, N)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        H, _, N = self.shape
        T = x.shape[-2]
        out = torch.empty(H, T, N)
        # a head's matrix is too small to share between cold workers (see QuantLinear)
        th = 1 if T <= QuantLinear.few_tokens else self.threads
        self.workers.matmul(self._rows, dequant.Q8_0, x.float().contiguous().numpy(), out.numpy(), th)
        return out


class NativeRMSNorm:
    """RMSNorm of float32 CPU rows on the native kernel (llama.cpp's arithmetic): torch's
    takes ~40 us for a 2048-float decode row on this class of machine, ~30 norms a token."""

    def __init__(self, weight: torch.Tensor, eps: float):
        from hybrid.models.layers import RMSNorm

        self.weight, self.eps = weight, eps
        self._torch = RMSNorm(weight, eps)
        self._w = weight.float().contiguous().numpy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.stride(-1) != 1 or x.device.type != "cpu":
            return self._torch(x)
        out = torch.empty(x.shape)
        native().rms_norm(x.numpy(), self._w, self.eps, out.numpy())
        return out


class _RopeTable:
    """A Rope's complex [P, R/2] table as the native calls read it: [P, R] (cos, sin) pairs,
    converted once per table."""

    def __init__(self):
        self._src = self._table = None

    def __call__(self, rope) -> np.ndarray:
        if rope.freqs is not self._src:
            self._src = rope.freqs
            self._table = torch.view_as_real(rope.freqs).reshape(rope.freqs.shape[0], -1).numpy()
        return self._table


def _linear_args(f):
    return (f.view, f.ggml_type)


class NativeCausalAttention:
    """Causal softmax attention of a long prompt chunk on the native flash kernel
    (native/flash.h) instead of torch's per-block scaled_dot_product_attention: blocks of 48
    query rows x 64 keys with the softmax carried online, K / V read in place (MLA's rope dims
    as a second key part, GQA's cache rows through their strides). The call alone 2.0-2.7x
    torch's on TinyConfig.mid's MLA shapes (AVX2 Zen 2, 2 threads, 512-query chunks at
    positions 0..1536); a whole MLA step with its K / V expansion 1.1-1.6x
    (bench/bench_mla.py). CPU float32 only; `accepts` says when."""

    def __init__(self, workers: NativeWorkers, threads: int = 0):
        self.workers = workers
        self.threads = threads

    @staticmethod
    def accepts(*tensors) -> bool:
        return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pos0: int,
                 q_rope: torch.Tensor | None = None, k_rope: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, H, Dk] at positions pos0.., k [Hkv or 1, S, Dk], v [Hkv, S, Dv] (any strides,
        last dims contiguous) -> [T, H, Dv] (into `out` when given, a view of any strides);
        optional second key part q_rope [T, H, R] with k_rope [Hkv or 1, S, R]."""
        def arr(t):   # a strided view as it is; only a non-contiguous last dim is copied
            return None if t is None else (t if t.stride(-1) == 1 else t.contiguous()).numpy()

        if out is None:
            out = torch.empty(q.shape[0], q.shape[1], v.shape[2])
        w = self.workers
        native().flash_attention(arr(q), arr(k), arr(v), out.numpy(), scale, pos0,
                                 q_rope=arr(q_rope), k_rope=arr(k_rope),
                                 threads=self.threads, engine=w.engine if w.hot else None)
        return out


class NativeMLA:
    """A layer's absorbed attention (every call the model makes in that mode: decode steps and
    short chunks) in one native call (native/mla.h) instead of ~60 small torch ops, which cost
    more in dispatch than in arithmetic (TinyConfig.mid, 2 cores: ~1 ms a layer-token). Same
    weights and kernels as the torch path: the native linears, NativeRMSNorm, the Q8_0 head
    matrices of NativeHeadLinear."""

    def __init__(self, attn, workers: NativeWorkers):
        a = attn.args
        lin = _linear_args
        q_lora = attn.wq is None
        self._mla = native().MLA(dict(
            D=a.dim, H=a.n_head, N=a.qk_nope_dim, R=a.qk_rope_dim, V=a.v_head_dim,
            C=a.kv_lora_rank, Q=a.q_lora_rank, eps=a.rms_eps, kq_scale=attn.scale,
            attn_norm=attn.attn_norm._w, kv_a_norm=attn.kv_a_norm._w,
            q_a=lin(attn.wq_a) if q_lora else None, q_a_norm=attn.q_a_norm._w if q_lora else None,
            q_b=lin(attn.wq_b) if q_lora else None, q=None if q_lora else lin(attn.wq),
            kv_a=lin(attn.wkv_a), wo=lin(attn.wo), k_up=attn.k_up._rows, v_up=attn.v_up._rows))
        self.layer = attn.il
        self.dim = a.dim
        self.rope_dim = a.qk_rope_dim
        self.workers = workers
        self._rope = _RopeTable()

    @classmethod
    def build(cls, attn, workers: NativeWorkers) -> NativeMLA | None:
        """None unless every part of `attn` already runs natively (quantized linears, native
        norms and head matrices)."""
        linears = [attn.wkv_a, attn.wo] + ([attn.wq_a, attn.wq_b] if attn.wq is None else [attn.wq])
        norms = [attn.attn_norm, attn.kv_a_norm] + ([attn.q_a_norm] if attn.wq is None else [])
        if (all(isinstance(f, QuantLinear) for f in linears)
                and all(isinstance(n, NativeRMSNorm) for n in norms)
                and all(isinstance(h, NativeHeadLinear) for h in (attn.k_up, attn.v_up))):
            return cls(attn, workers)
        return None

    def accepts(self, x: torch.Tensor, cache) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
                and cache.data.dtype == torch.float32 and cache.data.device.type == "cpu")

    def __call__(self, x: torch.Tensor, pos0: int, cache, rope) -> torch.Tensor:
        T = x.shape[0]
        rows = cache.layer_rows(self.layer, pos0 + T)
        out = torch.empty(T, self.dim)
        w = self.workers
        self._mla.decode(x.contiguous().numpy(), pos0, rows.numpy(), self._rope(rope), out.numpy(),
                         w.engine if w.hot else None)
        return out


class NativeGQA:
    """A layer's grouped-query attention for decode steps and short chunks in one native call
    (native/gqa.h): norm, q/k/v projections and biases, q/k norms, RoPE, the cache write,
    attention and the output projection, with the same weights as the torch path (the
    native linears and NativeRMSNorm). Longer chunks stay with torch's SDPA, whose blocked
    kernels win once T rows share each cached K/V row."""

    max_tokens = 16

    def __init__(self, attn, workers: NativeWorkers):
        a = attn.args

        def vec(t):
            return None if t is None else t.float().contiguous().numpy()

        self._keep = [vec(attn.bq), vec(attn.bk), vec(attn.bv)]   # the native call reads them
        self._gqa = native().GQA(dict(
            D=a.dim, H=a.n_head, Hkv=a.n_head_kv, Dk=a.head_dim_k, Dv=a.head_dim_v, R=a.rope_dim,
            neox=bool(a.rope_neox), eps=a.rms_eps, kq_scale=attn.scale,
            attn_norm=attn.attn_norm._w, q=_linear_args(attn.wq), k=_linear_args(attn.wk),
            v=_linear_args(attn.wv), o=_linear_args(attn.wo),
            bq=self._keep[0], bk=self._keep[1], bv=self._keep[2],
            q_norm=attn.q_norm._w if attn.q_norm is not None else None,
            k_norm=attn.k_norm._w if attn.k_norm is not None else None))
        self.layer = attn.il
        self.dim = a.dim
        self.workers = workers
        self._rope = _RopeTable()

    @classmethod
    def build(cls, attn, workers: NativeWorkers) -> NativeGQA | None:
        """None unless every part of `attn` already runs natively (quantized linears, native
        norms) and the module has the call."""
        norms = [n for n in (attn.attn_norm, attn.q_norm, attn.k_norm) if n is not None]
        if (hasattr(native(), "GQA")
                and all(isinstance(f, QuantLinear) for f in (attn.wq, attn.wk, attn.wv, attn.wo))
                and all(isinstance(n, NativeRMSNorm) for n in norms)):
            return cls(attn, workers)
        return None

    def accepts(self, x: torch.Tensor, cache) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
                and x.shape[0] <= self.max_tokens
                and cache.k.dtype == torch.float32 and cache.k.device.type == "cpu")

    def __call__(self, x: torch.Tensor, pos0: int, cache, rope) -> torch.Tensor:
        T = x.shape[0]
        k_rows, v_rows = cache.layer_rows(self.layer, pos0 + T)
        out = torch.empty(T, self.dim)
        w = self.workers
        self._gqa.decode(x.contiguous().numpy(), pos0, k_rows.numpy(), v_rows.numpy(),
                         self._rope(rope), out.numpy(), w.engine if w.hot else None)
        return out


class NativeRouter:
    """Router.__call__'s selection after the logits (probabilities, bias, group limit, top-k,
    weights) in one native call (~15 torch ops, ~0.2 ms a decode layer on TinyConfig.mid)."""

    def __init__(self, args, bias: torch.Tensor | None):
        self.args = args
        self.bias = None if bias is None else bias.float().contiguous().numpy()

    @staticmethod
    def logits(h: torch.Tensor, gate_inp: torch.Tensor) -> torch.Tensor:
        """h [T, D] @ gate_inp [E, D]^T on the native matmul: each row's dot products are
        the same whatever else is in the batch (torch's BLAS takes another path for one row
        than for several), so a request's routing does not depend on the requests batched
        with it (hybrid.runtime.batch)."""
        x = h.float().contiguous()
        w = gate_inp.float().contiguous()
        out = torch.empty(x.shape[0], w.shape[0])
        native().matmul(w.numpy().view(np.uint8), dequant.F32, x.numpy(), out.numpy(),
                        torch.get_num_threads())
        return out

    def __call__(self, logits: torch.Tensor):
        a = self.args
        T, K = logits.shape[0], a.n_expert_used
        ids = torch.empty(T, K, dtype=torch.long)
        weights = torch.empty(T, K)
        native().moe_route(logits.contiguous().numpy(), self.bias, a.gating_func, a.n_group,
                            a.n_group_used, K, a.expert_weights_norm, a.expert_weights_scale,
                            ids.numpy(), weights.numpy())
        return ids, weights


class NativeFFN:
    """A SwiGLU FFN (the shared experts) as a one-expert layer of the native expert engine:
    gate, up, SiLU*mul and down in one call on the engine's workers, instead of three
    linears and two torch ops."""

    def __init__(self, experts):
        self.experts = experts      # NativeExperts of one expert

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        return self.experts(x, torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1))
