"""Routed-expert engine vs an explicit float64 reference, on every ISA path.

Error bound: two int8 activation quantizations sit on the path (x before gate/up, h before
down), each adding a relative MSE of about 3e-5 (32-blocks) to 6e-5 (256-blocks), see
test_kernels.py; SiLU*mul roughly doubles what comes from x. 5e-4 leaves a 3x margin.
"""

import gc

import numpy as np
import psutil
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from hybrid import _native
from hybrid.backends.experts import ExpertEngine
from quantdata import random_rows
from test_kernels import isa, reference_weights  # noqa: F401  (isa is a fixture)

TYPE_MIXES = [
    (QT.Q4_K, QT.Q4_K, QT.Q6_K),  # what Q4_K_M does in about half the layers
    (QT.Q5_K, QT.Q8_0, QT.Q5_0),
    (QT.Q4_0, QT.Q6_K, QT.Q4_K),
    (QT.BF16, QT.F16, QT.F32),
]
D, F = 512, 256
NMSE_BOUND = 5e-4


class ExpertSet:
    """Random experts of one layer in GGUF layout plus their float64 dequantization."""

    def __init__(self, E, types, seed):
        rng = np.random.default_rng(seed)
        self.E, self.types = E, types
        self.gate = random_rows(types[0], E * F, D, rng)
        self.up = random_rows(types[1], E * F, D, rng)
        self.down = random_rows(types[2], E * D, F, rng)
        self.gate_f = reference_weights(types[0], self.gate).reshape(E, F, D)
        self.up_f = reference_weights(types[1], self.up).reshape(E, F, D)
        self.down_f = reference_weights(types[2], self.down).reshape(E, D, F)

    def add_to(self, engine):
        return engine.add_layer(self.E, self.gate, self.types[0], self.up, self.types[1], self.down, self.types[2])

    def reference(self, x, ids, w, skip=()):
        """Explicit loop over experts (each with the tokens routed to it), in float64."""
        x = x.astype(np.float64)
        y = np.zeros((x.shape[0], D))
        for e in range(self.E):
            if e in skip:
                continue
            t, k = np.nonzero(ids == e)
            g = x[t] @ self.gate_f[e].T
            u = x[t] @ self.up_f[e].T
            h = g * 0.5 * (1 + np.tanh(g / 2)) * u  # silu(g) * u, without exp overflow
            np.add.at(y, t, w[t, k][:, None] * (h @ self.down_f[e].T))
        return y


def routing(T, K, E, rng, skip_fraction=0.1):
    ids = np.stack([rng.choice(E, size=K, replace=False) for _ in range(T)]).astype(np.int64)
    ids[rng.random((T, K)) < skip_fraction] = -1
    w = rng.random((T, K)).astype(np.float32)
    return ids, w


def nmse(y, ref):
    return float(np.mean((y - ref) ** 2) / max(np.mean(ref ** 2), 1e-30))


CASES = [(T, K, E) for T in (1, 2, 7, 64, 513) for K in (1, 2, 6, 8) for E in (8, 64) if K <= E]


@pytest.fixture(scope="module")
def expert_sets():
    return {(E, i): ExpertSet(E, TYPE_MIXES[i], seed=10 * E + i) for E in (8, 64) for i in range(len(TYPE_MIXES))}


@pytest.mark.parametrize("T,K,E", CASES, ids=[f"T{T}-K{K}-E{E}" for T, K, E in CASES])
def test_forward_vs_float64(isa, expert_sets, T, K, E):
    case = CASES.index((T, K, E))
    experts = expert_sets[(E, case % len(TYPE_MIXES))]
    rng = np.random.default_rng(case)
    x = rng.standard_normal((T, D)).astype(np.float32)
    ids, w = routing(T, K, E, rng)
    engine = ExpertEngine(D, max_tokens=256, max_k=8, threads=2)
    layer = experts.add_to(engine)
    skip = ()
    if case % 3 == 0:  # masked experts: computed elsewhere, contribute nothing here
        skip = (int(ids[0, 0]) if ids[0, 0] >= 0 else 0, E - 1)
        mask = np.zeros(E, np.uint8)
        mask[list(skip)] = 1
        layer.set_skip(mask)
    y = layer(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(w)).numpy()
    ref = experts.reference(x, ids, w, skip)
    assert y.shape == (T, D)
    assert nmse(y, ref) < NMSE_BOUND, f"types {[t.name for t in experts.types]}: nmse {nmse(y, ref):.2e}"
    # tokens whose experts were all skipped get exactly zero
    dead = [t for t in range(T) if all(e < 0 or e in skip for e in ids[t])]
    assert np.all(y[dead] == 0)


def test_bit_identical_for_any_thread_count(expert_sets):
    experts = expert_sets[(64, 0)]
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((300, D)).astype(np.float32))
    ids, w = (torch.from_numpy(a) for a in routing(300, 8, 64, rng))
    outs = []
    for threads in (1, 2, 3, 4):
        engine = ExpertEngine(D, max_tokens=128, max_k=8, threads=threads)
        outs.append(experts.add_to(engine)(x, ids, w))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_submit_is_asynchronous_and_matches_call(expert_sets):
    experts = expert_sets[(64, 1)]
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((256, D)).astype(np.float32))
    ids, w = (torch.from_numpy(a) for a in routing(256, 8, 64, rng, 0.0))
    engine = ExpertEngine(D, max_tokens=256, max_k=8, threads=2)
    layer = experts.add_to(engine)
    want = layer(x, ids, w)           # float32 / int64 on the CPU: one native call
    assert torch.equal(layer(x, ids.int(), w), want)   # int32 ids: the staged path
    assert torch.equal(layer(x.clone().requires_grad_(), ids, w), want)  # numpy() refuses: staged
    for _ in range(5):   # (that submit returns before the work is done is bench_moe's to show)
        layer.submit(x, ids, w)
        with pytest.raises(RuntimeError, match="not waited for"):   # one forward in flight at a time
            layer.submit(x, ids, w)
        got = layer.wait()
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="nothing was submitted"):
        layer.wait()
    # copy=False hands out the engine's own output buffer (no extra host copy): same values
    layer.submit(x, ids, w)
    raw = layer.wait(copy=False)
    assert torch.equal(raw, want) and raw.data_ptr() == engine.y.data_ptr()


def test_bf16_input_and_dtype_preserved(expert_sets):
    experts = expert_sets[(8, 0)]
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((5, D)).astype(np.float32)).to(torch.bfloat16)
    ids, w = (torch.from_numpy(a) for a in routing(5, 2, 8, rng, 0.0))
    engine = ExpertEngine(D, max_tokens=8, max_k=8, threads=2)
    layer = experts.add_to(engine)
    y = layer(x, ids, w)
    assert y.dtype == torch.bfloat16
    ref = experts.reference(x.float().numpy(), ids.numpy(), w.numpy())
    assert nmse(y.float().numpy(), ref) < 1e-3  # bf16 output rounding on top of the kernel error


def test_long_inputs_are_split_by_max_tokens(expert_sets):
    experts = expert_sets[(8, 2)]
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((70, D)).astype(np.float32))
    ids, w = (torch.from_numpy(a) for a in routing(70, 2, 8, rng))
    small = experts.add_to(ExpertEngine(D, max_tokens=16, max_k=2, threads=2))
    big = experts.add_to(ExpertEngine(D, max_tokens=128, max_k=2, threads=2))
    assert torch.equal(small(x, ids, w), big(x, ids, w))


def test_bad_input_raises_value_error_naming_the_argument(expert_sets):
    experts = expert_sets[(8, 0)]
    engine = ExpertEngine(D, max_tokens=16, max_k=4, threads=1)
    layer = experts.add_to(engine)
    x = torch.zeros(3, D)
    ids = torch.zeros(3, 2, dtype=torch.int64)
    w = torch.ones(3, 2)
    cases = [
        ((torch.zeros(3, D + 1), ids, w), "x"),
        ((torch.zeros(3, D, dtype=torch.float64), ids, w), "x"),
        ((torch.zeros(D, 6).t(), torch.zeros(6, 2, dtype=torch.int64), torch.ones(6, 2)), "x"),
        ((x, torch.zeros(4, 2, dtype=torch.int64), w), "ids"),
        ((x, torch.zeros(3, 5, dtype=torch.int64), torch.ones(3, 5)), "ids"),
        ((x, torch.zeros(3, 2), w), "ids"),
        ((x, np.zeros((3, 2), np.int64), w), "ids"),
        ((x, torch.zeros(2, 3, dtype=torch.int64).t(), w), "ids"),
        ((x, torch.full((3, 2), 8, dtype=torch.int64), w), "ids"),
        ((x, ids, torch.ones(3, 3)), "weights"),
        ((x, ids, torch.ones(3, 2, dtype=torch.int32)), "weights"),
        ((torch.zeros(17, D), torch.zeros(17, 2, dtype=torch.int64), torch.ones(17, 2)), None),  # fine: split
    ]
    for args, name in cases:
        if name is None:
            layer(*args)
            continue
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            layer(*args)
    # more experts per token than a layer has (a one-expert layer: its slot scratch is 1 a token)
    one = engine.add_layer(1, experts.gate[:F], QT.Q4_K, experts.up[:F], QT.Q4_K, experts.down[:D], QT.Q6_K)
    with pytest.raises(ValueError, match=r"^ids: 2 experts per token, but the layer has 1"):
        one(x, ids, w)
    # the engine still works after every refusal
    assert layer(x, ids, w).shape == (3, D)
    assert one(x, ids[:, :1].contiguous(), w[:, :1].contiguous()).shape == (3, D)
    with pytest.raises(ValueError, match="gate"):
        engine.add_layer(8, experts.gate[:-1], QT.Q4_K, experts.up, QT.Q4_K, experts.down, QT.Q6_K)
    with pytest.raises(ValueError, match="down"):
        engine.add_layer(8, experts.gate, QT.Q4_K, experts.up, QT.Q4_K, experts.down, QT.Q4_0 + 100)
    with pytest.raises(ValueError, match="mask"):
        layer.set_skip(np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="cpus"):
        ExpertEngine(D, cpus=[10_000])


def test_no_leak_when_engines_are_created_and_destroyed(expert_sets):
    experts = expert_sets[(8, 0)]
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((64, D)).astype(np.float32))
    ids, w = (torch.from_numpy(a) for a in routing(64, 4, 8, rng))
    proc = psutil.Process()

    def cycle(n):
        for _ in range(n):
            engine = ExpertEngine(D, max_tokens=64, max_k=4, threads=2)
            experts.add_to(engine)(x, ids, w)
            del engine
        gc.collect()

    cycle(20)
    before = proc.memory_info().rss
    cycle(200)
    growth = proc.memory_info().rss - before
    assert growth < 8 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 200 engines"


def test_always_on_expert_in_the_same_call(expert_sets):
    """shared_layer: a one-expert layer (other types than the routed ones) added for every
    token with weight 1 in the same job: exactly routed + shared, also across token chunks
    and on the async path; a bad shared layer is refused before anything runs."""
    routed = expert_sets[(64, 0)]
    one = ExpertSet(1, TYPE_MIXES[1], seed=99)
    rng = np.random.default_rng(7)
    T = _native.MoEEngine.token_chunk + 88  # two chunks per part
    x = torch.from_numpy(rng.standard_normal((T, D)).astype(np.float32))
    ids, w = (torch.from_numpy(a) for a in routing(T, 6, 64, rng))
    engine = ExpertEngine(D, max_tokens=T, max_k=8, threads=2)
    r, s = routed.add_to(engine), one.add_to(engine)
    with torch.inference_mode():
        alone = r(x, ids, w)
        shared = s(x, torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1))
        assert r.absorb_shared(type("FFN", (), {"experts": s})())
        assert torch.equal(r(x, ids, w), alone + shared)
        r.submit(x, ids, w)
        assert torch.equal(r.wait(), alone + shared)
        want = routed.reference(x.numpy(), ids.numpy(), w.numpy()) + one.reference(
            x.numpy(), np.zeros((T, 1), np.int64), np.ones((T, 1), np.float32))
        assert nmse((alone + shared).numpy(), want) < NMSE_BOUND
        for bad in (r.layer, 17):
            with pytest.raises(ValueError, match="shared layer"):
                engine.forward(r.layer, x[:2], ids[:2], w[:2], shared_layer=bad)
    assert not r.absorb_shared(object())   # not a one-expert layer of this engine


def test_buffer_bytes_size_each_layers_slots(expert_sets):
    """MoEEngine.buffer_bytes (its vectors' capacities): the I/O buffers for max_tokens, and at
    the first forward a chunk's scratch whose h rows hold min(K, E) slots a token of each layer:
    here a one-expert layer 2048 wide (a dense FFN's shape) outgrows the routed layer's 4 slots
    of 256, and a K-slot sizing of it would take 4x its rows."""
    T, K, E, FW = 40, 4, 8, 2048
    engine = ExpertEngine(D, max_tokens=T, max_k=K, threads=2)
    routed = expert_sets[(E, 0)].add_to(engine)
    rng = np.random.default_rng(3)
    wide = engine.add_layer(1, random_rows(QT.Q4_K, FW, D, rng), QT.Q4_K, random_rows(QT.Q4_K, FW, D, rng), QT.Q4_K,
                            random_rows(QT.Q6_K, D, FW, rng), QT.Q6_K)
    io = 2 * T * D * 4 + 2 * T * (K + 1) * 4
    assert engine._eng.buffer_bytes == io
    x = torch.randn(T, D)
    ids, w = (torch.from_numpy(a) for a in routing(T, K, E, rng))
    routed(x, ids, w)
    wide(x, torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1))
    q8k = lambda n: n // 256 * 292   # noqa: E731  the activation row of a K-quant dot
    scratch = T * (2 * q8k(D) + 4 * max(K * F, FW) + max(K * q8k(F), q8k(FW)) + 4 * K)
    counts = 4 * (E + 1) + 4 * E + 4 * E + 8 * (E + 1)   # per expert: begin, cursor, active, chunk begins
    assert engine._eng.buffer_bytes == io + scratch + counts
