"""The placement pass: `Loader` answers a model's requests for tensors, linears, norms, the
embedding and routed experts according to a Plan (device of non-expert weights, their format,
which CPU linears run on the native quantized matmul, which expert engine). Model files never
mention devices; they ask this loader (models.layers.WeightLoader) and get what the plan says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hybrid.backends import dequant
from hybrid.backends.native import (NativeCausalAttention, NativeFFN, NativeGQA, NativeHeadLinear,
                                    NativeMLA, NativeRMSNorm, NativeRouter, NativeWorkers, QuantLinear,
                                    check_native_expert_types, native, native_experts_cls)
from hybrid.gguf_file import GGUFFile
from hybrid.models.layers import QUERY_BLOCK
from placement.solver import CPU_NATIVE_TYPES

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "CpuStandIn", "Loader", "MinimalPlan", "TorchLinear"]


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
    hot_expert_format: str = "bf16"  # gpu_experts held as bf16 copies or in their GGUF blocks
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


class CpuStandIn:
    """A Plan made for a GPU, run with the CPU standing in for it (tests, no GPU): device
    "cpu"; every other attribute is the plan's, so gpu0 placements, formats, hot experts and
    the GPU prefill threshold are what the GPU would get. Load it with gpu_paths=True."""

    cpu_stands_in_for_gpu = True

    def __init__(self, plan):
        self._plan = plan

    device = "cpu"

    def __getattr__(self, name):
        return getattr(self._plan, name)


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_FMT_OF = {v: k for k, v in DTYPES.items()}


class TorchLinear:
    """y = x @ W^T with W dequantized ([out, in], float32 on CPU, bf16 on the GPU)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            return F.linear(x.to(self.weight.dtype), self.weight).float()
        return F.linear(x, self.weight)


class _Embedding:
    """Row lookup that dequantizes only the rows asked for (the table stays in the mmap)."""

    def __init__(self, view: np.ndarray, ggml_type: int, n_per_row: int, device, name: str):
        self.view, self.ggml_type, self.n_per_row = view, ggml_type, n_per_row
        self.device, self.name = device, name

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.view[ids.cpu().numpy()]
        n = native()
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


class Loader:
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
        # queries per attention step: the Plan's workspace holds one block of scores
        self.attn_query_block = int((getattr(plan, "policy", None) or {}).get("attn_query_block", QUERY_BLOCK))
        mod = native()
        self.native_types = frozenset(mod.supported_types()) & CPU_NATIVE_TYPES if mod else frozenset()
        if cpu_linears not in ("native", "torch", "dequant"):
            raise ValueError(f"cpu_linears={cpu_linears!r}: use 'native', 'torch' or 'dequant'")
        self.native_linears = cpu_linears == "native" and bool(self.native_types)
        # "dequant": quantized CPU linears keep their blocks and dequantize to bf16 at every
        # call, as quantized GPU weights do (the GPU path's numerics, on the CPU)
        self.dequant_linears = cpu_linears == "dequant"
        self.native_min = int(getattr(plan, "cpu_linear_min_bytes", 1 << 20))
        if experts not in ("native", "torch"):
            raise ValueError(f"experts={experts!r}: use 'native' or 'torch'")
        self.experts_cls = native_experts_cls() if experts == "native" else None
        if experts == "native" and self.experts_cls is None:
            log.warning("hybrid._native is not built: routed experts run in torch from "
                        "dequantized weights (slow, memory hungry)")
        if self.experts_cls is not None:   # before anything is placed: no silent float copy
            check_native_expert_types(gguf, mod.supported_types())
        self._engine = None
        self.workers = NativeWorkers()   # the native linears' threads (the engine's, once made)
        self._warned = set()
        self.stats = {"native_linears": 0, "torch_linears": 0, "native_experts": 0,
                      "torch_experts": 0, "gpu_hot_experts": 0, "dequant_linears": 0}
        # bytes placed per tensor name: (plan device, kind, bytes); placed_bytes sums them
        self._tensor_bytes: dict[str, tuple] = {}
        self._extra_bytes: dict[tuple, int] = {}
        self._head_srcs: set = set()

    # -- what was placed where (Plan = allocation) -------------------------------------------
    @property
    def stand_in(self) -> bool:
        """The CPU plays the plan's GPU (a CpuStandIn plan, gpu_paths): gpu0 placements land
        on the CPU through the GPU's code paths (no native attention) and count as gpu0's."""
        return (self.gpu_paths and self.device.type == "cpu"
                and bool(getattr(self.plan, "cpu_stands_in_for_gpu", False)))

    def compute_plan_device(self) -> str:
        """Plan device of what goes to the compute device (tensor(), head_linear)."""
        return self._gpu_name() if (self.device.type == "cuda" or self.stand_in) else "cpu"

    def _wdev(self, plan_device: str) -> torch.device:
        if plan_device.startswith("gpu") and self.device.type == "cpu" and self.stand_in:
            return self.device
        return _torch_device(plan_device)

    def record(self, plan_device: str, kind: str, nbytes: int) -> None:
        """Count bytes placed outside the per-tensor records (hot experts, KV cache,
        staging buffers) on a plan device ("gpu0", "cpu")."""
        key = (plan_device, kind)
        self._extra_bytes[key] = self._extra_bytes.get(key, 0) + int(nbytes)

    def _record_tensor(self, name: str, plan_device: str, kind: str, t) -> None:
        self._tensor_bytes[name] = (plan_device, kind, int(t.numel() * t.element_size()))

    @property
    def placed_bytes(self) -> dict:
        """{plan device: {kind: bytes}} the loader (and the runtime, for the KV cache) allocated:
        weights by the format they are held in ("weights.bf16", "weights.f32",
        "weights.quantized": GGUF blocks), "routed_experts" (hot experts), "kv_cache",
        "prefill_staging" (the prefill offload's device slots), "bridge" (the MoE hand-off's
        device buffer), "pinned" (host staging). Tensors left in the GGUF mmap are not counted.
        Workspaces live per forward and are not here. Keys match the Plan's breakdown where
        both have them (tests/test_plan_allocation.py)."""
        out: dict = {}
        for dev, kind, n in self._tensor_bytes.values():
            d = out.setdefault(dev, {})
            d[kind] = d.get(kind, 0) + n
        for (dev, kind), n in self._extra_bytes.items():
            d = out.setdefault(dev, {})
            d[kind] = d.get(kind, 0) + n
        return out

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
        t = self._dequant(name, torch.float32, self.device)
        self._record_tensor(name, self.compute_plan_device(), "weights.f32", t)
        return t

    def _warn_once(self, key, msg, *a):
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *a)

    def linear(self, name):
        info = self._info(name)
        pdev, fmt = self.plan.placement_of(name)
        wdev = self._wdev(pdev)
        jit = (fmt == "quantized" and info.ggml_type in dequant.SUPPORTED_TYPES
               and info.ggml_type not in (dequant.F32, dequant.F16, dequant.BF16))
        fn = self._linear(name, info, pdev, fmt, wdev, jit)
        if isinstance(fn, QuantLinear):
            pass                       # reads the GGUF mmap in place: nothing placed
        elif hasattr(fn, "blocks"):
            self._record_tensor(name, pdev, "weights.quantized", fn.blocks)
        else:
            self._record_tensor(name, pdev, f"weights.{_FMT_OF[fn.weight.dtype]}", fn.weight)
        return fn if wdev == self.device else _DeviceBridge(fn, wdev, self.device)

    def _linear(self, name, info, pdev, fmt, wdev, jit):
        if not pdev.startswith("gpu"):
            if (fmt == "quantized" and self.native_linears and info.ggml_type in self.native_types
                    and info.n_bytes >= self.native_min):
                self.stats["native_linears"] += 1
                fn = QuantLinear(self.g.view(name), info.ggml_type, info.ne[0], self.threads, name,
                                 self.workers)
            elif jit and self.dequant_linears:
                from hybrid.backends.gpu import DequantLinear

                self.stats["dequant_linears"] += 1
                fn = DequantLinear(self.g.view(name), info.ggml_type, info.ne[0], wdev, name=name)
            else:
                self.stats["torch_linears"] += 1
                dt = torch.bfloat16 if fmt == "bf16" else torch.float32
                fn = TorchLinear(self._dequant(name, dt, wdev).view(info.ne[1], info.ne[0]))
        elif jit:
            # the plan keeps this linear's GGUF blocks on the GPU: dequantized per call
            from hybrid.backends.gpu import DequantLinear

            self.stats["dequant_linears"] += 1
            fn = DequantLinear(self.g.view(name), info.ggml_type, info.ne[0], wdev, name=name)
        else:
            if fmt not in DTYPES:
                fmt = "bf16"   # "quantized" float tensors (F32/F16 in the file): bf16 copy
            self.stats["torch_linears"] += 1
            fn = TorchLinear(self._dequant(name, DTYPES[fmt], wdev).view(info.ne[1], info.ne[0]))
        return fn

    def head_linear(self, name, weight):
        """Per-head linears from `weight` [H, in, out] float32 (made from tensor `name` at load),
        in the plan's format of `name` (bf16 on the GPU: the bytes the plan counted, one copy
        serving both attention paths). On the CPU, when the file stores the tensor quantized,
        decode runs on Q8_0 copies (NativeHeadLinear; F16 copies were tried: no faster than
        f32, the AVX2 F16C conversion bounds them); F32/F16 files keep exact float math."""
        from hybrid.models.layers import HeadLinear

        _, fmt = self.plan.placement_of(name)
        dt = torch.bfloat16 if fmt == "bf16" else torch.float32
        lin = HeadLinear(weight.to(device=self.device, dtype=dt))
        # the float32 tensors the surgery read are freed; the per-head copies stay
        blk = name.rsplit("attn_", 1)[0]
        if name not in self._head_srcs:
            self._head_srcs.add(name)
            for stem in ("attn_kv_b", "attn_k_b", "attn_v_b"):
                self._tensor_bytes.pop(f"{blk}{stem}.weight", None)
        key = f"{name}#head{sum(1 for k in self._tensor_bytes if k.startswith(name + '#'))}"
        self._record_tensor(key, self.compute_plan_device(), f"weights.{_FMT_OF[dt]}", lin.weight)
        if (self.device.type == "cpu" and dt == torch.float32 and self.native_linears
                and self._info(name).ggml_type not in (dequant.F32, dequant.F16, dequant.BF16)
                and weight.shape[1] % 32 == 0):
            return NativeHeadLinear(lin.weight, self.threads, self.workers)
        return lin

    def expert_select(self, args, bias):
        """The native router selection on the CPU, or None (torch)."""
        return NativeRouter(args, bias) if self.device.type == "cpu" and native() else None

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
        """The native whole-layer attention for `attn` on the CPU (chosen by what the layer
        is: MLA's absorbed path, or GQA), or None (the GPU, or the CPU standing in for it)."""
        if self.device.type != "cpu" or self.stand_in:
            return None
        from hybrid.models.attention import GQAttention
        from hybrid.models.deepseek2 import MLAttention

        if isinstance(attn, MLAttention):
            return NativeMLA.build(attn, self.workers)
        if isinstance(attn, GQAttention):
            return NativeGQA.build(attn, self.workers)
        return None

    def causal_attention(self):
        """The native causal attention of long prompt chunks on the CPU, or None (the GPU, the
        CPU standing in for it, cpu_linears other than native: the torch reference path)."""
        if self.device.type != "cpu" or self.stand_in or not self.native_linears:
            return None
        return NativeCausalAttention(self.workers, self.threads)

    def norm(self, name, eps):
        w = self.tensor(name)
        if self.device.type == "cpu" and native() is not None:
            return NativeRMSNorm(w, eps)
        from hybrid.models.layers import RMSNorm

        return RMSNorm(w, eps)

    def embedding(self, name):
        info = self._info(name)
        return _Embedding(self.g.view(name), info.ggml_type, info.ne[0], self.device, name)

    def _placed_experts(self, d_model, max_k):
        """The PlacedExperts of the plan's NUMA mode (created with the first MoE layer)."""
        if self._placed is None:
            from hybrid.backends.numa import PlacedExperts, node_groups

            groups = node_groups(self.numa, threads=self.expert_threads,
                                 logical_partitions=self.numa_partitions)
            self._placed = PlacedExperts(self.g, self.numa, groups, d_model=d_model,
                                         max_tokens=self.max_tokens, max_k=max_k,
                                         hugepages=self.hugepages, progress=self.copy_progress)
            self._engine = self._placed.engine
            if self.device.type == "cuda":   # y goes to the GPU each MoE layer: page-locked
                self._engine.register_output(self.device)
            self.workers.engine = self._engine._eng
            log.info("routed experts: numa %s, %d worker group(s): %s", self.numa, len(groups),
                     "; ".join(f"node {g.node} cpus {g.cpus}" for g in groups))
        return self._placed

    def finish(self):
        """After every layer asked for its experts: copy the placed expert bytes (numa modes
        other than off; off reads the mmap in place)."""
        if self._placed is not None:
            self._placed.load()

    def _gpu_name(self) -> str:
        """The plan device the GPU path places on ("gpu0"; its index from the torch device)."""
        return f"gpu{self.device.index or 0}"

    def _bridge(self, D, K):
        if self.bridge is None:
            from hybrid.backends.gpu import Bridge

            self.bridge = Bridge(D, self.max_tokens, K, self.device)
            gdev = self._gpu_name()
            self.record(gdev, "bridge", self.bridge.y.numel() * self.bridge.y.element_size())
            self.record("cpu", "pinned", sum(t.numel() * t.element_size() for t in
                                             (self.bridge.x, self.bridge.ids, self.bridge.w,
                                              self.bridge.y_host)))
        return self.bridge

    def _offload(self):
        if self.offload is None and self.gpu_prefill_tokens is not None:
            from hybrid.backends.gpu import PrefillOffload

            moe = sorted({int(n.split(".")[1]) for n in self.g.tensors
                          if n.endswith("ffn_gate_exps.weight")})
            self.offload = PrefillOffload(self.g, moe, self.device, self.gpu_prefill_tokens)
            cp = self.offload.copier
            self.record(self._gpu_name(), "prefill_staging", sum(t.numel() for t in cp.slots))
            if cp.cuda:
                self.record("cpu", "pinned", sum(t.numel() for t in cp.staging))
        return self.offload

    def experts(self, layer):
        names = [f"blk.{layer}.ffn_{k}_exps.weight" for k in ("gate", "up", "down")]
        infos = [self._info(n) for n in names]
        D, E = infos[0].ne[0], infos[0].ne[2]
        arch = self.g.metadata.get("general.architecture", "")
        K = int(self.g.metadata.get(f"{arch}.expert_used_count", 8))
        hot = [int(e) for e in self.plan.gpu_expert_ids(layer)] if self.gpu_paths else []
        runs_native = self.experts_cls is not None and all(
            i.ggml_type in native().supported_types() for i in infos)
        if not runs_native:
            from hybrid.backends.torch_experts import TorchExperts

            self.stats["torch_experts"] += 1
            dt = torch.float32 if self.device.type == "cpu" else torch.bfloat16
            ex = TorchExperts.from_gguf(self.g, layer, dtype=dt, device=self.device)
            # the dequantized copies are what this choice costs: counted, never silent
            for name, w in zip(names, (ex.gate, ex.up, ex.down)):
                self._record_tensor(name, self.compute_plan_device(), f"weights.{_FMT_OF[dt]}", w)
            return ex if self.expert_stats is None else _Recording(ex, self.expert_stats, layer)
        self.stats["native_experts"] += 1
        cpu = self._placed_experts(D, K).add_layer(layer, skip=hot)   # hot: never on the CPU
        if not self.gpu_paths:
            return cpu if self.expert_stats is None else _Recording(cpu, self.expert_stats, layer)
        from hybrid.backends.gpu import OverlappedExperts

        gpu = lut = None
        if hot:
            self.stats["gpu_hot_experts"] += len(hot)
            # in the form the solver planned them in (placement.solver.hot_expert_bytes)
            if getattr(self.plan, "hot_expert_format", "bf16") == "quantized":
                from hybrid.backends.gpu import QuantExperts

                gpu = QuantExperts.from_gguf(self.g, layer, self.device, hot)
            else:
                from hybrid.backends.torch_experts import TorchExperts

                gpu = TorchExperts.from_gguf(self.g, layer, dtype=torch.bfloat16,
                                             device=self.device, experts=hot)
            self.record(self._gpu_name(), "routed_experts", gpu.nbytes)
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
