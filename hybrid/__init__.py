"""hybrid: CPU/GPU hybrid runtime for huge Mixture-of-Experts models stored as GGUF.

Importing the package is cheap (no torch, no native module); the runtime is loaded on
first use so that `placement` and `--dry-run` work on machines without torch.
"""

import os

# torch's OpenMP workers spin for a long while after every CPU op by default; between layers
# they then take the cores the expert engine's workers need (20x slower decode measured on 2
# cores). Passive waiting must be chosen before the OpenMP runtime starts, i.e. before torch
# is imported: import hybrid first, or set OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def load(path, device="auto", threads=None, numa="off", ctx=4096, **kwargs):
    """Load a GGUF model for inference; see hybrid.runtime.engine.Runtime."""
    from hybrid.runtime.engine import load as _load

    return _load(path, device=device, threads=threads, numa=numa, ctx=ctx, **kwargs)


__all__ = ["__version__", "load"]
