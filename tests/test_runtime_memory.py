"""The memory the runtime really uses on the CPU agrees with what the Plan predicted (issue 5).

One model's RSS growth mixes what the Plan predicts with fixed costs it leaves out on purpose
(lazily mapped library pages, thread stacks, allocator arenas: ~30 MiB here, whatever the
model). On the demo model (45 MiB of experts) that is +40% over the Plan, so a bound on one
model cannot tell a hidden copy of the experts from those costs. So: the same model with 32
and with 128 experts per layer, each loaded and run in a fresh interpreter; the fixed costs
cancel in the difference, which must be the Plan's difference (134 MiB, measured within
±4 MiB). A hidden copy of 10% of the expert bytes adds 13 MiB to it.
"""

import dataclasses
import json
import subprocess
import sys

from hybrid.app.demo import _config
from hybrid.fixtures import build
from subproc import NEUTRAL_CWD, hybrid_env

MEASURE = r"""
import ctypes, gc, json, sys
import numpy as np
# the interpreter, torch and llama.cpp's libraries are the Plan's separate fixed
# `runtime_overhead`, resident before any model is loaded: import them first
import llama_cpp, psutil, torch
import hybrid, hybrid.runtime.engine
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
proc = psutil.Process()
before = proc.memory_info().rss
with hybrid.load(sys.argv[1], device="cpu", threads=2, ctx=1024) as rt:
    # measured after the forward has returned (and trimmed below): its activations, the
    # workspace sized for a whole prefill chunk (here the plan's 1024 tokens), are gone
    predicted = rt.plan.predicted_cpu_rss_after_forward()
    experts = rt.plan.devices["cpu"].breakdown["routed_experts"]
    # a prompt long enough that every expert of every layer is used at least once, so all
    # mapped expert pages are resident, as in a long-running session
    tokens = np.random.default_rng(0).integers(3, rt.n_vocab, 256).tolist()
    rt.logits(tokens)
    # what the runtime holds, not heap pages the prompt's activations freed but glibc kept
    # (their size depends on how the threads interleaved: the CI saw 7-20 MiB of it)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    used = proc.memory_info().rss - before
print(json.dumps({"used": used, "predicted": predicted, "experts": experts}))
"""


def _measure_once(path) -> dict:
    # one malloc arena: how many arenas the threads touch (each a few MiB resident) depends on
    # how they interleave, i.e. on the machine's load; the CI saw +10 MiB from it once
    r = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True,
                       env=hybrid_env(MALLOC_ARENA_MAX="1"), cwd=NEUTRAL_CWD, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _measure(path) -> dict:
    """The smallest of three runs: what the runtime needs; noise (readahead, arenas) only adds."""
    return min((_measure_once(path) for _ in range(3)), key=lambda m: m["used"])


def test_cpu_rss_growth_matches_the_plan(fixture_cache):
    small = _config()   # the demo model: 85M parameters, 32 experts per layer
    large = dataclasses.replace(small, n_expert=128)   # 311M parameters, ~4x the expert bytes
    a, b = (_measure(build(cfg, "Q4_K_M", fixture_cache)) for cfg in (small, large))
    MiB = 2**20
    used, predicted = b["used"] - a["used"], b["predicted"] - a["predicted"]
    msg = (f"RSS grew {a['used'] / MiB:.1f} / {b['used'] / MiB:.1f} MiB with 32 / 128 experts, the "
           f"Plan predicted {a['predicted'] / MiB:.1f} / {b['predicted'] / MiB:.1f} MiB: "
           f"difference {used / MiB:.1f} MiB, predicted {predicted / MiB:.1f} MiB")
    print(msg)
    # the difference is the routed experts' (and the routers') bytes: the prediction scales
    assert b["experts"] - a["experts"] >= 0.95 * predicted > 0, msg
    assert abs(used - predicted) <= 0.05 * predicted, msg
    # and each model's own growth: the Plan plus fixed costs of the order above, never less
    for m in (a, b):
        assert m["predicted"] <= m["used"] <= m["predicted"] + 64 * MiB, msg
