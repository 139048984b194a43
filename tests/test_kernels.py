"""Block kernels and quantized matmul vs gguf's numpy reference, on every ISA path.

Error bounds for the quantized matmul: activations are quantized to int8 per block with
absmax scaling, step d = amax/127. The rounding error is uniform in +-d/2, so the relative
error variance of a dot product is d^2 / (12 sigma^2). For Gaussian activations amax is about
2.5 sigma in a 32-block and 3.5 sigma in a 256-block, giving 3e-5 and 6e-5; the bounds below
allow 3-4x that. Float weight types do not quantize activations: only summation order differs.
"""

import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

from hybrid import _native
from quantdata import ALL_TYPES, random_rows
from subproc import NEUTRAL_CWD, hybrid_env

ISAS = ["scalar", "avx2", "avx512"]
NMSE_BOUND = {QT.F32: 1e-10, QT.F16: 1e-10, QT.BF16: 1e-10,
              QT.Q4_0: 1.5e-4, QT.Q5_0: 1.5e-4, QT.Q8_0: 1.5e-4,
              QT.Q4_K: 2.5e-4, QT.Q5_K: 2.5e-4, QT.Q6_K: 2.5e-4,
              # Q8_1 activations: Q8_0's plus fp16 rounding of d and of the scaled sum s
              # (relative 2^-12 each, ~1e-7 in NMSE). The random blocks' min is as large as
              # their spread, so the exact dot shrinks against the rounding error of sum(x):
              # measured 1.2e-4 (Q4_1) and 6.6e-5 (Q5_1); 2.5x that
              QT.Q4_1: 3e-4, QT.Q5_1: 3e-4,
              # Q8_K activations like the other K-quants: the 256-block bound
              QT.Q2_K: 2.5e-4, QT.Q3_K: 2.5e-4,
              # IQ4_NL on Q8_0 activations (32-blocks), IQ4_XS on Q8_K (256-blocks)
              QT.IQ4_NL: 1.5e-4, QT.IQ4_XS: 2.5e-4,
              # lattice types on Q8_K activations; measured 5e-5 .. 8.4e-5
              QT.IQ2_XXS: 2.5e-4, QT.IQ3_S: 2.5e-4, QT.IQ1_S: 2.5e-4,
              QT.IQ2_XS: 2.5e-4, QT.IQ2_S: 2.5e-4, QT.IQ3_XXS: 2.5e-4, QT.IQ1_M: 2.5e-4}


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in _native.available_isas():
        pytest.skip(f"this CPU cannot run {request.param} ({_native.cpu_features()})")
    before = _native.isa()
    _native.set_isa(request.param)
    yield request.param
    _native.set_isa(before)


def reference_weights(qtype, rows):
    """float64 [N, K] from gguf's numpy dequantization."""
    if qtype == QT.F32:
        return rows.view(np.float32).astype(np.float64)
    if qtype == QT.F16:
        return rows.view(np.float16).astype(np.float64)
    if qtype == QT.BF16:
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return gguf_dequantize(rows, qtype).astype(np.float64)


def ulp_distance(a, b):
    ai = a.astype(np.float32).view(np.int32).astype(np.int64)
    bi = b.astype(np.float32).view(np.int32).astype(np.int64)
    ai = np.where(ai < 0, -(ai & 0x7FFFFFFF), ai)
    bi = np.where(bi < 0, -(bi & 0x7FFFFFFF), bi)
    return np.abs(ai - bi)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(isa, qtype):
    rng = np.random.default_rng(int(qtype))
    rows = random_rows(qtype, 7, 512, rng)
    got = _native.dequantize(rows, int(qtype), rows.shape[0] * 512)
    want = reference_weights(qtype, rows).astype(np.float32).ravel()
    assert np.all(np.isfinite(got))
    assert ulp_distance(got, want).max() <= 1


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 3, 64, 300])
def test_matmul_vs_float64(isa, qtype, T):
    rng = np.random.default_rng(1000 * T + int(qtype))
    N, K = 37, 768
    rows = random_rows(qtype, N, K, rng)
    x = rng.standard_normal((T, K)).astype(np.float32)
    y = _native.matmul(rows, int(qtype), x, threads=2)
    ref = x.astype(np.float64) @ reference_weights(qtype, rows).T
    nmse = np.mean((y - ref) ** 2) / np.mean(ref ** 2)
    assert y.shape == (T, N) and y.dtype == np.float32
    assert nmse < NMSE_BOUND[qtype], f"{qtype.name} T={T}: normalized MSE {nmse:.2e}"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_simd_paths_match_scalar(qtype):
    """Same quantized activations on every path: only the float summation order may differ."""
    rng = np.random.default_rng(7)
    rows = random_rows(qtype, 29, 1024, rng)
    x = rng.standard_normal((5, 1024)).astype(np.float32)
    before = _native.isa()
    try:
        _native.set_isa("scalar")
        ref = _native.matmul(rows, int(qtype), x)
        for name in _native.available_isas()[1:]:
            _native.set_isa(name)
            got = _native.matmul(rows, int(qtype), x)
            np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max(), err_msg=name)
    finally:
        _native.set_isa(before)


def test_matmul_bf16_input_equals_float_input():
    rng = np.random.default_rng(3)
    rows = random_rows(QT.Q4_K, 16, 512, rng)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    x_bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    x_rounded = (x_bf16.astype(np.uint32) << 16).view(np.float32)
    a = _native.matmul(rows, int(QT.Q4_K), x_bf16)
    b = _native.matmul(rows, int(QT.Q4_K), x_rounded)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.F16], ids=lambda t: t.name)
def test_matmul_deterministic_across_threads(qtype):
    rng = np.random.default_rng(11)
    rows = random_rows(qtype, 301, 1024, rng)
    x = rng.standard_normal((67, 1024)).astype(np.float32)
    results = [_native.matmul(rows, int(qtype), x, threads=t) for t in (1, 2, 3, 5)]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_matmul_writes_into_out_and_strided_rows():
    rng = np.random.default_rng(5)
    rows = random_rows(QT.Q8_0, 8, 256, rng)
    big = rng.standard_normal((6, 512)).astype(np.float32)
    x = big[:, :256]  # strided rows, contiguous elements
    out = np.zeros((6, 8), np.float32)
    res = _native.matmul(rows, int(QT.Q8_0), x, out=out)
    assert res is out
    np.testing.assert_array_equal(out, _native.matmul(rows, int(QT.Q8_0), np.ascontiguousarray(x)))


@pytest.mark.parametrize("shared_x", [False, True], ids=["x-per-matrix", "x-shared"])
def test_batched_matmul_equals_one_call_per_matrix(isa, shared_x):
    """w [B, N, row_bytes] (the per-head up-projections of MLA): each product is exactly the
    single-matrix call, whether every matrix has its own x [B, T, K] or all share x [T, K],
    on the shared pool and on an expert engine's workers."""
    from hybrid.backends.experts import ExpertEngine

    rng = np.random.default_rng(21)
    B, N, K, T = 5, 40, 128, 3
    w = random_rows(QT.Q8_0, B * N, K, rng).reshape(B, N, -1)
    x = rng.standard_normal((T, K) if shared_x else (B, T, K)).astype(np.float32)
    want = np.stack([_native.matmul(w[b], int(QT.Q8_0), x if shared_x else x[b], threads=1)
                     for b in range(B)])
    np.testing.assert_array_equal(_native.matmul(w, int(QT.Q8_0), x, threads=2), want)
    eng = ExpertEngine(K, max_tokens=1, max_k=1, threads=2)
    try:
        out = np.full((B, T, N), np.nan, np.float32)
        assert _native.matmul(w, int(QT.Q8_0), x, out, engine=eng._eng) is out
        np.testing.assert_array_equal(out, want)
    finally:
        eng.close()


def test_batched_matmul_rejects_mismatched_batches():
    rng = np.random.default_rng(22)
    w = random_rows(QT.Q8_0, 4 * 8, 64, rng).reshape(4, 8, -1)
    with pytest.raises(ValueError, match="x: batch of 3 for 4"):
        _native.matmul(w, int(QT.Q8_0), np.zeros((3, 2, 64), np.float32))
    with pytest.raises(ValueError, match=r"out: must be float32 \[B, T, N\] = \[4, 2, 8\]"):
        _native.matmul(w, int(QT.Q8_0), np.zeros((4, 2, 64), np.float32), np.zeros((4, 2, 9), np.float32))


def test_rms_norm_matches_float64_and_accepts_strided_rows():
    rng = np.random.default_rng(23)
    x = rng.standard_normal((3, 600)).astype(np.float32) * 5
    w = rng.standard_normal(512).astype(np.float32)
    out = np.empty((3, 512), np.float32)
    _native.rms_norm(x[:, :512], w, 1e-6, out)            # rows 600 floats apart
    x64 = x[:, :512].astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-6)
    with pytest.raises(ValueError, match="w: expected 512"):
        _native.rms_norm(x[:, :512], w[:100], 1e-6, out)
    with pytest.raises(ValueError, match="out"):
        _native.rms_norm(x[:, :512], w, 1e-6, np.empty((2, 512), np.float32))


def test_matmul_rejects_bad_input():
    rng = np.random.default_rng(0)
    rows = random_rows(QT.Q4_K, 4, 512, rng)
    x = np.zeros((2, 512), np.float32)
    with pytest.raises(ValueError, match="x"):
        _native.matmul(rows, int(QT.Q4_K), np.zeros((2, 256), np.float32))  # wrong K
    with pytest.raises(ValueError, match="x"):
        _native.matmul(rows, int(QT.Q4_K), x.astype(np.float64))
    with pytest.raises(ValueError, match="x"):
        _native.matmul(rows, int(QT.Q4_K), np.zeros((2, 512, 1), np.float32))
    with pytest.raises(ValueError, match="x"):
        _native.matmul(rows, int(QT.Q4_K), np.zeros((512, 2), np.float32).T)  # column-major
    with pytest.raises(ValueError, match="not supported"):
        _native.matmul(rows, 34, x)  # TQ1_0
    with pytest.raises(ValueError, match="out"):
        _native.matmul(rows, int(QT.Q4_K), x, out=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="w"):
        _native.matmul(rows.view(np.float32), int(QT.Q4_K), x)
    with pytest.raises(ValueError, match="multiple"):
        _native.dequantize(rows, int(QT.Q4_K), 100)
    with pytest.raises(ValueError, match="bytes"):
        _native.dequantize(rows[:1], int(QT.Q4_K), 4 * 512)


def test_unknown_isa_is_refused():
    before = _native.isa()
    with pytest.raises(ValueError, match="HYBRID_ISA=sse9: unknown"):
        _native.set_isa("sse9")
    assert _native.isa() == before


@pytest.mark.parametrize("name", ["avx2", "avx512"])
def test_unavailable_isa_is_refused(name):
    # Only a CPU without the ISA can show the refusal (the binary asks cpuid, which a test
    # cannot fake): on one that has it this reports a skip instead of passing without a check.
    if name in _native.available_isas():
        pytest.skip(f"this CPU has {name}: the refusal cannot be shown here")
    before = _native.isa()
    with pytest.raises(ValueError, match=f"HYBRID_ISA={name}: this CPU lacks"):
        _native.set_isa(name)
    assert _native.isa() == before


@pytest.mark.parametrize("name", ["scalar", "avx2", "avx512", "bogus"])
def test_hybrid_isa_environment_variable(name):
    r = subprocess.run([sys.executable, "-c", "from hybrid import _native; print(_native.isa())"],
                       env=hybrid_env(HYBRID_ISA=name), cwd=NEUTRAL_CWD, capture_output=True, text=True,
                       timeout=120)
    if name in _native.available_isas():
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == name
    else:
        assert r.returncode != 0
        assert f"HYBRID_ISA={name}" in r.stderr
        assert "Segmentation" not in r.stderr and "Illegal" not in r.stderr


SIMDE_HEADER = "/usr/include/simde/x86/avx512.h"


@pytest.mark.skipif(not os.path.exists(SIMDE_HEADER), reason="SIMDe headers (Debian libsimde-dev) not installed")
def test_avx512_kernels_under_emulation(tmp_path):
    """On CPUs without AVX-512 the AVX-512 kernels still get checked: SIMDe emulates them."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    exe = tmp_path / "avx512_emulated"
    build = subprocess.run(
        ["g++", "-std=c++17", "-O1", "-mavx2", "-mfma", "-mf16c", "-mbmi2", "-DHYBRID_SIMDE_AVX512",
         f"-I{root}/native", f"{here}/native/avx512_emulated.cpp", f"{root}/native/quants.cpp", "-o", str(exe)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " 0 failed" in run.stdout


def isa_file_flags() -> dict[str, list[str]]:
    """The ISA-specific source files and their compile options, as CMakeLists.txt sets them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "CMakeLists.txt")).read()
    out = {}
    for files, opts in re.findall(r"set_source_files_properties\(([^)]*?) PROPERTIES\s+COMPILE_OPTIONS \"([^\"]*)\"\)", text):
        for f in files.split():
            out[os.path.join(root, f)] = opts.split(";")
    return out


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the ISA files are x86's")
def test_isa_files_share_no_code(tmp_path):
    """Each ISA file keeps its code to itself. An inline function, class member or std template
    instance with external linkage is emitted as a weak symbol by every file that uses it, and
    the linker keeps one copy for all of them: the AVX2 kernels could then run a copy built with
    AVX-512 flags (SIGILL on a CPU without AVX-512). Built as the module is (-O3, LTO: the
    objects' symbol tables list every definition the link-time merge sees), each file's object
    must hold no weak or unique global symbol."""
    files = isa_file_flags()
    assert len(files) == 4, files
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for src, flags in files.items():
        obj = tmp_path / (os.path.basename(src) + ".o")
        build = subprocess.run(["g++", "-std=c++17", "-O3", "-fno-math-errno", "-fPIC", "-fvisibility=hidden", "-flto", "-fno-fat-lto-objects", "-c", "-DHYBRID_X86=1", f"-I{root}/native", *flags,
                                src, "-o", str(obj)], capture_output=True, text=True, timeout=300)
        assert build.returncode == 0, build.stderr[-3000:]
        nm = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
        shared = [line for line in nm.splitlines() if len(line.split()) > 2 and line.split()[1] in ("W", "V", "u")]
        assert not shared, f"{os.path.basename(src)} emits code other files may share: " + "; ".join(shared[:5])


def ggml_q8_K(x):
    """llama.cpp's quantize_row_q8_K_ref, in numpy: (d, qs, bsums) per 256-block."""
    out = []
    for blk in x.reshape(-1, 256):
        j = int(np.argmax(np.abs(blk)))  # first index of the largest magnitude
        if blk[j] == 0:
            out.append((np.float32(0), np.zeros(256, np.int8), np.zeros(16, np.int16)))
            continue
        iscale = np.float32(-127.0) / blk[j]
        v = np.rint((iscale * blk).astype(np.float32))  # nearest, ties to even
        qs = np.minimum(127, v).astype(np.int8)
        out.append((np.float32(1) / iscale, qs, qs.reshape(16, 16).sum(1).astype(np.int16)))
    return out


def test_activation_quantization_is_llama_cpps(isa):
    """Same int8 activations as llama.cpp (Q8_K for K-quants; Q8_0 with an fp16 scale for 32-blocks)."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(1024) * rng.uniform(0.1, 10, 1024)).astype(np.float32)
    x[256:512] = 0  # an all-zero block
    raw = _native.quantize_activations(x, int(QT.Q4_K))
    blocks = np.frombuffer(raw.tobytes(), dtype=np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)]))
    for got, (d, qs, bs) in zip(blocks, ggml_q8_K(x)):
        assert got["d"] == d
        np.testing.assert_array_equal(got["qs"], qs)
        np.testing.assert_array_equal(got["bsums"], bs)
    raw = _native.quantize_activations(x, int(QT.Q8_0))
    blocks = np.frombuffer(raw.tobytes(), dtype=np.dtype([("d", "<f4"), ("sum", "<i4"), ("qs", "i1", 32)]))
    for got, blk in zip(blocks, x.reshape(-1, 32)):
        amax = np.abs(blk).max()
        assert got["d"] == np.float32(np.float16(amax / np.float32(127)))  # stored as fp16 by llama.cpp
        want = np.rint(blk * (np.float32(127) / amax if amax else np.float32(0))).astype(np.int8)
        np.testing.assert_array_equal(got["qs"], want)
        assert got["sum"] == int(want.astype(np.int32).sum())
    # Q8_1 (Q4_1 / Q5_1): d and s = d * sum(q) rounded to fp16, s from the unrounded d
    raw = _native.quantize_activations(x, int(QT.Q4_1))
    blocks = np.frombuffer(raw.tobytes(), dtype=np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)]))
    for got, blk in zip(blocks, x.reshape(-1, 32)):
        amax = np.abs(blk).max()
        d = amax / np.float32(127)
        want = np.rint(blk * (np.float32(127) / amax if amax else np.float32(0))).astype(np.int8)
        np.testing.assert_array_equal(got["qs"], want)
        assert got["d"] == np.float32(np.float16(d))
        assert got["s"] == np.float32(np.float16(d * np.float32(want.astype(np.int32).sum())))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_batched_tokens_equal_single_tokens(isa, qtype):
    """Prefill unpacks a weight block once for several tokens: each token's result must be
    bit-identical to computing it alone (decode), or prefill and decode would disagree."""
    rng = np.random.default_rng(12)
    rows = random_rows(qtype, 19, 512, rng)
    x = rng.standard_normal((11, 512)).astype(np.float32)
    batched = _native.matmul(rows, int(qtype), x)
    for t in range(x.shape[0]):
        np.testing.assert_array_equal(batched[t], _native.matmul(rows, int(qtype), x[t:t + 1])[0])


@pytest.mark.parametrize("nq,S,W,C", [(1, 1, 8, 8), (4, 37, 576, 512), (7, 5, 100, 36), (16, 300, 576, 512)])
def test_attention_kernels_vs_float64(isa, nq, S, W, C):
    """The MLA attention's row kernels (scores = q . row, values = sum_s p_s row[:C]) for
    query counts and widths on and off the SIMD blocking (4 queries, 8 / 16 floats)."""
    rng = np.random.default_rng(nq * 1000 + S)
    q = rng.standard_normal((nq, W)).astype(np.float32)
    rows = rng.standard_normal((S, W)).astype(np.float32)
    scores, values = _native.attention_kernels(q, rows, C)
    want_s = q.astype(np.float64) @ rows.T.astype(np.float64)
    np.testing.assert_allclose(scores, want_s, rtol=0, atol=1e-5 * np.sqrt(W) * 4)
    want_v = scores.astype(np.float64) @ rows[:, :C].astype(np.float64)
    np.testing.assert_allclose(values, want_v, rtol=1e-5, atol=1e-5 * np.abs(want_v).max())


def test_silu_mul_is_close_to_float64_and_independent_of_position(isa):
    """silu(g) * u, the routed experts' gate: within a few ulp of float64 (extremes included:
    large positive gates give g, large negative ones ~0, NaN stays NaN), and each element's
    value is the same alone (decode) as inside an array at any position (prefill)."""
    rng = np.random.default_rng(2)
    g = np.concatenate([np.linspace(-30, 30, 2001), [0.0, -0.0, 87.0, 88.5, 100.0, 1e4, -87.0, -88.5, -100.0, -1e4],
                        rng.standard_normal(333) * 8]).astype(np.float32)
    u = rng.uniform(-3, 3, g.size).astype(np.float32)
    got = _native.silu_mul(g, u)
    g64 = g.astype(np.float64)
    want = g64 / (1 + np.exp(-np.clip(g64, -700, 700))) * u
    np.testing.assert_allclose(got, want, rtol=8 * 2.0 ** -23, atol=1e-30)
    assert np.isnan(_native.silu_mul(np.array([np.nan], np.float32), np.ones(1, np.float32))[0])
    alone = np.array([_native.silu_mul(g[i:i + 1], u[i:i + 1])[0] for i in range(g.size)], np.float32)
    np.testing.assert_array_equal(got, alone)
    for n in range(1, 20):   # every tail length and offset
        np.testing.assert_array_equal(_native.silu_mul(g[5:5 + n], u[5:5 + n]), got[5:5 + n])


def test_exp_sum_is_within_a_few_ulp_of_exp(isa):
    """The softmax numerators of the MLA attention: exp(x - max) for x <= max. The AVX2
    polynomial stays within 4 ulp of float64 exp down to -87 and flushes below to 0."""
    x = np.concatenate([np.linspace(-87.0, 0.0, 4001), [-0.0, -1e-7, -200.0, -88.0, -1000.0],
                        np.random.default_rng(1).uniform(-30, 0, 333)]).astype(np.float32)
    y, s = _native.exp_sum(x + 3.0, 3.0)
    want = np.exp(x.astype(np.float64))
    ok = x >= -87.0
    np.testing.assert_allclose(y[ok], want[ok], rtol=4 * 2.0 ** -23, atol=0)
    assert np.all(y[~ok] <= 1e-37) and np.all(y >= 0)
    assert abs(s - want.sum()) <= 1e-5 * want.sum()
