// Checks the AVX-512 kernels against the scalar reference on a CPU without AVX-512, with the
// intrinsics emulated by SIMDe. Built and run by tests/test_kernels.py when SIMDe is installed.
#include <cmath>
#include <cstdio>
#include <vector>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include "common.h"

// Intrinsics SIMDe 0.7 does not emulate, done element by element.
static inline __m512 shim_cvtph_ps(__m256i h) {
    uint16_t a[16];
    float f[16];
    _mm256_storeu_si256((__m256i*)a, h);
    for (int i = 0; i < 16; i++) f[i] = hybrid::fp16_to_fp32(a[i]);
    return _mm512_loadu_ps(f);
}
static inline __m512i shim_cvtepu16_epi32(__m256i h) {
    uint16_t a[16];
    int32_t r[16];
    _mm256_storeu_si256((__m256i*)a, h);
    for (int i = 0; i < 16; i++) r[i] = a[i];
    return _mm512_loadu_si512(r);
}
static inline __m512 shim_cvtepi32_ps(__m512i v) {
    int32_t a[16];
    float f[16];
    _mm512_storeu_si512(a, v);
    for (int i = 0; i < 16; i++) f[i] = (float)a[i];
    return _mm512_loadu_ps(f);
}
static inline __m512i shim_cvtps_epi32(__m512 v) {  // round to nearest even, as the instruction
    float f[16];
    int32_t r[16];
    _mm512_storeu_ps(f, v);
    for (int i = 0; i < 16; i++) r[i] = (int32_t)std::nearbyint(f[i]);
    return _mm512_loadu_si512(r);
}
static inline __m512i shim_srai_epi32(__m512i v, unsigned int k) {  // arithmetic shift (k <= 31 here)
    int32_t a[16];
    _mm512_storeu_si512(a, v);
    for (int i = 0; i < 16; i++) a[i] >>= k;
    return _mm512_loadu_si512(a);
}
#define _mm512_cvtph_ps shim_cvtph_ps
#define _mm512_srai_epi32 shim_srai_epi32
#define _mm512_cvtps_epi32 shim_cvtps_epi32
#define _mm512_cvtepu16_epi32 shim_cvtepu16_epi32
#define _mm512_cvtepi32_ps shim_cvtepi32_ps

#include "../../native/arch/x86/avx512.cpp"
#include "../../native/arch/x86/gemm_avx512.cpp"

using namespace hybrid;

static uint64_t g_state = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32() {
    g_state ^= g_state << 13;
    g_state ^= g_state >> 7;
    g_state ^= g_state << 17;
    return (uint32_t)(g_state >> 16);
}
static float next_normalish() { return ((int)(next_u32() % 20001) - 10000) / 5000.f; }

// Random valid blocks: random quant bits, fp16 scales in a sane positive range.
static std::vector<uint8_t> random_row(int type, int n) {
    const type_info& ti = get_type_info(type);
    std::vector<uint8_t> row(row_bytes(type, n));
    for (auto& b : row) b = (uint8_t)next_u32();
    auto set_half = [&](size_t off) {
        const uint16_t h = (uint16_t)(0x1C00 + next_u32() % 0x0E00);
        std::memcpy(&row[off], &h, 2);
    };
    const int nb = n / ti.block;
    for (int b = 0; b < nb; b++) {
        const size_t base = (size_t)b * ti.block_bytes;
        switch (type) {
            case GGML_F32:
                for (int j = 0; j < ti.block; j++) {
                    float f = next_normalish();
                    std::memcpy(&row[base + 4 * j], &f, 4);
                }
                break;
            case GGML_F16: set_half(base); break;
            case GGML_BF16: row[base + 1] = (uint8_t)(0x3C + next_u32() % 8); break;
            case GGML_Q4_K:
            case GGML_Q5_K: set_half(base); set_half(base + 2); break;
            case GGML_Q6_K: set_half(base + 208); break;
            case GGML_Q4_1:
            case GGML_Q5_1: set_half(base); set_half(base + 2); break;
            case GGML_Q2_K: set_half(base + 80); set_half(base + 82); break;
            case GGML_Q3_K: set_half(base + 108); break;
            case GGML_IQ4_NL:
            case GGML_IQ4_XS:
            case GGML_IQ2_XXS:
            case GGML_IQ3_S:
            case GGML_IQ1_S:
            case GGML_IQ2_XS:
            case GGML_IQ2_S:
            case GGML_IQ3_XXS: set_half(base); break;
            case GGML_IQ1_M: {  // d in the top nibbles of the 4 u16 scales
                const uint16_t h = (uint16_t)(0x1C00 + next_u32() % 0x0E00);
                for (int k = 0; k < 4; k++) row[base + 49 + 2 * k] = (uint8_t)((row[base + 49 + 2 * k] & 0x0F) | (((h >> (4 * k)) & 0xF) << 4));
                break;
            }
            default: set_half(base); break;
        }
    }
    return row;
}

// The prefill tiles (gemm_avx512.cpp) against the AVX-512 single dot, bit for bit: token
// counts around the 4- and 8-token groups (tails of 1..7), 35 rows (two 16-row groups and 3
// rows for the per-row kernel), an odd count of 32-blocks, a strided output.
static void check_gemm_tiles(const kernel_table& simd, int* passed, int* failed) {
    gemm_tile_fn gemm[GGML_TYPE_LIMIT] = {};
    fill_avx512_gemm(gemm);
    const int types[] = {GGML_Q4_0, GGML_Q5_0, GGML_Q8_0, GGML_Q4_1, GGML_Q5_1, GGML_IQ4_NL, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K,
                         GGML_IQ2_XXS, GGML_IQ2_XS, GGML_IQ2_S, GGML_IQ3_XXS, GGML_IQ3_S, GGML_IQ1_S};
    const int R = 35;
    for (int type : types) {
        const type_info& ti = get_type_info(type);
        const int n = ti.block == 32 ? 544 : 512;
        const int64_t rb = row_bytes(type, n), ab = act_row_bytes(ti.act, n);
        std::vector<uint8_t> w;
        for (int r = 0; r < R; r++) {
            std::vector<uint8_t> row = random_row(type, n);
            w.insert(w.end(), row.begin(), row.end());
        }
        for (int T : {1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 17}) {
            std::vector<uint8_t> act(T * ab);
            std::vector<const void*> ptr(T);
            std::vector<float> x(n);
            for (int t = 0; t < T; t++) {
                for (auto& v : x) v = next_normalish() * (1 + t % 3);
                simd.quant_act[ti.act](x.data(), act.data() + t * ab, n);
                ptr[T - 1 - t] = act.data() + t * ab;  // any order of activation rows
            }
            const int64_t t_stride = R + 2;  // out[r + t * (R + 2)]: rows 1 apart, tokens R + 2
            std::vector<float> out(T * t_stride, -1.f);
            if (!gemm[type]) {
                std::printf("FAIL %s: no AVX-512 tile kernel\n", ti.name);
                (*failed)++;
                break;
            }
            gemm[type](n, w.data(), rb, R, ptr.data(), T, out.data(), 1, t_stride);
            bool ok = true;
            for (int t = 0; t < T; t++)
                for (int r = 0; r < R; r++) {
                    const float want = simd.dot[type](n, w.data() + r * rb, ptr[t]);
                    if (std::memcmp(&want, &out[r + t * t_stride], 4) != 0) {
                        if (ok) std::printf("FAIL %s tile T=%d: row %d token %d %.9g, dot %.9g\n", ti.name, T, r, t,
                                            out[r + t * t_stride], want);
                        ok = false;
                    }
                }
            for (int t = 0; t < T; t++)  // the gaps of the strided output stay untouched
                for (int r = R; r < t_stride; r++) ok = ok && out[r + t * t_stride] == -1.f;
            ok ? (*passed)++ : (*failed)++;
        }
    }
}

// Every 4-row dot of the table gives its single dot's bits for each of the 4 rows (prefill
// and decode must agree), and the types whose dot is AVX-512 code have none.
static void check_dot4(const kernel_table& simd, int* passed, int* failed) {
    const int n = 512;
    for (int type = 0; type < GGML_TYPE_LIMIT; type++) {
        if (!simd.dot4[type]) continue;
        const type_info& ti = get_type_info(type);
        const std::vector<uint8_t> w = random_row(type, n);
        std::vector<uint8_t> act(4 * act_row_bytes(ti.act, n));
        const void* ptr[4];
        std::vector<float> x(n);
        for (int r = 0; r < 4; r++) {
            for (auto& v : x) v = next_normalish() * (1 + r);
            ptr[r] = act.data() + r * act_row_bytes(ti.act, n);
            simd.quant_act[ti.act](x.data(), (void*)ptr[r], n);
        }
        float out[4];
        simd.dot4[type](n, w.data(), ptr, out);
        bool ok = true;
        for (int r = 0; r < 4; r++) {
            const float want = simd.dot[type](n, w.data(), ptr[r]);
            ok = ok && std::memcmp(&want, &out[r], 4) == 0;
        }
        if (!ok) std::printf("FAIL %s: dot4 differs from dot\n", ti.name);
        ok ? (*passed)++ : (*failed)++;
    }
}

// Q8_0 takes the AVX2 dot's float steps (four chains of blocks, one FMA per block of the exact
// integer sum) in both tables, which the row-group tiles of either ISA reproduce: the AVX-512
// dot (VNNI products) gives the AVX2 dot's bits, row after row. (Q4_K, Q5_K and Q6_K: the
// AVX-512 table holds the AVX2 dots themselves.)
static void check_same_bits_as_avx2(const kernel_table& simd, int* passed, int* failed) {
    kernel_table avx2;
    std::memset(&avx2, 0, sizeof(avx2));
    x86::fill_avx2_level(&avx2);
    for (int type : {GGML_Q4_K, GGML_Q5_K, GGML_Q6_K, GGML_Q8_0}) {
        const type_info& ti = get_type_info(type);
        const int n = ti.block == 32 ? 1056 : 1024;  // Q8_0: 33 blocks, a last group of one
        // Q8_0: the VNNI code, not the same function; the K-quants: the same function
        bool ok = (avx2.dot[type] != simd.dot[type]) == (type == GGML_Q8_0);
        for (int trial = 0; trial < 20 && ok; trial++) {
            const std::vector<uint8_t> w = random_row(type, n);
            std::vector<float> x(n);
            for (auto& v : x) v = next_normalish() * (1 + trial % 4);
            std::vector<uint8_t> act(act_row_bytes(ti.act, n));
            simd.quant_act[ti.act](x.data(), act.data(), n);
            const float a = avx2.dot[type](n, w.data(), act.data()), b = simd.dot[type](n, w.data(), act.data());
            if (std::memcmp(&a, &b, 4) != 0) {
                std::printf("FAIL %s trial %d: AVX-512 dot %.9g, AVX2 dot %.9g\n", ti.name, trial, b, a);
                ok = false;
            }
        }
        ok ? (*passed)++ : (*failed)++;
    }
}

// flash.h's attention item by item: the AVX-512 kernel (16 lanes, its own tile shapes)
// against the scalar reference, over shapes with row, key and value-dim tails, G > 1 and a
// second key part shared by every head. Bound: 4e-6 x max|v| (tests/test_flash.py's).
static void check_flash(const kernel_table& ref, const kernel_table& simd, int* passed, int* failed) {
    struct shape {
        int64_t T, H, Hkv, dk0, dk1, dv, pos0;
    };
    const shape shapes[] = {{1, 2, 2, 16, 0, 16, 0},    {7, 8, 2, 24, 0, 20, 5},    {47, 2, 2, 16, 8, 48, 0},
                            {49, 4, 4, 64, 32, 64, 0},  {64, 16, 2, 32, 0, 36, 100}, {97, 2, 2, 128, 64, 128, 1},
                            {130, 2, 1, 48, 0, 40, 70}};
    for (const shape& sh : shapes) {
        const int64_t S = sh.pos0 + sh.T, Dk = sh.dk0 + sh.dk1;
        std::vector<float> q(sh.T * sh.H * Dk), k(sh.Hkv * S * sh.dk0), kr(S * (sh.dk1 ? sh.dk1 : 1)),
            v(sh.Hkv * S * sh.dv), o_ref(sh.T * sh.H * sh.dv), o_simd(o_ref.size());
        float vmax = 0.f;
        for (auto& x : q) x = next_normalish();
        for (auto& x : k) x = next_normalish();
        for (auto& x : kr) x = next_normalish();
        for (auto& x : v) vmax = std::max(vmax, std::fabs(x = next_normalish()));
        flash_args a;
        a.H = sh.H, a.Hkv = sh.Hkv, a.T = sh.T, a.S = S, a.pos0 = sh.pos0;
        a.dk[0] = sh.dk0, a.dk[1] = sh.dk1, a.dv = sh.dv, a.scale = 1.f / std::sqrt((float)Dk);
        a.q[0] = q.data(), a.q_t[0] = sh.H * Dk, a.q_h[0] = Dk;       // [T, H, dk0 | dk1]
        a.q[1] = q.data() + sh.dk0, a.q_t[1] = sh.H * Dk, a.q_h[1] = Dk;
        a.k[0] = k.data(), a.k_s[0] = sh.dk0, a.k_h[0] = S * sh.dk0;  // [Hkv, S, dk0]
        a.k[1] = kr.data(), a.k_s[1] = sh.dk1, a.k_h[1] = 0;          // [S, dk1] for all heads
        a.v = v.data(), a.v_s = sh.dv, a.v_h = S * sh.dv;
        a.o_t = sh.H * sh.dv, a.o_h = sh.dv;
        std::vector<float> scratch(flash_scratch_floats(a) + 16);
        float* sp = scratch.data() + (16 - ((uintptr_t)scratch.data() / 4) % 16) % 16;  // 64-byte aligned
        const int64_t rows = sh.T * (sh.H / sh.Hkv);
        for (int which = 0; which < 2; which++) {
            a.o = which ? o_simd.data() : o_ref.data();
            const flash_fn fn = which ? simd.flash : ref.flash;
            for (int64_t g = 0; g < sh.Hkv; g++)
                for (int64_t r0 = 0; r0 < rows; r0 += kFlashRows) fn(a, g, r0, std::min(rows, r0 + kFlashRows), sp);
        }
        double worst = 0;
        for (size_t i = 0; i < o_ref.size(); i++) worst = std::max(worst, (double)std::fabs(o_ref[i] - o_simd[i]));
        if (worst <= 4e-6 * vmax) {
            (*passed)++;
        } else {
            (*failed)++;
            std::printf("FAIL flash T=%lld H=%lld Hkv=%lld dk=%lld+%lld dv=%lld pos0=%lld: max diff %.3g (|v| %.3g)\n",
                        (long long)sh.T, (long long)sh.H, (long long)sh.Hkv, (long long)sh.dk0, (long long)sh.dk1,
                        (long long)sh.dv, (long long)sh.pos0, worst, vmax);
        }
    }
}

int main() {
    kernel_table ref, simd;
    fill_scalar_kernels(&ref);
    std::memset(&simd, 0, sizeof(simd));
    fill_avx512_kernels(&simd);
    const int types[] = {GGML_F32, GGML_F16, GGML_BF16, GGML_Q4_0, GGML_Q5_0, GGML_Q8_0,
                         GGML_Q4_K, GGML_Q5_K, GGML_Q6_K, GGML_Q4_1, GGML_Q5_1, GGML_Q2_K, GGML_Q3_K,
                         GGML_IQ4_NL, GGML_IQ4_XS, GGML_IQ2_XXS, GGML_IQ3_S, GGML_IQ1_S,
                         GGML_IQ2_XS, GGML_IQ2_S, GGML_IQ3_XXS, GGML_IQ1_M};
    int passed = 0, failed = 0;
    const int n = 1024;
    for (int type : types) {
        const type_info& ti = get_type_info(type);
        for (int trial = 0; trial < 20; trial++) {
            std::vector<uint8_t> w = random_row(type, n);
            std::vector<float> x(n), a_ref(n), a_simd(n);
            for (auto& v : x) v = next_normalish();
            std::vector<uint8_t> act_ref(act_row_bytes(ti.act, n)), act_simd(act_ref.size());
            ref.quant_act[ti.act](x.data(), act_ref.data(), n);
            if (simd.quant_act[ti.act]) {
                simd.quant_act[ti.act](x.data(), act_simd.data(), n);
                if (std::memcmp(act_ref.data(), act_simd.data(), act_ref.size()) != 0) {
                    std::printf("FAIL %s quant_act differs\n", ti.name);
                    failed++;
                    continue;
                }
            }
            const float r = ref.dot[type](n, w.data(), act_ref.data());
            const float s = simd.dot[type](n, w.data(), act_ref.data());
            // scale of the terms, for a relative tolerance on cancellation
            ref.dequant[type](w.data(), a_ref.data(), n);
            double mag = 0;
            for (int i = 0; i < n; i++) mag += std::fabs(a_ref[i] * x[i]);
            const bool dot_ok = std::fabs(r - s) <= 1e-5 * mag + 1e-6;
            if (simd.dequant[type]) simd.dequant[type](w.data(), a_simd.data(), n);
            else a_simd = a_ref;
            const bool deq_ok = std::memcmp(a_ref.data(), a_simd.data(), n * 4) == 0;
            if (dot_ok && deq_ok) {
                passed++;
            } else {
                failed++;
                std::printf("FAIL %s trial %d: dot ref %.7g avx512 %.7g (mag %.3g), dequant %s\n", ti.name,
                            trial, r, s, mag, deq_ok ? "ok" : "differs");
            }
        }
    }
    check_gemm_tiles(simd, &passed, &failed);
    check_dot4(simd, &passed, &failed);
    check_same_bits_as_avx2(simd, &passed, &failed);
    check_flash(ref, simd, &passed, &failed);
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
