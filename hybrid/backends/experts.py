"""Bridge from a MoE layer to the native expert engine (routed experts in host RAM).

Letters: T tokens, K experts per token, E experts, D model dim, F expert FFN dim.

One `ExpertEngine` per model owns the native engine: its pinned worker threads and its
input / output buffers (page-locked for CUDA when a GPU is present, so the one copy each way
is a DMA). Each MoE layer gets a `NativeExperts` callable with the signature the model uses:
`experts(x[T, D], ids[T, K], weights[T, K]) -> y[T, D]`, or the split form `submit(...)` /
`wait()` so the GPU can compute the shared expert while the CPU works.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from hybrid import _native

log = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


def default_threads(cpus: list[int]) -> int:
    """All CPUs this process may use (the NUMA work refines this per node)."""
    return max(1, len(cpus))


def split_rows(n: int, shares: list[int], align: int = 16) -> list[tuple[int, int]]:
    """[start, end) ranges of n rows in proportion to shares, boundaries on multiples of align."""
    total = sum(shares)
    bounds, acc = [0], 0
    for s in shares[:-1]:
        acc += s
        bounds.append(min(n, max(bounds[-1], round(n * acc / total / align) * align)))
    bounds.append(n)
    return list(zip(bounds[:-1], bounds[1:]))


class ExpertEngine:
    """Native routed-expert engine shared by all MoE layers of a model.

    Workers form partitions (one per NUMA node; `partitions` gives each one's CPUs, one worker
    per entry, -1 = not pinned). Each partition computes its own rows of every expert, from
    memory local to it when the layer was placed per node (hybrid/backends/numa.py).
    """

    def __init__(self, d_model: int, *, max_tokens: int = 512, max_k: int = 8,
                 threads: int | None = None, cpus: list[int] | None = None, pin_threads: bool = True,
                 partitions: list[list[int]] | None = None):
        allowed = _native.allowed_cpus()
        if partitions is None:
            cpus = list(cpus) if cpus is not None else allowed
            if threads is None:
                threads = default_threads(cpus)
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            partitions = [[cpus[i % len(cpus)] if (pin_threads and cpus) else -1 for i in range(threads)]]
        bad = sorted({c for p in partitions for c in p if c >= 0} - set(allowed))
        if bad:
            raise ValueError(f"cpus: {bad} are not in this process's allowed set {allowed} "
                             "(taskset / numactl / cgroup cpuset)")
        if not partitions or any(not p for p in partitions):
            raise ValueError("partitions: every partition needs at least one worker")
        self._eng = _native.MoEEngine([list(p) for p in partitions], max_tokens, max_k, d_model)
        self.partitions = [list(p) for p in partitions]
        self.threads = sum(len(p) for p in partitions)
        self._keep = []  # buffers the native layers point into
        self.d_model = d_model
        self.max_tokens = max_tokens
        self.max_k = max_k
        # zero-copy torch views of the engine's buffers
        self.x = torch.from_numpy(self._eng.x)                 # [max_tokens, D]
        self.y = torch.from_numpy(self._eng.y)                 # [max_tokens, D]
        self.ids = torch.from_numpy(self._eng.ids).view(-1)    # [max_tokens * max_k]
        self.weights = torch.from_numpy(self._eng.weights).view(-1)
        self._pinned = []          # buffers page-locked by register_output
        self._pinned_device = None
        self._pending: tuple | None = None

    def register_output(self, device) -> bool:
        """Page-lock the output buffer y for async copies to `device` (the GPU path: y goes
        host -> device each MoE layer; x, ids and weights are filled by host copies and are
        not transferred). Only for a CUDA device: a CPU run must not start a CUDA context.
        Returns whether y is registered; a refusal is logged and y stays pageable (the copy
        is then synchronous, still correct)."""
        device = torch.device(device)
        if device.type != "cuda" or self._pinned:
            return bool(self._pinned)
        cudart = torch.cuda.cudart()
        t = self.y
        rc = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(rc) != 0:
            log.warning("cudaHostRegister of the expert engine's output (%d bytes) failed: %s; "
                        "its copies to the GPU stay synchronous", t.numel() * t.element_size(),
                        cudart.cudaGetErrorString(rc))
            return False
        self._pinned = [t]
        self._pinned_device = device
        return True

    def close(self):
        if self._eng is None:
            return
        self._eng.wait()
        if self._pinned:
            # a non_blocking copy out of y may still be queued on a stream: unregistering
            # page-locked memory under an in-flight DMA is undefined, so wait for the device
            torch.cuda.synchronize(self._pinned_device)
            cudart = torch.cuda.cudart()
            for t in self._pinned:
                rc = cudart.cudaHostUnregister(t.data_ptr())
                if int(rc) != 0:
                    log.warning("cudaHostUnregister failed: %s", cudart.cudaGetErrorString(rc))
            self._pinned = []
        self._eng = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def worker_cpus(self) -> list[int]:
        return self._eng.worker_cpus()

    def add_layer(self, n_experts: int, gate: np.ndarray, gate_type: int, up: np.ndarray, up_type: int,
                  down: np.ndarray, down_type: int) -> "NativeExperts":
        """Register one layer's experts from whole GGUF tensors (mmap views or one placed copy,
        used in place); partitions share them, each computing its own rows."""
        n_ff = _rows_per_expert(gate, gate_type, n_experts, self.d_model, "gate")
        shares = [len(p) for p in self.partitions]
        slices = [(gate, int(gate_type), up, int(up_type), down, int(down_type), f0, f1, d0, d1, 0, 0)
                  for (f0, f1), (d0, d1) in zip(split_rows(n_ff, shares), split_rows(self.d_model, shares))]
        return self.add_layer_slices(n_experts, n_ff, slices)

    def add_layer_slices(self, n_experts: int, n_ff: int, slices: list[tuple]) -> "NativeExperts":
        """Register one layer as per-partition slices: (gate, gate_type, up, up_type, down,
        down_type, f0, f1, d0, d1, first_f, first_d) where the buffers hold rows from first_f
        (gate/up) and first_d (down) of every expert."""
        layer = self._eng.add_layer(n_experts, n_ff, slices)
        self._keep.append(slices)
        return NativeExperts(self, layer, n_experts)

    # -- one forward at a time per engine -------------------------------------------------

    def _stage(self, x, ids, weights) -> tuple[int, int]:
        if self._pending is not None:
            raise RuntimeError("ExpertEngine: the previous forward was not waited for")
        T, K = _check_inputs(x, ids, weights, self.d_model, self.max_k)
        if T > self.max_tokens:
            raise ValueError(f"x: {T} tokens exceed the engine's max_tokens {self.max_tokens}; "
                             "call the layer (it splits long inputs) instead of submit")
        self.x[:T].copy_(x)
        self.ids[: T * K].view(T, K).copy_(ids)
        self.weights[: T * K].view(T, K).copy_(weights)
        return T, K

    def _result(self, T: int, device, dtype) -> torch.Tensor:
        out = torch.empty((T, self.d_model), device=device, dtype=dtype)
        out.copy_(self.y[:T], non_blocking=device.type == "cuda")
        return out

    def submit(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               shared_layer: int = -1):
        """Start a forward and return at once (the caller may use the GPU meanwhile)."""
        T, K = self._stage(x, ids, weights)
        self._eng.submit(layer, T, K, shared_layer)
        self._pending = (T, x.device, x.dtype)

    def wait(self, copy: bool = True) -> torch.Tensor:
        """The submitted forward's y [T, D]; copy=False: the engine's own (page-locked) output
        buffer, float32 on the CPU, valid until the next forward (for a caller that moves it
        to the device at once: no extra host copy)."""
        if self._pending is None:
            raise RuntimeError("ExpertEngine.wait: nothing was submitted")
        T, device, dtype = self._pending
        self._eng.wait()
        self._pending = None
        return self._result(T, device, dtype) if copy else self.y[:T]

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                shared_layer: int = -1) -> torch.Tensor:
        """Synchronous forward; the calling thread works as one of the engine's workers.
        shared_layer: a one-expert layer added for every token with weight 1 (see
        NativeExperts.absorb_shared)."""
        T, K = self._stage(x, ids, weights)
        self._eng.forward(layer, T, K, shared_layer)
        return self._result(T, x.device, x.dtype)


def _rows_per_expert(buf, qtype: int, n_experts: int, cols: int, name: str) -> int:
    row = _native.row_bytes(int(qtype), cols)
    nbytes = np.asarray(buf).nbytes if not hasattr(buf, "nbytes") else buf.nbytes
    if n_experts < 1 or nbytes % (n_experts * row):
        raise ValueError(f"{name}: {nbytes} bytes is not {n_experts} experts of rows of {row} bytes")
    return nbytes // (n_experts * row)


def _check_inputs(x, ids, weights, d_model: int, max_k: int) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != d_model:
        raise ValueError(f"x: expected a tensor [T, {d_model}], got {_describe(x)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} is not float32, bfloat16 or float16")
    if not x.is_contiguous():
        raise ValueError("x: must be contiguous (call .contiguous() first)")
    T = x.shape[0]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != T:
        raise ValueError(f"ids: expected a tensor [{T}, K], got {_describe(ids)}")
    K = ids.shape[1]
    if not 1 <= K <= max_k:
        raise ValueError(f"ids: K={K} experts per token is outside 1..{max_k} (the engine's max_k)")
    if ids.dtype not in _INT_DTYPES:
        raise ValueError(f"ids: dtype {ids.dtype} is not an integer type")
    if not ids.is_contiguous():
        raise ValueError("ids: must be contiguous")
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (T, K):
        raise ValueError(f"weights: expected a tensor [{T}, {K}], got {_describe(weights)}")
    if weights.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weights: dtype {weights.dtype} is not a float type")
    if not weights.is_contiguous():
        raise ValueError("weights: must be contiguous")
    return T, K


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return type(t).__name__


class NativeExperts:
    """Routed experts of one MoE layer: `experts(x, ids, weights) -> y`.

    ids < 0 are skipped; experts marked with `set_skip` (computed elsewhere, e.g. hot experts
    on the GPU) contribute nothing here, and the caller adds their share.
    """

    def __init__(self, engine: ExpertEngine, layer: int, n_experts: int):
        self.engine = engine
        self.layer = layer
        self.n_experts = n_experts
        self.shared_layer = -1   # a one-expert layer of the same engine computed in each call

    def absorb_shared(self, ffn) -> bool:
        """Compute `ffn` (the layer's shared experts) within every call of these routed experts
        when it is a one-expert layer of the same engine (NativeFFN): one job instead of two,
        and y = routed + shared exactly as two calls and an add. True when absorbed."""
        inner = getattr(ffn, "experts", None)
        if not isinstance(inner, NativeExperts) or inner.engine is not self.engine or inner.n_experts != 1:
            return False
        self.shared_layer = inner.layer
        return True

    def set_skip(self, mask) -> None:
        mask = np.asarray(mask, dtype=np.uint8).reshape(-1)
        if mask.size != self.n_experts:
            raise ValueError(f"mask: expected {self.n_experts} entries, got {mask.size}")
        self.engine._eng.set_skip(self.layer, mask)

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.engine.submit(self.layer, x, ids, weights, self.shared_layer)

    def wait(self, copy: bool = True) -> torch.Tensor:
        return self.engine.wait(copy)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else 0
        step = self.engine.max_tokens
        if 0 < T <= step and self.engine._pending is None:
            out = self._forward_arrays(x, ids, weights)
            if out is not None:
                return out
        if T <= step:
            return self.engine.forward(self.layer, x, ids, weights, self.shared_layer)
        _check_inputs(x, ids, weights, self.engine.d_model, self.engine.max_k)
        return torch.cat([self.engine.forward(self.layer, x[t0:t0 + step], ids[t0:t0 + step],
                                              weights[t0:t0 + step], self.shared_layer)
                          for t0 in range(0, T, step)])

    def _forward_arrays(self, x, ids, weights) -> torch.Tensor | None:
        """Decode's common case, float32 x / weights and int64 ids, contiguous on the CPU:
        staging and result copies inside one native call. None for any other input, before
        any work: numpy() refuses GPU, bfloat16 and autograd tensors (non-tensors have no
        numpy()), the binding's strict array types refuse other dtypes and layouts. Asking
        instead (dtype, device and contiguity of three tensors) cost ~30-60 us a call: the
        expert stream has evicted torch's code and data from the caches by then."""
        try:
            arrays = (x.numpy(), ids.numpy(), weights.numpy())
        except (TypeError, RuntimeError, AttributeError):  # AttributeError: not tensors
            return None
        out = torch.empty(x.shape[0], self.engine.d_model)
        try:
            self.engine._eng.forward_arrays(self.layer, *arrays, out.numpy(), self.shared_layer)
        except TypeError:  # pybind11: the arrays' dtypes or layouts do not match
            return None
        return out
