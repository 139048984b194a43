"""Declared tensor shapes: each architecture lists, from its ModelArgs, the GGML shape of every
tensor it reads (`Model.tensor_specs(args)`); the runtime checks a file against the list
before any weight is touched or any buffer is sized, as llama.cpp's loader does, and names
the tensor, the expected and the found shape.

Torch-free (as hybrid.models.args): the dry-run (placement) runs the same checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["COMPUTABLE_TYPES", "ModelConfigError", "TensorSpec", "blocks_present", "check_range", "check_tensors",
           "moe_layer", "transformer_specs"]


class ModelConfigError(ValueError):
    """GGUF metadata or tensors do not describe a model of the architecture we can run."""


def moe_layer(args, il: int) -> bool:
    """Layer il is an MoE block: the model has experts and il is past the leading dense ones."""
    return args.n_expert > 1 and il >= args.n_dense_lead


def check_range(source: str, key: str, value, lo: int, hi: int, why: str = "") -> int:
    """value as an int within lo..hi, else ModelConfigError naming the key (one line)."""
    try:
        v = int(value)
        ok = lo <= v <= hi and v == value
    except (TypeError, ValueError, OverflowError):
        v, ok = value, False
    if not ok:
        raise ModelConfigError(f"{source}: metadata {key} is {value!r}, expected {lo}..{hi}"
                               + (f" ({why})" if why else ""))
    return v


# GGML types the runtime computes: hybrid.backends.dequant handles each (on the CPU and the
# GPU), the native kernels a subset of them; the same set, spelled without importing torch
COMPUTABLE_TYPES = frozenset({0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23,
                              29, 30})
# F32 F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K IQ2_XXS IQ2_XS IQ3_XXS IQ1_S IQ4_NL
# IQ3_S IQ2_S IQ4_XS IQ1_M BF16


_BLK = re.compile(r"blk\.(\d+)\.")


def blocks_present(tensors) -> int:
    """1 + the highest N of the file's blk.N.* tensors (0 without any)."""
    top = -1
    for name in tensors:
        m = _BLK.match(name)
        if m:
            top = max(top, int(m.group(1)))
    return top + 1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple                 # GGML order (ne[0] = row length); None matches any size
    why: str = ""             # the metadata that fixes the shape, for the message
    required: bool = True
    types: frozenset | None = None   # GGML types allowed; None: any type the runtime computes


def _fmt(ne) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in ne) + "]"


def _padded(ne) -> tuple:
    """Trailing 1-sized dims do not count (a GGUF may store [D] or [D, 1])."""
    ne = list(ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return tuple(ne)


def _unused(name: str, n_layer: int) -> bool:
    """Tensors real files carry that no architecture here reads (llama.cpp skips them too):
    precomputed RoPE tables and the MTP / nextn blocks after the trunk."""
    m = _BLK.match(name)
    if m:
        return int(m.group(1)) >= n_layer
    return name.startswith(("rope_freqs", "rope_factors_", "token_types"))


def check_tensors(specs, tensors: dict, source: str, arch: str, n_layer: int | None = None) -> list:
    """Raise ModelConfigError (one line) at the first tensor that is missing, whose shape
    disagrees with the metadata or whose GGML type the runtime cannot compute; `tensors` maps
    names to objects with `ne` and `ggml_type` (duplicates and byte sizes are the header
    parser's: hybrid.gguf_file refuses a repeated name and derives each size from type and
    shape). Returns the names no spec declares (callers warn: real files carry extras),
    leaving out the known unused ones (RoPE tables, blocks >= n_layer)."""
    from hybrid.gguf_file import _type_name

    declared = set()
    for s in specs:
        declared.add(s.name)
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
        allowed = COMPUTABLE_TYPES if s.types is None else s.types
        gtype = getattr(t, "ggml_type", None)
        if gtype is not None and gtype not in allowed:
            names = ", ".join(sorted(_type_name(x) for x in allowed))
            raise ModelConfigError(
                f"{source}: tensor {s.name!r} has type {_type_name(gtype)}, expected one of "
                f"{names}; use a file quantized to one of these (e.g. Q4_K_M or Q8_0)")
    n = blocks_present(tensors) if n_layer is None else n_layer
    return [name for name in tensors if name not in declared and not _unused(name, n)]


def transformer_specs(a, arch: str, attention, *, ffn_norm: str = "ffn_norm",
                      shexp_ff: int | None = None, shexp_required: bool = False) -> list:
    """The specs every models.transformer.Transformer shares: embedding, output norm and head,
    and per layer its FFN norm and a dense FFN (feed_forward_length) or an MoE (router,
    optional selection bias, routed experts, optional shared expert of shexp_ff, optional
    shared-expert gate). attention(il) gives the layer's attention tensors as
    (name without 'blk.N.', ne, why, required) tuples."""
    D, V, E, F = a.dim, a.n_vocab, a.n_expert, a.n_ff_exp
    p = arch + "."
    specs = [TensorSpec("token_embd.weight", (D, V), f"{p}embedding_length and the vocabulary"),
             TensorSpec("output_norm.weight", (D,), f"{p}embedding_length"),
             TensorSpec("output.weight", (D, V), "the embedding", required=False)]
    for il in range(a.n_layer):
        b = f"blk.{il}."
        rows = list(attention(il)) + [(ffn_norm + ".weight", (D,), f"{p}embedding_length", True)]
        if not moe_layer(a, il):
            ff = f"{p}feed_forward_length"
            rows += [("ffn_gate.weight", (D, a.n_ff), ff, True), ("ffn_up.weight", (D, a.n_ff), ff, True),
                     ("ffn_down.weight", (a.n_ff, D), ff, True)]
        else:
            ex, sh = f"{p}expert_count and expert_feed_forward_length", f"{p}expert_shared_* keys"
            rows += [("ffn_gate_inp.weight", (D, E), f"{p}expert_count", True),
                     ("exp_probs_b.bias", (E,), f"{p}expert_count", False),
                     ("ffn_gate_exps.weight", (D, F, E), ex, True),
                     ("ffn_up_exps.weight", (D, F, E), ex, True),
                     ("ffn_down_exps.weight", (F, D, E), ex, True),
                     ("ffn_gate_shexp.weight", (D, shexp_ff), sh, shexp_required),
                     ("ffn_up_shexp.weight", (D, shexp_ff), sh, shexp_required),
                     ("ffn_down_shexp.weight", (shexp_ff, D), sh, shexp_required),
                     ("ffn_gate_inp_shexp.weight", (D,), f"{p}embedding_length", False)]
        specs += [TensorSpec(b + name, ne, why, req) for name, ne, why, req in rows]
    return specs
