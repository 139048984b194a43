"""Declared tensor shapes: each architecture lists, from its ModelArgs, the GGML shape of every
tensor it reads (`Model.tensor_specs(args)`); the runtime checks a file against the list
before any weight is touched or any buffer is sized, as llama.cpp's loader does, and names
the tensor, the expected and the found shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid.models.layers import ModelConfigError

__all__ = ["TensorSpec", "check_tensors", "transformer_specs"]


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


def transformer_specs(a, arch: str, attention, *, ffn_norm: str = "ffn_norm",
                      shexp_ff: int | None = None, shexp_required: bool = False) -> list:
    """The specs every models.transformer.Transformer shares: embedding, output norm and head,
    and per layer its FFN norm and a dense FFN (feed_forward_length) or an MoE (router,
    optional selection bias, routed experts, optional shared expert of shexp_ff, optional
    shared-expert gate). attention(il) gives the layer's attention tensors as
    (name without 'blk.N.', ne, why, required) tuples."""
    from hybrid.models.transformer import moe_layer

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
