"""The runtime: apply a Plan to load a GGUF model, prefill in chunks, decode with the latent
KV cache, sample, stream text. `hybrid.load(...)` returns a Runtime.

Placement is a pass here, not a flag in the model: `_Loader` answers the model's requests
for tensors, linears, the embedding and routed experts according to the plan
(device of non-expert weights, their format, which CPU linears run on the native quantized
matmul, which expert engine).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hybrid import dequant
from hybrid.gguf_file import GGUFFile
from hybrid.kv_cache import LatentKVCache
from hybrid.models import get_model_module
from hybrid.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

__all__ = ["GenerationStats", "MinimalPlan", "QuantLinear", "Runtime", "TorchLinear", "load"]

# GGML types the native quantized matmul takes (float weights stay in torch)
_NATIVE_LINEAR_TYPES = frozenset({dequant.Q4_0, dequant.Q5_0, dequant.Q8_0, dequant.Q4_K,
                                  dequant.Q5_K, dequant.Q6_K})


def _native():
    """hybrid._native if it was built, else None."""
    try:
        from hybrid import _native as n
    except ImportError:
        return None
    return n


def _native_experts_cls():
    if _native() is None:
        return None
    try:
        from hybrid.experts import NativeExperts
    except ImportError:
        return None
    return NativeExperts


@dataclass
class MinimalPlan:
    """A plan without the solver: every non-expert weight on one device, in one format.

    Has the part of placement.plan.Plan's interface the runtime reads (placement_of,
    device, kv_cache_*, cpu_linear_min_bytes, gpu_expert_ids, gpu_prefill_tokens), for tests
    and for callers that want to force a layout.
    """

    device: str = "cpu"
    gpu_weight_format: str = "bf16"
    kv_cache_tokens: int = 4096
    kv_cache_dtype: str = "f32"
    cpu_linear_min_bytes: int = 0   # every quantized CPU linear on the native matmul
    numa_mode: str = "off"
    gpu_experts: list = field(default_factory=list)
    gpu_prefill_tokens: int = 0     # chunks of at least this many tokens: experts on the GPU; 0 off
    fits: bool = True

    def placement_of(self, name: str):
        if name.startswith("token_embd"):
            return "cpu", "quantized"
        if name.endswith("_exps.weight"):
            return "cpu", "quantized"
        if self.device == "cpu":
            return "cpu", "quantized"
        return "gpu0", self.gpu_weight_format

    def gpu_expert_ids(self, layer: int) -> list:
        return list(self.gpu_experts[layer]) if layer < len(self.gpu_experts) else []


_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


class TorchLinear:
    """y = x @ W^T with W dequantized ([out, in], float32 on CPU, bf16 on the GPU)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            return F.linear(x.to(self.weight.dtype), self.weight).float()
        return F.linear(x, self.weight)


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
            return _native().matmul(w, ggml_type, x, out, engine=e)
        return _native().matmul(w, ggml_type, x, out, threads)

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
        if _native() is None:
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
        from hybrid.models.deepseek2 import RMSNorm

        self.weight, self.eps = weight, eps
        self._torch = RMSNorm(weight, eps)
        self._w = weight.float().contiguous().numpy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.stride(-1) != 1 or x.device.type != "cpu":
            return self._torch(x)
        out = torch.empty(x.shape)
        _native().rms_norm(x.numpy(), self._w, self.eps, out.numpy())
        return out


class NativeMLA:
    """A layer's absorbed attention (every call the model makes in that mode: decode steps and
    short chunks) in one native call (native/mla.h) instead of ~60 small torch ops, which cost
    more in dispatch than in arithmetic (TinyConfig.mid, 2 cores: ~1 ms a layer-token). Same
    weights and kernels as the torch path: the native linears, NativeRMSNorm, the Q8_0 head
    matrices of NativeHeadLinear."""

    def __init__(self, attn, workers: NativeWorkers):
        a = attn.args

        def lin(f):
            return (f.view, f.ggml_type)

        q_lora = attn.wq is None
        self._mla = _native().MLA(dict(
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
        self._rope_src = self._rope = None

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
        if rope.freqs is not self._rope_src:   # [P, R/2] complex -> [P, R] (cos, sin) pairs
            self._rope_src = rope.freqs
            self._rope = torch.view_as_real(rope.freqs).reshape(rope.freqs.shape[0], -1).numpy()
        out = torch.empty(T, self.dim)
        w = self.workers
        self._mla.decode(x.contiguous().numpy(), pos0, rows.numpy(), self._rope, out.numpy(),
                         w.engine if w.hot else None)
        return out


class NativeRouter:
    """Router.__call__'s selection after the logits (probabilities, bias, group limit, top-k,
    weights) in one native call (~15 torch ops, ~0.2 ms a decode layer on TinyConfig.mid)."""

    def __init__(self, args, bias: torch.Tensor | None):
        self.args = args
        self.bias = None if bias is None else bias.float().contiguous().numpy()

    def __call__(self, logits: torch.Tensor):
        a = self.args
        T, K = logits.shape[0], a.n_expert_used
        ids = torch.empty(T, K, dtype=torch.long)
        weights = torch.empty(T, K)
        _native().moe_route(logits.contiguous().numpy(), self.bias, a.gating_func, a.n_group,
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


class _Embedding:
    """Row lookup that dequantizes only the rows asked for (the table stays in the mmap)."""

    def __init__(self, view: np.ndarray, ggml_type: int, n_per_row: int, device, name: str):
        self.view, self.ggml_type, self.n_per_row = view, ggml_type, n_per_row
        self.device, self.name = device, name

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.view[ids.cpu().numpy()]
        n = _native()
        if self.device.type == "cpu" and n is not None and self.ggml_type in n.supported_types():
            # the native kernel: torch's block arithmetic is ~15 ops (~0.6 ms a decode token)
            flat = n.dequantize(rows, self.ggml_type, rows.shape[0] * self.n_per_row)
            return torch.from_numpy(flat).view(rows.shape[0], self.n_per_row)
        return dequant.dequantize(rows, self.ggml_type, self.n_per_row, device=self.device,
                                  name=self.name)


class _DeviceBridge:
    """A linear whose weight lives on another device than the activations."""

    def __init__(self, fn, weight_device, compute_device):
        self.fn, self.wdev, self.cdev = fn, weight_device, compute_device

    def __call__(self, x):
        return self.fn(x.to(self.wdev)).to(self.cdev)


def _torch_device(plan_device: str) -> torch.device:
    """Plan devices ("gpu0", "cpu", "numa1") -> torch devices."""
    if plan_device.startswith("gpu"):
        return torch.device(f"cuda:{int(plan_device[3:] or 0)}")
    return torch.device("cpu")


class _Loader:
    """Implements models.*.WeightLoader for a GGUF file and a plan.

    experts: "native" (CPU kernels on the GGUF bytes) or "torch" (dequantized).
    cpu_linears: "native" (quantized CPU linears of at least plan.cpu_linear_min_bytes run on
    the native matmul) or "torch" (every linear dequantized to float32).
    """

    def __init__(self, gguf: GGUFFile, plan, threads: int, *, experts: str = "native",
                 cpu_linears: str = "native", max_tokens: int = 512, numa: str = "off",
                 numa_partitions: int | None = None, expert_threads: int | None = None,
                 hugepages: bool = True, copy_progress: bool = False, gpu_paths: bool = False,
                 expert_stats=None, gpu_prefill_tokens: int | None = None,
                 gpu_idle_timer=None):
        self.g = gguf
        # the GPU code paths (overlapped experts, hot experts, prefill offload) also run with
        # the CPU as the device: how tests see them without a GPU
        self.gpu_paths = gpu_paths
        self.expert_stats = expert_stats
        self.gpu_prefill_tokens = gpu_prefill_tokens
        self.gpu_idle_timer = gpu_idle_timer
        self.bridge = None
        self.offload = None
        self.plan = plan
        self.threads = threads
        self.numa = numa or "off"
        self.numa_partitions = numa_partitions
        self.expert_threads = expert_threads
        self.hugepages = hugepages
        self.copy_progress = copy_progress
        self._placed = None
        self.device = torch.device(plan.device)
        self.max_tokens = max_tokens
        native = _native()
        self.native_types = frozenset(native.supported_types()) & _NATIVE_LINEAR_TYPES if native else frozenset()
        if cpu_linears not in ("native", "torch", "dequant"):
            raise ValueError(f"cpu_linears={cpu_linears!r}: use 'native', 'torch' or 'dequant'")
        self.native_linears = cpu_linears == "native" and bool(self.native_types)
        # "dequant": quantized CPU linears keep their blocks and dequantize to bf16 at every
        # call, as quantized GPU weights do (the GPU path's numerics, on the CPU)
        self.dequant_linears = cpu_linears == "dequant"
        self.native_min = int(getattr(plan, "cpu_linear_min_bytes", 1 << 20))
        if experts not in ("native", "torch"):
            raise ValueError(f"experts={experts!r}: use 'native' or 'torch'")
        self.experts_cls = _native_experts_cls() if experts == "native" else None
        if experts == "native" and self.experts_cls is None:
            log.warning("hybrid._native is not built: routed experts run in torch from "
                        "dequantized weights (slow, memory hungry)")
        self._engine = None
        self.workers = NativeWorkers()   # the native linears' threads (the engine's, once made)
        self._warned = set()
        self.stats = {"native_linears": 0, "torch_linears": 0, "native_experts": 0,
                      "torch_experts": 0, "gpu_hot_experts": 0, "dequant_linears": 0}

    def has(self, name):
        return name in self.g.tensors

    def _info(self, name):
        info = self.g.tensors.get(name)
        if info is None:
            raise ValueError(f"{self.g.paths[0]}: tensor {name!r} is missing; the GGUF is not "
                             f"a complete {self.g.metadata.get('general.architecture')} model")
        return info

    def shape(self, name):
        return self._info(name).shape

    def _dequant(self, name, dtype, device):
        info = self._info(name)
        t = dequant.dequantize(self.g.view(name), info.ggml_type, info.ne[0], dtype=dtype,
                               device=device, name=name)
        return t.view(info.shape)

    def tensor(self, name):
        # norms, router, biases and the k_b / v_b surgery: float32 on the compute device
        return self._dequant(name, torch.float32, self.device)

    def _warn_once(self, key, msg, *a):
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *a)

    def linear(self, name):
        info = self._info(name)
        pdev, fmt = self.plan.placement_of(name)
        wdev = _torch_device(pdev)
        jit = (fmt == "quantized" and info.ggml_type in dequant.SUPPORTED_TYPES
               and info.ggml_type not in (dequant.F32, dequant.F16, dequant.BF16))
        if wdev.type == "cpu":
            if (fmt == "quantized" and self.native_linears and info.ggml_type in self.native_types
                    and info.n_bytes >= self.native_min):
                self.stats["native_linears"] += 1
                fn = QuantLinear(self.g.view(name), info.ggml_type, info.ne[0], self.threads, name,
                                 self.workers)
            elif jit and self.dequant_linears:
                from hybrid.gpu import DequantLinear

                self.stats["dequant_linears"] += 1
                fn = DequantLinear(self.g.view(name), info.ggml_type, info.ne[0], wdev, name=name)
            else:
                self.stats["torch_linears"] += 1
                dt = torch.bfloat16 if fmt == "bf16" else torch.float32
                fn = TorchLinear(self._dequant(name, dt, wdev).view(info.ne[1], info.ne[0]))
        elif jit:
            # the plan keeps this linear's GGUF blocks on the GPU: dequantized per call
            from hybrid.gpu import DequantLinear

            self.stats["dequant_linears"] += 1
            fn = DequantLinear(self.g.view(name), info.ggml_type, info.ne[0], wdev, name=name)
        else:
            if fmt not in _DTYPES:
                fmt = "bf16"   # "quantized" float tensors (F32/F16 in the file): bf16 copy
            self.stats["torch_linears"] += 1
            fn = TorchLinear(self._dequant(name, _DTYPES[fmt], wdev).view(info.ne[1], info.ne[0]))
        return fn if wdev == self.device else _DeviceBridge(fn, wdev, self.device)

    def head_linear(self, name, weight):
        """Per-head linears from `weight` [H, in, out] float32 (made from tensor `name` at load),
        in the plan's format of `name` (bf16 on the GPU: the bytes the plan counted, one copy
        serving both attention paths). On the CPU, when the file stores the tensor quantized,
        decode runs on Q8_0 copies (NativeHeadLinear; F16 copies were tried: no faster than
        f32, the AVX2 F16C conversion bounds them); F32/F16 files keep exact float math."""
        from hybrid.models.deepseek2 import HeadLinear

        _, fmt = self.plan.placement_of(name)
        dt = torch.bfloat16 if fmt == "bf16" else torch.float32
        lin = HeadLinear(weight.to(device=self.device, dtype=dt))
        if (self.device.type == "cpu" and dt == torch.float32 and self.native_linears
                and self._info(name).ggml_type not in (dequant.F32, dequant.F16, dequant.BF16)
                and weight.shape[1] % 32 == 0):
            return NativeHeadLinear(lin.weight, self.threads, self.workers)
        return lin

    def expert_select(self, args, bias):
        """The native router selection on the CPU, or None (torch)."""
        return NativeRouter(args, bias) if self.device.type == "cpu" and _native() else None

    def fused_ffn(self, prefix, suffix):
        """The FFN `prefix`ffn_{gate,up,down}`suffix` as a one-expert layer of the native expert
        engine (CPU, quantized, native experts), or None."""
        names = [f"{prefix}ffn_{k}{suffix}.weight" for k in ("gate", "up", "down")]
        # (not on the GPU path: there the shared experts overlap the engine's routed work)
        if (self.device.type != "cpu" or self.gpu_paths or not self.native_linears
                or self.experts_cls is None or self._placed is None):
            return None
        infos = [self._info(n) for n in names]
        if any(self.plan.placement_of(n)[1] != "quantized" or i.ggml_type not in self.native_types
               for n, i in zip(names, infos)):
            return None
        views = [self.g.view(n) for n in names]
        layer = self._placed.engine.add_layer(1, views[0], infos[0].ggml_type, views[1],
                                              infos[1].ggml_type, views[2], infos[2].ggml_type)
        self.stats["native_linears"] += 3
        return NativeFFN(layer)

    def fused_attention(self, attn):
        """The native whole-layer absorbed attention for `attn` on the CPU, or None."""
        if self.device.type != "cpu":
            return None
        return NativeMLA.build(attn, self.workers)

    def norm(self, name, eps):
        w = self.tensor(name)
        if self.device.type == "cpu" and _native() is not None:
            return NativeRMSNorm(w, eps)
        from hybrid.models.deepseek2 import RMSNorm

        return RMSNorm(w, eps)

    def embedding(self, name):
        info = self._info(name)
        return _Embedding(self.g.view(name), info.ggml_type, info.ne[0], self.device, name)

    def _placed_experts(self, d_model, max_k):
        """The PlacedExperts of the plan's NUMA mode (created with the first MoE layer)."""
        if self._placed is None:
            from hybrid.numa import PlacedExperts, node_groups

            groups = node_groups(self.numa, threads=self.expert_threads,
                                 logical_partitions=self.numa_partitions)
            self._placed = PlacedExperts(self.g, self.numa, groups, d_model=d_model,
                                         max_tokens=self.max_tokens, max_k=max_k,
                                         hugepages=self.hugepages, progress=self.copy_progress)
            self._engine = self._placed.engine
            self.workers.engine = self._engine._eng
            log.info("routed experts: numa %s, %d worker group(s): %s", self.numa, len(groups),
                     "; ".join(f"node {g.node} cpus {g.cpus}" for g in groups))
        return self._placed

    def finish(self):
        """After every layer asked for its experts: copy the placed expert bytes (numa modes
        other than off; off reads the mmap in place)."""
        if self._placed is not None:
            self._placed.load()

    def _bridge(self, D, K):
        if self.bridge is None:
            from hybrid.gpu import Bridge

            self.bridge = Bridge(D, self.max_tokens, K, self.device)
        return self.bridge

    def _offload(self):
        if self.offload is None and self.gpu_prefill_tokens is not None:
            from hybrid.gpu import PrefillOffload

            moe = sorted({int(n.split(".")[1]) for n in self.g.tensors
                          if n.endswith("ffn_gate_exps.weight")})
            self.offload = PrefillOffload(self.g, moe, self.device, self.gpu_prefill_tokens)
        return self.offload

    def experts(self, layer):
        names = [f"blk.{layer}.ffn_{k}_exps.weight" for k in ("gate", "up", "down")]
        infos = [self._info(n) for n in names]
        D, E = infos[0].ne[0], infos[0].ne[2]
        arch = self.g.metadata.get("general.architecture", "")
        K = int(self.g.metadata.get(f"{arch}.expert_used_count", 8))
        hot = [int(e) for e in self.plan.gpu_expert_ids(layer)] if self.gpu_paths else []
        native = self.experts_cls is not None and all(
            i.ggml_type in _native().supported_types() for i in infos)
        if not native:
            from hybrid.torch_experts import TorchExperts

            self.stats["torch_experts"] += 1
            dt = torch.float32 if self.device.type == "cpu" else torch.bfloat16
            ex = TorchExperts.from_gguf(self.g, layer, dtype=dt, device=self.device)
            return ex if self.expert_stats is None else _Recording(ex, self.expert_stats, layer)
        self.stats["native_experts"] += 1
        cpu = self._placed_experts(D, K).add_layer(layer)
        if not self.gpu_paths:
            return cpu if self.expert_stats is None else _Recording(cpu, self.expert_stats, layer)
        from hybrid.gpu import OverlappedExperts

        gpu = lut = None
        if hot:
            from hybrid.torch_experts import TorchExperts

            mask = np.zeros(E, np.uint8)
            mask[hot] = 1
            cpu.set_skip(mask)
            self.stats["gpu_hot_experts"] += len(hot)
            gpu = TorchExperts.from_gguf(self.g, layer, dtype=torch.bfloat16, device=self.device,
                                         experts=hot)
            lut = torch.full((E,), -1, dtype=torch.long)
            lut[torch.tensor(hot, dtype=torch.long)] = torch.arange(len(hot))
            lut = lut.to(self.device)                                 # global id -> hot slot
        return OverlappedExperts(cpu, self._bridge(D, K), layer, hot=gpu, lut=lut,
                                 stats=self.expert_stats, offload=self._offload(),
                                 timer=self.gpu_idle_timer)

    def close(self):
        self.workers.engine = None
        if self.offload is not None:
            self.offload.close()
            self.offload = None
        if self._placed is not None:
            self._placed.close()   # closes the engine, frees the placed copies
            self._placed = None
        elif self._engine is not None:
            self._engine.close()
        self._engine = None


class _Recording:
    """Routed experts of the CPU path that also count the routing (ExpertStats)."""

    def __init__(self, inner, stats, layer):
        self.inner, self.stats, self.layer = inner, stats, layer

    def __call__(self, x, ids, weights):
        self.stats.record(self.layer, ids)
        return self.inner(x, ids, weights)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0         # prompt tokens reused from the previous sequence
    completion_tokens: int = 0
    finish_reason: str = ""        # "stop" (EOS / stop string) or "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens: list = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _solve_plan(path, device, numa, ctx, prefill_chunk, gpu_prefill_tokens=None,
                gpu_prefill_chunk=None):
    """Ask the placement solver where everything goes on this machine (a given GPU-prefill
    threshold goes to it too, so that it reserves the VRAM that needs)."""
    from placement import plan_for_gguf

    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for, but torch sees no CUDA GPU; "
                         "use device='cpu' (or 'auto')")
    kw = {"ctx": ctx, "numa": numa or "off", "prefill_chunk": prefill_chunk}
    if device == "cpu" or not torch.cuda.is_available():
        kw["cpu_only"] = True
        # the native matmul beats an f32 copy at every size measured (2-core AVX2 box, decode
        # of TinyConfig.mid: ~6 ms of ~70 ms per token went to f32 copies of the small
        # linears), and reads 4-7x fewer bytes
        kw["cpu_linear_min_bytes"] = 0
    else:
        kw["gpu_prefill_tokens"] = gpu_prefill_tokens
        kw["gpu_prefill_chunk"] = gpu_prefill_chunk
    plan = plan_for_gguf(path, **kw)
    if device.startswith("cuda") and plan.device == "cpu":
        raise ValueError(f"{path}: device='cuda' asked for, but the placement plan puts nothing "
                         f"on the GPU:\n{plan.to_text()}")
    return plan


def _check_plan_fits(path, plan) -> None:
    """Refuse, before anything is loaded, a plan the solver rejected (e.g. --numa replicate
    whose copy per node does not fit), with the plan's own explanation."""
    if getattr(plan, "fits", True):
        return
    msgs = "; ".join(p.message for p in getattr(plan, "problems", [])) or "see the plan"
    tips = "; ".join(f"{s.message} ({s.cli})" for s in getattr(plan, "suggestions", [])[:3])
    raise ValueError(f"{path}: the model does not fit this machine (numa "
                     f"{getattr(plan, 'numa_mode', 'off')}): {msgs}"
                     + (f". Options: {tips}" if tips else "")
                     + " (hybrid-run MODEL --dry-run prints the full plan)")


class Runtime:
    """A loaded model. Not thread-safe: one sequence at a time."""

    def __init__(self, path, *, device="auto", threads=None, numa="off", ctx=4096, plan=None,
                 prefill_chunk=512, experts="native", cpu_linears="native", progress=None,
                 numa_partitions=None, hugepages=True, copy_progress=None, gpu_paths="auto",
                 decode_graphs="auto", record_expert_stats=False, gpu_prefill_tokens=None,
                 gpu_prefill_chunk=8192, measure_gpu_idle=False):
        self.path = os.fspath(path)
        self.threads_given = threads is not None
        self.threads = int(threads) if threads else _default_threads()
        torch.set_num_threads(self.threads)
        self._torch_threads = self.threads
        self._default_spin_us = None
        self.prefill_chunk = int(prefill_chunk)
        self.gguf = GGUFFile(self.path)
        self._tokenizer = None
        self.model = self.loader = self.cache = self.decoder = None
        self.expert_stats = self.gpu_timer = None
        self.gpu_prefill_tokens = gpu_prefill_tokens
        self.gpu_prefill_chunk = int(gpu_prefill_chunk)
        gpu_opts = dict(gpu_paths=gpu_paths, decode_graphs=decode_graphs,
                        record_expert_stats=record_expert_stats,
                        gpu_prefill_tokens=gpu_prefill_tokens, measure_gpu_idle=measure_gpu_idle)
        try:
            self._load(device, numa, int(ctx), plan, experts, cpu_linears, progress,
                       numa_partitions, hugepages, copy_progress, gpu_opts)
        except BaseException:
            self.close()
            raise
        self._seq: list[int] = []  # tokens whose K/V are in the cache, in order
        self.last_stats: GenerationStats | None = None

    def _expert_threads(self, numa: str) -> int | None:
        """Workers of the expert engine. Given threads: that many. Otherwise, CPU-only with
        numa off: every allowed CPU (torch and the experts take turns, nothing else runs);
        else node_groups' default, each node's physical cores minus one (that core drives
        the GPU or the other nodes' memory traffic)."""
        if self.threads_given:
            return self.threads
        if numa == "off" and self.device.type == "cpu":
            return self.threads
        return None

    def _load(self, device, numa, ctx, plan, experts, cpu_linears, progress, numa_partitions,
              hugepages, copy_progress, gpu_opts):
        arch = self.gguf.architecture
        mod = get_model_module(arch, source=self.path)
        if plan is None:
            given = gpu_opts["gpu_prefill_tokens"]
            plan = _solve_plan(self.path, device, numa, ctx, self.prefill_chunk,
                               given if isinstance(given, int) and not isinstance(given, bool) else None,
                               self.gpu_prefill_chunk)
        _check_plan_fits(self.path, plan)
        self.plan = plan
        self.numa = getattr(plan, "numa_mode", None) or numa or "off"
        from hybrid.numa import MODES

        if self.numa not in MODES:
            raise ValueError(f"numa={self.numa!r}: use one of {', '.join(MODES)}")
        if experts != "native" and self.numa != "off":
            log.warning("numa=%s applies to the native expert engine; experts=%r ignores it",
                        self.numa, experts)
        self.device = torch.device(plan.device)
        self.args = mod.ModelArgs.from_gguf(self.gguf.metadata, self.gguf.tensors, self.path)
        self.ctx = int(plan.kv_cache_tokens)
        t0 = time.perf_counter()
        if copy_progress is None:
            # the caller's progress callback covers loading; a bar of its own otherwise
            copy_progress = progress is None and sys.stderr.isatty()
        gpu_paths = gpu_opts["gpu_paths"]
        self.gpu_paths = self.device.type == "cuda" if gpu_paths == "auto" else bool(gpu_paths)
        a = self.args
        moe_layers = list(range(a.n_dense_lead, a.n_layer)) if a.n_expert > 1 else []
        if gpu_opts["record_expert_stats"]:
            from hybrid.stats import ExpertStats

            self.expert_stats = ExpertStats(a.n_layer, a.n_expert, moe_layers,
                                            n_expert_used=a.n_expert_used, device=self.device,
                                            model=str(self.gguf.metadata.get("general.name", "")))
        if gpu_opts["measure_gpu_idle"] and self.gpu_paths:
            from hybrid.gpu import GpuIdleTimer

            self.gpu_timer = GpuIdleTimer(len(moe_layers), self.device)
        given = gpu_opts["gpu_prefill_tokens"]
        if given is not None and (isinstance(given, bool) or not hasattr(given, "__index__") or given < 0):
            raise ValueError(f"gpu_prefill_tokens={given!r}: a whole number of tokens >= 0 (0: off; "
                             f"None: the plan's threshold)")
        if given is not None and not self.gpu_paths:
            log.warning("gpu_prefill_tokens applies to the GPU path; this runtime has none")
        # None: the plan's threshold (the solver reserved VRAM for it); an int overrides, 0 is off
        planned = int(getattr(plan, "gpu_prefill_tokens", 0) or 0)
        if given and not planned and self.device.type == "cuda":
            log.warning("gpu_prefill_tokens=%d: the plan reserved no GPU memory for the prefill staging "
                        "buffers (two MoE layers of routed experts); loading may run out of it", given)
        self.gpu_prefill_tokens = (int(given) if given is not None else planned) if self.gpu_paths else 0
        self.loader = _Loader(self.gguf, plan, self.threads, experts=experts,
                              cpu_linears=cpu_linears, max_tokens=self.prefill_chunk,
                              numa=self.numa, numa_partitions=numa_partitions,
                              expert_threads=self._expert_threads(self.numa),
                              hugepages=hugepages, copy_progress=copy_progress,
                              gpu_paths=self.gpu_paths, expert_stats=self.expert_stats,
                              gpu_prefill_tokens=self.gpu_prefill_tokens or None,
                              gpu_idle_timer=self.gpu_timer)
        with torch.inference_mode():
            self.model = mod.DeepSeek2(self.args, self.loader, max_pos=self.ctx,
                                       rope_device=self.device, progress=progress)
        self.loader.finish()
        self.load_s = time.perf_counter() - t0
        kv_dtype = _DTYPES[getattr(plan, "kv_cache_dtype", "f32")]
        self.cache = LatentKVCache(self.args.n_layer, self.ctx, self.args.kv_lora_rank,
                                   self.args.qk_rope_dim, dtype=kv_dtype, device=self.device)
        self._setup_decoder(gpu_opts["decode_graphs"])

    def _setup_decoder(self, mode):
        """decode_graphs: "auto" (CUDA graphs on the GPU path with CUDA), True / "graphs",
        "static" (the same segmented fixed-shape step without capture), False / "off"."""
        if mode == "auto":
            mode = "graphs" if (self.gpu_paths and self.device.type == "cuda") else "off"
        elif mode is True:
            mode = "graphs"
        elif mode in (False, None):
            mode = "off"
        if mode not in ("graphs", "static", "off"):
            raise ValueError(f"decode_graphs={mode!r}: use 'auto', 'graphs', 'static' or 'off'")
        if mode == "off":
            return
        from hybrid.gpu import DecodeGraphs, OverlappedExperts

        experts = {}
        for il, blk in enumerate(self.model.blocks):
            ex = getattr(blk.ffn, "experts", None)
            if ex is None:
                continue
            if not isinstance(ex, OverlappedExperts):
                log.warning("decode_graphs=%s needs the GPU path's experts (gpu_paths=True, "
                            "native experts); decoding eagerly", mode)
                return
            experts[il] = ex
        self.decoder = DecodeGraphs(self.model, self.cache, experts, self.loader.bridge
                                    if self.loader.bridge is not None else None, self.device,
                                    mode=mode, stats=self.expert_stats)

    # -- tokenizer --------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from hybrid.tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.path, self.gguf.metadata)
        return self._tokenizer

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)

    # -- forward ----------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self.args.n_vocab

    def _check_tokens(self, tokens) -> torch.Tensor:
        t = torch.as_tensor(list(tokens) if not isinstance(tokens, (torch.Tensor, np.ndarray)) else tokens,
                            dtype=torch.long).reshape(-1)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.args.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.args.n_vocab}); got "
                             f"{int(t.min())}..{int(t.max())}")
        return t

    def _forward(self, tokens: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Run tokens after the cached sequence; returns logits float32 on the device."""
        T = tokens.numel()
        self.cache.check_room(T)
        self._set_threads_for(T)
        pos0 = self.cache.length
        timer = self.gpu_timer if T == 1 else None
        if timer is not None:
            timer.begin_step()
        if self.decoder is not None and T == self.decoder.T and last_only:
            # the decoder's logits are its static output buffer: the caller gets a copy
            logits = self.decoder(self.model.embed(tokens), pos0).clone()   # rows from the mmap
        else:
            logits = self.model(tokens.to(self.device), pos0, self.cache, last_only=last_only)
        if timer is not None:
            timer.end_step()
        self.cache.advance(T)
        self._seq.extend(tokens.tolist())
        return logits

    # A decode step's torch ops are tiny: on more threads each one pays the OpenMP wake-up
    # (passive waiting, see hybrid/__init__.py) for no gain; measured on TinyConfig.mid, 2
    # cores: 70 ms per step with 1 torch thread, 83 ms with 2. Longer inputs use them all.
    _single_thread_tokens = 4
    # Decode issues a native job every few hundred microseconds: the engine's workers spin
    # through the gaps rather than sleep and pay a futex wake-up per job (TinyConfig.mid,
    # 2 cores: ~37 -> ~33 ms a step with 2 ms instead of 100 us). Prefill's gaps are long
    # and torch's threads need the cores: the default applies there.
    decode_spin_us = 2000

    def _set_threads_for(self, T: int) -> None:
        """Torch's thread count and the engine workers' spin for a call of T tokens."""
        decode = T <= self._single_thread_tokens
        n = 1 if decode else self.threads
        if n != self._torch_threads:
            torch.set_num_threads(n)
            self._torch_threads = n
        eng = self.loader.workers.engine if self.loader is not None else None
        if eng is not None:
            if self._default_spin_us is None:
                self._default_spin_us = eng.spin_us
            eng.spin_us = self.decode_spin_us if decode else self._default_spin_us

    def _prefill(self, tokens: torch.Tensor, all_logits: bool, out=None):
        """Prefill in chunks; returns the last token's logits [B] (or fills out [T, B])."""
        last = None
        n = tokens.numel()
        step = self.prefill_chunk
        offload = self.loader.offload if self.loader is not None else None
        if offload is not None and n >= offload.min_tokens:
            # the routed experts stream to the GPU once per chunk: long chunks amortize it
            step = max(step, self.gpu_prefill_chunk, offload.min_tokens)
        for c0 in range(0, n, step):
            chunk = tokens[c0:c0 + step]
            if offload is not None:
                offload.expect_more = c0 + step < n and n - (c0 + step) >= offload.min_tokens
            lg = self._forward(chunk, last_only=not all_logits)
            if all_logits:
                out[c0:c0 + chunk.numel()] = lg.float().cpu().numpy()
            last = lg[-1]
        return last

    def reset(self) -> None:
        """Forget the cached sequence."""
        self.cache.reset()
        self._seq = []

    @torch.inference_mode()
    def logits(self, tokens) -> np.ndarray:
        """Logits of a fresh sequence at every position: float32 [T, n_vocab]."""
        t = self._check_tokens(tokens)
        self.reset()
        out = np.empty((t.numel(), self.args.n_vocab), dtype=np.float32)
        if t.numel():
            self._prefill(t, all_logits=True, out=out)
        return out

    @torch.inference_mode()
    def decode_logits(self, tokens) -> np.ndarray:
        """Like logits(), but one token at a time through the cache (consistency checks)."""
        t = self._check_tokens(tokens)
        self.reset()
        out = np.empty((t.numel(), self.args.n_vocab), dtype=np.float32)
        for i in range(t.numel()):
            out[i] = self._forward(t[i:i + 1], last_only=True)[-1].float().cpu().numpy()
        return out

    # -- generation -------------------------------------------------------------------------

    def _prompt_ids(self, prompt, add_bos, chat_template=None, **template_kw) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_bos=add_bos)
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(prompt, template=chat_template, **template_kw)
        if isinstance(prompt, (list, tuple, np.ndarray, torch.Tensor)):
            return [int(x) for x in prompt]
        raise ValueError("prompt must be a string, a list of chat messages "
                         "({'role': ..., 'content': ...}) or a list of token ids")

    @torch.inference_mode()
    def generate_tokens(self, prompt, *, max_tokens: int = 256, temperature: float = 0.6,
                        top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                        seed: int | None = None, stop: Sequence[str] | str | None = None,
                        add_bos: bool | None = None, stop_at_eos: bool = True,
                        chat_template: str | None = None,
                        **template_kw) -> Iterator[tuple[int, str]]:
        """Yield (token id, text piece) per generated token; see generate()."""
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                         repetition_penalty=repetition_penalty, seed=seed))
        ids = self._prompt_ids(prompt, add_bos, chat_template, **template_kw)
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        if len(ids) + max_tokens > self.ctx:
            max_tokens = max(0, self.ctx - len(ids))
            if max_tokens == 0:
                raise ValueError(f"prompt of {len(ids)} tokens fills the context of {self.ctx}; "
                                 f"load with a larger ctx=")
        stats = GenerationStats(prompt_tokens=len(ids))
        self.last_stats = stats
        # reuse the cached prefix of the previous sequence (chat turns share their history)
        common = 0
        for a, b in zip(self._seq, ids[:-1]):
            if a != b:
                break
            common += 1
        self.cache.truncate(common)
        self._seq = self._seq[:common]
        stats.cached_tokens = common
        t0 = time.perf_counter()
        logits = self._prefill(torch.tensor(ids[common:], dtype=torch.long), all_logits=False)
        stats.prefill_s = time.perf_counter() - t0
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        history = list(ids)
        text = ""
        emitted = 0
        dec = self.tokenizer.stream_decoder()
        hold = max((len(s) - 1 for s in stops), default=0)
        t0 = time.perf_counter()
        stats.finish_reason = "length"
        for i in range(max_tokens):
            tok = sampler(logits, history)
            history.append(tok)
            stats.tokens.append(tok)
            stats.completion_tokens += 1
            if stop_at_eos and self.tokenizer.is_eog(tok):
                stats.finish_reason = "stop"
                break
            text += dec.push(tok)
            # text before `emitted` was searched already, up to a tail shorter than any stop
            hit = min((p for p in (text.find(s, max(0, emitted - hold)) for s in stops) if p >= 0),
                      default=-1)
            if hit >= 0:
                if hit > emitted:
                    yield tok, text[emitted:hit]
                emitted = hit
                stats.finish_reason = "stop"
                break
            # hold back a tail that could still become a stop string
            safe = len(text) - hold
            if safe > emitted:
                yield tok, text[emitted:safe]
                emitted = safe
            else:
                yield tok, ""
            if i + 1 < max_tokens:
                logits = self._forward(torch.tensor([tok]), last_only=True)[-1]
        if stats.finish_reason == "length":
            text += dec.flush()
            if len(text) > emitted:
                yield -1, text[emitted:]
        stats.decode_s = time.perf_counter() - t0

    def generate(self, prompt, **kw) -> Iterator[str]:
        """Stream text for a prompt string, chat messages or token ids.

        Keywords: max_tokens=256, temperature=0.6 (0 = greedy), top_k=0, top_p=1.0,
        repetition_penalty=1.0, seed=None, stop=None (strings), add_bos=None (per the
        vocabulary), stop_at_eos=True, chat_template=None (override), and extra template
        variables. After the iterator ends, `last_stats` holds token counts, the finish
        reason and timings.
        """
        for _, piece in self.generate_tokens(prompt, **kw):
            if piece:
                yield piece

    # -- statistics -------------------------------------------------------------------------

    def save_expert_stats(self, path) -> None:
        """Write the routing counts of this runtime's forwards (load with
        record_expert_stats=True) in the format placement's --expert-stats reads."""
        if self.expert_stats is None:
            raise ValueError("routing statistics were not recorded: load with "
                             "record_expert_stats=True (hybrid-run --save-expert-stats FILE)")
        self.expert_stats.save(path)

    def gpu_idle(self) -> dict:
        """GPU idle time per decoded token (load with measure_gpu_idle=True, CUDA only)."""
        return self.gpu_timer.summary() if self.gpu_timer is not None else {"tokens": 0}

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._tokenizer is not None:
            self._tokenizer.close()
            self._tokenizer = None
        self.model = self.decoder = None
        if self.loader is not None:
            self.loader.close()
            self.loader = None
        self.cache = None
        if self.gguf is not None:
            self.gguf.close()
            self.gguf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path, device="auto", threads=None, numa="off", ctx=4096, **kw) -> Runtime:
    """Load a GGUF model and return a Runtime.

    device: "auto" (GPU when torch sees one), "cpu" or "cuda"; the placement solver turns it
    into a Plan unless plan= is given (a placement.plan.Plan or an engine.MinimalPlan).
    threads: CPU threads for torch and the native engine (default: all allowed CPUs).
    numa: off | interleave | distribute | replicate (passed to the solver; the plan's
    numa_mode decides how the routed experts are placed, see hybrid.numa). ctx: tokens of
    KV cache. Extra keywords: plan, prefill_chunk (512), experts ("native" / "torch"),
    cpu_linears ("native" / "torch"), progress (callback(done_layers, n_layers) while loading),
    numa_partitions (split each node's CPUs into that many worker groups: the per-node
    placement on a one-node machine), hugepages (True), copy_progress (a bar while the
    placed expert bytes are copied; default: when stderr is a terminal and no progress=).
    A plan that does not fit (plan.fits False) is refused before loading (ValueError).

    GPU path (hybrid/gpu.py): gpu_paths ("auto": when the plan puts compute on the GPU; True
    runs the same code with the CPU as the device, for tests), decode_graphs ("auto": CUDA
    graphs per KV bucket on CUDA; "static": the segmented fixed-shape step without capture;
    "off"), record_expert_stats (count routing for save_expert_stats), gpu_prefill_tokens
    (chunks of at least this many tokens compute routed experts on the GPU, streaming the
    weights; None: the plan's gpu_prefill_tokens, which the solver derives from PCIe and CPU
    speed and reserves VRAM for; 0: off; a threshold the plan did not reserve for may run
    out of GPU memory) with gpu_prefill_chunk (8192), measure_gpu_idle (CUDA events).
    """
    return Runtime(path, device=device, threads=threads, numa=numa, ctx=ctx, **kw)
