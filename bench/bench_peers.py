"""Routed experts on the CPU: hybrid's native engine vs kt-kernel's (ktransformers) MoE kernel.

    python bench/bench_peers.py [--layers 4] [--experts 64] [--d 2048] [--f 1024] [--k 6]
                                [--threads 2] [--runs 7] [--steps 40] [--prefill 512]
                                [--kt-threads 2,1] [--kt-hidden fp32|bf16] [--kt-m-block 32]

Letters: T tokens, D model dim, E experts, K experts per token, F expert FFN dim.

Both engines get the same GGUF expert bytes (random valid blocks, tests/quantdata.py) and the
same thread count. The peer is kt-kernel's llamafile backend (`kt_kernel_ext.moe.MOE`), the one
that consumes GGML block types; it is driven the way kt-kernel's own LlamafileMoEWrapper does
(one subpool, m_block 32, group_min_len 10, CPUInfer.submit(forward_task) + sync), minus the
GPU side, and with fp32 activations in and out by default (its wrapper uses bf16) so that both
engines compute the same thing. Its extension is loaded directly: the package __init__ imports the CUDA-oriented
wrapper and its dependencies (safetensors, ...), which a CPU benchmark needs none of.

First the outputs of both engines are compared on the same input (decode and prefill shapes);
timing is refused when they disagree. Then, interleaved, the order rotating from run to run:
  decode   one token per call, fresh random routing per call, layers round-robin so the active
           experts come from DRAM; GB/s counts the bytes of the experts each call reads
  prefill  T tokens through one layer in one call; tokens/s
  read     the machine's read bandwidth with the same threads (streaming sum), same run
Figures are medians. kt-kernel is probed first in a child process, so an import error, a
missing backend or an illegal instruction is reported (and our side still runs).

kt-kernel's thread model: a pool of N threads computes while the thread that handed it the
forward busy-waits, so N computing threads keep N + 1 cores busy. Where cores are few that
costs it dearly, so besides N = --threads it is also timed with N - 1 (same number of busy
threads as ours), each through CPUInfer submit+sync and through MOE.forward called directly.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchlib import add_expert_args, timed  # noqa: E402
from quantdata import random_rows  # noqa: E402

from hybrid import _native  # noqa: E402
from hybrid.backends.experts import ExpertEngine  # noqa: E402
from hybrid.runtime.engine import Runtime  # noqa: E402

# GGML type ids of the activations kt-kernel can take in and give back (hidden_type).
_KT_HIDDEN = {"fp32": (0, torch.float32), "bf16": (30, torch.bfloat16)}
# Agreement bound per activation type. fp32 in/out computes what we compute (both quantize the
# activations to the weights' vec_dot type, Q8_K here): ~3e-7 per token, but now and then a Q8_K
# value rounds the other way, which this synthetic data's large activations blow up to ~4e-3 for
# that token: ~1e-4 over hundreds of tokens. bf16 rounds the output, and bf16-valued inputs (8
# significant bits) often land on Q8_K rounding ties, which ggml (scale -127/max) and we
# (1 / (amax/127)) break differently: ~5e-3, neither nearer a float64 reference.
_TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2}
# kt-kernel's pool threads spin 50 ms after their last job before sleeping: let them settle
# before the other engine or the bandwidth probe runs.
_SETTLE_S = 0.08


# -- kt-kernel ---------------------------------------------------------------------------------

def load_kt():
    """kt-kernel's native module for this CPU, chosen by its own detection code, without the
    package __init__. Raises ImportError / RuntimeError saying why not."""
    spec = importlib.util.find_spec("kt_kernel")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("kt-kernel is not installed (pip install --no-deps kt_kernel-*.whl)")
    detect_py = Path(list(spec.submodule_search_locations)[0]) / "_cpu_detect.py"
    dspec = importlib.util.spec_from_file_location("kt_kernel_cpu_detect", detect_py)
    detect = importlib.util.module_from_spec(dspec)
    dspec.loader.exec_module(detect)
    with quiet_stdout():
        ext, variant = detect.initialize()
    if not hasattr(ext, "moe") or not hasattr(ext.moe, "MOE"):
        raise RuntimeError(f"kt-kernel variant {variant} has no llamafile backend (kt_kernel_ext.moe.MOE)")
    return ext, variant


@contextlib.contextmanager
def quiet_stdout():
    """kt-kernel's C++ printf()s banners to fd 1; keep them out of the table (shown on error)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield
        except BaseException:
            os.dup2(saved, 1)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 1)
            os.close(saved)


class KtExperts:
    """kt-kernel llamafile MoE layers on one CPUInfer; `kt(layer, x, ids, weights) -> y`.

    `threads` is kt's subpool size: its dispatch thread computes as worker 0, plus threads - 1
    workers. The thread that hands it a forward (CPUInfer's queue thread, or the caller of
    MOE.forward) busy-waits meanwhile, so `threads` computing threads keep threads + 1 busy.
    """

    def __init__(self, ext, d_model: int, n_ff: int, n_experts: int, k: int, *, threads: int,
                 max_tokens: int, hidden: str = "fp32", m_block: int = 32):
        self.ext, self.D, self.K = ext, d_model, k
        self.hidden_type, self.dtype = _KT_HIDDEN[hidden]
        self.max_tokens = max_tokens
        if n_ff % m_block or d_model % m_block:
            raise ValueError(f"kt m_block {m_block} must divide F={n_ff} and D={d_model}")
        pool = ext.WorkerPoolConfig()
        pool.subpool_count = 1
        pool.subpool_numa_map = [0]
        pool.subpool_thread_count = [threads]
        with quiet_stdout():
            self.cpu_infer = ext.CPUInfer(pool)
        self.n_ff, self.n_experts, self.m_block = n_ff, n_experts, m_block
        self.gpu_mask = torch.zeros(n_experts, dtype=torch.bool)  # all experts on the CPU
        self.moes = []
        self.bsz = {}  # T -> int32 [1] tensor: kt reads the token count through a pointer
        self.out = torch.empty((max_tokens, d_model), dtype=self.dtype)  # [T, D]

    def add_layer(self, gate, gate_type, up, up_type, down, down_type) -> int:
        """Same byte layout as ours: gate/up [E*F, row] rows of D, down [E*D, row] rows of F.
        kt copies the bytes into its own buffers at load."""
        ext = self.ext
        cfg = ext.moe.MOEConfig(self.n_experts, self.K, self.D, self.n_ff, self.gpu_mask.data_ptr())
        cfg.layer_idx = len(self.moes)
        cfg.pool = self.cpu_infer.backend_
        cfg.m_block = self.m_block
        cfg.group_min_len = 10  # forward_one per token below this, grouped GEMM above
        cfg.max_len = cfg.group_max_len = self.max_tokens
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = gate.ctypes.data, up.ctypes.data, down.ctypes.data
        cfg.gate_type, cfg.up_type, cfg.down_type = int(gate_type), int(up_type), int(down_type)
        cfg.hidden_type = self.hidden_type
        with quiet_stdout():
            moe = ext.moe.MOE(cfg)
            self.cpu_infer.submit(moe.load_weights_task())
            self.cpu_infer.sync()
        self.moes.append(moe)
        return len(self.moes) - 1

    def args(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor):
        """forward / forward_task arguments for x [T, D] (self.dtype), ids [T, K] int64,
        weights [T, K] fp32, out [T, D] (self.dtype)."""
        T = x.shape[0]
        if T not in self.bsz:
            self.bsz[T] = torch.tensor([T], dtype=torch.int32)
        return (self.bsz[T].data_ptr(), self.K, ids.data_ptr(), weights.data_ptr(), x.data_ptr(),
                out.data_ptr(), False)

    def run(self, layer: int, args: tuple, direct: bool):
        """direct: call MOE.forward on this thread (which then busy-waits for kt's pool) instead
        of kt's usual CPUInfer.submit(forward_task) + sync (its queue thread busy-waits)."""
        if direct:
            self.moes[layer].forward(*args)
        else:
            self.cpu_infer.submit(self.moes[layer].forward_task(*args))
            self.cpu_infer.sync()

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 direct: bool = False) -> torch.Tensor:
        T = x.shape[0]
        if T > self.max_tokens:
            raise ValueError(f"x: {T} tokens exceed max_tokens {self.max_tokens}")
        x = x.to(self.dtype).contiguous()
        ids = ids.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
        self.run(layer, self.args(layer, x, ids, weights, self.out), direct)
        return self.out[:T].clone()

    def close(self):
        with quiet_stdout():
            self.moes = []
            self.cpu_infer = None


def kt_probe(hidden: str, threads: int) -> dict:
    """Child-process check: load kt-kernel, build a small Q4_K/Q6_K layer, run the decode and
    the grouped path, compare with ours. Prints one JSON line."""
    ext, variant = load_kt()
    rng = np.random.default_rng(1)
    E, D, F, K = 8, 512, 256, 4
    g, u = random_rows(QT.Q4_K, E * F, D, rng), random_rows(QT.Q4_K, E * F, D, rng)
    d = random_rows(QT.Q6_K, E * D, F, rng)
    kt = KtExperts(ext, D, F, E, K, threads=threads, max_tokens=32, hidden=hidden)
    kt.add_layer(g, QT.Q4_K, u, QT.Q4_K, d, QT.Q6_K)
    ours = ExpertEngine(D, max_tokens=32, max_k=K, threads=threads)
    layer = ours.add_layer(E, g, QT.Q4_K, u, QT.Q4_K, d, QT.Q6_K)
    errs = {}
    for T in (1, 16):
        x, ids, w = routed_inputs(rng, T, D, E, K)
        x = x.to(kt.dtype)
        errs[T] = rel_err(kt(0, x, ids, w), layer(x, ids, w))
    ours.close()
    kt.close()
    return {"variant": variant, "errs": errs}


def probe_kt_in_child(hidden: str, threads: int) -> tuple[dict | None, str]:
    """(probe result, '') or (None, why kt-kernel cannot run here)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--kt-probe", "--kt-hidden", hidden,
           "--threads", str(threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None, "the probe (small layer, 2 forwards) did not finish in 300 s"
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        hint = " (an instruction this CPU lacks)" if sig == "SIGILL" else ""
        forced = os.environ.get("KT_KERNEL_CPU_VARIANT")
        if forced:
            hint += f" with KT_KERNEL_CPU_VARIANT={forced}"
        tail = p.stderr.strip()[-500:]
        return None, f"the probe was killed by {sig}{hint}" + (f"; stderr: {tail}" if tail else "")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return None, f"the probe exited with {p.returncode}: {tail}"
    return json.loads(lines[-1]), ""


# -- shared ------------------------------------------------------------------------------------

def routed_inputs(rng, T, D, E, K):
    """x [T, D] fp32, ids [T, K] int64 (distinct experts per token), weights [T, K] fp32."""
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    ids = torch.from_numpy(rng.random((T, E)).argsort(axis=1)[:, :K].astype(np.int64))
    w = torch.from_numpy(rng.random((T, K)).astype(np.float32))
    return x, ids, w


def rel_err(y, ref) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_expert_args(ap)
    ap.add_argument("--types", default="Q4_K,Q4_K,Q6_K", help="gate,up,down GGML types")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--kt-threads", default=None,
                    help="kt-kernel pool sizes to time, comma-separated (default: THREADS and THREADS-1, "
                         "since kt's spinning control threads come on top of its pool)")
    ap.add_argument("--kt-hidden", choices=sorted(_KT_HIDDEN), default="fp32",
                    help="activation type handed to kt-kernel (its wrapper uses bf16); ours gets the same")
    ap.add_argument("--kt-m-block", type=int, default=32, help="kt decode row block (its wrapper: 32)")
    ap.add_argument("--kt-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.kt_probe:
        print(json.dumps(kt_probe(args.kt_hidden, args.threads)))
        return

    rng = np.random.default_rng(0)
    E, D, F, K, T_pre = args.experts, args.d, args.f, args.k, max(args.prefill, 1)
    types = [QT[t] for t in args.types.split(",")]
    if args.kt_threads:
        kt_threads = [int(t) for t in args.kt_threads.split(",")]
    else:
        kt_threads = [args.threads] + ([args.threads - 1] if args.threads > 1 else [])

    probe, why_not = probe_kt_in_child(args.kt_hidden, args.threads)
    pools = {}  # kt pool size -> KtExperts (each holds its own copy of the experts)
    if probe is None:
        print(f"kt-kernel: not run: {why_not}")
    elif max(probe["errs"].values()) > _TOLERANCE[args.kt_hidden]:
        why_not = f"small-layer probe disagrees with ours: relative error {max(probe['errs'].values()):.2e}"
        print(f"kt-kernel: not run: {why_not}")
    else:
        ext, variant = load_kt()
        for n in kt_threads:
            pools[n] = KtExperts(ext, D, F, E, K, threads=n, max_tokens=T_pre, hidden=args.kt_hidden,
                                 m_block=args.kt_m_block)

    ours = ExpertEngine(D, max_tokens=T_pre, max_k=K, threads=args.threads)
    layers, keep, per_expert = [], [], 0
    for _ in range(args.layers):
        g = random_rows(types[0], E * F, D, rng)
        u = random_rows(types[1], E * F, D, rng)
        d = random_rows(types[2], E * D, F, rng)
        per_expert = (g.nbytes + u.nbytes + d.nbytes) // E
        layers.append(ours.add_layer(E, g, types[0], u, types[1], d, types[2]))
        for kt in pools.values():
            kt.add_layer(g, types[0], u, types[1], d, types[2])
        keep.append((g, u, d))
    total = per_expert * E * args.layers
    bw_buf = np.ones(max(total, 256 << 20), np.uint8)
    print(f"isa {_native.isa()}; threads {args.threads}; {args.layers} layers x {E} experts "
          f"({'/'.join(t.name for t in types)}, D={D}, F={F}) = {total / 2**30:.2f} GiB per engine; K={K}; "
          f"{per_expert * K / 1e6:.1f} MB of experts per token per layer; median of {args.runs} runs")
    if pools:
        print(f"kt-kernel {_kt_version()}: variant {variant}, llamafile backend (kt_kernel_ext.moe.MOE), "
              f"activations {args.kt_hidden}, m_block {args.kt_m_block}, group_min_len 10, one subpool of "
              f"{' / '.join(map(str, pools))} threads (incl. its dispatch thread)")

    # kt configurations: pool size x call path
    configs = {}
    for n, kt in pools.items():
        configs[f"kt {n} thr, submit+sync"] = (kt, False)
        configs[f"kt {n} thr, MOE.forward"] = (kt, True)

    # -- agreement on the benchmark's own layers, decode and prefill shapes --
    act_dtype = _KT_HIDDEN[args.kt_hidden][1]
    if configs:
        checks = []
        for T in sorted({1, 3, T_pre}):
            x, ids, w = routed_inputs(rng, T, D, E, K)
            x = x.to(act_dtype)
            checks.append((T, x, ids, w, layers[T % len(layers)](x, ids, w)))
        worst_all = 0.0
        for name, (kt, direct) in configs.items():
            errs = {T: rel_err(kt(T % len(layers), x, ids, w, direct), ref) for T, x, ids, w, ref in checks}
            worst_all = max(worst_all, *errs.values())
            print(f"agreement {name}: ||y_kt - y_ours|| / ||y_ours|| = "
                  + ", ".join(f"{e:.1e} (T={T})" for T, e in errs.items()))
        ok = worst_all <= _TOLERANCE[args.kt_hidden]
        print(f"agreement: {'ok' if ok else 'DISAGREE'}: worst {worst_all:.1e}, bound "
              f"{_TOLERANCE[args.kt_hidden]:.0e} for {args.kt_hidden} activations")
        if not ok:
            why_not = (f"outputs disagree (relative error {worst_all:.2e}); timing two different "
                       "computations is meaningless")
            print(f"kt-kernel: not timed: {why_not}")
            configs = {}

    # -- timed runs --
    def decode_inputs():
        x, ids, w = routed_inputs(rng, args.steps, D, E, K)
        return x.to(act_dtype)[:, None], ids[:, None], w[:, None]  # [steps, 1, *]

    prefill_spin_us = ours._eng.spin_us

    def decode_ours():
        # the runtime's decode setting (Runtime.decode_spin_us): its workers spin through the
        # gaps between a step's jobs (kt's spin 50 ms). With the prefill default they sleep
        # and a 16-core Xeon paid 1.45 ms a layer-token in futex wake-ups (0.38 spinning).
        xs, ids, w = decode_inputs()
        ours._eng.spin_us = Runtime.decode_spin_us
        try:
            dt = timed(lambda: [layers[s % len(layers)](xs[s], ids[s], w[s]) for s in range(args.steps)])
        finally:
            ours._eng.spin_us = prefill_spin_us
        return args.steps * K * per_expert / dt

    def decode_kt(kt, direct):
        def run():
            xs, ids, w = decode_inputs()
            out = kt.out[:1]
            calls = [(s % len(layers), kt.args(s % len(layers), xs[s], ids[s], w[s], out))
                     for s in range(args.steps)]
            dt = timed(lambda: [kt.run(layer, a, direct) for layer, a in calls])
            return args.steps * K * per_expert / dt
        return run

    pre = routed_inputs(rng, T_pre, D, E, K)
    pre = (pre[0].to(act_dtype), pre[1], pre[2])

    def prefill_ours():
        return T_pre / timed(lambda: layers[0](*pre))

    def prefill_kt(kt, direct):
        def run():
            a = kt.args(0, *pre, kt.out)
            return T_pre / timed(lambda: kt.run(0, a, direct))
        return run

    def read_bw():
        return bw_buf.nbytes / timed(lambda: _native.stream_read(bw_buf, args.threads))

    engines = {f"hybrid {args.threads} thr": (decode_ours, prefill_ours)}
    for name, (kt, direct) in configs.items():
        engines[name] = (decode_kt(kt, direct), prefill_kt(kt, direct))
    names = list(engines)
    for dec_fn, pf_fn in engines.values():  # warm up: page in, fault in kt's copies
        dec_fn()
        if args.prefill > 1:
            pf_fn()
        time.sleep(_SETTLE_S)
    dec = {n: [] for n in names}
    pf = {n: [] for n in names}
    bw = []
    for r in range(args.runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            dec[n].append(engines[n][0]())
            time.sleep(_SETTLE_S)
        bw.append(read_bw())
        time.sleep(_SETTLE_S)
        if args.prefill > 1:
            for n in order:
                pf[n].append(engines[n][1]())
                time.sleep(_SETTLE_S)

    bw_gbs = statistics.median(bw) / 1e9
    d_gbs = {n: statistics.median(v) / 1e9 for n, v in dec.items()}
    p_tps = {n: statistics.median(v) if v else float("nan") for n, v in pf.items()}
    print(f"read bandwidth ({args.threads} threads, streaming sum): {bw_gbs:.2f} GB/s")
    ref = names[0]
    w = max(len(n) for n in names) + 2
    print(f"{'engine':{w}}{'decode GB/s':>12}{'of read bw':>11}{'ms/layer-tok':>13}{'hybrid/x':>9}"
          f"{f'prefill T={T_pre} tok/s':>22}{'hybrid/x':>9}")
    for n in names:
        print(f"{n:{w}}{d_gbs[n]:12.2f}{d_gbs[n] / bw_gbs:11.2f}{1e3 * per_expert * K / (d_gbs[n] * 1e9):13.2f}"
              f"{d_gbs[ref] / d_gbs[n]:9.2f}{p_tps[n]:22.0f}{p_tps[ref] / p_tps[n]:9.2f}")
    if not configs:
        print(f"kt-kernel: not run: {why_not}")
    for kt in pools.values():
        kt.close()
    ours.close()


def _kt_version() -> str:
    try:
        from importlib.metadata import version
        return version("kt-kernel")
    except Exception:
        return "(version unknown)"


if __name__ == "__main__":
    main()
