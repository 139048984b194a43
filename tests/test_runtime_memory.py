"""The memory the runtime really uses on the CPU agrees with what the Plan predicted (issue 5):
RSS growth from loading a model and running every expert once, within 10% or 64 MiB."""

import gc

import numpy as np
import psutil

from hybrid.app.demo import _config
from hybrid.fixtures import build


def test_cpu_rss_growth_matches_the_plan(fixture_cache):
    # the demo model: 85M parameters, 53 MB of Q4_K_M, 32 experts per layer
    path = build(_config(), "Q4_K_M", fixture_cache)
    # The interpreter, torch and llama.cpp's libraries are the Plan's separate fixed
    # `runtime_overhead`, resident before any model is loaded: import them first.
    import llama_cpp  # noqa: F401
    import torch  # noqa: F401

    import hybrid.runtime.engine  # noqa: F401
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    with hybrid.load(path, device="cpu", threads=2, ctx=1024) as rt:
        predicted = rt.plan.predicted_cpu_rss_growth()
        # a prompt long enough that every expert of every layer is used at least once, so all
        # mapped expert pages are resident, as in a long-running session
        tokens = np.random.default_rng(0).integers(3, rt.n_vocab, 256).tolist()
        rt.logits(tokens)
        used = proc.memory_info().rss - before
    msg = f"RSS grew {used / 2**20:.1f} MiB, the Plan predicted {predicted / 2**20:.1f} MiB"
    print(msg)
    assert abs(used - predicted) <= max(0.1 * predicted, 64 << 20), msg
    assert predicted > 0
