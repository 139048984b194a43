"""Tensor inventory of a model: every tensor's role, layer, GGML type and bytes, from a GGUF header or a preset.

Reads only headers (hybrid.gguf_file), never tensor data, so a 400 GB model is inventoried in
well under a second. Presets (placement.presets) rebuild the inventory of well-known files from
the architecture numbers and the quantizer's type rules.
"""

import os
import re
from collections import Counter
from dataclasses import dataclass, field

from placement import ggml

SUPPORTED_ARCHITECTURES = ("deepseek2", "glm4moe", "llama", "qwen2moe", "qwen3moe")
# attention kind per architecture: "mla" keeps a latent KV cache, "gqa" K and V per KV head
ATTENTION_KIND = {"deepseek2": "mla", "glm4moe": "gqa", "llama": "gqa", "qwen2moe": "gqa", "qwen3moe": "gqa"}

# role of a tensor: what it does in the model, which decides where it may live.
# "mtp": the multi-token-prediction (nextn) blocks that llama.cpp loads but never runs for
# generation (TENSOR_SKIP); their bytes are in the file but no token reads them, so they are
# planned nowhere: the pages stay unread in the mmap, as in llama.cpp.
ROLES = (
    "embedding", "attention", "norm", "router", "dense_ffn", "shared_expert",
    "routed_experts", "output", "mtp", "other",
)
# the MLA up-projections; the runtime splits/absorbs them at load, so it needs them dequantized
KV_B_STEMS = ("attn_kv_b", "attn_k_b", "attn_v_b")


class InventoryError(ValueError):
    pass


def _stem(name: str) -> str:
    """'blk.3.ffn_up_exps.weight' -> 'ffn_up_exps'; 'output_norm.weight' -> 'output_norm'."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) >= 3:
        parts = parts[2:]
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return ".".join(parts)


def tensor_layer(name: str):
    """Layer number of a 'blk.N.' tensor, else None."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1])
    return None


# early Mixtral GGUFs store each expert as its own 2-D tensor: blk.N.ffn_gate.E.weight
_PER_EXPERT = re.compile(r"ffn_(gate|up|down)\.\d+$")


def tensor_role(name: str, n_layer: int = None) -> str:
    """Role of tensor `name`; with `n_layer` (blocks run per token), blocks past it are "mtp".

    qwen2moe's `ffn_gate_inp_shexp` (a [D] vector: sigmoid(x . w) scales the shared expert's
    output) is part of the shared expert, not a router: it selects nothing, exists only with the
    shared expert and is read exactly when it is, so it goes where that branch goes.
    q/k/v biases (qwen2moe, glm4moe) stay with their projections: "attention".
    """
    layer = tensor_layer(name)
    if ".nextn." in name or (n_layer is not None and layer is not None and layer >= n_layer):
        return "mtp"
    s = _stem(name)
    if s == "token_embd":
        return "embedding"
    if s == "output":
        return "output"
    if s.endswith("_norm"):
        return "norm"
    if s in ("ffn_gate_inp", "exp_probs_b"):
        return "router"
    if s.endswith("_exps") or _PER_EXPERT.match(s):
        return "routed_experts"
    if s.endswith("_shexp"):
        return "shared_expert"
    if s in ("ffn_gate", "ffn_up", "ffn_down"):
        return "dense_ffn"
    if s.startswith("attn_"):
        return "attention"
    return "other"


def tensor_group(name: str, role: str = None) -> str:
    """Key into Plan.tensor_placement: the role, with the MLA up-projections split out."""
    role = role or tensor_role(name)
    if role == "attention" and _stem(name) in KV_B_STEMS:
        return "attention.kv_b"
    return role


@dataclass(frozen=True)
class Tensor:
    name: str
    role: str
    layer: object          # int or None
    ggml_type: int
    ne: tuple              # GGML order, ne[0] = row length
    n_bytes: int

    @property
    def type_name(self) -> str:
        return ggml.type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        return ggml.n_elements(self.ne)

    @property
    def group(self) -> str:
        return tensor_group(self.name, self.role)


@dataclass
class ModelInfo:
    """The architecture numbers the solver needs (GGUF meaning; MLA fields are 0 for GQA models).

    n_layer counts the blocks a token runs through: GGUF's block_count less the MTP (nextn)
    blocks appended after the trunk (`nextn_predict_layers`, glm4moe and newer deepseek2
    converters), which llama.cpp skips and hybrid does not load either (n_nextn of them).
    """
    architecture: str
    name: str
    n_layer: int
    n_dense_lead: int
    n_embd: int
    n_vocab: int
    n_head: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_rope_dim: int
    qk_nope_dim: int
    v_head_dim: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    expert_ff: int
    dense_ff: int
    context_length: int
    attention: str = "mla"     # mla | gqa (ATTENTION_KIND)
    n_head_kv: int = 0         # GQA only (0 for MLA): KV heads and their K / V widths
    head_dim_k: int = 0        #   (attention.key_length / value_length, default D / H)
    head_dim_v: int = 0
    shared_ff: int = 0         # FFN width of the shared expert(s) together, 0 without
    n_nextn: int = 0

    @property
    def n_block(self) -> int:
        """Blocks in the file (GGUF block_count)."""
        return self.n_layer + self.n_nextn

    @property
    def kv_values_per_token(self) -> int:
        """Cached values per token over all layers that run.

        MLA: the latent (kv_lora_rank) plus the shared rope key per layer.
        GQA: K and V of every KV head per layer.
        """
        if self.attention == "mla":
            return self.n_layer * (self.kv_lora_rank + self.qk_rope_dim)
        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token in bf16 (the solver scales by the planned cache dtype)."""
        return self.kv_values_per_token * 2

    @property
    def attn_width(self) -> int:
        """Widest per-token attention intermediate: the absorbed MLA query and output in latent
        space (H x latent each), or the GQA query, key and value projections."""
        if self.attention == "mla":
            return 2 * self.n_head * (self.kv_lora_rank + self.qk_rope_dim)
        return self.n_head * self.head_dim_k + self.n_head_kv * (self.head_dim_k + self.head_dim_v)

    def attn_expansion_per_position(self, tokens: int) -> int:
        """Values a chunk of `tokens` queries expands per cached position: MLA chunks long
        enough to attend decompressed (hybrid.models.args.mla_decompress_min_tokens) hold one
        group of heads' K (nope + rope) and V (mla_expand_heads of them) over the whole context
        at once; 0 otherwise."""
        if self.attention != "mla":
            return 0
        from hybrid.models.args import mla_decompress_min_tokens, mla_expand_heads  # torch-free

        if tokens < mla_decompress_min_tokens(self.kv_lora_rank, self.qk_nope_dim, self.v_head_dim):
            return 0
        return mla_expand_heads(self.n_head) * (self.qk_nope_dim + self.qk_rope_dim + self.v_head_dim)

    @property
    def attn_flops_per_position(self) -> int:
        """FLOPs one query spends on one cached position in one layer (scores and weighted
        sum over all heads); absorbed MLA works in the latent space."""
        if self.attention == "mla":
            return 4 * self.n_head * (self.kv_lora_rank + self.qk_rope_dim)
        return 2 * self.n_head * (self.head_dim_k + self.head_dim_v)

    def prefill_attn_flops_per_position(self, tokens: int) -> tuple:
        """(attention, expansion): FLOPs per query and cached position in one layer when a chunk
        of `tokens` queries attends. MLA chunks that attend decompressed (as
        attn_expansion_per_position) score and weigh per head in its own dims, not the latent
        space, and first expand every cached position's K / V for all heads (kv_b: latent ->
        H x (nope + v)) once per chunk; others as attn_flops_per_position, nothing to expand."""
        if not self.attn_expansion_per_position(tokens):
            return self.attn_flops_per_position, 0.0
        H, N, R, V = self.n_head, self.qk_nope_dim, self.qk_rope_dim, self.v_head_dim
        return 2 * H * (N + R + V), 2 * self.kv_lora_rank * H * (N + V) / max(1, tokens)

    @property
    def moe_layers(self) -> list:
        return [i for i in range(self.n_dense_lead, self.n_layer)] if self.n_expert > 1 else []

    @classmethod
    def from_hparams(cls, arch: str, get, *, name: str, n_vocab: int, where: str) -> "ModelInfo":
        """`get(key, default)` reads GGUF metadata keys without the 'arch.' prefix."""
        if arch not in SUPPORTED_ARCHITECTURES:
            raise InventoryError(
                f"{where}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        missing = object()

        def need(key):
            v = get(key, missing)
            if v is missing:
                raise InventoryError(f"{where}: metadata key '{arch}.{key}' is missing")
            return int(v)

        def opt(key, default=0):
            v = get(key, None)
            return default if v is None else int(v)

        n_block = need("block_count")
        n_nextn = opt("nextn_predict_layers")
        if not 0 <= n_nextn < n_block:
            raise InventoryError(f"{where}: {arch}.nextn_predict_layers = {n_nextn} leaves no block of "
                                 f"the {n_block} in {arch}.block_count to run")
        n_embd, n_head = need("embedding_length"), need("attention.head_count")
        n_expert = opt("expert_count")
        n_dense_lead = opt("leading_dense_block_count")
        dense_ff = opt("feed_forward_length")
        # Mixtral-style llama files give the experts' width as feed_forward_length only
        expert_ff = opt("expert_feed_forward_length") or (dense_ff if n_expert > 1 else 0)
        if n_expert > 1 and not n_dense_lead:
            dense_ff = 0   # no dense FFN block runs (qwen3moe's feed_forward_length is unused)
        n_shared = opt("expert_shared_count")
        # qwen2moe gives the shared expert its own width; deepseek2 / glm4moe: count x expert width
        shared_ff = opt("expert_shared_feed_forward_length") or n_shared * expert_ff
        common = dict(
            architecture=arch, name=name,
            n_layer=n_block - n_nextn, n_nextn=n_nextn,
            n_dense_lead=n_dense_lead,
            n_embd=n_embd, n_vocab=int(n_vocab), n_head=n_head,
            n_expert=n_expert, n_expert_used=opt("expert_used_count"),
            n_expert_shared=n_shared or (1 if shared_ff else 0),
            expert_ff=expert_ff, shared_ff=shared_ff,
            dense_ff=dense_ff,
            context_length=opt("context_length", 4096),
            attention=ATTENTION_KIND[arch],
        )
        if ATTENTION_KIND[arch] == "gqa":
            k = opt("attention.key_length", n_embd // max(n_head, 1))
            v = opt("attention.value_length", n_embd // max(n_head, 1))
            return cls(**common, q_lora_rank=0, kv_lora_rank=0,
                       qk_rope_dim=opt("rope.dimension_count", k), qk_nope_dim=0, v_head_dim=v,
                       n_head_kv=opt("attention.head_count_kv", n_head), head_dim_k=k, head_dim_v=v)

        rope = need("rope.dimension_count")
        # MLA-aware converters store the decompressed head sizes under *_mla keys
        k_mla = get("attention.key_length_mla", None)
        if k_mla is not None:
            nope = int(k_mla) - rope
            v_dim = int(get("attention.value_length_mla", 0))
        else:
            nope = need("attention.key_length") - rope
            v_dim = need("attention.value_length")
        return cls(**common, q_lora_rank=opt("attention.q_lora_rank"), kv_lora_rank=need("attention.kv_lora_rank"),
                   qk_rope_dim=rope, qk_nope_dim=nope, v_head_dim=v_dim)


@dataclass
class Inventory:
    source: str            # path of the GGUF (first part) or "preset:NAME"
    model: ModelInfo
    tensors: list
    file_bytes: int = 0    # bytes of the file(s) on disk (header included); 0 for presets
    files: list = field(default_factory=list)
    quantization: str = ""  # e.g. "Q4_K_M" when known

    def __post_init__(self):
        self._by_name = {t.name: t for t in self.tensors}

    # --- totals -------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def bytes_by_role(self) -> dict:
        out = Counter()
        for t in self.tensors:
            out[t.role] += t.n_bytes
        return dict(out)

    def bytes_by_group(self) -> dict:
        out = Counter()
        for t in self.tensors:
            out[t.group] += t.n_bytes
        return dict(out)

    def count_by_type(self) -> dict:
        return dict(Counter(t.type_name for t in self.tensors))

    def bytes_by_type(self) -> dict:
        out = Counter()
        for t in self.tensors:
            out[t.type_name] += t.n_bytes
        return dict(out)

    def tensor(self, name: str) -> Tensor:
        return self._by_name[name]

    def __len__(self):
        return len(self.tensors)

    # --- experts ------------------------------------------------------------------------
    def expert_bytes(self, layer: int) -> int:
        """Bytes of one routed expert (its gate, up and down slices) in `layer`."""
        n = self.model.n_expert
        return sum(t.n_bytes for t in self.tensors if t.layer == layer and t.role == "routed_experts") // max(n, 1)

    def moe_layers(self) -> list:
        return sorted({t.layer for t in self.tensors if t.role == "routed_experts"})


def make_tensor(name: str, ggml_type_id: int, ne, n_layer: int = None) -> Tensor:
    """A tensor of GGML type `ggml_type_id` and dims `ne`; `n_layer` as in tensor_role."""
    ne = tuple(int(d) for d in ne)
    return Tensor(name=name, role=tensor_role(name, n_layer), layer=tensor_layer(name),
                  ggml_type=int(ggml_type_id), ne=ne, n_bytes=ggml.tensor_nbytes(ggml_type_id, ne))


def from_gguf(path) -> Inventory:
    """Inventory of a GGUF file (single file, or the first part of a split set), header only."""
    from hybrid.gguf_file import GGUFFile  # the one reader of GGUF headers in the project

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InventoryError(f"{path}: no such file")
    g = GGUFFile(path)
    arch = g.architecture
    meta = g.metadata

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    embd = g.tensors.get("token_embd.weight")
    n_vocab = get("vocab_size", None) or (int(embd.ne[1]) if embd is not None else 0)
    name = str(meta.get("general.name", os.path.basename(path)))
    model = ModelInfo.from_hparams(arch, get, name=name, n_vocab=int(n_vocab), where=path)
    # the loader's own checks (torch-free): a plan of an inconsistent file is refused, not computed
    from hybrid.models.args import header_args

    header_args(arch, meta, g.tensors, path)
    tensors = []
    for info in g.tensors.values():
        ne = tuple(int(d) for d in info.ne)
        tensors.append(Tensor(name=info.name, role=tensor_role(info.name, model.n_layer),
                              layer=tensor_layer(info.name), ggml_type=int(info.ggml_type), ne=ne,
                              n_bytes=int(info.n_bytes)))
    files = [os.fspath(p) for p in getattr(g, "paths", [path])]
    file_bytes = sum(os.path.getsize(f) for f in files)
    close = getattr(g, "close", None)
    if close:
        close()
    ftype = meta.get("general.file_type")
    return Inventory(source=path, model=model, tensors=tensors, file_bytes=file_bytes, files=files,
                     quantization=_FILE_TYPES.get(ftype, "") if ftype is not None else "")


def load(model=None, preset=None) -> Inventory:
    """From a GGUF path or a preset name (exactly one)."""
    if (model is None) == (preset is None):
        raise InventoryError("give either a GGUF file or --preset NAME")
    if preset is not None:
        from placement.presets import build_preset

        return build_preset(preset)
    return from_gguf(model)


# general.file_type values (llama_ftype) of the mixes people meet; informative only
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
               11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
               17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}
