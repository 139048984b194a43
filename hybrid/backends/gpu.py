"""The GPU half of the runtime: CPU experts overlapped with the GPU, decode in CUDA graphs,
quantized weights dequantized just in time, hot experts in VRAM, GPU prefill of long prompts.

Everything here also runs on the CPU (no streams, no events, no capture), which is how the
tests exercise the logic on machines without a GPU; what only CUDA can show (overlap,
graph replay, copy/compute concurrency) is measured by bench/bench_gpu.py.

One MoE layer with activations on the GPU (OverlappedExperts):

    GPU  router ─► D2H h,ids,w (side stream) ─► shared expert, hot experts ─► idle ─► H2D y ─► x += s + y
    host           wait for the D2H only ─► engine.submit ─────────────► engine.wait ─┘
    CPU                                      routed experts (NativeExperts)

Decode in CUDA graphs (DecodeGraphs): the CPU expert call cannot sit inside a graph (a host
function node would block the GPU while the CPU works and could not release the GIL-free
engine's buffers in order), so a decode step is cut at every MoE layer with CPU experts into
segments (a layer whose experts are all hot stays inside its segment):

    segment 0:  attention(0..) ... router(m0), D2H(h, ids, w) -> event(m0), shared(m0)
    segment i:  H2D(y of m_{i-1}), combine, attention, ..., router(m_i), D2H -> event(m_i), shared(m_i)
    last:       H2D(y), combine, ..., norm, lm_head

Each segment is one CUDA graph (the graphs of every KV-length bucket share one memory pool;
a bucket's segments are replayed in capture order). The host replays segment i, waits for its event (captured as an
external event node: the D2H is done, the shared expert still runs), runs the CPU experts,
writes their output to the pinned buffer the next segment's first node copies from, and
replays segment i+1. Positions come from a device tensor, the attention reads the KV cache
up to a bucket (powers of two) under a mask, so one capture serves every position of its
bucket. When capture fails the runtime logs why and decodes eagerly.

Shape legend: T tokens, D model dim, K experts per token, E experts, F expert FFN dim,
S keys attended (bucket), B vocabulary.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from hybrid.backends import dequant
from hybrid.backends.torch_experts import expert_ffn, grouped_experts

log = logging.getLogger(__name__)

__all__ = ["DequantLinear", "QuantExperts", "Bridge", "OverlappedExperts", "GpuIdleTimer", "DecodeGraphs",
           "PrefillOffload", "kv_buckets"]


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


# ------------------------------------------------------------------------------------------
# quantized weights on the device


# Weights a DequantLinear dequantizes at a time: a matrix streams through in row blocks of
# about this many weights, so its bf16 copy and the float32 temporaries of the decoding never
# exceed one block (the output head of R1 whole would be ~1.85 GB bf16 plus f32 temporaries).
# placement.solver.DEQUANT_BLOCK_WEIGHTS is the same number: the Plan's dequant workspace.
DEQUANT_BLOCK_WEIGHTS = 1 << 22

# Tokens per matrix up to which a quantized matrix product runs the fused kernel
# (hybrid.backends.qmatvec: the blocks read once, no bf16 copy): decode and small batches.
# More tokens dequantize the matrix in row blocks and multiply them on tensor cores, the copy
# made once for all of them.
FUSED_MAX_TOKENS = 16

_warned_no_triton: set = set()
# (GGML type, device) -> True when the fused kernel passed its check there, else why not
_fused_checked: dict = {}
# byte offsets of the f16 scale fields in a block of each fused type
_F16_FIELDS = {dequant.Q8_0: (0,), dequant.Q4_K: (0, 2), dequant.Q5_K: (0, 2), dequant.Q6_K: (208,)}


def fused_ok(ggml_type: int, device) -> bool:
    """Whether products with `ggml_type` blocks on `device` run the fused kernel. A CUDA
    device without Triton (torch's CUDA wheels bring it) is said once in the log: its
    quantized products then dequantize first, ~12 more bytes moved per weight. The first
    use of each type on a device checks the kernel (_check_fused): one that does not compile
    or computes wrong there is turned off, with the reason in the log."""
    from hybrid.backends import qmatvec   # imports Triton (a second) only when asked

    if ggml_type not in qmatvec.FUSED_TYPES:
        return False
    if not qmatvec.available(device):
        if _is_cuda(device) and "cuda" not in _warned_no_triton:
            _warned_no_triton.add("cuda")
            log.warning("Triton is not installed: quantized GPU weights and hot experts are "
                        "dequantized before each product (slower decode); pip install triton")
        return False
    key = (ggml_type, str(torch.device(device)))
    if key not in _fused_checked:
        _fused_checked[key] = _check_fused(ggml_type, device)
        if _fused_checked[key] is not True:
            log.warning("the fused %s kernel is off on %s (%s): those products dequantize "
                        "first", dequant.type_name(ggml_type), key[1], _fused_checked[key])
    return _fused_checked[key] is True


def _check_fused(ggml_type: int, device):
    """The fused kernel on small random blocks (two matrices, a slot without one, the plain
    form) against dequantize-then-matmul on the same device: True, or what went wrong."""
    from hybrid.backends import qmatvec

    blk, nb = dequant.BLOCK[ggml_type]
    D, N = 512, 40
    g = torch.Generator().manual_seed(ggml_type)
    raw = torch.randint(0, 256, (2, N, D // blk, nb), dtype=torch.uint8, generator=g)
    for off in _F16_FIELDS[ggml_type]:   # finite, moderate scales (random bytes make infs)
        d = (torch.rand(2, N, D // blk, generator=g) * 0.01 + 0.001).half()
        raw[..., off:off + 2] = d.view(torch.uint8).view(2, N, D // blk, 2)
    raw = raw.view(2, N, -1).to(device)
    x = torch.randn(3, D, generator=g).to(device)
    eids = torch.tensor([1, -1, 0], dtype=torch.int32, device=device)
    rows = torch.tensor([2, 0, 1], dtype=torch.int32, device=device)
    try:
        got = qmatvec.qmatvec(raw, ggml_type, D, x, eids, rows)                # [3, N]
        plain = qmatvec.qmatvec(raw[0], ggml_type, D, x)                       # [3, N]
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:   # a Triton that cannot compile it here: the unfused path
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    # the reference in float64 (no TF32 or reduced-precision matmul can blur it)
    w = [dequant.dequantize(raw[i], ggml_type, D).double() for i in range(2)]  # [N, D] each
    xd = x.double()
    want = torch.stack((w[1] @ xd[2], torch.zeros_like(w[0][:, 0]), w[0] @ xd[1]))
    err = max(float((got.double() - want).abs().max()), float((plain.double() - xd @ w[0].t()).abs().max()))
    scale = float(want.abs().max())
    if not err <= 1e-3 * scale:
        return f"wrong results: max error {err:.3g} against {scale:.3g}"
    return True


def _qmatvec(*args, **kw):
    from hybrid.backends.qmatvec import qmatvec

    return qmatvec(*args, **kw)


def _rows_per_block(rows: int, in_features: int, block_weights: int) -> int:
    return max(1, min(rows, block_weights // max(in_features, 1)))


def dequant_linear(blocks: torch.Tensor, ggml_type: int, in_features: int, x: torch.Tensor,
                   dtype, rows_per_block: int, name: str = "linear") -> torch.Tensor:
    """x @ W^T, float32 [..., N], with W the GGUF blocks `blocks` (uint8 [N, row bytes])
    dequantized to `dtype` rows_per_block rows at a time, each block freed before the next:
    the peak is one block's copy and its temporaries, whatever the matrix. Fixed trip count
    (capturable)."""
    N = blocks.shape[0]
    xs = x.to(dtype)

    def rows(r0, r1):
        return dequant.dequantize(blocks[r0:r1], ggml_type, in_features, dtype=dtype, name=name)

    if rows_per_block >= N:
        return F.linear(xs, rows(0, N)).float()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32, device=x.device)
    for r0 in range(0, N, rows_per_block):
        r1 = min(N, r0 + rows_per_block)
        y[..., r0:r1] = F.linear(xs, rows(r0, r1))
    return y


class DequantLinear:
    """y = x @ W^T with W kept on the device as its GGUF blocks (uint8). For plans with
    gpu_weight_format "quantized": VRAM holds ~4.5 bits per weight instead of 16. Up to
    FUSED_MAX_TOKENS rows of x the fused kernel reads the blocks once (types with one, Triton
    present); otherwise the rows are dequantized to `dtype` (hybrid.backends.dequant, torch
    ops: any device) at every call, in blocks of block_weights weights
    (DEQUANT_BLOCK_WEIGHTS), each freed before the next: the peak is one block."""

    def __init__(self, blocks: np.ndarray, ggml_type: int, in_features: int, device,
                 dtype=torch.bfloat16, name: str = "linear",
                 block_weights: int = DEQUANT_BLOCK_WEIGHTS):
        if ggml_type not in dequant.SUPPORTED_TYPES:
            raise dequant.DequantError(f"{name}: {dequant.type_name(ggml_type)} has no torch "
                                       f"dequantization")
        self.blocks = dequant._as_tensor(blocks).to(device)           # uint8 [out, row_bytes]
        self.ggml_type = ggml_type
        self.in_features = in_features
        self.out_features = blocks.shape[0]
        self.dtype = dtype
        self.name = name
        self.rows_per_block = _rows_per_block(self.out_features, in_features, block_weights)
        self.fused = fused_ok(ggml_type, self.blocks.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized matrix [out, in] (made now, whole, not kept: for tests)."""
        return dequant.dequantize(self.blocks, self.ggml_type, self.in_features,
                                  dtype=self.dtype, name=self.name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.numel() <= FUSED_MAX_TOKENS * self.in_features:
            y = _qmatvec(self.blocks, self.ggml_type, self.in_features,
                         x.reshape(-1, self.in_features))
            return y.view(*x.shape[:-1], self.out_features)
        return dequant_linear(self.blocks, self.ggml_type, self.in_features, x, self.dtype,
                              self.rows_per_block, self.name)


class QuantExperts:
    """Hot experts kept on the device in their GGUF blocks: for Q4_K_M ~3.3x as many as
    bf16 copies in the same VRAM (placement.solver.hot_expert_bytes plans them at their file
    bytes when the Plan's hot_expert_format is "quantized"). The calls of TorchExperts.

    Up to FUSED_MAX_TOKENS tokens (decode, the graphs' static step) with the fused kernel:
    one launch per matrix for every (token, slot) pair, the expert ids read on the device
    (no host sync; slots whose expert is not hot read nothing). Otherwise by expert: each
    matrix dequantized in row blocks (DequantLinear's workspace) and multiplied for all its
    tokens at once; the static step without the fused kernel goes slot by slot (fixed trip
    count: the CPU stand-in's view of it, and CUDA without Triton).

    Shape legend: T tokens, K slots per token, S = T*K, D model dim, F expert FFN dim,
    E hot experts."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, types,
                 dtype=torch.bfloat16, block_weights: int = DEQUANT_BLOCK_WEIGHTS):
        """gate, up: uint8 [E, F, row bytes of D]; down: uint8 [E, D, row bytes of F];
        types: their GGML types."""
        self.gate, self.up, self.down = gate, up, down
        self.types = tuple(int(t) for t in types)
        self.n_expert, self.n_ff, self.d_model = gate.shape[0], gate.shape[1], down.shape[1]
        self.dtype = dtype
        self.rpb = (_rows_per_block(self.n_ff, self.d_model, block_weights),
                    _rows_per_block(self.d_model, self.n_ff, block_weights))
        self.fused = all(fused_ok(t, gate.device) for t in self.types)

    @property
    def nbytes(self) -> int:
        """Bytes of the held blocks (what the Plan counts for quantized hot experts)."""
        return sum(t.numel() for t in (self.gate, self.up, self.down))

    @classmethod
    def from_gguf(cls, gguf, layer: int, device, experts, dtype=torch.bfloat16):
        """The blocks of one layer's routed experts `experts` (ids), copied to `device`."""
        mats, types = [], []
        for k in ("gate", "up", "down"):
            name = f"blk.{layer}.ffn_{k}_exps.weight"
            info = gguf.tensors[name]
            if info.ggml_type not in dequant.SUPPORTED_TYPES:
                raise dequant.DequantError(f"{name}: {dequant.type_name(info.ggml_type)} has no "
                                           f"torch dequantization, so its experts cannot be "
                                           f"cached on the GPU; run with --no-expert-cache")
            v = gguf.view(name).reshape(info.shape[0], info.shape[1], -1)[list(experts)]
            mats.append(dequant._as_tensor(v).to(device))
            types.append(info.ggml_type)
        return cls(*mats, types, dtype=dtype)

    def _linear(self, w, t, in_features, rpb, h):
        if self.fused and h.shape[0] <= FUSED_MAX_TOKENS:
            return _qmatvec(w, t, in_features, h)
        return dequant_linear(w, t, in_features, h, self.dtype, rpb)

    def _ffn(self, gate, up, down, h):
        """One expert's blocks (gate, up [F, row bytes], down [D, row bytes]) for the tokens
        h [n, D] -> [n, D]."""
        D, F_ = self.d_model, self.n_ff
        g = self._linear(gate, self.types[0], D, self.rpb[0], h)                 # [n, F]
        u = self._linear(up, self.types[1], D, self.rpb[0], h)                   # [n, F]
        return self._linear(down, self.types[2], F_, self.rpb[1], F.silu(g) * u)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 host_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ids: hot slots (-1: not hot). host_ids: the same on the host (token counts without
        a device->host sync)."""
        if self.fused and ids.shape[0] <= FUSED_MAX_TOKENS:
            return self.static(x, ids, weights)
        src = ids if host_ids is None else host_ids
        flat = src.reshape(-1).long()
        counts = torch.bincount(flat[flat >= 0], minlength=self.n_expert).tolist()  # one sync
        return grouped_experts(x, ids, weights, counts,
                               lambda e, h: self._ffn(self.gate[e], self.up[e], self.down[e], h),
                               self.dtype)

    def static(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same sum with fixed shapes and no host sync (capturable in a CUDA graph)."""
        T, K = ids.shape
        D, F_ = self.d_model, self.n_ff
        slots = ids.reshape(-1)                                                  # [S]
        if self.fused:
            eids = slots.to(torch.int32)
            tok = torch.arange(T * K, device=x.device, dtype=torch.int32) // K    # [S]
            g = _qmatvec(self.gate, self.types[0], D, x, eids, tok)              # [S, F]
            u = _qmatvec(self.up, self.types[1], D, x, eids, tok)                # [S, F]
            each = torch.arange(T * K, device=x.device, dtype=torch.int32)      # slot s: row s
            o = _qmatvec(self.down, self.types[2], F_, F.silu(g) * u, eids, each)  # [S, D]
        else:
            o = torch.zeros(T * K, D, dtype=torch.float32, device=x.device)
            for s in range(T * K):   # fixed trip count: S slots, not a loop over experts
                e = slots[s:s + 1].clamp(min=0)             # [1]; not hot: weight 0 below
                blocks = [m.index_select(0, e)[0] for m in (self.gate, self.up, self.down)]
                o[s] = self._ffn(*blocks, x[s // K:s // K + 1])[0]
        w = torch.where(ids >= 0, weights.float(), 0.0)                          # [T, K]
        return (w.unsqueeze(-1) * o.view(T, K, D)).sum(1)                        # [T, D]


# ------------------------------------------------------------------------------------------
# host <-> device hand-off of the routed experts


class Bridge:
    """Staging shared by every MoE layer (one forward at a time): pinned host buffers for
    h, ids, weights (one D2H each way per layer, on a side stream), a device buffer for the
    experts' output, the events the host and the main stream wait on. On the CPU the same
    calls are plain copies."""

    def __init__(self, d_model: int, max_tokens: int, max_k: int, device):
        self.device = torch.device(device)
        self.cuda = _is_cuda(self.device)
        pin = self.cuda
        self.max_tokens, self.max_k, self.d_model = max_tokens, max_k, d_model
        self.x = torch.empty(max_tokens, d_model, pin_memory=pin)                 # [T, D]
        self.ids = torch.empty(max_tokens * max_k, dtype=torch.int64, pin_memory=pin)
        self.w = torch.empty(max_tokens * max_k, dtype=torch.float32, pin_memory=pin)
        self.y_host = torch.empty(max_tokens, d_model, pin_memory=pin)            # [T, D]
        self.y = torch.empty(max_tokens, d_model, device=self.device)             # [T, D]
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.ready = torch.cuda.Event()
            self.done = torch.cuda.Event()
        else:
            self.stream = self.ready = self.done = None

    def host_views(self, T: int, K: int):
        return self.x[:T], self.ids[:T * K].view(T, K), self.w[:T * K].view(T, K)

    def to_host(self, x, ids, w):
        """Copy h [T, D], ids [T, K], weights [T, K] to the pinned staging; returns when they
        are there (the one host wait of a layer; work queued after it keeps the GPU busy)."""
        T, K = ids.shape
        xs, ih, wh = self.host_views(T, K)
        if not self.cuda:
            xs.copy_(x), ih.copy_(ids), wh.copy_(w)
            return xs, ih, wh
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            xs.copy_(x, non_blocking=True)
            ih.copy_(ids, non_blocking=True)
            wh.copy_(w, non_blocking=True)
            self.ready.record(self.stream)
        self.ready.synchronize()
        return xs, ih, wh

    def to_device(self, y_host: torch.Tensor) -> torch.Tensor:
        """y [T, D] from (pinned) host memory into the device buffer; the main stream waits
        for the copy, the host does not. Valid until the next layer's to_device."""
        T = y_host.shape[0]
        out = self.y[:T]
        if not self.cuda:
            return out.copy_(y_host)
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)   # the previous layer's consumers of self.y are queued
        with torch.cuda.stream(self.stream):
            out.copy_(y_host, non_blocking=True)
            self.done.record(self.stream)
        main.wait_event(self.done)
        return out


class GpuIdleTimer:
    """GPU idle time per token, from CUDA events: for each MoE layer, from the moment the
    GPU has finished everything queued before the CPU result (shared and hot experts) to
    the moment the result is on the device. Events are recorded without host syncs and read
    once per token (end_step), when the logits are synced anyway. Eager steps only: replayed
    CUDA graphs hand off outside OverlappedExperts.wait and are not timed."""

    def __init__(self, n_layers: int, device):
        self.cuda = _is_cuda(device)
        n = max(1, n_layers)
        if self.cuda:
            self.start = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            self.end = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            self.step = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        self.used = 0
        self.tokens = []    # (idle_ms, step_ms) per read_token

    def begin_step(self):
        self.used = 0
        if self.cuda:
            self.step[0].record()

    def idle_start(self):
        if self.cuda and self.used < len(self.start):
            self.start[self.used].record()

    def idle_end(self):
        if self.cuda and self.used < len(self.end):
            self.end[self.used].record()
            self.used += 1

    def end_step(self):
        if not self.cuda:
            return
        self.step[1].record()
        self.step[1].synchronize()
        if not self.used:   # no hand-off seen (a graph-replayed step): nothing to attribute
            return
        idle = sum(self.start[i].elapsed_time(self.end[i]) for i in range(self.used))
        self.tokens.append((idle, self.step[0].elapsed_time(self.step[1])))

    def summary(self) -> dict:
        if not self.tokens:
            return {"tokens": 0}
        idle = sum(t[0] for t in self.tokens)
        total = sum(t[1] for t in self.tokens)
        return {"tokens": len(self.tokens), "idle_ms_per_token": idle / len(self.tokens),
                "step_ms": total / len(self.tokens), "idle_fraction": idle / total if total else 0.0}


class OverlappedExperts:
    """Routed experts of one MoE layer whose activations live on the device.

    The CPU engine computes the experts it does not skip; `hot` (TorchExperts on the device
    for the Plan's gpu_experts, with `lut` global id -> hot slot) computes the rest while the
    CPU works; `offload` (PrefillOffload) takes long chunks to the device entirely. The
    model calls submit(), runs the shared expert, then wait() (overlap_shared). A layer whose
    experts are all hot (`all_hot`) never goes to the CPU: no hand-off, no host wait, and
    DecodeGraphs keeps it inside one captured segment."""

    overlap_shared = True

    def __init__(self, cpu, bridge: Bridge, layer: int, hot=None, lut=None, stats=None,
                 offload=None, timer: GpuIdleTimer | None = None):
        self.cpu, self.bridge, self.layer = cpu, bridge, layer
        self.hot, self.lut = hot, lut
        self.lut_host = lut.cpu() if lut is not None else None
        self.all_hot = lut is not None and bool((self.lut_host >= 0).all())
        self.stats, self.offload, self.timer = stats, offload, timer
        self._pending = None

    def local_ids(self, ids, lut=None):
        """Global expert ids -> hot slots (-1: not hot)."""
        lut = self.lut if lut is None else lut
        return torch.where(ids >= 0, lut[ids.clamp(min=0)], -1)

    def submit(self, x, ids, weights):
        if self._pending is not None:
            raise RuntimeError(f"layer {self.layer}: submit() twice without wait()")
        T = x.shape[0]
        if self.stats is not None:
            self.stats.record(self.layer, ids)
        if self.all_hot:
            self._pending = ("done", self.hot(x, self.local_ids(ids), weights))
            return
        if self.offload is not None and self.offload.wants(T):
            self._pending = ("done", self.offload(self.layer, x, ids, weights))
            return
        if T > self.bridge.max_tokens:
            # longer than the staging: the engine splits it, without overlap
            y = self.cpu(x.float().cpu().contiguous(), ids.cpu().contiguous(),
                         weights.float().cpu().contiguous()).to(x.device)
            if self.hot is not None:
                y = y + self.hot(x, self.local_ids(ids), weights)
            self._pending = ("done", y)
            return
        xs, ih, wh = self.bridge.to_host(x, ids, weights)
        self.cpu.submit(xs, ih, wh)
        gpu = None
        if self.hot is not None:   # queued now: runs on the GPU while the CPU works
            gpu = self.hot(x, self.local_ids(ids), weights,
                           host_ids=self.local_ids(ih, self.lut_host))
        self._pending = ("cpu", gpu)

    def wait(self):
        kind, part = self._pending
        self._pending = None
        if kind == "done":
            return part
        if self.timer is not None:
            self.timer.idle_start()
        # the engine's own page-locked output, straight into the device buffer (async DMA)
        y = self.bridge.to_device(self.cpu.wait(copy=False))
        if self.timer is not None:
            self.timer.idle_end()
        return y if part is None else y + part

    def __call__(self, x, ids, weights):
        self.submit(x, ids, weights)
        return self.wait()


# ------------------------------------------------------------------------------------------
# decode in CUDA graphs


def kv_buckets(ctx: int, smallest: int = 256) -> list[int]:
    """KV lengths captured: powers of two from `smallest`, the context last."""
    out, b = [], min(smallest, ctx)
    while b < ctx:
        out.append(b)
        b *= 2
    out.append(ctx)
    return out


class DecodeGraphs:
    """A decode step (T tokens at known positions) through model.decode_static, in segments
    between the CPU expert calls (see the module docstring).

    mode "graphs": capture per KV bucket on first use, replay after; "static": the same
    segmented fixed-shape path run eagerly (the CPU tests' view of it; the fallback when
    capture fails)."""

    def __init__(self, model, cache, experts: dict, bridge: Bridge, device, T: int = 1,
                 mode: str = "graphs", stats=None):
        self.model, self.cache, self.experts, self.bridge = model, cache, experts, bridge
        self.device = torch.device(device)
        self.T = T
        self.mode = mode if _is_cuda(self.device) else "static"
        self.stats = stats
        D = model.args.dim
        self.x_in = torch.zeros(T, D, device=self.device)                        # [T, D]
        self.pos = torch.zeros(T, dtype=torch.int64, device=self.device)          # [T]
        self.buckets = kv_buckets(cache.max_tokens)
        self.graphs: dict[int, tuple] = {}
        self.failed: str | None = None
        self.replays = 0      # steps run from captured graphs (the capturing step too)
        self.captures = 0     # KV buckets captured
        # one memory pool for every bucket's graphs: buckets replay one at a time and what
        # outlives a step (logits, the hand-off tensors in `keep`) stays referenced, so a
        # later bucket's capture only reuses blocks that an earlier one frees after each step
        self.pool = None
        if self.mode == "graphs":
            self.events = {il: torch.cuda.Event(external=True) for il in experts}

    def bucket(self, end: int) -> int:
        return next(b for b in self.buckets if b >= end)

    def __call__(self, x: torch.Tensor, pos0: int) -> torch.Tensor:
        """x [T, D] embedded tokens at positions pos0.. -> logits [T, B]."""
        T = x.shape[0]
        if T != self.T:
            raise ValueError(f"DecodeGraphs: built for {self.T} tokens per step, got {T}")
        self.x_in.copy_(x)
        self.pos.copy_(torch.arange(pos0, pos0 + T), non_blocking=True)
        S = self.bucket(pos0 + T)
        if self.mode == "graphs":
            try:
                g = self.graphs.get(S) or self._capture(S)
            except Exception as e:   # a kernel or op that cannot be captured: decode eagerly
                self.failed = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture failed (%s); decoding without graphs", self.failed)
                self.mode = "static"
                self.graphs.clear()   # their pool goes with them
                self.pool = None
                torch.cuda.synchronize(self.device)
                return self._static(S)
            return self._replay(g)
        return self._static(S)

    # -- eager, same segments ---------------------------------------------------------------
    def _static(self, S: int) -> torch.Tensor:
        gen = self.model.decode_static(self.x_in, self.pos, self.cache, S)
        msg, reply = next(gen), None
        try:
            while True:
                if msg[0] == "submit":
                    _, il, h, ids, w = msg
                    self.experts[il].submit(h, ids, w)
                    reply = None
                else:
                    reply = self.experts[msg[1]].wait()
                msg = gen.send(reply)
        except StopIteration as stop:
            return stop.value

    # -- CUDA graphs ------------------------------------------------------------------------
    def _capture(self, S: int):
        """Capture the segments of bucket S (one eager run first warms cuBLAS and the caches
        the capture must not allocate; its routing is not counted twice)."""
        saved = {il: ex.stats for il, ex in self.experts.items()}
        for ex in self.experts.values():
            ex.stats = None
        side = torch.cuda.Stream(self.device)   # warm-up on a side stream, as torch advises
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                self._static(S)
        finally:
            for il, ex in self.experts.items():
                ex.stats = saved[il]
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        # a capture that raises can leave the capture stream current (torch.cuda.graph's exit
        # raising before it restores the stream) and a partial graph holding the pool: both
        # are undone in finally, so the eager fallback runs on the caller's stream
        caller = torch.cuda.current_stream(self.device)
        # a capture that fails leaves the device's default RNG in capture mode (torch ends
        # the capture before it releases the generator, and the end raises): every later
        # random op on the device would raise "Offset increment outside graph capture". A
        # clone taken now (not capturing) replaces its state if the capture fails.
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        rng = torch.cuda.default_generators[index]
        rng_before = rng.clone_state()
        partial: list = []
        try:
            out = self._capture_segments(S, partial)
        except BaseException:
            for g in partial:   # free what the captured segments hold in the pool
                try:
                    g.reset()
                except Exception:   # the graph whose capture failed may refuse
                    pass
            rng.graphsafe_set_state(rng_before)
            raise
        finally:
            if torch.cuda.current_stream(self.device) != caller:
                torch.cuda.set_stream(caller)
        self.captures += 1
        return out

    def _capture_segments(self, S: int, partial: list):
        br, T = self.bridge, self.T
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        pool = self.pool
        gen = self.model.decode_static(self.x_in, self.pos, self.cache, S)
        segments, keep = [], []
        reply, started, gpu_part, logits = None, False, None, None
        while logits is None:
            g = torch.cuda.CUDAGraph()
            partial.append(g)
            layer = None
            with torch.cuda.graph(g, pool=pool):
                if started:   # the previous layer's CPU result: pinned host -> device
                    y = br.y[:T]
                    y.copy_(br.y_host[:T], non_blocking=True)
                    reply = y if gpu_part is None else y + gpu_part
                try:
                    msg = gen.send(reply) if started else next(gen)
                    started = True
                    while True:
                        if msg[0] == "submit":
                            _, layer, h, ids, w = msg
                            ex = self.experts[layer]
                            if not ex.all_hot:   # to the CPU engine's staging first
                                xs, ih, wh = br.host_views(T, ids.shape[1])
                                xs.copy_(h, non_blocking=True)
                                ih.copy_(ids, non_blocking=True)
                                wh.copy_(w, non_blocking=True)
                                self.events[layer].record()
                            if self.stats is not None:
                                self.stats.record(layer, ids)
                            gpu_part = None
                            if ex.hot is not None:
                                gpu_part = ex.hot.static(h, ex.local_ids(ids), w)
                            keep.append((h, ids, w, gpu_part))
                            msg = gen.send(None)
                        elif self.experts[msg[1]].all_hot:   # nothing on the CPU: go on
                            msg = gen.send(gpu_part)
                        else:   # ("wait", layer) of a layer with CPU experts: the segment ends
                            break
                except StopIteration as stop:
                    logits = stop.value
                    layer = None
            segments.append((g, layer))
        self.graphs[S] = (segments, logits, keep)
        return self.graphs[S]

    def _replay(self, captured) -> torch.Tensor:
        segments, logits, _ = captured
        br, T = self.bridge, self.T
        for g, layer in segments:
            g.replay()
            if layer is None:
                continue
            self.events[layer].synchronize()          # h, ids, w of this layer on the host
            cpu = self.experts[layer].cpu
            xs, ih, wh = br.host_views(T, self.model.args.n_expert_used)
            cpu.submit(xs, ih, wh)
            br.y_host[:T].copy_(cpu.wait())           # read by the next segment's first node
        self.replays += 1
        return logits


# ------------------------------------------------------------------------------------------
# GPU prefill: a layer's routed experts streamed to the device


class _LayerSource:
    """Where one MoE layer's expert bytes are: the three GGUF tensors (mmap views)."""

    def __init__(self, gguf, layer: int):
        self.names = [f"blk.{layer}.ffn_{k}_exps.weight" for k in ("gate", "up", "down")]
        self.infos = [gguf.tensors[n] for n in self.names]
        self.views = [gguf.view(n).reshape(-1) for n in self.names]
        self.nbytes = sum(v.nbytes for v in self.views)


class _Copier:
    """Two device slots, each a layer's expert bytes; copies into one while the other is
    computed on. CUDA: a worker thread memcpys the mmap into a ring of pinned chunks and
    queues each chunk's H2D on a copy stream; the compute stream waits for a layer's last
    copy (an event), the copy stream for the end of the compute that used the slot before.
    CPU (tests): the same bookkeeping with plain copies."""

    def __init__(self, sources: dict, device, chunk_bytes: int = 64 << 20, log_events=None):
        self.sources = sources
        self.device = torch.device(device)
        self.cuda = _is_cuda(self.device)
        size = max(s.nbytes for s in sources.values())
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.slot_of: dict[int, int] = {}
        self.loaded: dict[int, object] = {}      # layer -> Future (copy finished on the host side)
        self.copied: dict[int, object] = {}      # layer -> event (copy finished on the device)
        self.freed = [None, None]                # per slot: event after its last compute
        self.events = log_events if log_events is not None else []
        self._next_slot = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hybrid-prefill-copy")
        self._lock = threading.Lock()
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            n = 2
            self.staging = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(n)]
            self.staged = [None] * n
        self.chunk = chunk_bytes

    def prefetch(self, layer: int) -> None:
        with self._lock:
            if layer in self.loaded:
                return
            slot = self._next_slot
            self._next_slot ^= 1
            for l, s in list(self.slot_of.items()):   # whoever held this slot is evicted
                if s == slot:
                    del self.slot_of[l]
                    self.loaded.pop(l, None)
                    self.copied.pop(l, None)
            self.slot_of[layer] = slot
            self.events.append(("prefetch", layer, slot))
            self.loaded[layer] = self._pool.submit(self._copy, layer, slot, self.freed[slot])

    def _copy(self, layer: int, slot: int, freed) -> None:
        with torch.inference_mode():   # the slots are inference tensors; mode is per thread
            self._copy_layer(layer, slot, freed)

    def _copy_layer(self, layer: int, slot: int, freed) -> None:
        src, dst = self.sources[layer], self.slots[slot]
        if not self.cuda:
            off = 0
            for v in src.views:
                dst[off:off + v.nbytes].copy_(dequant._as_tensor(v))
                off += v.nbytes
            self.events.append(("copied", layer, slot))
            return
        with torch.cuda.stream(self.stream):
            if freed is not None:
                self.stream.wait_event(freed)        # the slot's previous layer is computed
            off, k = 0, 0
            for v in src.views:
                for s in range(0, v.nbytes, self.chunk):
                    n = min(self.chunk, v.nbytes - s)
                    if self.staged[k] is not None:
                        self.staged[k].synchronize()  # this pinned chunk's last H2D is done
                    self.staging[k][:n].copy_(dequant._as_tensor(v[s:s + n]))
                    dst[off:off + n].copy_(self.staging[k][:n], non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                    self.staged[k] = ev
                    off += n
                    k ^= 1
            done = torch.cuda.Event()
            done.record(self.stream)
        self.copied[layer] = done
        self.events.append(("copied", layer, slot))

    def acquire(self, layer: int) -> list:
        """The layer's three tensors on the device ([E, rows, row_bytes] uint8 views), once
        copied (the compute stream waits for the copy; the host waits only for the host-side
        part of it)."""
        self.prefetch(layer)
        self.loaded[layer].result()
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[layer])
        slot = self.slots[self.slot_of[layer]]
        out, off = [], 0
        for v, info in zip(self.sources[layer].views, self.sources[layer].infos):
            E = info.shape[0]
            out.append(slot[off:off + v.nbytes].view(E, info.shape[1], -1))
            off += v.nbytes
        self.events.append(("acquire", layer, self.slot_of[layer]))
        return out

    def release(self, layer: int) -> None:
        """The compute that reads the layer's slot is queued: the slot may be refilled after it."""
        slot = self.slot_of.get(layer)
        if slot is None:
            return
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.freed[slot] = ev
        self.events.append(("release", layer, slot))

    def close(self):
        self._pool.shutdown(wait=True)   # no copy is being queued any more
        if self.cuda:
            # the copy stream's H2D into the slots may still run: the caching allocator only
            # knows the stream the slots were made on, so freeing them now could hand memory
            # still being written to the next allocation
            self.stream.synchronize()
        self.slots = []
        self.staging = []


class PrefillOffload:
    """Routed experts of long prefill chunks (at least `min_tokens` tokens) on the device:
    each MoE layer's expert bytes stream to the GPU through pinned memory, double-buffered
    (layer i+1 is copied while layer i computes), and are dequantized there expert by expert
    (only experts that got tokens). Shorter chunks stay on the CPU engine.

    expect_more (set by the runtime per chunk): after the last MoE layer, start copying the
    first one again for the next chunk."""

    def __init__(self, gguf, moe_layers, device, min_tokens: int, dtype=torch.bfloat16,
                 log_events=None):
        if int(min_tokens) < 1:
            raise ValueError(f"PrefillOffload: min_tokens {min_tokens}: at least 1 (GPU prefill off is no offload)")
        self.layers = sorted(moe_layers)
        self.device = torch.device(device)
        self.min_tokens = int(min_tokens)
        self.dtype = dtype
        self.d_model = None
        sources = {l: _LayerSource(gguf, l) for l in self.layers}
        self.copier = _Copier(sources, self.device, log_events=log_events)
        self.events = self.copier.events
        self.expect_more = False
        self.calls = 0

    def wants(self, T: int) -> bool:
        return T >= self.min_tokens

    def _next(self, layer: int):
        i = self.layers.index(layer)
        if i + 1 < len(self.layers):
            return self.layers[i + 1]
        return self.layers[0] if self.expect_more else None

    def __call__(self, layer: int, x, ids, weights):
        gate, up, down = self.copier.acquire(layer)
        nxt = self._next(layer)
        if nxt is not None:
            self.copier.prefetch(nxt)     # overlaps this layer's compute
        self.events.append(("compute", layer))
        y = self._compute(self.copier.sources[layer].infos, gate, up, down, x, ids, weights)
        self.copier.release(layer)
        self.calls += 1
        return y

    def _compute(self, infos, gate, up, down, x, ids, weights):
        D = x.shape[1]
        gi, ui, di = infos
        host = ids.reshape(-1).cpu()                                  # one sync per layer
        counts = torch.bincount(host[host >= 0], minlength=gi.shape[0]).tolist()

        def ffn(e, h):   # dequantized from the streamed blocks, one expert at a time
            g = dequant.dequantize(gate[e], gi.ggml_type, D, dtype=self.dtype)       # [F, D]
            u = dequant.dequantize(up[e], ui.ggml_type, D, dtype=self.dtype)         # [F, D]
            d = dequant.dequantize(down[e], di.ggml_type, g.shape[0], dtype=self.dtype)  # [D, F]
            return expert_ffn(h, g, u, d)

        return grouped_experts(x, ids, weights, counts, ffn, self.dtype)

    def close(self):
        self.copier.close()
