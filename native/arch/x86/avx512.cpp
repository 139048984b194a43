// AVX-512 (F/BW/VL/DQ + VNNI) kernel table. Compiled with those flags; used only after cpuid
// confirms all of them. Dequantize and activation quantization are the AVX2-level code of
// x86_avx2_kernels.h rebuilt with these flags (they are load/store bound, wider vectors do not
// help); most dots use 512-bit registers and VNNI dot instructions. Q4_K, Q5_K, Q6_K and Q8_0
// keep the AVX2 dots (Q8_0 with the VNNI product): one FMA per block of its exact integer sum,
// the float step gemm_avx512.cpp's 16-row prefill groups take for 16 rows in one register, so
// prefill equals decode bit for bit, and the AVX2 table's results too. Cached, one thread, Zen
// 4, ns per 256 weights: Q4_K 7.4 as the 512-bit dot it replaced, Q6_K 8.2 (7.8), Q8_0 8.3
// (8.2); 512-bit versions with this float step took 8.3 and 9.3 for Q4_K and Q6_K (the per-block
// reduction of 16 lanes). At decode all of them stream DRAM at the read bandwidth.
#include "x86_avx2_kernels.h"
#include "flash_x86.h"

namespace hybrid {
namespace x86_512 {

using namespace x86;

static inline __m512i join256(__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

static inline float reduce_add(__m512 v) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return hsum_ps(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}

static float dot_f32(int64_t n, const void* w, const void* a) {
    const float* x = (const float*)w;
    const float* y = (const float*)a;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16), s1);
    }
    float s = reduce_add(_mm512_add_ps(s0, s1));
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

static inline __m512 load_f16x16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
static inline __m512 load_bf16x16(const uint16_t* p) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

static float dot_f16(int64_t n, const void* w, const void* a) {
    const uint16_t* x = (const uint16_t*)w;
    const float* y = (const float*)a;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(load_f16x16(x + i), _mm512_loadu_ps(y + i), s0);
        s1 = _mm512_fmadd_ps(load_f16x16(x + i + 16), _mm512_loadu_ps(y + i + 16), s1);
    }
    float s = reduce_add(_mm512_add_ps(s0, s1));
    for (; i < n; i++) s += h2f(x[i]) * y[i];
    return s;
}

static float dot_bf16(int64_t n, const void* w, const void* a) {
    const uint16_t* x = (const uint16_t*)w;
    const float* y = (const float*)a;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(load_bf16x16(x + i), _mm512_loadu_ps(y + i), s0);
        s1 = _mm512_fmadd_ps(load_bf16x16(x + i + 16), _mm512_loadu_ps(y + i + 16), s1);
    }
    float s = reduce_add(_mm512_add_ps(s0, s1));
    for (; i < n; i++) s += bf16_to_fp32(x[i]) * y[i];
    return s;
}

// Word permutations spreading 4 int16 scales over 4 x 8 lanes (sub-blocks of 16 quants).
alignas(64) static const int16_t k_q6_scale_idx[2][32] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
};

// Q4_1 / Q5_1: the AVX2 code with one VNNI instruction for the 32 u8 x s8 products.
static inline __m256i dot_vnni_32(__m256i u, __m256i s) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

// sum_i sc_i * (u . a)_i over one 128-half of a Q2_K / Q3_K block: quarters q (q2_quarters),
// the half's 8 scales as int16 in sc8, its 128 activations at ay. 64 quants per register:
// maddubs, then vpdpwssd with the scales spread over 4 x 8 words (k_q6_scale_idx's layout).
static inline __m512i q2_half_sums_512(__m512i sumi, const __m256i q[4], __m128i sc8, const int8_t* ay) {
    const __m512i sc = _mm512_castsi128_si512(sc8);
    const __m512i a01 = _mm512_loadu_si512((const void*)ay), a23 = _mm512_loadu_si512((const void*)(ay + 64));
    const __m512i idx0 = _mm512_load_si512((const void*)k_q6_scale_idx[0]);
    const __m512i idx1 = _mm512_load_si512((const void*)k_q6_scale_idx[1]);
    sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(join256(q[0], q[1]), a01), _mm512_permutexvar_epi16(idx0, sc));
    return _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(join256(q[2], q[3]), a23), _mm512_permutexvar_epi16(idx1, sc));
}

static float dot_q2_K(int64_t n, const void* w, const void* a) {
    const block_q2_K* x = (const block_q2_K*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    __m512 acc = _mm512_setzero_ps();
    __m256 acc_m = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_q2_K));
        const __m128i sc = _mm_and_si128(_mm_loadu_si128((const __m128i*)x[b].scales), _mm_set1_epi8(0xF));
        __m512i sumi = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q2_quarters(x[b].qs + 32 * h, nullptr, h, q);
            sumi = q2_half_sums_512(sumi, q, _mm_cvtepu8_epi16(h ? _mm_srli_si128(sc, 8) : sc), y[b].qs + 128 * h);
        }
        const __m256i mins = _mm256_madd_epi16(q2_nibbles16(x[b].scales, 4), _mm256_loadu_si256((const __m256i*)y[b].bsums));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(y[b].d * h2f(x[b].d)), _mm512_cvtepi32_ps(sumi), acc);
        acc_m = _mm256_fmadd_ps(_mm256_set1_ps(y[b].d * h2f(x[b].dmin)), _mm256_cvtepi32_ps(mins), acc_m);
    }
    return reduce_add(acc) - hsum_ps(acc_m);
}

static float dot_q3_K(int64_t n, const void* w, const void* a) {
    const block_q3_K* x = (const block_q3_K*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_q3_K));
        const __m128i sc8 = q3_scales_128(x[b].scales);
        __m512i sumi = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m256i q[4];
            q2_quarters(x[b].qs + 32 * h, x[b].hmask, h, q);
            sumi = q2_half_sums_512(sumi, q, _mm_cvtepi8_epi16(h ? _mm_srli_si128(sc8, 8) : sc8), y[b].qs + 128 * h);
        }
        // the quants went in + 4: take 4 * sum_i sc_i * bsums_i back out (8 lanes, low half)
        const __m256i off = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8), _mm256_loadu_si256((const __m256i*)y[b].bsums));
        sumi = _mm512_sub_epi32(sumi, _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_slli_epi32(off, 2), 0));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(y[b].d * h2f(x[b].d)), _mm512_cvtepi32_ps(sumi), acc);
    }
    return reduce_add(acc);
}

// IQ4_XS: a pair of sub-blocks (64 quants) per 512-bit register, pair sums scaled by vpdpwssd.
static float dot_iq4_xs(int64_t n, const void* w, const void* a) {
    const block_iq4_xs* x = (const block_iq4_xs*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_iq4_xs));
        __m512i sumi = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i*)(x[b].qs + 32 * c));
            const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m512i wv = join256(iq4_lookup(_mm256_permute2x128_si256(lo, hi, 0x20)),
                                       iq4_lookup(_mm256_permute2x128_si256(lo, hi, 0x31)));
            const __m512i av = _mm512_loadu_si512((const void*)(y[b].qs + 64 * c));
            // |w| x (a with w's sign): AVX-512 has no vpsignb, a masked negate does it
            const __m512i as = _mm512_mask_sub_epi8(av, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), av);
            const __m512i p = _mm512_maddubs_epi16(_mm512_abs_epi8(wv), as);
            const __m512i s = join256(_mm256_set1_epi16((short)iq4_xs_scale(x[b], 2 * c)),
                                      _mm256_set1_epi16((short)iq4_xs_scale(x[b], 2 * c + 1)));
            sumi = _mm512_dpwssd_epi32(sumi, p, s);
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(h2f(x[b].d) * y[b].d), _mm512_cvtepi32_ps(sumi), acc);
    }
    return reduce_add(acc);
}

// x86_avx2_kernels.h's vec8 on 512-bit registers (flash_x86.h's kernel and exp_v take either)
struct vec16 {
    static constexpr int W = 16;
    using T = __m512;
    using M = __mmask16;
    static T zero() { return _mm512_setzero_ps(); }
    static T load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
    static T bcast(const float* p) { return _mm512_set1_ps(*p); }
    static T set1(float x) { return _mm512_set1_ps(x); }
    static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
    static T fnma(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }
    static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
    static T add(T a, T b) { return _mm512_add_ps(a, b); }
    static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
    static T max(T a, T b) { return _mm512_max_ps(a, b); }
    static T min(T a, T b) { return _mm512_min_ps(a, b); }
    static T round(T a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    static T pow2(T n) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
    }
    static M below(T a, T b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
    static T select(M m, T a, T b) { return _mm512_mask_blend_ps(m, b, a); }
};

}  // namespace x86_512

bool fill_avx512_kernels(kernel_table* t) {
    t->isa = "avx512";
    x86::fill_avx2_level(t);
    const kernel_table avx2_level = *t;
    t->dot[GGML_F32] = x86_512::dot_f32;
    t->dot[GGML_F16] = x86_512::dot_f16;
    t->dot[GGML_BF16] = x86_512::dot_bf16;
    // 32-blocks: x86::rows32 with one 256-bit VNNI dot per block (gemm_avx512.cpp's tiles)
    t->dot[GGML_Q4_0] = x86::dot32<x86::b32_q4_0, x86_512::dot_vnni_32>;
    t->dot[GGML_Q5_0] = x86::dot32<x86::b32_q5_0, x86_512::dot_vnni_32>;
    // Q4_K / Q5_K / Q6_K: fill_avx2_level's dots; Q8_0 the same code with the VNNI product
    // (see the top of this file)
    t->dot[GGML_Q8_0] = x86::dot_q8_0<x86_512::dot_vnni_32>;
    t->dot[GGML_Q4_1] = x86::dot32<x86::b32_q4_1, x86_512::dot_vnni_32>;
    t->dot[GGML_Q5_1] = x86::dot32<x86::b32_q5_1, x86_512::dot_vnni_32>;
    t->dot[GGML_Q2_K] = x86_512::dot_q2_K;
    t->dot[GGML_Q3_K] = x86_512::dot_q3_K;
    t->dot[GGML_IQ4_NL] = x86::dot32<x86::b32_iq4_nl, x86_512::dot_vnni_32>;
    t->dot[GGML_IQ4_XS] = x86_512::dot_iq4_xs;
    // 8 keys x 48 rows (24 sums) per score tile, 6 rows x 64 value dims (24 sums) per value tile
    t->flash = flash_rows_simd<x86_512::vec16, 8, 3, 6, 4>;
    // A 4-row dot is bit-identical only to the single dot of its own code: where this file
    // replaced the AVX2 dot, the type does without (the lattice types keep theirs).
    for (int i = 0; i < GGML_TYPE_LIMIT; i++)
        if (t->dot[i] != avx2_level.dot[i]) t->dot4[i] = nullptr;
    return true;
}

}  // namespace hybrid
