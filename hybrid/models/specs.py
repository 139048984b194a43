"""Declared tensor shapes: each architecture lists, from its ModelArgs, the GGML shape of every
tensor it reads (`Model.tensor_specs(args)`); the runtime checks a file against the list
before any weight is touched or any buffer is sized, as llama.cpp's loader does, and names
the tensor, the expected and the found shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid.models.layers import ModelConfigError

__all__ = ["TensorSpec", "check_tensors"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple                 # GGML order (ne[0] = row length); None matches any size
    why: str = ""             # the metadata that fixes the shape, for the message
    required: bool = True


def _fmt(ne) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in ne) + "]"


def _padded(ne) -> tuple:
    """Trailing 1-sized dims do not count (a GGUF may store [D] or [D, 1])."""
    ne = list(ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return tuple(ne)


def check_tensors(specs, tensors: dict, source: str, arch: str) -> None:
    """Raise ModelConfigError (one line) at the first tensor that is missing or whose shape
    disagrees with the metadata; `tensors` maps names to objects with `ne`."""
    for s in specs:
        t = tensors.get(s.name)
        if t is None:
            if s.required:
                raise ModelConfigError(
                    f"{source}: tensor {s.name!r} is missing (expected shape {_fmt(s.ne)}); the "
                    f"file is not a complete {arch} model")
            continue
        want, got = _padded(s.ne), _padded(t.ne)
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            raise ModelConfigError(
                f"{source}: tensor {s.name!r} has shape {_fmt(t.ne)}, expected {_fmt(s.ne)}"
                + (f" from {s.why}" if s.why else "")
                + f"; the metadata and the tensors disagree (a damaged or mis-converted {arch} file)")
