"""GGML tensor types: ids, names and block geometry, enough to size any tensor without gguf/numpy.

Geometry: a row of ne[0] elements is stored as ne[0] / block_size blocks of type_size bytes
(ggml-common.h). The table matches gguf.constants.GGML_QUANT_SIZES (checked by a test).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block_size: int   # elements per block
    type_size: int    # bytes per block

    @property
    def quantized(self) -> bool:
        return self.block_size > 1

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


_TABLE = [
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22), (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110), (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176), (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74), (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50), (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136), (24, "I8", 1, 1), (25, "I16", 1, 2),
    (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8), (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2), (34, "TQ1_0", 256, 54), (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
]

TYPES = {t[0]: GGMLType(*t) for t in _TABLE}
BY_NAME = {t.name: t for t in TYPES.values()}

F32, F16, BF16 = BY_NAME["F32"].id, BY_NAME["F16"].id, BY_NAME["BF16"].id
Q4_0, Q5_0, Q5_1, Q8_0 = (BY_NAME[n].id for n in ("Q4_0", "Q5_0", "Q5_1", "Q8_0"))
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (BY_NAME[n].id for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
IQ4_NL = BY_NAME["IQ4_NL"].id


def ggml_type(t) -> GGMLType:
    """Look a type up by id or by name ('q4_k' works)."""
    if isinstance(t, GGMLType):
        return t
    if isinstance(t, str):
        try:
            return BY_NAME[t.upper()]
        except KeyError:
            raise ValueError(f"unknown GGML type {t!r}; known: {', '.join(sorted(BY_NAME))}") from None
    try:
        return TYPES[int(t)]
    except KeyError:
        raise ValueError(f"unknown GGML type id {t!r}") from None


def type_name(t) -> str:
    return ggml_type(t).name


def n_elements(ne) -> int:
    n = 1
    for d in ne:
        n *= int(d)
    return n


def tensor_nbytes(ggml_type_id, ne) -> int:
    """Bytes of a tensor of GGML type with GGML-order dims ne (ne[0] = row length)."""
    t = ggml_type(ggml_type_id)
    if int(ne[0]) % t.block_size:
        raise ValueError(f"row length {ne[0]} is not a multiple of the {t.name} block ({t.block_size})")
    return n_elements(ne) // t.block_size * t.type_size


# The activation row a CPU dot with weights of a type consumes (native/quants.cpp act_row_bytes):
# float32 for the float types, 40 B per 32 values for the 32-blocks (a float scale, a float sum
# or offset term, the quants: hybrid's q8_32 and its q8_1), and q8_K's 292 B per 256 for the
# 256-blocks (a float scale, the quants, 16 int16 sums).
def act_row_bytes(ggml_type_id, n: int) -> int:
    """Bytes of the quantized activation row of n values a dot with this weight type reads."""
    t = ggml_type(ggml_type_id)
    if not t.quantized:
        return 4 * n
    return n // 32 * 40 if t.block_size == 32 else n // 256 * 292
