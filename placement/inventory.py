"""Tensor inventory of a model: every tensor's role, layer, GGML type and bytes, from a GGUF header or a preset.

Reads only headers (hybrid.gguf_file), never tensor data, so a 400 GB model is inventoried in
well under a second. Presets (placement.presets) rebuild the inventory of well-known files from
the architecture numbers and the quantizer's type rules.
"""

import os
from collections import Counter
from dataclasses import dataclass, field

from placement import ggml

SUPPORTED_ARCHITECTURES = ("deepseek2",)

# role of a tensor: what it does in the model, which decides where it may live
ROLES = (
    "embedding", "attention", "norm", "router", "dense_ffn", "shared_expert",
    "routed_experts", "output", "other",
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


def tensor_role(name: str) -> str:
    s = _stem(name)
    if s == "token_embd":
        return "embedding"
    if s == "output":
        return "output"
    if s.endswith("_norm"):
        return "norm"
    if s in ("ffn_gate_inp", "exp_probs_b"):
        return "router"
    if s.endswith("_exps"):
        return "routed_experts"
    if s.endswith("_shexp"):
        return "shared_expert"
    if s in ("ffn_gate", "ffn_up", "ffn_down"):
        return "dense_ffn"
    if s.startswith("attn_"):
        return "attention"
    return "other"


def tensor_group(name: str) -> str:
    """Key into Plan.tensor_placement: the role, with the MLA up-projections split out."""
    role = tensor_role(name)
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
        return tensor_group(self.name)


@dataclass
class ModelInfo:
    """The architecture numbers the solver needs (deepseek2 names, GGUF meaning)."""
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

    @property
    def kv_bytes_per_token(self) -> int:
        """MLA latent cache: (kv_lora_rank + rope dims) bf16 values per token per layer."""
        return self.n_layer * (self.kv_lora_rank + self.qk_rope_dim) * 2

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

        rope = need("rope.dimension_count")
        # MLA-aware converters store the decompressed head sizes under *_mla keys
        k_mla = get("attention.key_length_mla", None)
        if k_mla is not None:
            nope = int(k_mla) - rope
            v_dim = int(get("attention.value_length_mla", 0))
        else:
            nope = need("attention.key_length") - rope
            v_dim = need("attention.value_length")
        return cls(
            architecture=arch, name=name,
            n_layer=need("block_count"),
            n_dense_lead=int(get("leading_dense_block_count", 0)),
            n_embd=need("embedding_length"),
            n_vocab=int(n_vocab),
            n_head=need("attention.head_count"),
            q_lora_rank=int(get("attention.q_lora_rank", 0)),
            kv_lora_rank=need("attention.kv_lora_rank"),
            qk_rope_dim=rope, qk_nope_dim=nope, v_head_dim=v_dim,
            n_expert=int(get("expert_count", 0)),
            n_expert_used=int(get("expert_used_count", 0)),
            n_expert_shared=int(get("expert_shared_count", 0)),
            expert_ff=int(get("expert_feed_forward_length", 0)),
            dense_ff=int(get("feed_forward_length", 0)),
            context_length=int(get("context_length", 4096)),
        )


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


def make_tensor(name: str, ggml_type_id: int, ne) -> Tensor:
    ne = tuple(int(d) for d in ne)
    return Tensor(name=name, role=tensor_role(name), layer=tensor_layer(name),
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

    tensors = []
    for info in g.tensors.values():
        ne = tuple(int(d) for d in info.ne)
        tensors.append(Tensor(name=info.name, role=tensor_role(info.name), layer=tensor_layer(info.name),
                              ggml_type=int(info.ggml_type), ne=ne, n_bytes=int(info.n_bytes)))
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    n_vocab = get("vocab_size", None) or (embd.ne[1] if embd is not None else 0)
    name = str(meta.get("general.name", os.path.basename(path)))
    model = ModelInfo.from_hparams(arch, get, name=name, n_vocab=int(n_vocab), where=path)
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
