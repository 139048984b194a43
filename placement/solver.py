"""Inventory x Hardware x Workload x Policy -> Plan: fit a huge MoE into one GPU and host RAM.

Order of decisions:
  1. GPU: non-expert weights (bf16, or the GGUF bytes when bf16 does not fit), the KV cache
     (MLA: the latent; GQA: K and V per KV head), explicit reserves (CUDA context, compute
     workspace, allocator slack). MTP (nextn) blocks are planned nowhere: never run.
  2. Host: routed experts in their GGUF form, spread over the allowed NUMA nodes by the NUMA
     mode, plus pinned buffers, page tables, the runtime's own overhead and an OS reserve.
  3. Leftover VRAM: first the GPU prefill buffers (two layers of routed experts streamed through
     PCIe for long prompts, from the token threshold of prefill_crossover), then routed experts
     cached on the GPU: by activation frequency when statistics are given, else the same
     number in every MoE layer.
  4. Estimate tokens/s from the bytes each token moves and the bandwidths.
  5. When something overflows: re-solve with each concrete change and report those that help.

Shape legend: L layers, E experts, K experts per token, D hidden, H heads.
"""

import math
import re
from dataclasses import asdict, dataclass, replace

from placement.ggml import Q4_K, act_row_bytes, type_name
from placement.hardware import HW_OVERRIDES, Hardware
from placement.inventory import Inventory
from placement.plan import DeviceUsage, Plan, Problem, Suggestion
from placement.units import GiB, MiB, fmt_bytes, fmt_gb, fmt_int_list

NUMA_MODES = ("off", "interleave", "distribute", "replicate")
GPU_FORMATS = ("auto", "bf16", "quantized")

# estimate assumptions used when the hardware does not say (reported with the estimate)
ASSUMED_RAM_BANDWIDTH_PER_NODE = 100e9
ASSUMED_GPU_BANDWIDTH = 900e9
ASSUMED_PCIE_BANDWIDTH = 25e9
# the native causal attention (float32) against the int8 matmul rate, where not measured (Zen 4,
# 2 threads, three probes: 0.16, 0.26, 0.32)
ASSUMED_ATTENTION_SHARE = 0.25
CPU_GFLOPS_PER_CORE = {"amx_int8": 400.0, "avx512_vnni": 120.0, "avx512f": 80.0, "avx2": 50.0, "": 10.0}


class SolverError(ValueError):
    pass


DEFAULT_CONTEXT = 32768
# KV slots the solver gives a server by itself (Workload.batch None): the most that fit, at most
# this many. More slots than this only help with many cores and short replies: a user asks for
# them with --parallel N.
SLOTS_MAX = 8

# The prefill chunk when none is given: PREFILL_CHUNK, which sizes a GPU plan's attention
# workspace (its long prompts stream the routed experts to the GPU in gpu_prefill_chunk chunks);
# a CPU-only plan takes up to CPU_PREFILL_CHUNK (the expert engine's own chunk, native/moe.h
# kTokenChunk) where its buffers fit: each expert's rows are rewritten once for 4x the tokens
# (Zen 4, 2 threads, 2048-token prompt of the mid bench model: prompt 1.09x; the engine alone at
# DeepSeek's 256 experts top-8: 1.17x AVX-512, 1.11x AVX2).
PREFILL_CHUNK = 512
CPU_PREFILL_CHUNK = 2048


@dataclass
class Workload:
    context: object = None     # tokens per sequence the KV cache must hold; None: min(32K, model's)
    # KV slots of `context` tokens each: sequences decoded together (hybrid-run --parallel);
    # None: the most whose caches fit after the weights and reserves, 1..SLOTS_MAX
    batch: object = 1
    # tokens per prefill step (--prefill-chunk); None: the solver's choice (solve: CPU-only plans
    # take up to CPU_PREFILL_CHUNK where it fits, others PREFILL_CHUNK)
    prefill_chunk: object = None
    # tokens per prefill step while the routed experts stream to the GPU (hybrid.load's
    # gpu_prefill_chunk): sizes the GPU prefill workspace
    gpu_prefill_chunk: int = 8192

    # plan a context longer than the model was trained for (--force-ctx): its positions past
    # that are out of distribution, so only on request
    allow_long_context: bool = False

    def resolved(self, model) -> "Workload":
        """The defaults that follow from the model filled in: the context, and where no prefill
        chunk is given PREFILL_CHUNK, or --parallel's slots where more (a decode step of every
        slot is one chunk; solve may then plan a longer one)."""
        wl = self if self.prefill_chunk is not None else replace(
            self, prefill_chunk=max(PREFILL_CHUNK, int(self.batch or 1)))
        if wl.context is None:
            return replace(wl, context=min(DEFAULT_CONTEXT, model.context_length or DEFAULT_CONTEXT))
        trained = model.context_length
        if trained and int(wl.context) > trained and not wl.allow_long_context:
            raise SolverError(f"--ctx {wl.context}: the model was trained for {trained} tokens; use "
                              f"--ctx {trained} or less (--force-ctx plans it anyway, with quality loss)")
        return wl

    def validate(self):
        for k, flag in (("context", "--ctx"), ("batch", "--parallel"), ("prefill_chunk", "--prefill-chunk"),
                        ("gpu_prefill_chunk", "gpu_prefill_chunk")):
            if getattr(self, k) is not None and int(getattr(self, k)) < 1:
                raise SolverError(f"{flag} must be >= 1, got {getattr(self, k)}")
        if self.batch is not None and int(self.batch) > int(self.prefill_chunk):
            # a decode step is one forward of a token per slot: the buffers hold a prefill chunk
            raise SolverError(f"--parallel {self.batch}: at most --prefill-chunk ({self.prefill_chunk}) slots")


@dataclass
class Policy:
    numa: str = "auto"                   # off | interleave | distribute | replicate | auto
    gpu_weight_format: str = "auto"      # auto | bf16 | quantized
    hot_expert_format: str = "auto"      # auto | bf16 | quantized (see hot_expert_format())
    use_gpu: bool = True
    expert_cache: bool = True            # spend leftover VRAM on routed experts
    expert_stats: object = None          # per layer activation counts, see load_expert_stats
    gpu_prefill_tokens: object = None    # None: from prefill_crossover; 0: off; N: chunks of >= N tokens
    cpu_weight_format: str = "quantized"  # non-expert weights when they live on the CPU
    # smaller CPU linears are dequantized to f32 (torch matmul); None: as hybrid.load runs it,
    # 0 without a GPU (every quantized linear native), 1 MiB beside one
    cpu_linear_min_bytes: object = None
    kv_cache_dtype: str = "auto"         # auto: bf16 on the GPU, f32 on the CPU (no fast bf16 math there)
    # explicit reserves
    cuda_context_bytes: int = 600 * MiB  # driver + cuBLAS handles: outside torch's allocator
    allocator_slack_bytes: int = 256 * MiB   # fragmentation of the caching allocator
    workspace_bytes: object = None       # None = formula (activations + attention scores)
    attn_query_block: int = 64           # queries per attention step: bounds the score buffer
    pinned_bytes: object = None          # None = formula (double-buffered hidden states)
    host_reserve_bytes: int = 4 * GiB    # OS, page cache of other files, other processes
    runtime_overhead_bytes: int = 1 * GiB  # Python, torch, CUDA host state of this process
    # estimate assumptions
    ram_efficiency: float = 0.7          # share of stream bandwidth the expert kernels reach
    interleave_efficiency: float = 0.75  # interleaved pages: half the reads cross the socket link
    sync_latency_s: float = 40e-6        # per MoE layer: submit, wait, hidden state both ways
    gpu_tflops: float = 100.0            # sustained bf16 TFLOP/s for the non-expert part
    threads: object = None               # CPU workers (--threads); None: one per allowed cpu

    def validate(self):
        if self.numa not in NUMA_MODES + ("auto",):
            raise SolverError(f"--numa {self.numa}: choose one of {', '.join(NUMA_MODES + ('auto',))}")
        if self.gpu_weight_format not in GPU_FORMATS:
            raise SolverError(f"--gpu-format {self.gpu_weight_format}: choose one of {', '.join(GPU_FORMATS)}")
        if self.hot_expert_format not in GPU_FORMATS:
            raise SolverError(f"--hot-format {self.hot_expert_format}: choose one of {', '.join(GPU_FORMATS)}")
        if self.cpu_weight_format not in ("quantized", "f32", "bf16"):
            raise SolverError(f"cpu_weight_format {self.cpu_weight_format}: quantized | f32 | bf16")
        if self.kv_cache_dtype not in ("auto",) + tuple(DTYPE_BYTES):
            raise SolverError(f"kv_cache_dtype {self.kv_cache_dtype}: auto | {' | '.join(DTYPE_BYTES)}")
        n = self.gpu_prefill_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise SolverError(f"--gpu-prefill-tokens {n}: a whole number of tokens >= 0 (0 turns GPU prefill off)")


# --- sizes ----------------------------------------------------------------------------

DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}
# GGML types the native CPU matmul takes in their blocks: the one list the runtime's loader
# uses too (tests/test_native_linear_types.py: every quantized type hybrid._native computes)
CPU_NATIVE_TYPES = frozenset({2, 3, 6, 7, 8,                # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
                              10, 11, 12, 13, 14,           # Q2_K Q3_K Q4_K Q5_K Q6_K
                              20, 23,                       # IQ4_NL IQ4_XS
                              16, 17, 22, 18, 21, 19, 29})  # IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ1_S IQ1_M
_LINEAR_ROLES = ("attention", "dense_ffn", "shared_expert", "output", "other")


def _fmt_bytes_of(t, fmt: str) -> int:
    if fmt in DTYPE_BYTES:
        return t.n_elements * DTYPE_BYTES[fmt]
    return t.n_bytes


def _group_formats(use_gpu: bool, gpu_fmt: str, cpu_fmt: str) -> dict:
    """group -> (device, format) for everything but the routed experts."""
    dev, fmt = ("gpu0", gpu_fmt) if use_gpu else ("cpu", cpu_fmt)
    return {
        # a row lookup per token: the table stays in the GGUF mmap, rows go to the device
        "embedding": ("cpu", "quantized"),
        "attention": (dev, fmt),
        # split into k_b / v_b (and absorbed) at load: needs the dequantized values
        "attention.kv_b": (dev, "bf16" if use_gpu else "f32"),
        "norm": (dev, "f32"),
        # routing scores decide which experts run; keep them in float
        "router": (dev, "f32"),
        "dense_ffn": (dev, fmt),
        "shared_expert": (dev, fmt),
        "output": (dev, fmt),
        "other": (dev, fmt),
    }


def _native_linear(t, pol: Policy) -> bool:
    """A CPU linear that the native matmul runs in its GGUF blocks (others: float copies)."""
    return t.role in _LINEAR_ROLES and t.ggml_type in CPU_NATIVE_TYPES and t.n_bytes >= pol.cpu_linear_min_bytes


def _weight_costs(inv: Inventory, groups: dict, pol: Policy) -> tuple:
    """Bytes of the non-expert weights: ({role: bytes on gpu0}, {role: bytes on the host}).

    On the CPU a 'quantized' linear stays in the GGUF mmap when the native matmul takes it
    (a supported type, at least cpu_linear_min_bytes); smaller or other ones become f32 copies,
    whose source pages were read once ('file_pages', reclaimable but resident after load).
    """
    gpu, host = {}, {}
    for t in inv.tensors:
        if t.role in ("routed_experts", "mtp"):   # mtp: never read, stays in the file (_mtp_note)
            continue
        dev, fmt = groups[t.group if t.group in groups else "other"]
        if dev == "gpu0":
            gpu[t.role] = gpu.get(t.role, 0) + _fmt_bytes_of(t, fmt)
            continue
        if fmt == "quantized" and t.role in _LINEAR_ROLES and not _native_linear(t, pol):
            fmt = "f32"
        b = _fmt_bytes_of(t, fmt)
        host[t.role] = host.get(t.role, 0) + b
        if fmt != "quantized":   # a converted copy; the GGUF pages it was read from stay mapped
            host["file_pages"] = host.get("file_pages", 0) + t.n_bytes
    return gpu, host


def workspace_formula(inv: Inventory, wl: Workload, pol: Policy, value_bytes: int = 4) -> dict:
    """Compute workspace of the device that runs attention: activations of the tokens in flight
    (fp32), one block of attention scores (H x query block x context, fp32) and, for MLA chunks
    that attend decompressed, one group of heads' K and V over the context (`value_bytes` each:
    2 where the GPU expands in bf16, 4 for the CPU's fp32)."""
    m = inv.model
    tokens = max(wl.prefill_chunk, wl.batch)
    # residual, normed input, attention out, MoE out; the widest projection pair: the dense FFN
    # gate+up, the shared experts' gate+up, or the attention projections (MLA: the absorbed
    # query and output in latent space, H x latent each; GQA: q, k and v)
    width = 4 * m.n_embd + max(2 * m.dense_ff, 2 * m.shared_ff, m.attn_width)
    activations = tokens * width * 4
    block = min(pol.attn_query_block, tokens)
    scores = m.n_head * block * wl.context * 4
    expanded = m.attn_expansion_per_position(tokens) * wl.context * value_bytes
    logits = wl.batch * m.n_vocab * 4
    formula = (f"{tokens} tokens x {width} x 4 B + {m.n_head} heads x {block} queries x "
               f"{wl.context} keys x 4 B")
    if expanded:
        formula += (f" + K/V expanded for {wl.context} keys "
                    f"({m.attn_expansion_per_position(tokens)} values x {value_bytes} B)")
    return {"activations": activations, "attention_scores": scores, "attention_expansion": expanded,
            "logits": logits, "total": activations + scores + expanded + logits,
            "formula": formula + " + logits"}


# Each CPU worker's prefill-tile scratch (native/arch/x86): the rewritten row group of a
# Q4_K / Q5_K / Q6_K / Q8_0 tile (at most 4992 B per 256 weights of a row: Q4_K's and Q5_K's
# 16-row groups, a byte per quant, the largest of the forms, whose size gemm_rowgroups.h
# asserts) and a token group's prepared activation scales (at most 4 B per weight of a row,
# the 32-block types).
TILE_SCRATCH_PER_BLOCK = 4992
TILE_SCRATCH_PER_WEIGHT = 4


def tile_scratch_bytes(inv: Inventory, threads: int) -> int:
    """Bound on the prefill tiles' thread-local scratch, for the longest row: per worker of the
    expert engine and of the CPU linears' pool (native/bindings.cpp shared_pool), `threads` each."""
    k = max((t.ne[0] for t in inv.tensors if len(t.ne) >= 2), default=0)
    return 2 * max(1, threads) * ((k + 255) // 256 * TILE_SCRATCH_PER_BLOCK + k * TILE_SCRATCH_PER_WEIGHT)


# an FFN matrix: its kind, then _exps (routed), _shexp (shared) or nothing (dense), or .N (an
# early Mixtral file's tensor per expert)
_FFN_MATRIX = re.compile(r"\.ffn_(gate|up|down)(?:_exps|_shexp)?(?:\.\d+)?\.weight$")


def _engine_layers(inv: Inventory, cpu_ffns: bool) -> list:
    """(E, D, F, gate, up, down types) of each layer the native expert engine holds: the routed
    experts, and with cpu_ffns (a CPU-only plan with quantized CPU weights) the dense FFNs and
    shared experts the native linears take, as one-expert layers (hybrid.runtime.loader
    fused_ffn)."""
    layers = {}
    for t in inv.tensors:
        match = _FFN_MATRIX.search(t.name)
        if t.layer is None or match is None or len(t.ne) < 2:
            continue
        if t.role == "routed_experts":
            key = (t.layer, "routed")
        elif cpu_ffns and t.role in ("dense_ffn", "shared_expert") and t.ggml_type in CPU_NATIVE_TYPES:
            key = (t.layer, t.role)
        else:
            continue
        kind = match.group(1)
        g = layers.setdefault(key, {"E": 0})
        # a 3-D tensor holds E experts; 2-D ones are one expert each (count the gates)
        g["E"] = int(t.ne[2]) if len(t.ne) > 2 else g["E"] + (kind == "gate")
        g[kind] = (t.ggml_type, int(t.ne[0]), int(t.ne[1]))
    return [(g["E"], g["gate"][1], g["gate"][2], g["gate"][0], g["up"][0], g["down"][0])
            for g in layers.values() if all(k in g for k in ("gate", "up", "down"))]


def expert_engine_bytes(inv: Inventory, wl: Workload, cpu_ffns: bool) -> tuple:
    """(io, scratch): the native expert engine's own buffers (native/moe.cpp
    MoEEngine::buffer_bytes is their sum). io, allocated at load: x and y [tokens, D] fp32, ids
    and weights [tokens, K + 1]. scratch, at the first forward, for a chunk of at most
    ENGINE_TOKEN_CHUNK tokens: their quantized activations for gate and up, h rows (fp32) and
    quantized h rows for down (min(K, E) slots a token), the slot lists, and the per-expert
    counts. tokens: the prefill chunk (the engine's max_tokens; --parallel is at most that)."""
    layers = _engine_layers(inv, cpu_ffns)
    if not layers:
        return 0, 0
    m = inv.model
    K = max(1, m.n_expert_used)
    tokens, chunk = wl.prefill_chunk, _engine_chunk(wl)
    io = 2 * tokens * m.n_embd * 4 + 2 * tokens * (K + 1) * 4
    xg = max(act_row_bytes(tg, d) for _, d, _, tg, _, _ in layers)
    xu = max(act_row_bytes(tu, d) for _, d, _, _, tu, _ in layers)
    h = max(min(K, e) * f for e, _, f, *_ in layers)
    hq = max(min(K, e) * act_row_bytes(td, f) for e, _, f, _, _, td in layers)
    E = max(e for e, *_ in layers)
    scratch = chunk * (xg + xu + 4 * h + hq + 4 * K) + 4 * (E + 1) + 4 * E + 4 * E + 8 * (E + 1)
    return io, scratch


# native/moe.h MoEEngine::kTokenChunk
ENGINE_TOKEN_CHUNK = 2048


def _engine_chunk(wl: Workload) -> int:
    """Tokens the expert engine takes at once: the prefill chunk, split into chunks of at most
    ENGINE_TOKEN_CHUNK."""
    return min(max(1, wl.prefill_chunk), ENGINE_TOKEN_CHUNK)


def _prefill_call_tokens(wl: Workload) -> int:
    """Tokens the expert engine takes at once in a prefill, for its speed: the engine's chunk,
    or fewer where no prompt can be as long (a sequence's context; the slots' together, as a
    server prefills several prompts in one forward)."""
    return max(1, min(_engine_chunk(wl), int(wl.context or _engine_chunk(wl)) * max(1, int(wl.batch or 1))))


def pinned_formula(inv: Inventory, wl: Workload) -> int:
    """Host<->GPU staging for the MoE hand-off: hidden states in and out, double-buffered, fp32,
    plus routing ids and weights."""
    m = inv.model
    tokens = max(wl.prefill_chunk, wl.batch)
    return 2 * tokens * (2 * m.n_embd * 4 + m.n_expert_used * 8)


# Quantized GPU weights (gpu_weight_format "quantized") are dequantized per call in row blocks
# of DEQUANT_BLOCK_WEIGHTS weights (hybrid.backends.gpu.DequantLinear, the same number); one
# block's bf16 copy and the float32 temporaries of its decoding peak at ~22 B a weight
# (measured on the CPU for Q4_0..Q6_K: tests/test_gpu_path.py), budgeted at 32.
DEQUANT_BLOCK_WEIGHTS = 1 << 22
DEQUANT_BYTES_PER_WEIGHT = 32


# Bytes a decode step moves per quantized GPU weight beyond its blocks: the torch-op
# dequantization writes and reads float32 temporaries and the bf16 row block the matmul then
# reads (see DequantLinear). A budget, not a GPU measurement: it makes quantized GPU weights
# slower per token than bf16 ones. Types with the fused kernel (FUSED_GPU_TYPES) read only
# their blocks when Triton is there, but how close that kernel comes to the GPU's bandwidth is
# unmeasured (scripts/gpu-check.sh's kernel/ lines measure it): until it is, auto keeps
# preferring bf16 weights where they fit.
DEQUANT_TRAFFIC_PER_WEIGHT = 12


def dequant_workspace_bytes() -> int:
    """VRAM one quantized linear's call needs beyond its blocks and its output."""
    return DEQUANT_BLOCK_WEIGHTS * DEQUANT_BYTES_PER_WEIGHT


# --- hot experts -----------------------------------------------------------------------

# The hot-expert cache is kept in its GGUF blocks when the GPU has a fused dequantize-and-
# multiply kernel for the experts' types (hybrid.backends.qmatvec, Triton: decode reads the
# blocks once, ~3.3x as many Q4_K_M experts fit as bf16 copies); otherwise as bf16 copies
# (hybrid.backends.torch_experts.TorchExperts), 2 bytes a weight. Either way the Plan's bytes
# and the runtime's allocations agree (tests/test_plan_allocation.py). Same set as
# hybrid.backends.qmatvec.FUSED_TYPES (a test holds them equal): Q8_0, Q4_K, Q5_K, Q6_K.
FUSED_GPU_TYPES = frozenset({8, 12, 13, 14})


def hot_expert_format(inv: Inventory, fmt: str = "auto") -> str:
    """The form of the hot-expert cache: `fmt` when given; auto: "quantized" when every
    routed-expert tensor has a fused GPU kernel, "bf16" otherwise (the IQ types: unfused,
    a quantized hot expert would be dequantized before every product)."""
    if fmt != "auto":
        return fmt
    types = {t.ggml_type for t in inv.tensors if t.role == "routed_experts"}
    return "quantized" if types and types <= FUSED_GPU_TYPES else "bf16"


def hot_expert_bytes(inv: Inventory, layer: int, fmt: str) -> int:
    """VRAM of one hot expert of `layer` (its gate, up and down) as the runtime holds it:
    its file bytes ("quantized") or 2 bytes a weight ("bf16")."""
    n = max(inv.model.n_expert, 1)
    if fmt == "quantized":
        return inv.expert_bytes(layer)
    elems = sum(t.n_elements for t in inv.tensors if t.layer == layer and t.role == "routed_experts")
    return elems // n * DTYPE_BYTES["bf16"]


# --- expert statistics ----------------------------------------------------------------

def load_expert_stats(obj, inv: Inventory) -> dict:
    """Activation counts -> {layer: [count per expert]}.

    Accepts {"layer": [counts...]} / {layer: {expert: count}} dicts, or a JSON file path of those.
    """
    import json

    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        try:
            with open(obj, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SolverError(f"--expert-stats {obj}: cannot read: {e}") from None
    if isinstance(obj, dict) and "layers" in obj:
        obj = obj["layers"]
    if isinstance(obj, list):
        obj = {i: v for i, v in enumerate(obj) if v}
    E = inv.model.n_expert
    out = {}
    for k, v in obj.items():
        layer = int(k)
        if isinstance(v, dict):
            counts = [0.0] * E
            for e, c in v.items():
                counts[int(e)] = float(c)
        else:
            counts = [float(c) for c in v]
        if len(counts) != E:
            raise SolverError(f"expert stats for layer {layer}: {len(counts)} counts, the model has {E} experts")
        out[layer] = counts
    return out


def choose_gpu_experts(inv: Inventory, budget: int, stats, fmt: str) -> dict:
    """{layer: [expert ids]} filling `budget` bytes.

    With stats: the most used experts first. Caching expert e of layer l saves K*p_l(e)*b_l
    bytes of CPU reads per token for b_l bytes of VRAM, so the ratio only depends on p_l(e).
    Without: the same count in every MoE layer (lowest ids; nothing better is known).
    Sizes are the VRAM a hot expert takes in `fmt` (hot_expert_bytes).
    """
    layers = inv.moe_layers()
    E = inv.model.n_expert
    size = {l: hot_expert_bytes(inv, l, fmt) for l in layers}
    chosen = {l: [] for l in layers}
    if budget <= 0 or not layers:
        return chosen
    if stats:
        items = []
        for l in layers:
            counts = stats.get(l)
            if counts is None:
                continue
            total = sum(counts) or 1.0
            items.extend((c / total, l, e) for e, c in enumerate(counts))
        items.sort(key=lambda x: (-x[0], x[1], x[2]))
        left = budget
        for p, l, e in items:
            if size[l] <= left:
                chosen[l].append(e)
                left -= size[l]
        if left < min(size.values()):
            return {l: sorted(v) for l, v in chosen.items()}
        # layers without statistics share what is left evenly
        budget = left
        layers_left = [l for l in layers if l not in stats]
    else:
        layers_left = layers
    if layers_left:
        per_round = sum(size[l] for l in layers_left)
        n = min(E, budget // per_round)
        left = budget - n * per_round
        for l in layers_left:
            chosen[l] = list(range(n))
        if n < E:
            for l in layers_left:
                if size[l] <= left:
                    chosen[l].append(n)
                    left -= size[l]
    return {l: sorted(v) for l, v in chosen.items()}


# --- the solver -----------------------------------------------------------------------

def _resolve_numa(pol: Policy, hw: Hardware) -> str:
    n_allowed = len(hw.allowed_nodes)
    mode = pol.numa
    if mode == "auto":
        mode = "interleave" if n_allowed > 1 else "off"
    return mode


def solve(inventory: Inventory, hardware: Hardware, workload: Workload = None, policy: Policy = None,
          _suggest: bool = True) -> Plan:
    """The Plan; `auto` choices resolved to the fastest estimate that fits (_choose); when it
    does not fit, suggestions re-planned with their change applied (placement.advice)."""
    inv, hw = inventory, hardware
    auto_chunk = workload is None or workload.prefill_chunk is None
    wl = (workload or Workload()).resolved(inv.model)
    pol = policy or Policy()
    wl.validate()
    pol.validate()
    if wl.batch is None:
        cap = min(SLOTS_MAX, wl.prefill_chunk)    # a decode step of every slot is one chunk
        n = most_slots(inv, hw, wl, pol, cap)
        wl = replace(wl, batch=max(1, n))
        plan = _choose(inv, hw, wl, pol)
        plan.kv_slots_reason = _slots_reason(plan, n, cap)
    else:
        plan = _choose(inv, hw, wl, pol)
        if wl.batch > 1 and not plan.fits:
            _explain_slots(plan, most_slots(inv, hw, wl, pol, wl.batch - 1))
    if auto_chunk:
        plan = _auto_prefill_chunk(inv, hw, wl, pol, plan)
    if plan.problems and _suggest:
        from placement.advice import suggest

        plan.suggestions = suggest(inv, hw, wl, pol, plan,
                                   lambda i, h, w, p: solve(i, h, w, p, _suggest=False))
    return plan


def _auto_prefill_chunk(inv, hw, wl, pol, plan) -> Plan:
    """No --prefill-chunk: a CPU-only plan that fits is planned again with a chunk of
    CPU_PREFILL_CHUNK tokens (no more than the context, no less than PREFILL_CHUNK) and keeps it
    where that fits too; the KV slots were chosen first (wl.batch), so a longer chunk never
    costs a slot. The plan says which chunk and why."""
    chunk = max(wl.prefill_chunk, min(CPU_PREFILL_CHUNK, wl.context))
    if not plan.fits or plan.device != "cpu" or chunk <= wl.prefill_chunk:
        return plan
    longer = _choose(inv, hw, replace(wl, prefill_chunk=chunk), pol)
    if longer.fits:
        longer.kv_slots_reason = plan.kv_slots_reason
        longer.notes.append(f"prefill chunk {chunk} (CPU-only, no --prefill-chunk): the expert engine takes up to "
                            f"{chunk} tokens a call instead of {wl.prefill_chunk}, so each expert's rows are "
                            f"rewritten for more tokens at once; its buffers and the activations are counted above")
        return longer
    more = longer.devices["cpu"].bytes - plan.devices["cpu"].bytes
    plan.notes.append(f"prefill chunk {wl.prefill_chunk} (no --prefill-chunk): {chunk} would need {fmt_bytes(more)} "
                      f"more host RAM, which {', '.join(p.budget for p in longer.problems)} has no room for")
    return plan


def most_slots(inv, hw, wl, pol, hi: int) -> int:
    """The most KV slots of wl.context tokens, at most hi, whose plan fits; 0 when not even one
    does. The hot-expert cache and the GPU prefill buffers only take what is left: slots come
    first."""
    def ok(n):
        return _choose(inv, hw, replace(wl, batch=n), pol).fits

    lo, top = 0, hi
    while lo < top:
        mid = (lo + top + 1) // 2
        lo, top = (mid, top) if ok(mid) else (lo, mid - 1)
    return lo


def _kv_room(plan) -> str:
    return "gpu0" if plan.kv_cache_device == "gpu0" else "host RAM"


def _slots_reason(plan, n: int, cap: int) -> str:
    """Why the solver chose plan.kv_slots by itself (most_slots gave n of at most cap)."""
    per = fmt_bytes(plan.kv_slot_bytes)
    if n == 0:
        return "the plan does not fit even with one slot"
    if n == cap:
        return (f"the most the solver picks without --parallel ({SLOTS_MAX}, and no more than "
                f"--prefill-chunk); their caches ({per} each) fit {_kv_room(plan)} after the "
                f"weights and reserves")
    return (f"the most whose caches ({per} each) fit {_kv_room(plan)} after the weights and "
            f"reserves; {n + 1} would not")


def _explain_slots(plan, most: int) -> None:
    """A plan of --parallel N slots that does not fit: the problem on the KV cache's budget
    names the flag and the most slots that fit."""
    key = "gpu0" if plan.kv_cache_device == "gpu0" else "cpu"
    n, ctx = plan.kv_slots, plan.kv_slot_tokens
    fits = (f"at most {most} fit (--parallel {most})" if most else
            "the plan does not fit even with one")
    why = (f"the KV caches of --parallel {n} take {fmt_bytes(plan.kv_cache_bytes)} ({n} slots x {ctx} tokens x "
           f"{plan.kv_bytes_per_token} B); {fits}")
    for p in plan.problems:
        if p.budget == key:
            p.message += f"; {why}"
    plan.kv_slots_reason = f"--parallel {n}; {fits}"


def _speed(plan) -> tuple:
    e = plan.estimate or {}
    return e.get("decode_tok_s", 0.0), e.get("prefill_tok_s", 0.0)


def _choose(inv, hw, wl, pol) -> Plan:
    """`auto` GPU weight format and NUMA mode: plan every combination and keep the one whose
    decode estimate is fastest (prefill breaks near ties) among those that fit; the plan says
    why. When none fits, the plain rule (bf16 when it fits the GPU; interleave over several
    nodes) gives the plan its problems and suggestions."""
    gpu = pol.use_gpu and bool(hw.gpus)
    fmts = ("bf16", "quantized") if (pol.gpu_weight_format == "auto" and gpu) else (pol.gpu_weight_format,)
    several = len(hw.allowed_nodes) > 1
    modes = ("interleave", "distribute") if (pol.numa == "auto" and several) else (pol.numa,)
    if len(fmts) * len(modes) == 1:
        return _solve_one(inv, hw, wl, pol)
    tried = [(f, n, _solve_one(inv, hw, wl, replace(pol, gpu_weight_format=f, numa=n))) for f in fmts for n in modes]
    fitting = [t for t in tried if t[2].fits]
    if not fitting:
        return _solve_one(inv, hw, wl, pol)
    best_decode = max(_speed(t[2])[0] for t in fitting)
    f, n, plan = max((t for t in fitting if _speed(t[2])[0] >= 0.98 * best_decode), key=lambda t: _speed(t[2])[1])

    def label(f_, n_):
        return ", ".join(x for x, auto in ((f"GPU weights {f_}", len(fmts) > 1), (f"numa {n_}", len(modes) > 1)) if auto)

    others = "; ".join(f"{label(f_, n_)}: " + (f"~{_speed(p_)[0]:.1f}" if p_.fits else "does not fit")
                       for f_, n_, p_ in tried if p_ is not plan)
    plan.notes.insert(0, f"auto: {label(f, n)}: decode ~{_speed(plan)[0]:.1f} tok/s, prefill "
                         f"~{_speed(plan)[1]:.0f} tok/s, the fastest estimate that fits ({others})")
    plan.policy = _policy_dict(pol)
    return plan


def _solve_one(inv, hw, wl, pol) -> Plan:
    m = inv.model
    notes = []
    if pol.cpu_linear_min_bytes is None:
        pol = replace(pol, cpu_linear_min_bytes=MiB if (pol.use_gpu and hw.gpus) else 0)
    reserves = {}

    gpu = hw.gpus[0] if (pol.use_gpu and hw.gpus) else None
    if gpu is not None and len(hw.gpus) > 1:
        notes.append(f"{len(hw.gpus)} GPUs found; the plan uses the first one ({gpu.name})")
    numa_mode = _resolve_numa(pol, hw)
    allowed = hw.allowed_nodes
    if numa_mode in ("interleave", "distribute", "replicate") and len(allowed) < 2:
        notes.append(f"--numa {numa_mode} with {len(allowed)} usable NUMA node: same as off")

    kv_device = "gpu0" if gpu is not None else "cpu"
    kv_dtype = pol.kv_cache_dtype if pol.kv_cache_dtype != "auto" else ("bf16" if gpu is not None else "f32")
    # MLA: the latent cache; GQA: K and V per KV head (ModelInfo.kv_values_per_token)
    kv_per_token = m.kv_values_per_token * DTYPE_BYTES[kv_dtype]
    kv_tokens = wl.context * wl.batch
    kv_bytes = kv_tokens * kv_per_token
    ws = workspace_formula(inv, wl, pol, value_bytes=2 if gpu is not None else 4)
    # workspace bytes per token of context (scores, MLA expansion): 0 when the workspace is given
    ws_per_ctx = 0 if pol.workspace_bytes is not None else (
        (ws["attention_scores"] + ws["attention_expansion"]) // max(1, wl.context))
    workspace = int(pol.workspace_bytes) if pol.workspace_bytes is not None else ws["total"]
    reserves["workspace"] = ({"bytes": workspace, "given": True} if pol.workspace_bytes is not None
                             else dict(ws, bytes=workspace))
    devices = {}
    problems = []

    # ---- GPU ---------------------------------------------------------------------------
    gpu_fmt = "none"
    hot_fmt = hot_expert_format(inv, pol.hot_expert_format)   # the form of gpu_cache's experts
    gpu_cache = {}
    max_ctx = 0
    if gpu is not None:
        cap = int(gpu.free_bytes)
        fixed = pol.cuda_context_bytes + pol.allocator_slack_bytes + workspace + kv_bytes
        w_bf16 = sum(_weight_costs(inv, _group_formats(True, "bf16", pol.cpu_weight_format), pol)[0].values())
        w_q = sum(_weight_costs(inv, _group_formats(True, "quantized", pol.cpu_weight_format), pol)[0].values())
        if pol.gpu_weight_format == "auto":
            gpu_fmt = "bf16" if w_bf16 + fixed <= cap else "quantized"
            if gpu_fmt == "quantized":
                notes.append(
                    f"fits only with quantized GPU weights: the non-expert weights as bf16 ({fmt_bytes(w_bf16)}) "
                    f"do not fit the GPU ({fmt_bytes(cap)}, of which {fmt_bytes(fixed)} go to the KV cache and "
                    f"reserves), so they stay in their GGUF types ({fmt_bytes(w_q)}) and are dequantized on the fly")
        else:
            gpu_fmt = pol.gpu_weight_format
        groups = _group_formats(True, gpu_fmt, pol.cpu_weight_format)
        weights, host_weights = _weight_costs(inv, groups, pol)
        breakdown = dict(weights)
        breakdown.update({"kv_cache": kv_bytes, "workspace": workspace,
                          "cuda_context": pol.cuda_context_bytes, "allocator_slack": pol.allocator_slack_bytes})
        if gpu_fmt == "quantized":
            breakdown["dequant_workspace"] = dequant_workspace_bytes()
        used = sum(breakdown.values())
        per_token_ctx = kv_per_token * wl.batch + ws_per_ctx
        base = used - kv_bytes - ws_per_ctx * wl.context
        max_ctx = max(0, (cap - base) // per_token_ctx)
        if used > cap:
            detail = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1]) if v)
            problems.append(Problem("gpu0", used, cap,
                                    f"gpu0: needs {fmt_bytes(used)} ({detail}), has {fmt_bytes(cap)}: "
                                    f"over by {fmt_bytes(used - cap)} with {gpu_fmt} weights"))
            gpu_prefill = _prefill_info(wl, "gpu0 is over budget without it")
        else:
            use_cache = pol.expert_cache and m.n_expert > 1
            stats = load_expert_stats(pol.expert_stats, inv) if (use_cache and pol.expert_stats is not None) else None

            # quantized hot experts of chunks too long for the fused kernel are dequantized in
            # row blocks: the workspace quantized GPU weights have, else reserved beside them
            hot_ws = dequant_workspace_bytes() if hot_fmt == "quantized" and gpu_fmt != "quantized" else 0

            def cache_for(budget):
                if not use_cache or budget <= hot_ws:
                    return {}
                return choose_gpu_experts(inv, budget - hot_ws, stats, hot_fmt)

            def make_room(short):
                """Flags that free `short` more bytes of gpu0 without touching the prefill buffers."""
                ways = []
                if gpu_fmt == "bf16" and sum(weights.values()) - w_q >= short:
                    ways.append("--gpu-format quantized")
                per_tok = kv_per_token * wl.batch + ws_per_ctx
                ctx = (wl.context - -(-short // per_tok)) // 256 * 256
                if ctx >= wl.gpu_prefill_chunk:
                    ways.append(f"--ctx {ctx}")
                return f"; {' or '.join(ways)} would make room" if ways else ""

            gpu_prefill, gpu_cache, reserved, more = _plan_gpu_prefill(inv, hw, wl, pol, numa_mode, gpu, cap - used,
                                                                       cache_for, stats, make_room, hot_fmt)
            notes.extend(more)
            breakdown.update(reserved)
            used += sum(reserved.values())
            cached = sum(len(v) * hot_expert_bytes(inv, l, hot_fmt) for l, v in gpu_cache.items())
            if cached:
                breakdown["routed_experts"] = cached
                used += cached
                if hot_ws:
                    breakdown["dequant_workspace"] = hot_ws
                    used += hot_ws
        devices["gpu0"] = DeviceUsage(bytes=used, capacity_bytes=cap, breakdown=breakdown, kind="gpu",
                                      note=f"{gpu.name}")
    else:
        groups = _group_formats(False, "none", pol.cpu_weight_format)
        _, host_weights = _weight_costs(inv, groups, pol)
        if pol.use_gpu is False and hw.gpus:
            notes.append("GPU not used (--cpu-only)")
        gpu_prefill = _prefill_info(wl, "no GPU in this plan")
        if pol.gpu_prefill_tokens:
            notes.append(f"--gpu-prefill-tokens {pol.gpu_prefill_tokens}: no GPU in this plan, prefill stays on the CPU")

    # ---- host --------------------------------------------------------------------------
    host = {}
    routed_cpu = 0
    for t in inv.tensors:
        if t.role == "routed_experts":
            ncached = len(gpu_cache.get(t.layer, ()))
            routed_cpu += t.n_bytes - (t.n_bytes // max(m.n_expert, 1)) * ncached
    host.update(host_weights)
    if gpu is None:
        host["kv_cache"] = kv_bytes
        host["workspace"] = workspace
    else:
        pinned = int(pol.pinned_bytes) if pol.pinned_bytes is not None else pinned_formula(inv, wl)
        host["pinned_buffers"] = pinned
        reserves["pinned_buffers"] = {"bytes": pinned, "given": pol.pinned_bytes is not None}
    n_nodes = max(1, len(allowed))
    copies = n_nodes if (numa_mode == "replicate" and n_nodes > 1) else 1
    host["routed_experts"] = routed_cpu * copies
    weights_on_host = sum(v for k, v in host.items() if k not in ("kv_cache", "workspace", "pinned_buffers",
                                                                   "file_pages"))
    host["page_tables"] = weights_on_host // 512   # 8-byte entries for 4 KiB pages
    host["tile_scratch"] = tile_scratch_bytes(inv, pol.threads or len(hw.allowed_cpus))
    host["expert_io"], host["expert_scratch"] = expert_engine_bytes(
        inv, wl, cpu_ffns=gpu is None and pol.cpu_weight_format == "quantized")
    host["runtime_overhead"] = pol.runtime_overhead_bytes
    host["host_reserve"] = pol.host_reserve_bytes
    reserves["host_reserve"] = pol.host_reserve_bytes
    reserves["runtime_overhead"] = pol.runtime_overhead_bytes

    cap_nodes = {n.id: (n.available_bytes if not hw.hypothetical else n.total_bytes) for n in allowed}
    host_cap = sum(cap_nodes.values())
    host_used = sum(host.values())
    devices["cpu"] = DeviceUsage(bytes=host_used, capacity_bytes=host_cap, breakdown=host, kind="host",
                                 note=_host_note(hw, numa_mode))
    # per node: routed experts by NUMA mode, everything else spread evenly
    spread = {k: v for k, v in host.items() if k != "routed_experts"}
    for n in hw.numa_nodes:
        key = f"numa{n.id}"
        if n.id not in cap_nodes:
            devices[key] = DeviceUsage(bytes=0, capacity_bytes=0, breakdown={}, kind="numa",
                                       note="not allowed for this process")
            continue
        share = cap_nodes[n.id] / host_cap if (numa_mode == "off" and host_cap) else 1 / n_nodes
        b = {k: int(v / n_nodes) for k, v in spread.items()}
        b["routed_experts"] = routed_cpu if copies > 1 else int(routed_cpu * share)
        devices[key] = DeviceUsage(bytes=sum(b.values()), capacity_bytes=cap_nodes[n.id], breakdown=b, kind="numa")

    # ---- host problems -----------------------------------------------------------------
    if host_used > host_cap:
        msg = (f"cpu: needs {fmt_bytes(host_used)} of host RAM (routed experts {fmt_bytes(host['routed_experts'])}), "
               f"this process may use {fmt_bytes(host_cap)}: {fmt_bytes(host_used - host_cap)} missing")
        if hw.binding:
            total = sum(n.total_bytes for n in hw.numa_nodes)
            msg += f"; {hw.binding}; the machine has {fmt_bytes(total)} on {len(hw.numa_nodes)} NUMA nodes"
        if copies > 1:
            msg += (f"; --numa replicate keeps a full copy of the routed experts ({fmt_bytes(routed_cpu)}) on each of "
                    f"the {copies} nodes: {copies}x expert memory ({fmt_bytes(routed_cpu * copies)} in all)")
        problems.append(Problem("cpu", host_used, host_cap, msg))
    if numa_mode != "off" and n_nodes > 1:
        for n in allowed:
            u = devices[f"numa{n.id}"]
            if u.bytes > u.capacity_bytes:
                why = (f"replicate puts all {fmt_bytes(routed_cpu)} of routed experts on every node (~{copies}x expert memory)"
                       if copies > 1 else f"{numa_mode} puts 1/{n_nodes} of the routed experts on each node")
                problems.append(Problem(f"numa{n.id}", u.bytes, u.capacity_bytes,
                                        f"numa{n.id}: needs {fmt_bytes(u.bytes)}, has {fmt_bytes(u.capacity_bytes)}: "
                                        f"over by {fmt_bytes(u.bytes - u.capacity_bytes)}; {why}"))

    # ---- placement table ---------------------------------------------------------------
    present = {t.group if t.group in groups else "other" for t in inv.tensors
               if t.role not in ("routed_experts", "mtp")}
    placement = {g: tuple(v) for g, v in groups.items() if g in present}
    if any(t.role == "routed_experts" for t in inv.tensors):
        placement["routed_experts"] = ("cpu", "quantized")
        if any(gpu_cache.values()):
            placement["routed_experts.gpu_cache"] = ("gpu0", hot_fmt)
    gpu_experts = [list(gpu_cache.get(l, [])) for l in range(m.n_layer)]

    mtp = _mtp_note(inv)
    if mtp:
        notes.append(mtp)
    if hw.sources.get("cores") == "this machine":
        notes.append(f"{hw.physical_cores} cores: this machine's count, kept for the hypothetical one "
                     f"(--cores N to change it)")
    if pol.threads and pol.threads > len(hw.allowed_cpus):
        notes.append(f"--threads {pol.threads}: this process may use {len(hw.allowed_cpus)} cpus; more "
                     f"workers than cpus only wait for each other, the run uses {len(hw.allowed_cpus)}")
    estimate = estimate_speed(inv, hw, wl, pol, numa_mode, gpu, gpu_fmt, gpu_cache, devices, hot_fmt)
    plan = Plan(
        fits=not problems,
        model=m.name, source=inv.source, architecture=m.architecture, quantization=inv.quantization,
        weights_bytes=inv.total_bytes, n_tensors=len(inv.tensors), devices=devices,
        kv_cache_bytes=kv_bytes, kv_cache_tokens=kv_tokens, kv_cache_device=kv_device, kv_slots=wl.batch,
        kv_slots_reason=f"--parallel {wl.batch}" if wl.batch > 1 else "one sequence (--serve plans more)",
        kv_bytes_per_token=kv_per_token, kv_cache_dtype=kv_dtype, kv_cache_kind=m.attention,
        cpu_linear_min_bytes=pol.cpu_linear_min_bytes,
        max_context_tokens=int(max_ctx) if gpu is not None else _host_max_ctx(devices, kv_per_token, wl),
        gpu_weight_format=gpu_fmt, numa_mode=numa_mode, tensor_placement=placement, gpu_experts=gpu_experts,
        hot_expert_format=hot_fmt if any(gpu_cache.values()) else "none",
        estimate=estimate, gpu_prefill_tokens=gpu_prefill["tokens"], gpu_prefill=gpu_prefill,
        problems=problems, notes=notes, reserves=reserves,
        workload=asdict(wl), policy=_policy_dict(pol),
        hardware=dict(hw.summary(), description=hw.describe()),
    )
    return plan


def _mtp_note(inv: Inventory) -> str:
    """The MTP (nextn) blocks: in the file, in weights_bytes, planned nowhere.

    llama.cpp loads them with TENSOR_SKIP and never runs them for generation; neither does
    hybrid. Counting them on the GPU (their attention, shared expert, eh_proj) or in host RAM
    (their routed experts) would reserve memory no token reads; their mmap pages stay unread.
    """
    mtp = [t for t in inv.tensors if t.role == "mtp"]
    if not mtp:
        return ""
    blocks = sorted({t.layer for t in mtp if t.layer is not None})
    return (f"{len(mtp)} tensors ({fmt_bytes(sum(t.n_bytes for t in mtp))}) of the MTP/nextn block(s) "
            f"{fmt_int_list(blocks)} stay unread in the file: they are not run for generation "
            f"(llama.cpp skips them too)")


def _policy_dict(pol: Policy) -> dict:
    d = asdict(pol)
    if d.get("expert_stats") is not None and not isinstance(d["expert_stats"], str):
        d["expert_stats"] = "given"
    return d


def _host_note(hw: Hardware, mode: str) -> str:
    nodes = fmt_int_list(n.id for n in hw.allowed_nodes)
    return f"NUMA node(s) {nodes}, mode {mode}"


def _host_max_ctx(devices, kv_per_token, wl) -> int:
    cpu = devices["cpu"]
    room = cpu.capacity_bytes - (cpu.bytes - cpu.breakdown.get("kv_cache", 0))
    return max(0, room // (kv_per_token * wl.batch))


# --- estimate -------------------------------------------------------------------------

def _cpu_gflops(hw: Hardware) -> tuple:
    for flag in ("amx_int8", "avx512_vnni", "avx512f", "avx2"):
        if flag in hw.isa:
            return CPU_GFLOPS_PER_CORE[flag], flag
    return CPU_GFLOPS_PER_CORE[""], "scalar"


def _cpus_used(hw: Hardware, threads=None) -> tuple:
    """(cpus a run of `threads` workers uses, allowed cpus): a rate the probe measured on all
    allowed cpus scales by their ratio."""
    n = len(hw.allowed_cpus)
    return (min(n, threads) if threads else n), n


def _cpu_flops(hw: Hardware, threads=None) -> tuple:
    """(sustained FLOP/s of the allowed cores, how it was derived)."""
    if hw.cpu_flops:
        used, n = _cpus_used(hw, threads)
        return hw.cpu_flops * used / n, f"{hw.cpu_flops * used / n / 1e9:.0f} GFLOP/s on {used} cpus (measured)"
    gflops_core, isa = _cpu_gflops(hw)
    cores = min(hw.allowed_cores, threads) if threads else hw.allowed_cores
    return cores * gflops_core * 1e9, f"{cores} cores x {gflops_core:.0f} GFLOP/s ({isa}, assumed sustained)"


def _attention_flops(hw: Hardware, threads=None) -> tuple:
    """(FLOP/s of the native causal attention on the cpus used, how it was derived): measured
    (placement.probe), else ASSUMED_ATTENTION_SHARE of _cpu_flops."""
    if hw.attention_flops:
        used, n = _cpus_used(hw, threads)
        f = hw.attention_flops * used / n
        return f, f"{f / 1e9:.0f} GFLOP/s on {used} cpus (measured)"
    f = _cpu_flops(hw, threads)[0] * ASSUMED_ATTENTION_SHARE
    return f, f"{f / 1e9:.0f} GFLOP/s ({ASSUMED_ATTENTION_SHARE} x the matmul rate, assumed)"


def _ram_bandwidth(hw: Hardware, pol: Policy, numa_mode: str) -> tuple:
    """(bytes/s the expert kernels read at, node bandwidth, 'given' | 'assumed', how)."""
    n_nodes = max(1, len(hw.allowed_nodes))
    node_bw = hw.ram_bandwidth_per_node or ASSUMED_RAM_BANDWIDTH_PER_NODE
    src = "measured" if hw.sources.get("ram_bandwidth") == "measured" else "given"
    src = src if hw.ram_bandwidth_per_node else "assumed"
    if numa_mode in ("distribute", "replicate"):
        agg, how = node_bw * n_nodes, f"{n_nodes} node(s), local reads"
    elif numa_mode == "interleave":
        agg = node_bw * n_nodes * (pol.interleave_efficiency if n_nodes > 1 else 1.0)
        how = f"{n_nodes} node(s) interleaved x {pol.interleave_efficiency if n_nodes > 1 else 1.0}"
    else:
        agg, how = node_bw, "one node's worth (pages land where first touched)"
    # the share of that bandwidth a one-token matmul streaming from RAM reaches: measured on
    # this machine (placement.probe), else the policy's figure
    if src == "measured" and hw.ram_kernel_efficiency:
        eff, how = hw.ram_kernel_efficiency, f"{how}, x {hw.ram_kernel_efficiency:.2f} kernel efficiency (measured)"
    else:
        eff, how = pol.ram_efficiency, f"{how}, x {pol.ram_efficiency} kernel efficiency"
    return agg * eff, node_bw, src, how


def _hit_rates(inv: Inventory, stats, gpu_cache: dict) -> dict:
    """{MoE layer: share of its routed-expert calls served by the GPU cache}: the cached share
    of the experts, or of the recorded activations when statistics are given."""
    E = max(inv.model.n_expert, 1)
    hit = {l: len(gpu_cache.get(l, ())) / E for l in inv.moe_layers()}
    if stats and gpu_cache:
        for l in hit:
            if l in stats:
                tot = sum(stats[l]) or 1.0
                hit[l] = sum(stats[l][e] for e in gpu_cache.get(l, ())) / tot
    return hit


def _on_cpus_used(hw: Hardware, figures: dict, threads=None) -> dict:
    """{key (a ggml type, tokens per expert): a rate the probe measured on all allowed cpus, on
    the cpus used}."""
    used, n = _cpus_used(hw, threads)
    return {int(k): v * used / n for k, v in figures.items()}


def _flops_of(hw: Hardware, threads=None):
    """ggml type -> sustained FLOP/s of its native matmul on the cpus used: measured per type
    on this machine (placement.probe), else the one figure of _cpu_flops."""
    flops = _cpu_flops(hw, threads)[0]
    by_type = _on_cpus_used(hw, hw.cpu_flops_by_type, threads)
    return lambda ggml_type: by_type.get(ggml_type, flops)


def _expert_flops_of(hw: Hardware, flops_of, tokens_per_expert: float, threads=None):
    """ggml type -> FLOP/s of the expert engine's prefill with this many tokens per expert: the
    engine's rate measured with Q4_K experts (placement.probe) at the nearest token counts,
    interpolated in log(tokens), for another type times its matmul's speed against Q4_K's;
    flops_of (the 64-token matmul) where the engine was not measured."""
    measured = sorted(_on_cpus_used(hw, hw.moe_prefill_flops, threads).items())
    if not measured:
        return flops_of
    n = min(max(tokens_per_expert, measured[0][0]), measured[-1][0])
    hi = next(i for i, (k, _) in enumerate(measured) if k >= n)
    (n0, f0), (n1, f1) = measured[max(0, hi - 1)], measured[hi]
    q4_engine = f1 if n1 == n0 else f0 + (f1 - f0) * math.log(n / n0) / math.log(n1 / n0)
    return lambda ggml_type: q4_engine * flops_of(ggml_type) / flops_of(Q4_K)


def _decode_rate_of(hw: Hardware, eff_bw: float, threads=None):
    """ggml type -> bytes/s a one-token matmul of its weights in RAM runs at: the slower of
    reading them (eff_bw) and computing them (measured per type with the weights in cache,
    placement.probe; lattice types are compute-bound). eff_bw for a type without a figure
    (another machine, the probe off)."""
    compute = _on_cpus_used(hw, hw.cpu_decode_bytes_by_type, threads)
    return lambda ggml_type: min(eff_bw, compute.get(ggml_type, eff_bw))


def _decode_compute_note(hw: Hardware, rate_of, eff_bw: float, types) -> str:
    """The assumption behind the per-type decode rates of `types` (those a token's CPU
    matmuls read)."""
    if not hw.cpu_decode_bytes_by_type:
        return "not measured: every type at the RAM bandwidth (optimistic for compute-bound IQ types)"
    slow = sorted((rate_of(t), t) for t in types if rate_of(t) < eff_bw)
    if not slow:
        return "every type's one-token matmul keeps up with the RAM bandwidth (measured)"
    return (", ".join(f"{type_name(t)} {r / 1e9:.1f} GB/s" for r, t in slow)
            + ": compute-bound one-token matmuls (measured); other types at the RAM bandwidth")


def _cpu_expert_prefill_s(inv: Inventory, hw: Hardware, wl: Workload, pol: Policy, eff_bw: float,
                          hit: dict) -> float:
    """Seconds of CPU routed-expert work per prompt token (all MoE layers, cached experts
    excluded): the expert FLOPs at the engine's prefill rate for their type with an engine
    chunk's tokens per expert (C * K / E), or the bytes a chunk touches (nearly every expert once
    C*K >> E) spread over its tokens, whichever is slower. C: the prefill chunk, at most the
    engine's own chunk (ENGINE_TOKEN_CHUNK), which a longer one is split into."""
    m = inv.model
    K, E = m.n_expert_used, max(m.n_expert, 1)
    C = _prefill_call_tokens(wl)
    layers = inv.moe_layers()
    flops_of = _expert_flops_of(hw, _flops_of(hw, pol.threads), C * K / E, pol.threads)
    compute = sum(2 * K * t.n_elements / E * (1 - hit[t.layer]) / flops_of(t.ggml_type)
                  for t in inv.tensors if t.role == "routed_experts")
    touched = 1 - (1 - K / E) ** C if E > K else 1.0
    mem_per_tok = sum(inv.expert_bytes(l) * E * touched * (1 - hit[l]) for l in layers) / C / eff_bw
    return max(compute, mem_per_tok)


def estimate_speed(inv, hw, wl, pol, numa_mode, gpu, gpu_fmt, gpu_cache, devices, hot_fmt) -> dict:
    """Decode: every token reads the non-expert weights once (GPU) and K experts per MoE layer
    (CPU, unless cached on the GPU, each type at the slower of the RAM bandwidth and its
    one-token matmul), plus the KV cache; one CPU<->GPU hand-off per MoE layer.
    Prefill: CPU expert FLOPs at the expert engine's measured prefill rate (else the ISA's
    sustained rate), or the experts' bytes per engine chunk, whichever is slower, plus the GPU part (chunks short of the GPU prefill threshold; see
    prefill_crossover for the long ones), or on the CPU the linears at their type's rate and
    attention at the native attention's (MLA's K / V expansion at the matmul's). hot_fmt: the
    form of gpu_cache's experts."""
    m = inv.model
    K = m.n_expert_used
    assumptions = {}
    layers = inv.moe_layers()
    size = {l: inv.expert_bytes(l) for l in layers}
    stats = load_expert_stats(pol.expert_stats, inv) if (pol.expert_stats is not None and gpu_cache) else None
    hit = _hit_rates(inv, stats, gpu_cache)
    cpu_bytes_tok = sum(K * size[l] * (1 - hit[l]) for l in layers)
    gpu_exp_bytes_tok = sum(K * size[l] * hit[l] for l in layers)    # the CPU reads they save
    gpu_hot_read_tok = sum(K * hot_expert_bytes(inv, l, hot_fmt) * hit[l] for l in layers)

    # RAM bandwidth the expert kernels see
    eff_bw, node_bw, src, how = _ram_bandwidth(hw, pol, numa_mode)
    assumptions["ram_bandwidth_per_node"] = f"{node_bw / 1e9:.0f} GB/s ({src})"
    assumptions["effective_ram_bandwidth"] = f"{eff_bw / 1e9:.0f} GB/s ({how})"

    # non-expert bytes each token reads (embedding: one row)
    nonexp = 0
    if gpu is not None:
        nonexp = sum(v for k, v in devices["gpu0"].breakdown.items()
                     if k not in ("kv_cache", "workspace", "cuda_context", "allocator_slack", "routed_experts",
                                  "embedding", "prefill_staging", "prefill_workspace", "dequant_workspace"))
    else:
        nonexp = sum(v for k, v in devices["cpu"].breakdown.items()
                     if k not in ("kv_cache", "workspace", "routed_experts", "embedding", "page_tables",
                                  "runtime_overhead", "host_reserve", "pinned_buffers", "tile_scratch",
                                  "expert_io", "expert_scratch"))
    if gpu is not None and gpu_fmt == "quantized":
        groups = _group_formats(True, gpu_fmt, pol.cpu_weight_format)
        nonexp += DEQUANT_TRAFFIC_PER_WEIGHT * sum(
            t.n_elements for t in inv.tensors if t.role not in ("routed_experts", "mtp", "embedding")
            and groups[t.group if t.group in groups else "other"][1] == "quantized")
    pos = max(1, wl.context // 2)
    kv_read = pos * (devices.get("gpu0") or devices["cpu"]).breakdown.get("kv_cache", 0) // max(1, wl.context * wl.batch)
    if gpu is not None:
        gbw = gpu.bandwidth or ASSUMED_GPU_BANDWIDTH
        assumptions["gpu_bandwidth"] = f"{gbw / 1e9:.0f} GB/s ({'given' if gpu.bandwidth else 'assumed'})"
        t_gpu = (nonexp + kv_read + gpu_hot_read_tok) / gbw
        t_sync = len(layers) * pol.sync_latency_s
        assumptions["sync_latency_per_moe_layer"] = f"{pol.sync_latency_s * 1e6:.0f} us"
    else:
        t_gpu = 0.0
        # every layer's small torch ops, beside its bytes: measured on this machine
        # (placement.probe), unknown (0) elsewhere
        t_sync = m.n_layer * hw.layer_overhead_s
        if hw.layer_overhead_s:
            assumptions["layer_overhead"] = (f"{m.n_layer} layers x {hw.layer_overhead_s * 1e6:.0f} us "
                                             f"(torch ops, measured)")
        cpu_bytes_tok += nonexp + kv_read
    # what a token's native CPU matmuls read, by weight type: a compute-bound type (its
    # one-token matmul slower than the RAM bandwidth) adds the difference to the read time
    E = max(m.n_expert, 1)
    groups = _group_formats(False, gpu_fmt, pol.cpu_weight_format)
    native = {}
    for t in inv.tensors:
        if t.role == "routed_experts":
            native[t.ggml_type] = native.get(t.ggml_type, 0) + K * t.n_bytes / E * (1 - hit[t.layer])
        elif gpu is None and groups.get(t.group, groups["other"])[1] == "quantized" and _native_linear(t, pol):
            native[t.ggml_type] = native.get(t.ggml_type, 0) + t.n_bytes
    rate_of = _decode_rate_of(hw, eff_bw, pol.threads)
    t_cpu = cpu_bytes_tok / eff_bw + sum(b / rate_of(t) - b / eff_bw for t, b in native.items())
    assumptions["cpu_decode_compute"] = _decode_compute_note(hw, rate_of, eff_bw, [t for t, b in native.items() if b])
    decode_t = t_gpu + t_cpu + t_sync
    assumptions["decode_context_position"] = f"{pos} tokens (half the context)"

    # prefill
    cpu_flops, assumptions["cpu_compute"] = _cpu_flops(hw, pol.threads)
    flops_of = _flops_of(hw, pol.threads)
    t_cpu_pf = _cpu_expert_prefill_s(inv, hw, wl, pol, eff_bw, hit)
    chunk = _prefill_call_tokens(wl)
    if hw.moe_prefill_flops:
        assumptions["cpu_expert_prefill"] = (
            f"the expert engine at {chunk * K / max(m.n_expert, 1):.0f} tokens per expert "
            f"(a {chunk}-token chunk; measured with Q4_K experts, other types at their matmul's ratio)")
    nonexp_params = sum(t.n_elements for t in inv.tensors
                        if t.role not in ("routed_experts", "embedding", "mtp"))
    # attention over `pos` cached positions in every layer that runs, as a prefill chunk attends
    attn_pos, expand_pos = m.prefill_attn_flops_per_position(chunk)
    gpu_flops_tok = 2 * nonexp_params + m.n_layer * (attn_pos + expand_pos) * pos
    if gpu is not None:
        pcie = hw.pcie_bandwidth or ASSUMED_PCIE_BANDWIDTH
        t_gpu_pf = gpu_flops_tok / (pol.gpu_tflops * 1e12) + len(layers) * 2 * m.n_embd * 4 / pcie
        assumptions["gpu_compute"] = f"{pol.gpu_tflops:.0f} TFLOP/s bf16 (assumed sustained)"
        assumptions["pcie_bandwidth"] = f"{pcie / 1e9:.0f} GB/s ({'given' if hw.pcie_bandwidth else 'assumed'})"
    else:
        # the linears at their type's rate (f32 copies: the headline figure); attention at the
        # native attention's, MLA's K / V expansion at the matmul rate
        attn_flops, assumptions["cpu_attention"] = _attention_flops(hw, pol.threads)
        t_gpu_pf = (sum(2 * t.n_elements / flops_of(t.ggml_type) for t in inv.tensors
                        if t.role not in ("routed_experts", "embedding", "mtp"))
                    + m.n_layer * pos * (attn_pos / attn_flops + expand_pos / cpu_flops))
    prefill_t = t_cpu_pf + t_gpu_pf
    return {
        "decode_tok_s": round(1.0 / decode_t, 2) if decode_t > 0 else 0.0,
        "prefill_tok_s": round(1.0 / prefill_t, 1) if prefill_t > 0 else 0.0,
        "bytes_per_token": {"cpu_experts": int(cpu_bytes_tok), "gpu_experts": int(gpu_exp_bytes_tok),
                            "non_expert": int(nonexp), "kv_cache": int(kv_read)},
        "expert_cache_hit_rate": round(gpu_exp_bytes_tok / (gpu_exp_bytes_tok + cpu_bytes_tok), 4)
        if (gpu_exp_bytes_tok + cpu_bytes_tok) else 0.0,
        "seconds_per_token": {"gpu": t_gpu, "cpu": t_cpu, "sync": t_sync},
        "assumptions": assumptions,
    }


# --- GPU prefill ----------------------------------------------------------------------

def _routed_layer_bytes(inv: Inventory) -> dict:
    """{MoE layer: bytes of its routed experts (gate, up, down)}: what one prefill slot holds."""
    out = {}
    for t in inv.tensors:
        if t.role == "routed_experts":
            out[t.layer] = out.get(t.layer, 0) + t.n_bytes
    return out


def prefill_crossover(inv: Inventory, hw: Hardware, wl: Workload, pol: Policy, numa_mode: str, gpu,
                      hit: dict) -> dict:
    """Prompt tokens per chunk from which streaming the routed experts to the GPU beats the CPU.

    GPU path (hybrid.backends.gpu.PrefillOffload), per chunk of T tokens, summed over the MoE layers;
    layer l+1 is copied while layer l computes, so per layer the slower of the two counts
    (steady state: the first layer's copy of a lone chunk is not hidden, ~1/58 on R1):
        t_gpu(T) = max(S / B_pcie, S_deq / B_gpu + T * g)
    S: routed-expert bytes (GGUF blocks, what crosses PCIe); S_deq: those bytes read plus 2
    bytes per weight written, every expert dequantized to bf16 once per chunk; g: expert FLOPs
    per token at gpu_tflops. CPU path: t_cpu(T) = T * c, with c the CPU prefill cost per token
    of the estimate (estimate_speed): the slower of the expert FLOPs at the CPU's prefill rate
    (the expert engine's as measured here, else cores x GFLOP/s of the ISA) and the expert bytes
    a prefill_chunk touches over the effective RAM bandwidth, for the experts not cached on the
    GPU. The non-expert part is the same on both paths.
    The GPU path wins from T* = max(S / (B_pcie * c), (S_deq / B_gpu) / (c - g)); never if g >= c.

    DeepSeek-R1 Q4_K_M: S = 394.0 GB over 58 MoE layers, 653.9e9 expert weights (S_deq =
    1.70 TB), 40.9 GFLOP of experts per token; 64 AVX512-VNNI cores at 120 GFLOP/s (7.68
    TFLOP/s), 2 x 150 GB/s interleaved (x 0.75 x 0.7 = 157.5 GB/s), 100 TFLOP/s GPU:
      c = max(40.9e9 / 7.68e12, 394.0e9 / 512 / 157.5e9) = max(5.32, 4.89) ms = 5.32 ms; g = 0.41 ms
      2x256g-48g (PCIe 25 GB/s, 960 GB/s): T* = max(15.76 s / 5.32 ms, 1.77 s / 4.91 ms)
                                               = max(2962, 361) = 2962 tokens
      2x256g-80g (PCIe 50 GB/s, 2000 GB/s): T* = max(7.88 s / 5.32 ms, 0.85 s / 4.91 ms) = 1481 tokens
    (the hot-expert cache the plan keeps besides makes c smaller and T* a little larger).
    """
    m = inv.model
    K = m.n_expert_used
    S = sum(_routed_layer_bytes(inv).values())
    weights = sum(t.n_elements for t in inv.tensors if t.role == "routed_experts")
    pcie = hw.pcie_bandwidth or ASSUMED_PCIE_BANDWIDTH
    gbw = (gpu.bandwidth if gpu is not None else 0) or ASSUMED_GPU_BANDWIDTH
    eff_bw = _ram_bandwidth(hw, pol, numa_mode)[0]
    c = _cpu_expert_prefill_s(inv, hw, wl, pol, eff_bw, hit)
    g = len(inv.moe_layers()) * 2 * K * 3 * m.n_embd * m.expert_ff / (pol.gpu_tflops * 1e12)
    copy_s = S / pcie
    dequant_s = (S + 2 * weights) / gbw
    if not S or c <= g:
        tokens = 0
    else:
        tokens = max(1, math.ceil(max(copy_s / c, dequant_s / (c - g))))
    chunk = min(wl.gpu_prefill_chunk, wl.context)
    t_chunk = max(copy_s, dequant_s + chunk * g)
    return {
        "tokens": tokens,
        "routed_bytes": S, "pcie_bandwidth": pcie, "gpu_bandwidth": gbw,
        "pcie_s_per_chunk": copy_s, "dequant_s_per_chunk": dequant_s,
        "gpu_s_per_token": g, "cpu_s_per_token": c,
        "gpu_expert_tok_s": chunk / t_chunk if t_chunk else 0.0,
        "cpu_expert_tok_s": 1.0 / c if c else 0.0,
        "formula": "T* = max(S / (B_pcie * c), (S_deq / B_gpu) / (c - g))",
    }


def gpu_prefill_reserve(inv: Inventory, wl: Workload, pol: Policy, tokens: int) -> dict:
    """VRAM the GPU prefill path needs besides the rest of the plan, for chunks of `tokens`.

    staging: two slots of the largest MoE layer's routed experts (hybrid.backends.gpu._Copier fills one
    while the other is computed on), allocated at load. workspace, live while a long chunk
    runs: the activations of `tokens` tokens beyond the prefill_chunk ones already in the
    workspace (workspace_formula), plus PrefillOffload's own buffers: an fp32 output row per
    (token, expert) pair, the chunk in bf16 and its fp32 result, the routing order, and one
    expert at a time dequantized to bf16 with its intermediates for up to every token.
    """
    m = inv.model
    D, F, K = m.n_embd, m.expert_ff, m.n_expert_used
    slot = max(_routed_layer_bytes(inv).values(), default=0)
    acts = max(0, workspace_formula(inv, replace(wl, prefill_chunk=tokens), pol)["activations"]
               - workspace_formula(inv, wl, pol)["activations"])
    offload = (tokens * K * D * 4 + tokens * D * (2 + 4) + tokens * K * 8 * 3
               + 3 * F * D * 2 + tokens * (D * 2 + 4 * F * 2 + D * (2 + 4)))
    return {"bytes": 2 * slot + acts + offload, "staging": 2 * slot, "slot": slot,
            "workspace": acts + offload, "tokens": tokens,
            "formula": f"2 x {slot} B (largest MoE layer's routed experts) + activations of {tokens} tokens "
                       f"beyond the prefill chunk ({acts} B) + offload buffers ({offload} B)"}


def _prefill_info(wl: Workload, reason: str) -> dict:
    """Plan.gpu_prefill with GPU prefill off. tokens: the threshold (Plan.gpu_prefill_tokens);
    source: model | given | off; reason: why off; chunk_tokens: the longest GPU chunk planned for;
    *_bytes: the gpu0 reserve (gpu_prefill_reserve) and the hot-expert cache it displaced;
    crossover: prefill_crossover's arithmetic."""
    return {"tokens": 0, "source": "off", "reason": reason, "chunk_tokens": min(wl.gpu_prefill_chunk, wl.context),
            "reserve_bytes": 0, "staging_bytes": 0, "slot_bytes": 0, "workspace_bytes": 0,
            "hot_cache_given_up_bytes": 0, "crossover": {}, "formula": ""}


def _plan_gpu_prefill(inv, hw, wl, pol, numa_mode, gpu, room, cache_for, stats, make_room, hot_fmt) -> tuple:
    """GPU prefill and the hot-expert cache, from the VRAM `room` the rest of the plan leaves.

    The staging buffers come before the hot-expert cache: a long prompt gains several times
    over on the GPU path, while the cache without statistics saves a few percent of the CPU
    reads per decoded token. When the reserve does not fit even with no cache, GPU prefill is
    off and the reason says what would make room. Returns (info, gpu_cache, gpu0 breakdown
    entries, notes). hot_fmt: the cache's form (hot_expert_format), for its bytes.
    """
    want = pol.gpu_prefill_tokens
    chunk = min(wl.gpu_prefill_chunk, wl.context)
    full_cache = cache_for(room)
    info = _prefill_info(wl, "")

    def crossover(cache):
        return prefill_crossover(inv, hw, wl, pol, numa_mode, gpu, _hit_rates(inv, stats, cache))

    def off(reason, note=False):
        info.update(reason=reason, crossover=crossover(full_cache))
        flag = f"--gpu-prefill-tokens {want}: " if want else ""
        return info, full_cache, {}, [f"{flag}GPU prefill off: {reason}"] if note else []

    if not inv.moe_layers():
        return off("the model has no routed experts")
    if want == 0:
        return off("turned off (--gpu-prefill-tokens 0)")
    if want is not None and want > wl.context:
        return off(f"no prompt reaches {want} tokens in a {wl.context}-token context", note=True)
    res = gpu_prefill_reserve(inv, wl, pol, min(max(chunk, want or 0), wl.context))
    if res["bytes"] > room:
        return off(f"its buffers need {fmt_bytes(res['bytes'])} of gpu0 (staging 2 x {fmt_bytes(res['slot'])}, "
                   f"workspace {fmt_bytes(res['workspace'])} for {res['tokens']}-token chunks), "
                   f"{fmt_bytes(max(room, 0))} are left after the weights, KV cache and reserves"
                   + make_room(res["bytes"] - room), note=True)
    cache = cache_for(room - res["bytes"])
    cross = crossover(cache)
    tokens, source = want, "given"
    if want is None:
        tokens, source = cross["tokens"], "model"
        if not tokens:
            hit = _hit_rates(inv, stats, cache)
            return off("every routed expert is cached on the GPU already" if min(hit.values()) >= 1
                       else "the GPU would compute the experts no faster than the CPU")
        if tokens > chunk:
            where = "the context" if chunk == wl.context else "a GPU prefill chunk"
            return off(f"streaming pays only from {tokens} tokens per chunk, more than {where} holds "
                       f"({chunk} tokens)")

    def cached(c):
        return sum(len(v) * hot_expert_bytes(inv, l, hot_fmt) for l, v in c.items())

    lost = cached(full_cache) - cached(cache)
    notes = []
    if lost > 0:
        notes.append(f"GPU prefill (chunks of {tokens}+ tokens) reserves {fmt_bytes(res['bytes'])} of gpu0, so the "
                     f"hot-expert cache holds {fmt_bytes(cached(cache))} instead of {fmt_bytes(cached(full_cache))} "
                     f"(--gpu-prefill-tokens 0 keeps the cache)")
    info.update(tokens=tokens, source=source, reserve_bytes=res["bytes"], staging_bytes=res["staging"],
                workspace_bytes=res["workspace"], hot_cache_given_up_bytes=max(lost, 0), crossover=cross,
                slot_bytes=res["slot"], formula=res["formula"])
    return info, cache, {"prefill_staging": res["staging"], "prefill_workspace": res["workspace"]}, notes


# --- convenience ----------------------------------------------------------------------

# "threads" is the run's worker count (Policy.threads); a hypothetical machine's SMT is
# threads_per_core
_HW_KEYS = tuple(k for k in HW_OVERRIDES if k != "threads")
_WL_KEYS = ("context", "batch", "prefill_chunk", "gpu_prefill_chunk", "allow_long_context")


def build_inputs(hardware=None, profile=None, measure=True, gpus=True, **overrides):
    """Split keyword overrides into (Hardware, Workload, Policy). Unknown keys are an error.

    Workload keys: context (or ctx), batch (KV slots; None: the most that fit), prefill_chunk,
    gpu_prefill_chunk, allow_long_context.
    Policy keys: any Policy field (numa, gpu_weight_format or gpu_format, hot_expert_format or
    hot_format, cpu_only, threads,
    expert_stats, ...). Hardware keys: placement.hardware.HW_OVERRIDES but threads (gpu_mem, ram,
    numa_nodes, cores, threads_per_core, bind_node, allowed_mems, allowed_cpus, ram_bandwidth, ...).
    This machine (no hardware, no profile) comes with its measured bandwidth and compute
    (placement.probe; measure="again" measures anew, False keeps assumed figures); gpus=False
    looks for no GPU (a run told to stay on the CPU starts no CUDA context, nor nvidia-smi).
    `profile` names configs/hardware/<profile>.json.
    """
    from placement import hardware as hwmod

    ov = dict(overrides)
    if "ctx" in ov:
        ov["context"] = ov.pop("ctx")
    if "gpu_format" in ov:
        ov["gpu_weight_format"] = ov.pop("gpu_format")
    if "hot_format" in ov:
        ov["hot_expert_format"] = ov.pop("hot_format")
    if ov.pop("cpu_only", False):
        ov["use_gpu"] = False
    hw_kw = {k: ov.pop(k) for k in _HW_KEYS if k in ov and ov[k] is not None}
    for k in _HW_KEYS:
        ov.pop(k, None)
    wl_kw = {k: ov.pop(k) for k in _WL_KEYS if k in ov}
    pol_fields = set(Policy.__dataclass_fields__)
    unknown = set(ov) - pol_fields
    if unknown:
        raise SolverError(f"unknown option(s): {', '.join(sorted(unknown))}")
    if hardware is None:
        if profile:
            hardware = hwmod.from_profile(profile)
        else:
            hardware = hwmod.detect(gpus=gpus)
            if measure:
                hardware = hwmod.measure(hardware, refresh=measure == "again")
    elif profile:
        raise SolverError("give either hardware= or profile=, not both")
    if hw_kw:
        hardware = hwmod.apply_overrides(hardware, **hw_kw)
    wl = Workload(**{k: (v if v is None or isinstance(v, bool) else int(v)) for k, v in wl_kw.items()})
    return hardware, wl, Policy(**{k: v for k, v in ov.items() if v is not None})


def plan_for_gguf(path, hardware=None, profile=None, **overrides) -> Plan:
    """Plan for a GGUF file (header only) on this machine or on `hardware` / a profile, with
    overrides as keyword arguments (see build_inputs)."""
    from placement.inventory import from_gguf

    inv = from_gguf(path)
    hw, wl, pol = build_inputs(hardware=hardware, profile=profile, **overrides)
    return solve(inv, hw, wl, pol)


def plan_for_preset(name, hardware=None, profile=None, **overrides) -> Plan:
    from placement.presets import build_preset

    inv = build_preset(name)
    hw, wl, pol = build_inputs(hardware=hardware, profile=profile, **overrides)
    return solve(inv, hw, wl, pol)


def predict_cpu_rss_growth(path_or_inventory, context: int = 4096, batch: int = 1, prefill_chunk: int = 512,
                           **policy) -> int:
    """Host bytes loading this model on the CPU only should add to the process RSS
    (plan.devices['cpu'] without the OS reserve and the fixed runtime overhead).

    For the runtime's end-to-end check: measure RSS before load (torch imported) and after
    the first forward, compare within 10% or 64 MiB.
    """
    from placement.hardware import detect
    from placement.inventory import Inventory, from_gguf

    inv = path_or_inventory if isinstance(path_or_inventory, Inventory) else from_gguf(path_or_inventory)
    wl = Workload(context=context, batch=batch, prefill_chunk=prefill_chunk)
    pol = Policy(use_gpu=False, **policy)
    return solve(inv, detect(gpus=False), wl, pol, _suggest=False).predicted_cpu_rss_growth()


__all__ = ["Workload", "Policy", "solve", "plan_for_gguf", "plan_for_preset", "predict_cpu_rss_growth",
           "build_inputs", "choose_gpu_experts", "load_expert_stats", "prefill_crossover", "gpu_prefill_reserve",
           "NUMA_MODES", "GPU_FORMATS", "SLOTS_MAX", "SolverError", "most_slots"]
