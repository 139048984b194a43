"""What the benchmarks share. They run as scripts (`python bench/bench_x.py`), so this
folder is on sys.path and they import it as `benchlib`."""

from __future__ import annotations

import time

import numpy as np


def timed(fn) -> float:
    """Seconds one call of fn takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prompt_ids(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    """n random token ids, never the control tokens 0..2 (BOS/EOS/PAD of the fixture vocabulary)."""
    return np.random.default_rng(seed).integers(3, n_vocab, n).tolist()


def add_expert_args(ap) -> None:
    """The routed-expert set and run counts of the expert benchmarks: 64 experts of a
    2048 x 1024 layer, 6 active, several layers so nothing stays cached, 2 threads."""
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--f", type=int, default=1024)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--steps", type=int, default=40, help="decode calls per run")
