"""Build tiny deepseek2 GGUF models (random weights with a trained model's routing and output
traits, small BPE vocab) and split GGUF files.

Used by the tests (tests/conftest.py caches the files per session) and by `hybrid-run --demo`.
Every file is written the way llama.cpp's converter writes DeepSeek-R1/V3, scaled down, so that
llama.cpp loads it and serves as the reference implementation for our runtime.

Shape legend (GGML order, ne[0] = contiguous row): D n_embd, V vocab, H heads, E experts,
F expert FFN, S shared experts, N nope head dim, R rope head dim, Vd value head dim,
Lq q_lora_rank, Lkv kv_lora_rank.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from hybrid.gguf_file import GGUFError, _parse_header

__all__ = [
    "TinyConfig",
    "build",
    "build_f32",
    "quantize",
    "split_gguf",
    "write_gguf",
    "tokenizer_vocab",
    "DEEPSEEK_R1_CHAT_TEMPLATE",
    "BOS",
    "EOS",
]

# Bump when the bytes a given (config, ftype) produces change, to invalidate caches.
BUILDER_VERSION = 2

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"

# DeepSeek-R1's chat template (tokenizer_config.json of deepseek-ai/DeepSeek-R1 after the
# 2025-02 update that opens the generation prompt with "<think>\n"). Raw string: the "\n"
# inside the Jinja string literals are Jinja escapes, as in the JSON original.
DEEPSEEK_R1_CHAT_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}"
    r"{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    r"{{bos_token}}{{ns.system_prompt}}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    r"{{'<｜User｜>' + message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    r" + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n'"
    r" + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    r"{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']"
    r" + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    r"{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    r"{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    r"{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)


@dataclass(frozen=True)
class TinyConfig:
    """A deepseek2 model small enough to build and run in a test (defaults: ~6 MB at Q4_K_M)."""

    n_merges: int = 300  # BPE merges learned from _BPE_TEXT; vocab = 3 + 256 + merges + 4
    n_embd: int = 256  # D; K-quants need row lengths % 256 == 0
    n_layer: int = 3
    n_dense: int = 1  # leading_dense_block_count
    ffn: int = 512  # dense FFN
    n_expert: int = 16
    n_expert_used: int = 4
    n_expert_shared: int = 1
    expert_ffn: int = 256
    n_group: int = 4  # expert_group_count (0 = key absent, no group routing)
    n_group_used: int = 2
    n_head: int = 4
    q_lora_rank: int = 128  # 0 -> attn_q instead of attn_q_a / attn_q_a_norm / attn_q_b
    kv_lora_rank: int = 64
    qk_nope: int = 32
    qk_rope: int = 16
    v_head: int = 32
    mla_split: bool = False  # False: attn_kv_b, no *_mla keys (early-2025 files); True: k_b/v_b
    yarn: bool = True
    yarn_factor: float = 4.0  # R1: 40 over 4096 original tokens; here context_length / 4
    yarn_log_multiplier: float = 0.1  # as the converter writes it (0.1 * mscale_all_dim)
    rope_freq_base: float = 10000.0
    gating: str = "sigmoid"  # "sigmoid" (2, with exp_probs_b bias) or "softmax" (1, no bias)
    expert_weights_norm: bool = True
    expert_weights_scale: float = 2.5
    rms_eps: float = 1e-6
    context_length: int = 4096
    seed: int = 0

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"TinyConfig.{field}={getattr(self, field)!r}: {why}")

        if self.n_embd % 32:
            bad("n_embd", "must be a multiple of 32 (a multiple of 256 for K-quants)")
        if not 0 <= self.n_dense <= self.n_layer:
            bad("n_dense", f"must be within 0..n_layer ({self.n_layer})")
        if not 0 < self.n_expert_used <= self.n_expert:
            bad("n_expert_used", f"must be within 1..n_expert ({self.n_expert})")
        if self.gating not in ("sigmoid", "softmax"):
            bad("gating", "must be 'sigmoid' or 'softmax'")
        if self.n_group:
            per_group = self.n_expert // self.n_group
            if self.n_group < 2 or self.n_expert % self.n_group or per_group < 2:
                bad("n_group", f"must be 0, or >= 2 and divide n_expert ({self.n_expert}) into groups of >= 2")
            if not 0 < self.n_group_used < self.n_group:
                bad("n_group_used", f"must be within 1..n_group-1 ({self.n_group - 1}) (llama.cpp asserts it)")
            if self.n_group_used * per_group < self.n_expert_used:
                bad("n_group_used", "the kept groups hold fewer experts than n_expert_used")
        for f in ("kv_lora_rank", "qk_nope", "qk_rope", "v_head", "n_head"):
            if getattr(self, f) <= 0:
                bad(f, "must be > 0")
        if self.qk_rope % 2:
            bad("qk_rope", "must be even (RoPE rotates pairs)")

    @classmethod
    def mid(cls, **overrides) -> TinyConfig:
        """~2 GB at Q4_K_M (2.8B routed-expert params): for benchmarks only, never tests."""
        kw = dict(
            n_embd=2048, n_layer=8, n_dense=1, ffn=4096, n_expert=64, n_expert_used=8,
            n_expert_shared=1, expert_ffn=1024, n_group=8, n_group_used=4, n_head=16,
            q_lora_rank=768, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128,
            context_length=8192,
        )
        kw.update(overrides)
        return cls(**kw)

    @property
    def vocab_size(self) -> int:
        return len(tokenizer_vocab(self.n_merges)[0])

    def n_params(self) -> int:
        return sum(int(np.prod(ne)) for _, ne in _tensor_shapes(self))


# ------------------------------------------------------------------------------------------
# GGUF writing (streaming: tensor data is produced and written one tensor at a time)

_VT = GGUFValueType
_SCALAR_FMT = {
    _VT.UINT8: "<B", _VT.INT8: "<b", _VT.UINT16: "<H", _VT.INT16: "<h", _VT.UINT32: "<I",
    _VT.INT32: "<i", _VT.FLOAT32: "<f", _VT.BOOL: "<?", _VT.UINT64: "<Q", _VT.INT64: "<q",
    _VT.FLOAT64: "<d",
}


def _str_bytes(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value_bytes(vtype: int, value, etype: int | None = None) -> bytes:
    if vtype == _VT.STRING:
        return _str_bytes(value)
    if vtype == _VT.ARRAY:
        head = struct.pack("<IQ", etype, len(value))
        if etype == _VT.STRING:
            return head + b"".join(_str_bytes(s) for s in value)
        return head + struct.pack("<" + _SCALAR_FMT[etype][1] * len(value), *value)
    return struct.pack(_SCALAR_FMT[vtype], value)


def encode_kv(key: str, vtype: int, value, etype: int | None = None) -> bytes:
    """One metadata entry in GGUF encoding (array: vtype ARRAY and the element type etype)."""
    return _str_bytes(key) + struct.pack("<I", vtype) + _value_bytes(vtype, value, etype)


def _n_bytes(ggml_type: int, ne) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if ne[0] % block:
        raise ValueError(f"row length {ne[0]} is not a multiple of the {GGMLQuantizationType(ggml_type).name} block {block}")
    return int(np.prod(ne, dtype=np.int64)) // block * size


def write_gguf(path, kv: bytes, n_kv: int, tensors, produce, *, alignment: int = 32) -> pathlib.Path:
    """Write a GGUF v3 file.

    kv: encoded metadata entries (see encode_kv), n_kv of them; include general.alignment
    yourself when it is not 32. tensors: list of (name, ggml_type, ne). produce(i) returns the
    bytes (or an iterable of buffers) of tensor i, called in order, so big models stream.
    produce=None writes the header only and extends the file sparsely to its full size (huge
    files for header tests, at no disk cost).
    """
    path = pathlib.Path(path)
    infos = []
    offset = 0
    sizes = []
    for name, gtype, ne in tensors:
        n = _n_bytes(gtype, ne)
        infos.append(_str_bytes(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, gtype, offset))
        sizes.append(n)
        offset += -(-n // alignment) * alignment
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), n_kv) + kv + b"".join(infos)
    header += b"\0" * (-len(header) % alignment)
    with open(path, "wb") as f:
        f.write(header)
        if produce is None:
            f.truncate(len(header) + offset)
            return path
        for i, n in enumerate(sizes):
            data = produce(i)
            chunks = [data] if isinstance(data, (bytes, bytearray, memoryview, np.ndarray)) else data
            written = 0
            for c in chunks:
                mv = memoryview(c).cast("B")
                f.write(mv)
                written += mv.nbytes
            if written != n:
                raise ValueError(f"{path}: tensor {tensors[i][0]!r}: produced {written} bytes, expected {n}")
            f.write(b"\0" * (-n % alignment))
    return path


# ------------------------------------------------------------------------------------------
# Tokenizer: GPT-2 byte-level BPE with a few hundred merges learned from the text below

_BPE_TEXT = """\
The quick brown fox jumps over the lazy dog. Hello, world! This is a small model that
knows very little, but it can still read and write every byte of English text. When the
weather is good we walk to the river and watch the boats; when it rains we stay at home,
read books, make tea and talk about the things we have seen. The engine reads the weights
from the file, the experts run on the processor and the attention runs on the graphics card.
What is the capital of France? The capital of France is Paris. How many legs does a spider
have? A spider has eight legs. Please think step by step, then answer the question in one
short sentence. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2025. The model thinks, then it answers.
"""
_PRETOKEN_RE = re.compile(r" ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+")


def _byte_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character map (space -> 'Ġ', newline -> 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out = [""] * 256
    extra = 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    b2u = _byte_to_unicode()
    words = Counter(
        tuple(b2u[b] for b in w.encode("utf-8")) for w in _PRETOKEN_RE.findall(_BPE_TEXT)
    )
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties by text
        merges.append(best)
        joined = best[0] + best[1]
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


_VOCAB_CACHE: dict[int, tuple] = {}


def tokenizer_vocab(n_merges: int):
    """(tokens, token_types, merges) of the fixture vocabulary.

    Ids: 0 BOS, 1 EOS, 2 PAD (control, as in DeepSeek-R1), 3..258 the 256 byte tokens,
    then one token per merge, then <think>, </think>, <｜User｜>, <｜Assistant｜> (user-defined).
    """
    if n_merges not in _VOCAB_CACHE:
        merges = _learn_merges(n_merges)
        tokens = [BOS, EOS, PAD, *_byte_to_unicode()]
        seen = set(tokens)
        for a, b in merges:
            if a + b not in seen:
                tokens.append(a + b)
                seen.add(a + b)
        n_normal = len(tokens) - 3
        tokens += [THINK, END_THINK, USER, ASSISTANT]
        types = [3, 3, 3] + [1] * n_normal + [4, 4, 4, 4]  # 1 normal, 3 control, 4 user-defined
        _VOCAB_CACHE[n_merges] = (tokens, types, [f"{a} {b}" for a, b in merges])
    return _VOCAB_CACHE[n_merges]


# ------------------------------------------------------------------------------------------
# The model


def _tensor_shapes(cfg: TinyConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ne) of every tensor, in file order, as llama.cpp's deepseek2 loader expects."""
    D, V, H = cfg.n_embd, cfg.vocab_size, cfg.n_head
    N, R, Vd = cfg.qk_nope, cfg.qk_rope, cfg.v_head
    Lq, Lkv, E, F = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.n_expert, cfg.expert_ffn
    FS = F * cfg.n_expert_shared
    out = [("token_embd.weight", (D, V))]
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        out.append((p + "attn_norm.weight", (D,)))
        if Lq:
            out += [
                (p + "attn_q_a.weight", (D, Lq)),
                (p + "attn_q_a_norm.weight", (Lq,)),
                (p + "attn_q_b.weight", (Lq, H * (N + R))),
            ]
        else:
            out.append((p + "attn_q.weight", (D, H * (N + R))))
        out += [
            (p + "attn_kv_a_mqa.weight", (D, Lkv + R)),
            (p + "attn_kv_a_norm.weight", (Lkv,)),
        ]
        if cfg.mla_split:
            out += [(p + "attn_k_b.weight", (N, Lkv, H)), (p + "attn_v_b.weight", (Lkv, Vd, H))]
        else:
            out.append((p + "attn_kv_b.weight", (Lkv, H * (N + Vd))))
        out += [(p + "attn_output.weight", (H * Vd, D)), (p + "ffn_norm.weight", (D,))]
        if i < cfg.n_dense:
            out += [
                (p + "ffn_gate.weight", (D, cfg.ffn)),
                (p + "ffn_up.weight", (D, cfg.ffn)),
                (p + "ffn_down.weight", (cfg.ffn, D)),
            ]
        else:
            out.append((p + "ffn_gate_inp.weight", (D, E)))
            if cfg.gating == "sigmoid":
                out.append((p + "exp_probs_b.bias", (E,)))
            out += [
                (p + "ffn_gate_exps.weight", (D, F, E)),
                (p + "ffn_up_exps.weight", (D, F, E)),
                (p + "ffn_down_exps.weight", (F, D, E)),
                (p + "ffn_gate_shexp.weight", (D, FS)),
                (p + "ffn_up_shexp.weight", (D, FS)),
                (p + "ffn_down_shexp.weight", (FS, D)),
            ]
    out += [("output_norm.weight", (D,)), ("output.weight", (D, V))]
    return out


def _rng(cfg: TinyConfig, name: str) -> np.random.Generator:
    # Per-tensor streams: the same seed gives the same weights whatever the layout options,
    # so e.g. mla_split=True and False describe the same network.
    return np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])


# Purely random weights make a poor reference model. Their router scores are i.i.d., so a
# token's 4th and 5th expert scores are often within 1e-3 of each other: llama.cpp's 8-bit
# activation rounding (or its f16 KV cache) flips the choice, and the flip cascades through
# the later layers and positions (min cosine 0.82 between llama.cpp on the Q8_0 and on the F32
# file). Their logits over ~560 tokens have near-tied maxima. A trained model has neither: its
# routing is decisive and mostly decided by the token itself (OpenMoE's "context-independent
# specialization"), and its next-token distribution has a clear winner at most positions.
# So the weights stay random except for these planted traits:
#   - each token's embedding = an identity part (random) + for every MoE layer a component of
#     _ROUTE_STRONG (+-15%) along the router direction of each of the K experts it prefers,
#     spread over n_group_used groups; half the tokens also carry a decoy expert (1.3x) in
#     another group whose other experts score low (-0.5x): group-limited routing must drop
#     the decoy, so the groups matter.
#   - router row = _ROUTER_GAIN * (its direction + _ROUTER_NOISE * random): chosen experts
#     score ~sigmoid(1.7), the others ~sigmoid(0 +- 0.5).
#   - the router directions are orthonormal; the identity part is orthogonal to them and the
#     blocks write only 1 - _WRITE_AWAY of their output into them (trained residual streams
#     keep features apart), so routing stays decisive across layers yet depends on context.
#   - output row of token w = _PEAK * unit(identity part of w's predecessor) + random: a
#     bigram table over a random cyclic order of the text tokens (special tokens, EOS among
#     them, and control bytes are never the planted winner: greedy replies have no control
#     characters and run until max_tokens).
#   - queries x _Q_GAIN (attention scores std ~2.6: peaked heads, so RoPE, YaRN and
#     kq_scale slips show) and routed expert outputs x _EXPERT_GAIN (the routed experts carry
#     most of the MoE output, as in DeepSeek's 8 routed x 2.5 vs one shared).
# Measured: routing margins >= 0.05 in probability (the two implementations differ by < 0.001),
# top-1 margins >= 2 standard deviations of the logits; zeroing the routed experts moves
# logits to a median cosine of 0.80 (softmax variant: 0.98), so they matter.
_ROUTE_STRONG = 12.0
_ROUTE_JITTER = 0.15
_DECOY = 1.3
_ROUTER_GAIN = 0.5
_ROUTER_NOISE = 0.2
_IDENTITY_STD = 2.0
_WRITE_AWAY = 0.9
_PEAK = 4.0
_Q_GAIN = 2.0
_EXPERT_GAIN = 2.0
_RESIDUAL_WRITES = ("attn_output.weight", "ffn_down.weight", "ffn_down_exps.weight",
                    "ffn_down_shexp.weight")


@dataclass(frozen=True)
class _Traits:
    router_dirs: dict[int, np.ndarray]  # MoE layer -> [E, D] orthonormal rows
    router_basis: np.ndarray  # [n_moe * E, D] all of them, orthonormal ([0, D] if they do not fit)
    identity: np.ndarray  # [V, D] the random part of each token's embedding
    embedding: np.ndarray  # [V, D] float32, token_embd
    succ: np.ndarray  # [V] the token each token's embedding predicts (output row peak)


def _traits(cfg: TinyConfig) -> _Traits:
    # Only fields that change the traits: layout options (mla_split, q_lora_rank, ...) share them.
    return _traits_of(cfg.seed, cfg.n_merges, cfg.n_embd, cfg.n_layer, cfg.n_dense, cfg.n_expert,
                      cfg.n_expert_used, cfg.n_group, cfg.n_group_used)


@functools.lru_cache(maxsize=4)
def _traits_of(seed, n_merges, D, n_layer, n_dense, E, K, G, Gu) -> _Traits:
    rng = np.random.default_rng([seed, zlib.crc32(b"traits")])
    tokens, types, _ = tokenizer_vocab(n_merges)
    V = len(tokens)
    moe = list(range(n_dense, n_layer))
    basis = rng.standard_normal((D, E * len(moe)))
    if E * len(moe) <= D:
        U = np.linalg.qr(basis)[0].T if moe else np.zeros((0, D))  # orthonormal rows
        kept_apart = U
    else:  # more directions than dims (no test config): nearly orthogonal, nothing kept apart
        U = (basis / np.linalg.norm(basis, axis=0)).T
        kept_apart = np.zeros((0, D))
    dirs = {il: U[j * E:(j + 1) * E] for j, il in enumerate(moe)}
    identity = _IDENTITY_STD * rng.standard_normal((V, D))
    identity -= (identity @ kept_apart.T) @ kept_apart
    emb = identity.copy()
    for il in moe:
        z = np.zeros((V, E))  # [V, E] each token's component along each router direction
        for t in range(V):
            if G > 1:
                per = E // G
                groups = rng.permutation(G)
                counts = [K // Gu + (i < K % Gu) for i in range(Gu)]
                chosen = np.concatenate([g * per + rng.permutation(per)[:c]
                                         for g, c in zip(groups[:Gu], counts)])
                if rng.random() < 0.5:  # a decoy: one fitting expert in a group that does not fit
                    g = groups[Gu + rng.integers(G - Gu)]
                    z[t, g * per:(g + 1) * per] = -0.5 * _ROUTE_STRONG
                    z[t, g * per + rng.integers(per)] = _DECOY * _ROUTE_STRONG
            else:
                chosen = rng.permutation(E)[:K]
            z[t, chosen] = _ROUTE_STRONG * rng.uniform(1 - _ROUTE_JITTER, 1 + _ROUTE_JITTER, K)
        emb += z @ dirs[il]
    # Byte tokens sit at ids 3 + byte; control bytes are never predicted.
    control = {3 + b for b in [*range(9), *range(11, 32), 127]}
    text = np.array([i for i, ty in enumerate(types) if ty == 1 and i not in control])
    succ = np.empty(V, dtype=np.int64)
    order = rng.permutation(text)
    succ[order] = np.roll(order, -1)  # one cycle: greedy text repeats only after all of it
    rest = np.setdiff1d(np.arange(V), text)
    succ[rest] = rng.choice(text, len(rest))
    return _Traits(dirs, kept_apart, identity, emb.astype(np.float32), succ)


def _weights(cfg: TinyConfig, name: str, ne: tuple[int, ...]) -> np.ndarray:
    """float32 weights in numpy order (reversed ne): random, scaled so activations stay O(1),
    with the traits of a trained model described above."""
    shape = tuple(reversed(ne))
    if name.endswith("_norm.weight"):
        return (1.0 + 0.1 * _rng(cfg, name).standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith("exp_probs_b.bias"):
        return (0.05 * _rng(cfg, name).standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
        # Split from attn_kv_b [H*(N+Vd), Lkv] exactly as llama.cpp's converter does.
        kv_b_name = name.rsplit(".", 2)[0] + ".attn_kv_b.weight"
        H, N, Vd, Lkv = cfg.n_head, cfg.qk_nope, cfg.v_head, cfg.kv_lora_rank
        kv_b = _weights(cfg, kv_b_name, (Lkv, H * (N + Vd))).reshape(H, N + Vd, Lkv)
        if name.endswith("attn_k_b.weight"):
            return np.ascontiguousarray(kv_b[:, :N, :].transpose(0, 2, 1))  # [H, Lkv, N]
        return np.ascontiguousarray(kv_b[:, N:, :])  # [H, Vd, Lkv]
    tr = _traits(cfg)
    if name == "token_embd.weight":
        return tr.embedding.copy()
    fan_in = ne[0]
    w = _rng(cfg, name).standard_normal(shape, dtype=np.float32)
    w *= np.float32(fan_in**-0.5)  # in place: stays float32 (float32 * float64 scalar would promote)
    if name.endswith("ffn_gate_inp.weight"):  # [E, D]
        il = int(name.split(".")[1])
        return (_ROUTER_GAIN * (tr.router_dirs[il] + _ROUTER_NOISE * w)).astype(np.float32)
    if name == "output.weight":  # [V, D]
        unit = tr.identity / np.linalg.norm(tr.identity, axis=1, keepdims=True)
        np.add.at(w, tr.succ, (_PEAK * unit).astype(np.float32))
    elif name.endswith(("attn_q_b.weight", "attn_q.weight")):
        w *= np.float32(_Q_GAIN)
    elif name.endswith(_RESIDUAL_WRITES):  # [..., D, in]: keep writes out of the router subspace
        if name.endswith("ffn_down_exps.weight"):
            w *= np.float32(_EXPERT_GAIN)
        U = tr.router_basis.astype(np.float32)  # [n_dir, D]
        for m in w.reshape(-1, *w.shape[-2:]):  # per expert: small temporaries
            m -= np.float32(_WRITE_AWAY) * (U.T @ (U @ m))
    return w


def _metadata(cfg: TinyConfig, file_type: int) -> tuple[bytes, int]:
    a = "deepseek2."
    tokens, types, merges = tokenizer_vocab(cfg.n_merges)
    u32, f32, b, s, arr = _VT.UINT32, _VT.FLOAT32, _VT.BOOL, _VT.STRING, _VT.ARRAY
    if cfg.mla_split:
        heads_kv, k_len, v_len = 1, cfg.kv_lora_rank + cfg.qk_rope, cfg.kv_lora_rank
    else:
        heads_kv, k_len, v_len = cfg.n_head, cfg.qk_nope + cfg.qk_rope, cfg.v_head
    kv = [
        ("general.architecture", s, "deepseek2"),
        ("general.name", s, "tiny-deepseek2"),
        ("general.file_type", u32, file_type),
        ("general.quantization_version", u32, 2),
        (a + "context_length", u32, cfg.context_length),
        (a + "embedding_length", u32, cfg.n_embd),
        (a + "block_count", u32, cfg.n_layer),
        (a + "feed_forward_length", u32, cfg.ffn),
        (a + "attention.head_count", u32, cfg.n_head),
        (a + "attention.head_count_kv", u32, heads_kv),
        (a + "attention.key_length", u32, k_len),
        (a + "attention.value_length", u32, v_len),
    ]
    if cfg.mla_split:
        kv += [
            (a + "attention.key_length_mla", u32, cfg.qk_nope + cfg.qk_rope),
            (a + "attention.value_length_mla", u32, cfg.v_head),
        ]
    kv += [
        (a + "rope.freq_base", f32, cfg.rope_freq_base),
        (a + "attention.layer_norm_rms_epsilon", f32, cfg.rms_eps),
        (a + "expert_used_count", u32, cfg.n_expert_used),
    ]
    if cfg.n_group:
        kv += [
            (a + "expert_group_count", u32, cfg.n_group),
            (a + "expert_group_used_count", u32, cfg.n_group_used),
        ]
    kv += [
        (a + "leading_dense_block_count", u32, cfg.n_dense),
        (a + "vocab_size", u32, len(tokens)),
        (a + "attention.q_lora_rank", u32, cfg.q_lora_rank),
        (a + "attention.kv_lora_rank", u32, cfg.kv_lora_rank),
        (a + "expert_feed_forward_length", u32, cfg.expert_ffn),
        (a + "expert_count", u32, cfg.n_expert),
        (a + "expert_shared_count", u32, cfg.n_expert_shared),
        (a + "expert_weights_scale", f32, cfg.expert_weights_scale),
        (a + "expert_weights_norm", b, cfg.expert_weights_norm),
        (a + "expert_gating_func", u32, 2 if cfg.gating == "sigmoid" else 1),
        (a + "rope.dimension_count", u32, cfg.qk_rope),
    ]
    if cfg.yarn:
        kv += [
            (a + "rope.scaling.type", s, "yarn"),
            (a + "rope.scaling.factor", f32, cfg.yarn_factor),
            (a + "rope.scaling.original_context_length", u32, int(cfg.context_length / cfg.yarn_factor)),
            (a + "rope.scaling.yarn_log_multiplier", f32, cfg.yarn_log_multiplier),
        ]
    kv += [
        ("tokenizer.ggml.model", s, "gpt2"),
        ("tokenizer.ggml.pre", s, "deepseek-v3"),
        ("tokenizer.ggml.tokens", arr, tokens, s),
        ("tokenizer.ggml.token_type", arr, types, _VT.INT32),
        ("tokenizer.ggml.merges", arr, merges, s),
        ("tokenizer.ggml.bos_token_id", u32, tokens.index(BOS)),
        ("tokenizer.ggml.eos_token_id", u32, tokens.index(EOS)),
        ("tokenizer.ggml.padding_token_id", u32, tokens.index(PAD)),
        ("tokenizer.ggml.add_bos_token", b, True),
        ("tokenizer.ggml.add_eos_token", b, False),
        ("tokenizer.chat_template", s, DEEPSEEK_R1_CHAT_TEMPLATE),
    ]
    blob = b"".join(encode_kv(*e) for e in kv)
    return blob, len(kv)


# Matrices are written as F16 (llama.cpp file type 1) instead of F32 above this many
# parameters, so that the `mid` benchmark model's source file stays ~6 GB instead of ~12 GB.
_F16_ABOVE_PARAMS = 256 << 20


def build_f32(path, cfg: TinyConfig) -> pathlib.Path:
    """Write cfg as an unquantized GGUF: F32 (F16 matrices for models above ~270M params;
    norms, router and biases stay F32 as in the public files). Returns path."""
    shapes = _tensor_shapes(cfg)
    big = cfg.n_params() > _F16_ABOVE_PARAMS
    tensors = []
    for name, ne in shapes:
        keep_f32 = len(ne) == 1 or "ffn_gate_inp" in name or not big
        tensors.append((name, int(GGMLQuantizationType.F32 if keep_f32 else GGMLQuantizationType.F16), ne))
    kv, n_kv = _metadata(cfg, file_type=1 if big else 0)

    def produce(i):
        name, gtype, ne = tensors[i]
        w = _weights(cfg, name, ne)
        return w if gtype == GGMLQuantizationType.F32 else w.astype(np.float16)

    return write_gguf(path, kv, n_kv, tensors, produce)


def _llama_ftype(ftype: str) -> int:
    import llama_cpp

    name = {"F32": "LLAMA_FTYPE_ALL_F32"}.get(ftype.upper(), f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    if not hasattr(llama_cpp, name):
        known = sorted(n[len("LLAMA_FTYPE_MOSTLY_"):] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ValueError(f"unknown quantization type {ftype!r}; llama.cpp knows: {', '.join(known)}")
    return getattr(llama_cpp, name)


def quantize(src, dst, ftype: str, *, threads: int | None = None, verbose: bool = False) -> pathlib.Path:
    """Quantize src into dst with llama.cpp (e.g. "Q4_K_M", "Q8_0", "Q6_K", "F16")."""
    import ctypes
    import logging

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _llama_ftype(ftype)
    params.nthread = threads or os.cpu_count() or 1
    # llama-cpp-python prints llama.cpp's log through this logger; the quantizer's per-tensor
    # chatter (which also cuts UTF-8 metadata mid-character) is noise unless asked for.
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    if not verbose:
        log.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if rc != 0:
        raise RuntimeError(f"llama.cpp failed to quantize {src} to {ftype} (return code {rc}); see its log above")
    return pathlib.Path(dst)


def _cache_key(cfg: TinyConfig, ftype: str) -> str:
    blob = json.dumps([BUILDER_VERSION, ftype.upper(), dataclasses.asdict(cfg)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build(cfg: TinyConfig, ftype: str, cache_dir) -> pathlib.Path:
    """Path of cfg quantized to ftype under cache_dir, building it if it is not there yet.

    Files are named by a hash of (cfg, ftype, BUILDER_VERSION) and written under a temporary
    name then renamed, so concurrent builders never see half a file.
    """
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    ftype = ftype.upper()
    dst = cache_dir / f"tiny-deepseek2-{_cache_key(cfg, ftype)}-{ftype}.gguf"
    if dst.exists():
        return dst
    if ftype == "F32" or (ftype == "F16" and cfg.n_params() > _F16_ABOVE_PARAMS):
        # build_f32 writes exactly this file type
        src = dst
        keep_src = True
    else:
        src = build(cfg, "F16" if cfg.n_params() > _F16_ABOVE_PARAMS else "F32", cache_dir)
        keep_src = src.stat().st_size < (256 << 20)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        if src == dst:
            build_f32(tmp, cfg)
        else:
            quantize(src, tmp, ftype)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    if not keep_src:
        src.unlink(missing_ok=True)
    return dst


# ------------------------------------------------------------------------------------------
# Splitting, gguf-split style


def split_gguf(src, out_prefix, n_parts: int) -> list[pathlib.Path]:
    """Split a single GGUF into n_parts files "{out_prefix}-0000i-of-0000n.gguf" the way
    llama.cpp's gguf-split does: part 0 keeps all metadata, every part gets split.no (u16,
    0-based), split.count (u16) and split.tensors.count (i32) and a contiguous run of tensors
    (balanced by bytes). Returns the part paths in order."""
    src = pathlib.Path(src)
    h = _parse_header(src)
    if "split.count" in h.metadata:
        raise ValueError(f"{src}: already part of a split set; split the merged file instead")
    n_t = len(h.tensors)
    if not 1 <= n_parts <= n_t:
        raise ValueError(f"n_parts={n_parts}: must be within 1..{n_t} (the number of tensors)")
    # Contiguous runs balanced by bytes, each part at least one tensor.
    ends = np.cumsum([t.n_bytes for t in h.tensors])
    cuts = [0]
    for p in range(1, n_parts):
        c = int(np.searchsorted(ends, ends[-1] * p / n_parts)) + 1
        cuts.append(min(max(c, cuts[-1] + 1), n_t - (n_parts - p)))
    cuts.append(n_t)
    groups = [h.tensors[a:b] for a, b in zip(cuts, cuts[1:])]
    kv_src = _raw_kv(src, h)
    out_prefix = pathlib.Path(out_prefix)
    paths = []
    with open(src, "rb") as sf:
        for p, group in enumerate(groups):
            split_kv = (
                encode_kv("split.no", _VT.UINT16, p)
                + encode_kv("split.count", _VT.UINT16, n_parts)
                + encode_kv("split.tensors.count", _VT.INT32, n_t)
            )
            if p == 0:
                kv, n_kv, alignment = kv_src + split_kv, len(h.metadata) + 3, h.alignment
            else:
                kv, n_kv, alignment = split_kv, 3, 32
            path = out_prefix.with_name(f"{out_prefix.name}-{p + 1:05d}-of-{n_parts:05d}.gguf")
            tensors = [(t.name, t.ggml_type, t.ne) for t in group]

            def produce(i, group=group, sf=sf):
                t = group[i]
                sf.seek(t.offset)
                return _chunks(sf, t.n_bytes)

            write_gguf(path, kv, n_kv, tensors, produce, alignment=alignment)
            paths.append(path)
    return paths


def _chunks(f, n: int, chunk: int = 64 << 20):
    while n:
        b = f.read(min(chunk, n))
        if not b:
            raise GGUFError(f"{f.name}: unexpected end of file while copying tensor data")
        yield b
        n -= len(b)


def _raw_kv(path: pathlib.Path, h) -> bytes:
    """The metadata section of a parsed file, byte for byte (types preserved exactly)."""
    with open(path, "rb") as f:
        f.seek(h.kv_start)
        return f.read(h.kv_end - h.kv_start)
