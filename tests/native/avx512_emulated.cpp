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
#define _mm512_cvtph_ps shim_cvtph_ps
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
// counts around the 4- and 8-token groups (tails of 1..7), several rows, a strided output.
static void check_gemm_tiles(const kernel_table& simd, int* passed, int* failed) {
    gemm_tile_fn gemm[GGML_TYPE_LIMIT] = {};
    fill_avx512_gemm(gemm);
    const int types[] = {GGML_Q4_0, GGML_Q5_0, GGML_Q8_0, GGML_Q4_1, GGML_Q5_1, GGML_IQ4_NL, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K,
                         GGML_IQ2_XXS, GGML_IQ2_XS, GGML_IQ2_S, GGML_IQ3_XXS, GGML_IQ3_S, GGML_IQ1_S};
    const int n = 512, R = 3;
    for (int type : types) {
        const type_info& ti = get_type_info(type);
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
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
