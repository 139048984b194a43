"""hybrid: CPU/GPU hybrid runtime for huge Mixture-of-Experts models stored as GGUF.

Importing the package is cheap (no torch, no native module); the runtime is loaded on
first use so that `placement` and `--dry-run` work on machines without torch.
"""

__version__ = "0.1.0"


def load(path, device="auto", threads=None, numa="off", ctx=4096, **kwargs):
    """Load a GGUF model for inference; see hybrid.engine.Runtime."""
    from hybrid.engine import load as _load

    return _load(path, device=device, threads=threads, numa=numa, ctx=ctx, **kwargs)


__all__ = ["__version__", "load"]
