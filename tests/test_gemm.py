"""Prefill tiles (native/gemm.h): many tokens at once must give, bit for bit, what each token
gives alone (the decode path, one dot per output), on every ISA path and for every type with
a tile kernel, in the CPU linears (matmul) and in the routed-expert engine.

Token counts straddle the tile sizes: 4- and 8-token groups with tails of 1..7, the matmul's
64-token tiles (513 = 8 x 64 + 1), and more than one engine chunk (512 tokens). Row counts
are not multiples of the 16-row tiles. The AVX-512 tiles are checked under emulation by
test_kernels.py::test_avx512_kernels_under_emulation when this CPU lacks AVX-512.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from hybrid import _native
from hybrid.backends.experts import ExpertEngine
from quantdata import ALL_TYPES, random_rows
from test_kernels import isa, reference_weights  # noqa: F401  (isa is a fixture)
from test_moe import D, ExpertSet, routing

TILE_TYPES = [QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_1, QT.Q5_1, QT.IQ4_NL, QT.Q4_K, QT.Q5_K, QT.Q6_K,
              QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ1_S]


def test_tile_kernels_are_in_use(isa):
    """The equality tests below prove something only where the tiles are the path taken."""
    want = [] if isa == "scalar" else sorted(int(t) for t in TILE_TYPES)
    assert _native.prefill_tile_types() == want
    _native.set_prefill_tiles(False)
    try:
        assert _native.prefill_tile_types() == []
    finally:
        _native.set_prefill_tiles(True)


def one_token_at_a_time(rows, qtype, x):
    return np.stack([_native.matmul(rows, int(qtype), x[t:t + 1])[0] for t in range(x.shape[0])])


@pytest.mark.parametrize("T", [2, 5, 7, 64, 513, 2048], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("qtype", TILE_TYPES, ids=lambda t: t.name)
def test_matmul_prefill_equals_decode(isa, qtype, T):
    rng = np.random.default_rng(T)
    N = 37 if T < 2048 else 9  # 2048 tokens: fewer rows keep it fast
    rows = random_rows(qtype, N, 512, rng)
    x = (rng.standard_normal((T, 512)) * rng.uniform(0.1, 4, (T, 1))).astype(np.float32)
    np.testing.assert_array_equal(_native.matmul(rows, int(qtype), x), one_token_at_a_time(rows, qtype, x))


@pytest.mark.parametrize("T", [5, 66], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("qtype", [t for t in ALL_TYPES if t not in TILE_TYPES], ids=lambda t: t.name)
def test_every_other_type_prefills_as_it_decodes(isa, qtype, T):
    """Types without a tile kernel prefill through their 4-row dots (dot4: Q2_K, Q3_K, IQ4_XS,
    the lattice types) or one dot per token: bit for bit what each token gives alone."""
    rng = np.random.default_rng(T)
    rows = random_rows(qtype, 19, 512, rng)
    x = (rng.standard_normal((T, 512)) * rng.uniform(0.1, 4, (T, 1))).astype(np.float32)
    np.testing.assert_array_equal(_native.matmul(rows, int(qtype), x), one_token_at_a_time(rows, qtype, x))


BLOCK32_TYPES = [QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_1, QT.Q5_1, QT.IQ4_NL]


@pytest.mark.parametrize("K", [32, 96, 288], ids=lambda K: f"K{K}")
@pytest.mark.parametrize("qtype", BLOCK32_TYPES, ids=lambda t: t.name)
def test_32_block_rows_of_odd_block_counts(isa, qtype, K):
    """The 32-block rows go two blocks at a time (x86::rows32): a row of an odd number of
    blocks ends on a lone block, in the tiles as in the single dot; and both equal the
    float64 reference within the activations' quantization."""
    rng = np.random.default_rng(K)
    rows = random_rows(qtype, 13, K, rng)
    x = rng.standard_normal((11, K)).astype(np.float32)
    got = _native.matmul(rows, int(qtype), x)
    np.testing.assert_array_equal(got, one_token_at_a_time(rows, qtype, x))
    want = x.astype(np.float64) @ reference_weights(qtype, rows).T
    scale = np.abs(x).astype(np.float64) @ np.abs(reference_weights(qtype, rows)).T
    assert np.all(np.abs(got - want) <= 0.02 * scale + 1e-6)


def test_matmul_prefill_writes_only_its_outputs(isa):
    """Strided output rows: the tile stores N values per token and nothing in between."""
    rng = np.random.default_rng(3)
    rows = random_rows(QT.Q8_0, 21, 256, rng)
    x = rng.standard_normal((13, 256)).astype(np.float32)
    out = np.full((13, 40), 7.0, np.float32)
    _native.matmul(rows, int(QT.Q8_0), x, out=out[:, 5:26])
    np.testing.assert_array_equal(out[:, 5:26], one_token_at_a_time(rows, QT.Q8_0, x))
    assert np.all(out[:, :5] == 7) and np.all(out[:, 26:] == 7)


# fp16 scale offsets per block of the types whose other bytes may all be 0xFF (largest quants
# and 6-bit scales): the int16 pair sums of the AVX2 K-quant tiles are closest to overflow there.
SCALE_FIELDS = {QT.Q4_K: (144, (0, 2)), QT.Q5_K: (176, (0, 2)), QT.Q6_K: (210, (208,))}


@pytest.mark.parametrize("qtype", list(SCALE_FIELDS), ids=lambda t: t.name)
def test_largest_quants_do_not_overflow(isa, qtype):
    block, fields = SCALE_FIELDS[qtype]
    N, K = 5, 512
    rows = np.full((N, K // 256 * block), 0xFF, np.uint8)
    for off in fields:
        rows.reshape(N, -1, block)[:, :, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    # -1 everywhere but +1 first in each 256-block: that +1 maps to -127, every -1 to +127, so
    # every product has the largest magnitude with one sign; the second token flips all signs
    x = -np.ones((6, K), np.float32)
    x[:, ::256] = 1
    x[1::2] *= -1
    np.testing.assert_array_equal(_native.matmul(rows, int(qtype), x), one_token_at_a_time(rows, qtype, x))
    want = x.astype(np.float64) @ reference_weights(qtype, rows).T
    np.testing.assert_allclose(_native.matmul(rows, int(qtype), x), want, rtol=1e-3)


MIXES = [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q5_K, QT.Q8_0, QT.Q5_0), (QT.Q4_0, QT.Q6_K, QT.Q4_K),
         (QT.Q8_0, QT.Q8_0, QT.Q8_0)]
ENGINE_CASES = [(T, K, E) for T in (2, 7, 64, 513) for K, E in ((2, 8), (6, 64))]


@pytest.fixture(scope="module")
def mixes():
    return [ExpertSet(64, types, seed=50 + i) for i, types in enumerate(MIXES)]


@pytest.mark.parametrize("T,K,E", ENGINE_CASES, ids=[f"T{T}-K{K}-E{E}" for T, K, E in ENGINE_CASES])
def test_expert_prefill_equals_decode(isa, mixes, T, K, E):
    """E=64, K=6: a few tokens per expert, so most expert tiles are tails."""
    case = ENGINE_CASES.index((T, K, E))
    experts = mixes[case % len(MIXES)]
    rng = np.random.default_rng(case)
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = routing(T, K, E, rng)
    ids, w = torch.from_numpy(ids), torch.from_numpy(w)
    engine = ExpertEngine(D, max_tokens=T, max_k=K, threads=2)
    layer = experts.add_to(engine)
    batched = layer(x, ids, w).clone()
    for t in range(T):
        single = layer(x[t:t + 1], ids[t:t + 1], w[t:t + 1])
        assert torch.equal(batched[t], single[0]), f"token {t} of {T}, types {[q.name for q in experts.types]}"
    engine.close()


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0], ids=lambda t: t.name)
def test_k_quant_row_groups_every_tail(isa, qtype):
    """Tiles rewrite row groups when a tile has enough tokens (AVX2: 8 rows, Q4_K / Q5_K from 5
    tokens, Q6_K 8, Q8_0 12; AVX-512: 16 rows, K-quants from 3, Q8_0 2; 4 tokens at a time,
    tails of 1-3) and leave the last rows and shorter tiles to the per-row kernels: every token
    count from 1 to 13 and row counts on and off the groups (37: two 16-row groups and 5 rows)
    give, bit for bit, what each token gives alone, and stay within the activations'
    quantization of the float64 reference."""
    rng = np.random.default_rng(int(qtype))
    for R in (8, 13, 24, 37):
        rows = random_rows(qtype, R, 768, rng)
        ref = reference_weights(qtype, rows)
        for T in list(range(1, 14)) + [64]:
            x = (rng.standard_normal((T, 768)) * rng.uniform(0.1, 4, (T, 1))).astype(np.float32)
            got = _native.matmul(rows, int(qtype), x)
            np.testing.assert_array_equal(got, one_token_at_a_time(rows, qtype, x), err_msg=f"R={R} T={T}")
            want = x.astype(np.float64) @ ref.T
            assert np.all(np.abs(got - want) <= 0.02 * (np.abs(x).astype(np.float64) @ np.abs(ref).T) + 1e-6)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0], ids=lambda t: t.name)
def test_k_quant_tiles_at_the_int16_limits(isa, qtype):
    """The AVX2 row-group tiles add maddubs sums in int16 (Q4_K: 8 x 2 x 15 x 127, Q5_K:
    4 x 2 x 31 x 127, Q6_K: 2 x 2 x 63 x 127): with every quant, scale and min at its largest
    magnitude and activations at +-127 the sums reach those bounds; an overflow would differ
    from the single dot. Q6_K's rows 8-15 hold quants 0 instead (q - 32 = -32: the largest
    offset its tile takes off). Q8_0 (one maddubs per madd: 2 x 127 x 127) with quants of
    +-127. The same 16 rows are one AVX-512 group (int32 sums, scaled by vpmulld: the largest
    products it forms)."""
    rng = np.random.default_rng(3)
    rows = random_rows(qtype, 16, 512, rng)
    size = {QT.Q4_K: 144, QT.Q5_K: 176, QT.Q6_K: 210, QT.Q8_0: 34}[qtype]
    blocks = rows.reshape(16, -1, size)
    if qtype == QT.Q8_0:
        blocks[:8, :, 2:] = 0x7F                 # +127
        blocks[8:, :, 2:] = 0x81                 # -127
    elif qtype == QT.Q6_K:
        blocks[:8, :, :192] = 0xFF               # every quant 63
        blocks[8:, :, :192] = 0                  # every quant 0: q - 32 = -32
        blocks[:, :, 192:208] = 0x7F             # scales 127
    else:
        blocks[:, :, 4:] = 0xFF                  # scales, mins, fifth bits and quants all ones
    rows = blocks.reshape(16, -1)
    x = np.concatenate([np.full((4, 512), 3.0), np.full((4, 512), -3.0), rng.standard_normal((4, 512))]).astype(np.float32)
    got = _native.matmul(rows, int(qtype), x)
    np.testing.assert_array_equal(got, one_token_at_a_time(rows, qtype, x))
    want = x.astype(np.float64) @ reference_weights(qtype, rows).T
    assert np.allclose(got[:8], want[:8], rtol=1e-3)
