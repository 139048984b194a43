"""This machine's memory read bandwidth, CPU compute and per-layer decode cost, measured
(a few seconds) by the native kernels and torch in a child process, cached per machine:
the estimates of a plan for this machine use them instead of assumed figures (a hypothetical
machine keeps given or profile figures).

The child process keeps the dry-run free of torch and of the native module. The cache is a
JSON file per machine (CPU model, allowed cpus, RAM) in the hybrid cache directory;
`--measure` measures again. HYBRID_PROBE=0 turns the probe off (assumed figures).
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import time

from placement import ggml

VERSION = 10
BUFFER_BYTES = 256 << 20     # well beyond any L3 this runs on
MATMUL = (4096, 512, 64)     # K, N, tokens: a prefill-sized matmul
# The expert engine's prefill, Q4_K: d_model, rows per expert, experts (108 MB: from RAM, as a
# model's), experts per token; timed at these tokens per expert on average (R1 at a 512-token
# chunk: 16, Qwen3-30B-A3B: 32, the mid bench model: 48)
MOE = (2048, 512, 64, 8)
MOE_TOKENS_PER_EXPERT = (4, 16, 64)
# the attention the probe times: queries, heads, keys, key dims, rope dims, value dims
ATTENTION = (256, 16, 2048, 128, 64, 128)
DECODE_BYTES_PER_THREAD = 1 << 20   # the one-token matmul's weights: each worker's share stays in cache


def machine_key() -> str:
    """What the figures depend on: the CPU model, the cpus this process may use, the RAM, and
    the kernels measured (the native module's file: a rebuilt or upgraded one measures anew)."""
    from placement.hardware import _read

    model = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                  if ln.startswith("model name")), "")
    mem = next((ln.split()[1] for ln in _read("/proc/meminfo").splitlines() if ln.startswith("MemTotal")), "")
    return hashlib.sha1(f"{VERSION}|{model}|{_allowed_cpus()}|{mem}|{_native_id()}".encode()).hexdigest()[:16]


def _native_id() -> str:
    """Size and modification time of the native module's file ("" when it is not built)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("hybrid._native")
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.origin:
        return ""
    try:
        st = os.stat(spec.origin)
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


def _allowed_cpus() -> list:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def cache_file():
    from hybrid.app.demo import cache_dir

    return cache_dir() / f"probe-{machine_key()}.json"


def measured(refresh: bool = False) -> dict:
    """{'read_bytes_per_s', 'cpu_flops', 'cpu_flops_by_type', 'decode_bytes_per_s_by_type',
    'threads', ...} of this machine, from the cache or measured now; {} when the probe is off
    or cannot run (no native module)."""
    if os.environ.get("HYBRID_PROBE", "1") == "0":
        return {}
    path = cache_file()
    # figures measured on another number of cpus than this process may use (a child that ran
    # under other bindings than its parent) are not this machine's: measured again, not cached
    threads = len(_allowed_cpus())
    if not refresh:
        try:
            cached = json.loads(path.read_text())
            if cached.get("threads") == threads:
                return cached
        except (OSError, ValueError):
            pass
    try:
        # the child imports the packages this process imported (an installed hybrid has the
        # native module, a source tree in the cwd may not): their folder first on its path
        import hybrid

        roots = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__))) for m in (hybrid, sys.modules[__name__])]
        code = (f"import sys; sys.path[:0] = {roots!r}; import json; from placement.probe import _measure; "
                f"print(json.dumps(_measure()))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        figures = json.loads(r.stdout) if r.returncode == 0 else {}
    except (OSError, subprocess.SubprocessError, ValueError):
        figures = {}
    if figures.get("threads") == threads:
        from hybrid.atomic import write_text

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps(figures, indent=1))
        except OSError:
            pass   # a read-only cache: measured again next time
    return figures


def _best(fn, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure() -> dict:
    """In the child: read bandwidth over all allowed cpus (best of 5 reads of 256 MiB) and the
    rate a one-token Q4_K matmul streams the same bytes at (best of 3); for each
    type the native matmul runs, its FLOP/s at 64 tokens (best of 3) and the bytes/s of its
    one-token matmul with the weights in cache (best of 20: the compute side of decode's
    roofline); the per-layer cost of a decode step; the expert engine's prefill FLOP/s at a few
    tokens per expert; the native causal attention's FLOP/s."""
    import numpy as np

    from hybrid import _native
    from placement.solver import CPU_NATIVE_TYPES

    threads = len(_allowed_cpus())
    buf = np.ones(BUFFER_BYTES, dtype=np.uint8)        # ones: every page touched, not shared zero
    _native.stream_read(buf, threads)
    read_s = _best(lambda: _native.stream_read(buf, threads), 5)
    K, N, T = MATMUL
    # the same bytes read as Q4_K weights (blocks of 0x01 bytes: finite) by a one-token matmul:
    # the share of that bandwidth the kernels reach from RAM
    row_bytes = K // 256 * 144
    ram_rows = buf[: BUFFER_BYTES // row_bytes * row_bytes].reshape(-1, row_bytes)
    x_one, out_ram = np.ones((1, K), np.float32), np.empty((1, len(ram_rows)), np.float32)
    _native.matmul(ram_rows, ggml.Q4_K, x_one, out=out_ram, threads=threads)
    ram_matmul_s = _best(lambda: _native.matmul(ram_rows, ggml.Q4_K, x_one, out=out_ram, threads=threads), 3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = np.empty((T, N), dtype=np.float32)
    flops, decode = {}, {}
    for t in sorted(CPU_NATIVE_TYPES):   # each type's kernel has its own speed (lattice types: table lookups)
        w = _random_blocks(t, N, K, rng)
        _native.matmul(w, t, x, out=out, threads=threads)
        flops[str(t)] = 2 * K * N * T / _best(lambda: _native.matmul(w, t, x, out=out, threads=threads), 3)
        w1 = np.resize(w, (max(1, threads * DECODE_BYTES_PER_THREAD // w.shape[1]), w.shape[1]))
        out1 = np.empty((1, w1.shape[0]), dtype=np.float32)
        _native.matmul(w1, t, x[:1], out=out1, threads=threads)
        decode[str(t)] = w1.nbytes / _best(lambda: _native.matmul(w1, t, x[:1], out=out1, threads=threads), 20)
    return {"version": VERSION, "read_bytes_per_s": BUFFER_BYTES / read_s,
            "matmul_read_bytes_per_s": ram_rows.nbytes / ram_matmul_s, "cpu_flops": flops[str(ggml.Q4_K)],
            "cpu_flops_by_type": flops, "decode_bytes_per_s_by_type": decode,
            # the engine's and the attention's timings may fail (say, no memory for the engine's
            # 108 MB layer): the estimate then assumes their rates, the other figures stand
            "moe_prefill_flops": _timed_or({}, "the expert engine's prefill", _moe_prefill_flops, threads, rng),
            "attention_flops": _timed_or(0.0, "the native attention", _attention_flops, threads, rng),
            "layer_overhead_s": _layer_overhead(), "threads": threads, "isa": _native.isa(),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def _timed_or(default, what: str, timing, *args):
    """timing(*args), or `default` (saying why on stderr) when it cannot run here."""
    try:
        return timing(*args)
    except (RuntimeError, ValueError, OSError, MemoryError) as e:
        print(f"probe: {what} was not timed ({e})", file=sys.stderr)
        return default


def _moe_prefill_flops(threads: int, rng) -> dict:
    """{tokens per expert: FLOP/s} of the expert engine's prefill of one layer of Q4_K experts
    (MOE) at each of MOE_TOKENS_PER_EXPERT on average (best of 3 calls). Beside the multiplies
    of a matmul, a prefill groups the tokens by expert, quantizes their activations, rewrites
    every expert's row groups for its few tokens, runs the tiles' tails and weighs the outputs
    back: the 64-token matmul's rate the Plan's estimate took for it had overshot the measured
    prefill by 1.3-1.5x on Zen 4."""
    import numpy as np
    import torch

    from hybrid.backends.experts import ExpertEngine

    D, F, E, K = MOE
    one = [_random_blocks(ggml.Q4_K, F, D, rng), _random_blocks(ggml.Q4_K, D, F, rng)]
    gate, up, down = (np.tile(b, (E, 1)) for b in (one[0], one[0], one[1]))   # E experts' rows, each its own copy
    engine = ExpertEngine(D, max_tokens=max(MOE_TOKENS_PER_EXPERT) * E // K, max_k=K, threads=threads)
    try:
        layer = engine.add_layer(E, gate, ggml.Q4_K, up, ggml.Q4_K, down, ggml.Q4_K)
        out = {}
        for n in MOE_TOKENS_PER_EXPERT:
            T = n * E // K
            # K distinct experts per token at random, as a router's: some experts get fewer
            # tokens than n, some more (the tiles' tails)
            ids = torch.from_numpy(np.argsort(rng.random((T, E)), axis=1)[:, :K].copy())
            x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
            w = torch.full((T, K), 1.0 / K)
            layer(x, ids, w)
            out[str(n)] = 2 * 3 * D * F * K * T / _best(lambda: layer(x, ids, w), 3)
        return out
    finally:
        engine.close()


def _attention_flops(threads: int, rng) -> float:
    """FLOP/s of the native causal attention of a prompt chunk (flash_attention, the kernel
    CPU prefill attends with; best of 3): ATTENTION's queries after the rest of its keys, MLA's
    shape (a second key part of rope dims shared by the heads). Its float32 multiply-adds run
    at a fraction of the int8 matmul's rate the estimate used to take for them (Zen 4, 2
    threads: ~135 against 300-530 GFLOP/s)."""
    import numpy as np

    from hybrid import _native

    T, H, S, dk, dr, dv = ATTENTION
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((T, H, dk), (H, S, dk), (H, S, dv)))
    q_rope, k_rope = (rng.standard_normal(shape).astype(np.float32) for shape in ((T, H, dr), (1, S, dr)))
    out = np.empty((T, H, dv), np.float32)

    def call():
        _native.flash_attention(q, k, v, out, 1.0 / math.sqrt(dk + dr), S - T, q_rope=q_rope, k_rope=k_rope,
                                threads=threads)

    call()
    return 2 * H * (dk + dr + dv) * T * (S - T + (T + 1) / 2) / _best(call, 3)


def _random_blocks(ggml_type: int, rows: int, k: int, rng):
    """uint8 [rows, row bytes] of random blocks (zero blocks would hit one line of a lattice
    type's grid): random bytes, each block whose values come out non-finite (a random fp16
    scale of inf or NaN) replaced by one that does not."""
    import numpy as np

    from hybrid import _native

    t = ggml.ggml_type(ggml_type)
    blocks = rng.integers(0, 256, (rows * k // t.block_size, t.type_size), dtype=np.uint8)
    values = _native.dequantize(blocks, ggml_type, rows * k).reshape(len(blocks), t.block_size)
    finite = np.isfinite(values).all(axis=1)
    blocks[~finite] = blocks[np.argmax(finite)]
    return blocks.reshape(rows, -1)


# aten ops a CPU decode step runs per layer: counted with a TorchDispatchMode over decode
# steps of the tiny deepseek2 (277 for 4 layers) and the SmolLM2 demo (1960 for 30 layers)
TORCH_OPS_PER_LAYER = 67


def _layer_overhead() -> float:
    """Seconds a CPU decode step spends per layer in its small torch ops (one thread, as the
    runtime decodes), beside reading its bytes: a decode-sized mix of ops, timed (median of
    50 layers' worth). The native calls' own cost is in the bytes and FLOPs: during decode
    their workers spin between calls."""
    import torch

    torch.set_num_threads(1)
    x, w = torch.randn(1, 256), torch.randn(256, 256)

    def ten_ops():    # the mix of a decode layer: norms, elementwise, small matmuls, routing, views
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        s = torch.softmax(h @ w, dim=-1)
        torch.topk(s, 4)
        return (h + s).view(1, 4, 64).transpose(0, 1)

    per_layer = []
    for _ in range(50):
        t0 = time.perf_counter()
        for _ in range(round(TORCH_OPS_PER_LAYER / 10)):
            ten_ops()
        per_layer.append(time.perf_counter() - t0)
    return sorted(per_layer)[len(per_layer) // 2]


if __name__ == "__main__":
    print(json.dumps(_measure()))
