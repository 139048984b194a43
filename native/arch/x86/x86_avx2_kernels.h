// AVX2 + FMA + F16C kernels for every block format. Included by avx2.cpp and, compiled with
// AVX-512 flags, by avx512.cpp (which then replaces the dots with 512-bit / VNNI versions).
// Everything here has internal linkage (an unnamed namespace): each including file gets its
// own copy built with its own flags. An inline function or class member with external linkage
// would be emitted by every ISA file and merged by the linker into one copy, which the AVX2
// table could then share with the AVX-512 file's build (SIGILL on a CPU without AVX-512); for
// the same reason nothing here instantiates a std container.
#pragma once

#if defined(HYBRID_SIMDE_AVX512)
// Test builds only (tests/native/avx512_emulated.cpp): SIMDe emulates the AVX-512 intrinsics
// so the AVX-512 kernels can be checked on a CPU without AVX-512.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdlib>
#include <new>
#include <type_traits>

#include "../../quants.h"

namespace hybrid {
namespace x86 {
namespace {

// Hardware fp16 -> fp32 (F16C): exact, like the scalar fp16_to_fp32, but one instruction.
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int hsum_epi32_128(__m128i v) {
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(v);
}

// Weight rows are streamed from DRAM once per token: every dot prefetches the lines of the
// block kPrefetchAhead bytes ahead of the one it computes (common.h). Past the end of a row
// that is the next rows, which the same worker reads next; past a buffer's end prefetches
// are dropped, never fault.
static inline void prefetch_block(const uint8_t* blk, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char*)blk + kPrefetchAhead + o, _MM_HINT_T0);
}

// 32 bytes: 0x10 where bit j of `bits` is set, else 0 (the 5th bit of Q5_0 quants).
static inline __m256i bits_to_0x10(uint32_t bits) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

// ---------------------------------------------------------------- dequantize
// Same float operations as the scalar reference (explicit mul then sub, no fused FMA), so
// the results are bit-identical to it.

static inline void store_i8x8_scaled(float* y, __m128i q8, __m256 d) {
    _mm256_storeu_ps(y, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), d));
}

static void dequant_f16(const void* src, float* y, int64_t n) {
    const uint16_t* x = (const uint16_t*)src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + i))));
    for (; i < n; i++) y[i] = h2f(x[i]);
}

static void dequant_bf16(const void* src, float* y, int64_t n) {
    const uint16_t* x = (const uint16_t*)src;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(x + i)));
        _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; i < n; i++) y[i] = bf16_to_fp32(x[i]);
}

static void dequant_q8_0(const void* src, float* y, int64_t n) {
    const block_q8_0* x = (const block_q8_0*)src;
    for (int64_t b = 0; b < n / QK32; b++, y += QK32) {
        const __m256 d = _mm256_set1_ps(h2f(x[b].d));
        for (int j = 0; j < QK32; j += 8)
            store_i8x8_scaled(y + j, _mm_loadl_epi64((const __m128i*)(x[b].qs + j)), d);
    }
}

// 32 signed quants (already offset) of one 32-block, times d.
static inline void store_i8x32_scaled(float* y, __m256i q, __m256 d) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    store_i8x8_scaled(y + 0, lo, d);
    store_i8x8_scaled(y + 8, _mm_srli_si128(lo, 8), d);
    store_i8x8_scaled(y + 16, hi, d);
    store_i8x8_scaled(y + 24, _mm_srli_si128(hi, 8), d);
}

// Q4_0 / Q5_0 nibbles of a 32-block in element order: low nibbles then high nibbles.
static inline __m256i nibbles_32(const uint8_t* qs) {
    const __m128i q = _mm_loadu_si128((const __m128i*)qs);
    const __m256i v = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    return _mm256_and_si256(v, _mm256_set1_epi8(0xF));
}

static void dequant_q4_0(const void* src, float* y, int64_t n) {
    const block_q4_0* x = (const block_q4_0*)src;
    for (int64_t b = 0; b < n / QK32; b++, y += QK32) {
        const __m256i q = _mm256_sub_epi8(nibbles_32(x[b].qs), _mm256_set1_epi8(8));
        store_i8x32_scaled(y, q, _mm256_set1_ps(h2f(x[b].d)));
    }
}

static void dequant_q5_0(const void* src, float* y, int64_t n) {
    const block_q5_0* x = (const block_q5_0*)src;
    for (int64_t b = 0; b < n / QK32; b++, y += QK32) {
        uint32_t qh;
        std::memcpy(&qh, x[b].qh, 4);
        __m256i q = _mm256_or_si256(nibbles_32(x[b].qs), bits_to_0x10(qh));
        q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
        store_i8x32_scaled(y, q, _mm256_set1_ps(h2f(x[b].d)));
    }
}

// y[0..31] = d * q - m for 32 unsigned quants in a 256-bit register.
static inline void store_u8x32_affine(float* y, __m256i q, __m256 d, __m256 m) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++) {
        const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
        _mm256_storeu_ps(y + 8 * i, _mm256_sub_ps(_mm256_mul_ps(d, f), m));
    }
}

static void dequant_k4(const uint8_t* qs, const uint8_t* qh, const uint8_t* scales, float d,
                       float dmin, float* y) {
    uint8_t sm[16];
    unpack_scales_mins_k4(scales, sm);
    const __m256i m4 = _mm256_set1_epi8(0xF);
    const __m256i hbits = qh ? _mm256_loadu_si256((const __m256i*)qh) : _mm256_setzero_si256();
    for (int c = 0; c < 4; c++, y += 64) {
        const __m256i q = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
        __m256i lo = _mm256_and_si256(q, m4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        if (qh) {
            const __m256i one = _mm256_set1_epi8(1);
            const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * c), one);
            const __m256i h1 = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * c + 1), one);
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(h0, 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4));
        }
        store_u8x32_affine(y, lo, _mm256_set1_ps(d * sm[2 * c]), _mm256_set1_ps(dmin * sm[8 + 2 * c]));
        store_u8x32_affine(y + 32, hi, _mm256_set1_ps(d * sm[2 * c + 1]),
                           _mm256_set1_ps(dmin * sm[8 + 2 * c + 1]));
    }
}

static void dequant_q4_K(const void* src, float* y, int64_t n) {
    const block_q4_K* x = (const block_q4_K*)src;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K)
        dequant_k4(x[b].qs, nullptr, x[b].scales, h2f(x[b].d), h2f(x[b].dmin), y);
}

static void dequant_q5_K(const void* src, float* y, int64_t n) {
    const block_q5_K* x = (const block_q5_K*)src;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K)
        dequant_k4(x[b].qs, x[b].qh, x[b].scales, h2f(x[b].d), h2f(x[b].dmin), y);
}

// The four quarters (32 quants each, values 0..63) of one 128-half of a Q6_K block. Quarter
// k's two high bits are bits 2k..2k+1 of qh: masked in place and moved to bits 4-5 with one
// shift (none for k = 2; the mask keeps 16-bit shifts from crossing bytes).
static inline void q6_quarters(const uint8_t* ql, const uint8_t* qh, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(0xF);
    const __m256i l0 = _mm256_loadu_si256((const __m256i*)ql);
    const __m256i l1 = _mm256_loadu_si256((const __m256i*)(ql + 32));
    const __m256i h = _mm256_loadu_si256((const __m256i*)qh);
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(0x03)), 4));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(0x0C)), 2));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, _mm256_set1_epi8(0x30)));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                           _mm256_srli_epi16(_mm256_and_si256(h, _mm256_set1_epi8((char)0xC0)), 2));
}

static void dequant_q6_K(const void* src, float* y, int64_t n) {
    const block_q6_K* x = (const block_q6_K*)src;
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = h2f(x[b].d);
        for (int half = 0; half < 2; half++, y += 128) {
            __m256i q[4];
            q6_quarters(x[b].ql + 64 * half, x[b].qh + 32 * half, q);
            const int8_t* sc = x[b].scales + 8 * half;
            for (int i = 0; i < 4; i++) {
                const __m256i s = _mm256_sub_epi8(q[i], _mm256_set1_epi8(32));
                const __m128i lo = _mm256_castsi256_si128(s), hi = _mm256_extracti128_si256(s, 1);
                const __m256 d0 = _mm256_set1_ps(d * sc[2 * i]), d1 = _mm256_set1_ps(d * sc[2 * i + 1]);
                store_i8x8_scaled(y + 32 * i + 0, lo, d0);
                store_i8x8_scaled(y + 32 * i + 8, _mm_srli_si128(lo, 8), d0);
                store_i8x8_scaled(y + 32 * i + 16, hi, d1);
                store_i8x8_scaled(y + 32 * i + 24, _mm_srli_si128(hi, 8), d1);
            }
        }
    }
}

// ---------------------------------------------------------------- activation quantization
// Bit-identical to the scalar reference: same amax, same d and 1/d, same rounding
// (cvtps rounds to nearest even, like nearest_int).

static inline float absmax(const float* x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 32 floats times id, rounded, packed to 32 int8 in order; returns their sum.
static inline int quantize_32(const float* x, __m256 id, int8_t* out) {
    __m256i v[4];
    for (int i = 0; i < 4; i++) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), id));
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
    // packs works per 128-bit lane: fix the order with one permute at the end.
    const __m256i p01 = _mm256_packs_epi32(v[0], v[1]);
    const __m256i p23 = _mm256_packs_epi32(v[2], v[3]);
    __m256i p = _mm256_packs_epi16(p01, p23);
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)out, p);
    return hsum_epi32_128(_mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
}

static void quant_act_q8_32(const float* x, void* dst, int64_t n) {
    block_q8_32* y = (block_q8_32*)dst;
    for (int64_t b = 0; b < n / QK32; b++, x += QK32) {
        const float amax = absmax(x, QK32);
        const float id = amax != 0.f ? 127.f / amax : 0.f;
        y[b].sum = quantize_32(x, _mm256_set1_ps(id), y[b].qs);
        y[b].d = _cvtsh_ss(_cvtss_sh(amax / 127.f, _MM_FROUND_TO_NEAREST_INT));
    }
}

static void quant_act_q8_1(const float* x, void* dst, int64_t n) {
    block_q8_1* y = (block_q8_1*)dst;
    for (int64_t b = 0; b < n / QK32; b++, x += QK32) {
        const float amax = absmax(x, QK32);
        const float d = amax / 127.f;
        const float id = amax != 0.f ? 127.f / amax : 0.f;
        const int sum = quantize_32(x, _mm256_set1_ps(id), y[b].qs);
        y[b].d = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
        y[b].s = _cvtsh_ss(_cvtss_sh(d * (float)sum, _MM_FROUND_TO_NEAREST_INT));
    }
}

static void quant_act_q8_K(const float* x, void* dst, int64_t n) {
    block_q8_K* y = (block_q8_K*)dst;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        const float amax = absmax(x, QK_K);
        if (amax == 0.f) {
            std::memset(&y[b], 0, sizeof(y[b]));
            continue;
        }
        int j = 0;  // the first value of largest magnitude keeps its sign: it maps to -127
        while (j < QK_K - 1 && std::fabs(x[j]) != amax) j++;
        const float iscale = -127.f / x[j];
        const __m256 vid = _mm256_set1_ps(iscale);
        for (int i = 0; i < QK_K; i += 32) quantize_32(x + i, vid, y[b].qs + i);
        // bsums: pairwise sums of 16 int8 via maddubs with ones, then horizontal adds.
        const __m256i ones = _mm256_set1_epi8(1);
        for (int j = 0; j < QK_K; j += 64) {
            const __m256i a = _mm256_maddubs_epi16(ones, _mm256_loadu_si256((const __m256i*)(y[b].qs + j)));
            const __m256i c = _mm256_maddubs_epi16(ones, _mm256_loadu_si256((const __m256i*)(y[b].qs + j + 32)));
            // a: 16 pair sums of 32 quants (4 groups of 16 -> 2 groups per 128-bit lane)
            __m256i h = _mm256_hadd_epi16(a, c);   // lane0: a0..3 pairs, c0..3; lane1: a4..7, c4..7
            h = _mm256_hadd_epi16(h, h);
            h = _mm256_hadd_epi16(h, h);           // each lane: [a_g, c_g] group sums in words 0,1
            const int16_t* w = (const int16_t*)&h;
            y[b].bsums[j / 16 + 0] = w[0];
            y[b].bsums[j / 16 + 1] = w[8];
            y[b].bsums[j / 16 + 2] = w[1];
            y[b].bsums[j / 16 + 3] = w[9];
        }
        y[b].d = 1.f / iscale;
    }
}

// ---------------------------------------------------------------- dots: float weights

static float dot_f32(int64_t n, const void* w, const void* a) {
    const float* x = (const float*)w;
    const float* y = (const float*)a;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), s1);
    }
    float s = hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += x[i] * y[i];
    return s;
}

// ---------------------------------------------------------------- attention over cached rows

// Four queries per pass over a row: each 8-float chunk of the row is loaded once for four FMAs.
static void attn_scores(const float* q, int64_t nq, const float* rows, int64_t stride, int64_t S, int64_t W,
                        float* out) {
    const int64_t W8 = W / 8 * 8;
    for (int64_t s = 0; s < S; s++) {
        const float* r = rows + s * stride;
        int64_t i = 0;
        for (; i + 4 <= nq; i += 4) {
            const float *q0 = q + i * W, *q1 = q0 + W, *q2 = q1 + W, *q3 = q2 + W;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t c = 0; c < W8; c += 8) {
                const __m256 v = _mm256_loadu_ps(r + c);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c), v, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + c), v, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + c), v, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + c), v, a3);
            }
            float o[4] = {hsum_ps(a0), hsum_ps(a1), hsum_ps(a2), hsum_ps(a3)};
            for (int64_t c = W8; c < W; c++)
                for (int k = 0; k < 4; k++) o[k] += q[(i + k) * W + c] * r[c];
            for (int k = 0; k < 4; k++) out[(i + k) * S + s] = o[k];
        }
        for (; i < nq; i++) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t c = 0; c < W8; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * W + c), _mm256_loadu_ps(r + c), a);
            float o = hsum_ps(a);
            for (int64_t c = W8; c < W; c++) o += q[i * W + c] * r[c];
            out[i * S + s] = o;
        }
    }
}

// 8 floats as the width-generic code below (exp_v, flash_x86.h) sees a vector: avx512.cpp has
// the 16-float twin (vec16) with the same members.
struct vec8 {
    static constexpr int W = 8;
    using T = __m256;
    using M = __m256;  // a lane mask
    static T zero() { return _mm256_setzero_ps(); }
    static T load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
    static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
    static T set1(float x) { return _mm256_set1_ps(x); }
    static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
    static T fnma(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
    static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
    static T add(T a, T b) { return _mm256_add_ps(a, b); }
    static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
    static T max(T a, T b) { return _mm256_max_ps(a, b); }
    static T min(T a, T b) { return _mm256_min_ps(a, b); }
    static T round(T a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    // 2^n for integral n in float (n + 127 into the exponent field)
    static T pow2(T n) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    }
    static M below(T a, T b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }  // a < b
    static T select(M m, T a, T b) { return _mm256_blendv_ps(b, a, m); }  // m ? a : b
};

// exp of W floats: 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, exp(r) by a degree-6
// polynomial (Cephes' expf coefficients, within 2 ulp of std::exp); below -87.3 the result
// is flushed to 0 (softmax numerators: nothing that small matters next to the max's 1).
template <class V>
static inline typename V::T exp_v(typename V::T x) {
    const typename V::T lo = V::set1(-87.3f);
    const typename V::M tiny = V::below(x, lo);
    x = V::min(V::max(x, lo), V::set1(88.3f));
    const typename V::T n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
    typename V::T r = V::fnma(n, V::set1(0.693359375f), x);
    r = V::fnma(n, V::set1(-2.12194440e-4f), r);
    typename V::T p = V::set1(1.9875691500e-4f);
    p = V::fma(p, r, V::set1(1.3981999507e-3f));
    p = V::fma(p, r, V::set1(8.3334519073e-3f));
    p = V::fma(p, r, V::set1(4.1665795894e-2f));
    p = V::fma(p, r, V::set1(1.6666665459e-1f));
    p = V::fma(p, r, V::set1(5.0000001201e-1f));
    p = V::fma(V::mul(p, r), r, V::add(r, V::set1(1.f)));
    return V::select(tiny, V::zero(), V::mul(p, V::pow2(n)));
}

static inline __m256 exp8(__m256 x) { return exp_v<vec8>(x); }

static float exp_sum(float* x, int64_t n, float sub) {
    const __m256 vs = _mm256_set1_ps(sub);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
        _mm256_storeu_ps(x + i, v);
        acc = _mm256_add_ps(acc, v);
    }
    float sum = hsum_ps(acc);
    for (; i < n; i++) sum += (x[i] = std::exp(x[i] - sub));
    return sum;
}

// silu(g) * u, 8 at a time with exp8 (libm's expf cost ~25 cycles an element: ~5% of an expert
// prefill at D = 2048, twice that where large negative gates took its overflow path); a tail
// goes through the same vector code, so an element's value never depends on n or position.
// Above 87.3 exp8(-g) is 0 and silu(g) = g; below -88.3 exp8 saturates near 2.2e38 and the
// result is ~0, as with std::exp.
static inline __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

static void silu_mul(int64_t n, const float* g, const float* u, float* out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    if (i < n) {
        alignas(32) float gt[8] = {0}, ut[8] = {0}, ot[8];
        for (int64_t j = i; j < n; j++) gt[j - i] = g[j], ut[j - i] = u[j];
        _mm256_store_ps(ot, silu_mul8(_mm256_load_ps(gt), _mm256_load_ps(ut)));
        for (int64_t j = i; j < n; j++) out[j] = ot[j - i];
    }
}

// 16 columns of four queries in eight registers across all rows, then the next 16 columns:
// each row chunk is loaded once per four queries, the sums never leave the registers.
static void attn_values(const float* p, int64_t nq, const float* rows, int64_t stride, int64_t S, int64_t C,
                        float* out) {
    const int64_t C16 = C / 16 * 16;
    int64_t i = 0;
    for (; i + 4 <= nq; i += 4) {
        const float *p0 = p + i * S, *p1 = p0 + S, *p2 = p1 + S, *p3 = p2 + S;
        for (int64_t c = 0; c < C16; c += 16) {
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
            for (int64_t s = 0; s < S; s++) {
                const float* r = rows + s * stride + c;
                const __m256 v0 = _mm256_loadu_ps(r), v1 = _mm256_loadu_ps(r + 8);
                __m256 b = _mm256_broadcast_ss(p0 + s);
                a00 = _mm256_fmadd_ps(b, v0, a00), a01 = _mm256_fmadd_ps(b, v1, a01);
                b = _mm256_broadcast_ss(p1 + s);
                a10 = _mm256_fmadd_ps(b, v0, a10), a11 = _mm256_fmadd_ps(b, v1, a11);
                b = _mm256_broadcast_ss(p2 + s);
                a20 = _mm256_fmadd_ps(b, v0, a20), a21 = _mm256_fmadd_ps(b, v1, a21);
                b = _mm256_broadcast_ss(p3 + s);
                a30 = _mm256_fmadd_ps(b, v0, a30), a31 = _mm256_fmadd_ps(b, v1, a31);
            }
            float* o = out + i * C + c;
            _mm256_storeu_ps(o, a00), _mm256_storeu_ps(o + 8, a01);
            _mm256_storeu_ps(o + C, a10), _mm256_storeu_ps(o + C + 8, a11);
            _mm256_storeu_ps(o + 2 * C, a20), _mm256_storeu_ps(o + 2 * C + 8, a21);
            _mm256_storeu_ps(o + 3 * C, a30), _mm256_storeu_ps(o + 3 * C + 8, a31);
        }
    }
    // leftover queries and columns: plain sums
    for (int64_t k = 0; k < nq; k++)
        for (int64_t c = (k < i ? C16 : 0); c < C; c++) {
            float acc = 0.f;
            for (int64_t s = 0; s < S; s++) acc += p[k * S + s] * rows[s * stride + c];
            out[k * C + c] = acc;
        }
}

static inline __m256 load_f16x8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}
static inline __m256 load_bf16x8(const uint16_t* p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

static float dot_f16(int64_t n, const void* w, const void* a) {
    const uint16_t* x = (const uint16_t*)w;
    const float* y = (const float*)a;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(load_f16x8(x + i), _mm256_loadu_ps(y + i), s0);
        s1 = _mm256_fmadd_ps(load_f16x8(x + i + 8), _mm256_loadu_ps(y + i + 8), s1);
    }
    float s = hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += h2f(x[i]) * y[i];
    return s;
}

static float dot_bf16(int64_t n, const void* w, const void* a) {
    const uint16_t* x = (const uint16_t*)w;
    const float* y = (const float*)a;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(load_bf16x8(x + i), _mm256_loadu_ps(y + i), s0);
        s1 = _mm256_fmadd_ps(load_bf16x8(x + i + 8), _mm256_loadu_ps(y + i + 8), s1);
    }
    float s = hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += bf16_to_fp32(x[i]) * y[i];
    return s;
}

// ---------------------------------------------------------------- dots: 32-blocks (AVX2)
// Q8_0, Q4_0, Q5_0, Q4_1, Q5_1 and IQ4_NL: one code for the single dot (N = 1) and the prefill
// tiles (N tokens, the block unpacked once), per ISA through DOT, the 32 x u8 . s8 -> 8 x int32
// product (maddubs + madd on AVX2, vpdpbusd on VNNI): per token the same operations in the
// same order whatever N, so a tile's results are the dot's bit for bit.
//
// Per token and block the integer sum goes to float and is added to the accumulator scaled
// by d * d_act (one FMA). Q4_0 / Q5_0 subtract their offset (8 or 16 times the activation's
// sum) from the integer sum, exactly; Q4_1 / Q5_1 add m * s (the activation's scaled sum) in a
// scalar. (Adding two blocks' scaled sums before the accumulator, to halve its FMA chain,
// measured 10-15% slower here: these loops are bound by vector uops, not by that chain.)

typedef __m256i (*dot_u8s8_fn)(__m256i u, __m256i s);

// Sum of u8 x s8 products of 32 pairs, as 8 int32 lanes.
static inline __m256i dot_u8s8_32(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// 32 nibble indices -> the signed IQ4_NL values (one pshufb per 32).
static inline __m256i iq4_lookup(__m256i idx) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)kIQ4NLValues));
    return _mm256_shuffle_epi8(v, idx);
}

// The six types as the rows below read them: the activation block, the block's bytes, its
// quants (`q`: signed for Q8_0 / IQ4_NL, else unsigned) and scale, the offset of unsigned
// quants (Q4_0 / Q5_0) and whether it has a min (Q4_1 / Q5_1).
struct b32_q8_0 {
    typedef block_q8_32 act;
    static constexpr int64_t bytes = sizeof(block_q8_0);
    static constexpr bool is_signed = true, has_min = false;
    static constexpr int offset = 0;
    static inline __m256i quants(const uint8_t* b) { return _mm256_loadu_si256((const __m256i*)((const block_q8_0*)b)->qs); }
};
struct b32_iq4_nl {
    typedef block_q8_32 act;
    static constexpr int64_t bytes = sizeof(block_iq4_nl);
    static constexpr bool is_signed = true, has_min = false;
    static constexpr int offset = 0;
    static inline __m256i quants(const uint8_t* b) { return iq4_lookup(nibbles_32(((const block_iq4_nl*)b)->qs)); }
};
template <class Block, int OFFSET, bool MIN>
struct b32_nibbles {
    typedef typename std::conditional<MIN, block_q8_1, block_q8_32>::type act;
    static constexpr int64_t bytes = sizeof(Block);
    static constexpr bool is_signed = false, has_min = MIN;
    static constexpr int offset = OFFSET;
    static inline __m256i quants(const uint8_t* b) { return nibbles_32(((const Block*)b)->qs); }
};
template <class Block, int OFFSET, bool MIN>
struct b32_nibbles5 : b32_nibbles<Block, OFFSET, MIN> {
    static inline __m256i quants(const uint8_t* b) {
        uint32_t qh;
        std::memcpy(&qh, ((const Block*)b)->qh, 4);
        return _mm256_or_si256(nibbles_32(((const Block*)b)->qs), bits_to_0x10(qh));
    }
};
typedef b32_nibbles<block_q4_0, 8, false> b32_q4_0;
typedef b32_nibbles5<block_q5_0, 16, false> b32_q5_0;
typedef b32_nibbles<block_q4_1, 0, true> b32_q4_1;
typedef b32_nibbles5<block_q5_1, 0, true> b32_q5_1;

// The activation block's quant sum (Q8_32) and scaled sum (Q8_1), where its format has one.
static inline int act_sum(const block_q8_32& y) { return y.sum; }
static inline int act_sum(const block_q8_1&) { return 0; }
static inline float act_s(const block_q8_1& y) { return y.s; }
static inline float act_s(const block_q8_32&) { return 0.f; }

// One unpacked block of type B: its quants as DOT's unsigned operand, what signs the
// activations (signed types), the fp16 scale and min as floats.
template <class B>
struct b32_unpacked {
    __m256i u, sign;
    float d, m;
    explicit b32_unpacked(const uint8_t* blk) {
        prefetch_block(blk, 1);  // blocks < 64 B: one line each
        const __m256i q = B::quants(blk);
        u = B::is_signed ? _mm256_sign_epi8(q, q) : q;
        sign = q;
        uint16_t h;
        std::memcpy(&h, blk, 2);
        d = h2f(h);
        m = 0.f;
        if (B::has_min) std::memcpy(&h, blk + 2, 2), m = h2f(h);
    }
    // the block's integer dot with activation block y, offset taken out
    template <dot_u8s8_fn DOT>
    inline __m256i dot(const typename B::act& y) const {
        const __m256i a = _mm256_loadu_si256((const __m256i*)y.qs);
        __m256i p = DOT(u, B::is_signed ? _mm256_sign_epi8(a, sign) : a);
        if (B::offset) p = _mm256_sub_epi32(p, _mm256_setr_epi32(B::offset * act_sum(y), 0, 0, 0, 0, 0, 0, 0));
        return p;
    }
};

// Two blocks' scales (or scale products) s0, s1 as the lanes of hadd(block 0, block 1) take
// them: (s0, s0, s1, s1) in both 128-bit lanes.
static inline __m256 pair_lanes(float s0, float s1) {
    const __m128 v = _mm_shuffle_ps(_mm_set_ss(s0), _mm_set_ss(s1), 0);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(v), v, 1);
}

// out[r] = dot of the weight row at w with activation rows a[0..N). Blocks go in pairs: the
// two blocks' int32 sums share one hadd, one conversion and one FMA by the lanes' scales
// d_w * d_act (a lone last block: its own FMA); the float step per block had been ~35% of a
// Q8_0 tile. PREP: `da` holds the activations' pair_lanes, [pair][token], prepared once per
// tile token group (rows32_kernel), and one multiply makes a token's lanes; else (the single
// dot) two scalar products make them. Every lane is the same product of the same two floats
// either way, so the single dot and every tile give the same bits.
template <int N, class B, dot_u8s8_fn DOT, bool PREP = false>
static inline void rows32(int64_t n, const uint8_t* w, const void* const* a, const float* da, float* out) {
    const typename B::act* const* ys = (const typename B::act* const*)a;
    const int64_t nb = n / QK32;
    __m256 acc[N];
    float ms[N];
    for (int r = 0; r < N; r++) acc[r] = _mm256_setzero_ps(), ms[r] = 0.f;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const b32_unpacked<B> x0(w + b * B::bytes), x1(w + (b + 1) * B::bytes);
        const __m256 dw = PREP ? pair_lanes(x0.d, x1.d) : _mm256_setzero_ps();
        for (int r = 0; r < N; r++) {
            const typename B::act& y0 = ys[r][b];
            const typename B::act& y1 = ys[r][b + 1];
            const __m256i h = _mm256_hadd_epi32(x0.template dot<DOT>(y0), x1.template dot<DOT>(y1));
            const __m256 s = PREP ? _mm256_mul_ps(dw, _mm256_loadu_ps(da + (b / 2 * N + r) * 8))
                                  : pair_lanes(x0.d * y0.d, x1.d * y1.d);
            acc[r] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(h), acc[r]);
            if (B::has_min) ms[r] += x0.m * act_s(y0), ms[r] += x1.m * act_s(y1);
        }
    }
    if (b < nb) {
        const b32_unpacked<B> x(w + b * B::bytes);
        for (int r = 0; r < N; r++) {
            const typename B::act& y = ys[r][b];
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x.d * y.d), _mm256_cvtepi32_ps(x.template dot<DOT>(y)), acc[r]);
            if (B::has_min) ms[r] += x.m * act_s(y);
        }
    }
    for (int r = 0; r < N; r++) out[r] = hsum_ps(acc[r]) + ms[r];
}

template <class B, dot_u8s8_fn DOT>
static float dot32(int64_t n, const void* w, const void* a) {
    float out;
    rows32<1, B, DOT>(n, (const uint8_t*)w, &a, nullptr, &out);
    return out;
}

// Q8_0 (AVX2, and AVX-512 with DOT the VNNI product): the same integer block sums, one float
// step per block, acc = fma(d * d_act, S_b, acc), in four chains per row and token (chain c:
// the blocks b with b % 4 == c, in block order), out = (c0 + c1) + (c2 + c3); so that the row
// groups of gemm_avx2.cpp / gemm_avx512.cpp (rows in vector lanes) give every output bit for
// bit what this gives: there the pair step of rows32 cost a third of the loop (Zen 2 runs these
// loops at the rate of their vector uops, and a row per lane needs one float step per 8 rows
// and block). Here four blocks' sums share one reduction (three hadds) and one FMA (lane c:
// chain c). Zen 4, cached, one thread, ns per 256 weights: one chain and a reduction per two
// blocks 11.7 (the FMA latency bound it), four chains 8.8 (8.3 with the VNNI product), the
// lane-partial pair step of rows32 8.2. A missing block of the last group adds 0 x 0 to its
// lane: a chain starts at +0 and never holds -0, so that is exact.
template <dot_u8s8_fn DOT>
static float dot_q8_0(int64_t n, const void* wv, const void* a) {
    typedef b32_q8_0 B;
    const uint8_t* w = (const uint8_t*)wv;
    const block_q8_32* y = (const block_q8_32*)a;
    const int64_t nb = n / QK32;
    __m128 acc = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b += 4) {
        __m256i p[4];
        float sc[4];
        for (int c = 0; c < 4; c++) {
            if (b + c < nb) {
                const b32_unpacked<B> x(w + (b + c) * B::bytes);
                p[c] = x.template dot<DOT>(y[b + c]);
                sc[c] = x.d * y[b + c].d;
            } else {
                p[c] = _mm256_setzero_si256();
                sc[c] = 0.f;
            }
        }
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));  // S_b .. S_b+3
        acc = _mm_fmadd_ps(_mm_setr_ps(sc[0], sc[1], sc[2], sc[3]), _mm_cvtepi32_ps(s4), acc);
    }
    const __m128 c01 = _mm_add_ps(acc, _mm_movehdup_ps(acc));  // lane 0: c0 + c1, lane 2: c2 + c3
    return _mm_cvtss_f32(_mm_add_ss(c01, _mm_movehl_ps(c01, c01)));
}

// The integer sums of N <= 8 tokens (p[t]: 8 int32 partials each) with token t in lane t,
// lanes N..7 zero: a tree of hadds, then the two 128-bit halves added.
template <int N>
static inline __m256i sums_in_lanes(const __m256i* p) {
    const __m256i z = _mm256_setzero_si256();
    __m256i q[4];
    for (int i = 0; i < 4; i++)
        q[i] = 2 * i < N ? _mm256_hadd_epi32(p[2 * i], 2 * i + 1 < N ? p[2 * i + 1] : z) : z;
    const __m256i r0 = _mm256_hadd_epi32(q[0], q[1]), r1 = N > 4 ? _mm256_hadd_epi32(q[2], q[3]) : z;
    return _mm256_add_epi32(_mm256_permute2x128_si256(r0, r1, 0x20), _mm256_permute2x128_si256(r0, r1, 0x31));
}

// The integer sums of N <= 4 tokens for two blocks (pa: block b, pb: block b + 1): block b's
// in lanes 0..N-1, block b + 1's in lanes 4..4+N-1.
template <int N>
static inline __m256i sums_in_lanes2(const __m256i* pa, const __m256i* pb) {
    const __m256i z = _mm256_setzero_si256();
    const __m256i q0 = _mm256_hadd_epi32(pa[0], N > 1 ? pa[1] : z), q2 = _mm256_hadd_epi32(pb[0], N > 1 ? pb[1] : z);
    const __m256i q1 = N > 2 ? _mm256_hadd_epi32(pa[2], N > 3 ? pa[3] : z) : z;
    const __m256i q3 = N > 2 ? _mm256_hadd_epi32(pb[2], N > 3 ? pb[3] : z) : z;
    const __m256i r0 = _mm256_hadd_epi32(q0, q1), r1 = _mm256_hadd_epi32(q2, q3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(r0, r1, 0x20), _mm256_permute2x128_si256(r0, r1, 0x31));
}

// dot_q8_0 for 2..8 tokens with the tokens in vector lanes: per block each token's integer
// sum (the same sign / maddubs / madd), the N sums into lanes, and one float step for all,
// the steps dot_q8_0 takes per token (its four chains of blocks, out = (c0 + c1) + (c2 + c3)),
// so the results are its bits. `da` holds the tokens' scales, [block][8 lanes] (lanes N..7
// zero), prepared once per token group (q8_0_kernel).
template <int N, dot_u8s8_fn DOT>
static inline void rows_q8_0_lanes(int64_t n, const uint8_t* w, const void* const* a, const float* da, float* out) {
    typedef b32_q8_0 B;
    const block_q8_32* const* ys = (const block_q8_32* const*)a;
    const int64_t nb = n / QK32;
    alignas(32) float o[4][8];
    if constexpr (N <= 4) {
        // block b in lanes 0..3 and b + 1 in 4..7 of one register: acc[0] holds chains 0 and 1,
        // acc[1] chains 2 and 3; a missing b + 1 adds 0 x 0 to its lanes
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < nb; b += 2) {
            const bool two = b + 1 < nb;
            const b32_unpacked<B> x0(w + b * B::bytes), x1(w + (two ? b + 1 : b) * B::bytes);
            __m256i pa[N], pb[N];
            for (int t = 0; t < N; t++) {
                pa[t] = x0.template dot<DOT>(ys[t][b]);
                pb[t] = two ? x1.template dot<DOT>(ys[t][b + 1]) : _mm256_setzero_si256();
            }
            const __m256 f = _mm256_cvtepi32_ps(sums_in_lanes2<N>(pa, pb));
            const __m256 sc = _mm256_mul_ps(_mm256_setr_m128(_mm_set1_ps(x0.d), _mm_set1_ps(two ? x1.d : 0.f)),
                                            _mm256_setr_m128(_mm_load_ps(da + b * 8),
                                                             two ? _mm_load_ps(da + b * 8 + 8) : _mm_setzero_ps()));
            acc[(b / 2) % 2] = _mm256_fmadd_ps(sc, f, acc[(b / 2) % 2]);
        }
        _mm256_store_ps(o[0], acc[0]);
        _mm256_store_ps(o[1], acc[1]);
        for (int t = 0; t < N; t++) out[t] = (o[0][t] + o[0][4 + t]) + (o[1][t] + o[1][4 + t]);
    } else {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < nb; b++) {
            const b32_unpacked<B> x(w + b * B::bytes);
            __m256i p[N];
            for (int t = 0; t < N; t++) p[t] = x.template dot<DOT>(ys[t][b]);
            acc[b % 4] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(x.d), _mm256_load_ps(da + b * 8)),
                                         _mm256_cvtepi32_ps(sums_in_lanes<N>(p)), acc[b % 4]);
        }
        for (int c = 0; c < 4; c++) _mm256_store_ps(o[c], acc[c]);
        for (int t = 0; t < N; t++) out[t] = (o[0][t] + o[1][t]) + (o[2][t] + o[3][t]);
    }
}

// The calling thread's scratch for a tile's per-group preparation (rows32_kernel, the K-quant
// tile kernels; SLOT 0) and for weight rows a tile rewrites (SLOT 1, gemm_rowgroups.h's row
// groups): grown as needed, 64-byte aligned, freed when the thread ends.
struct thread_scratch {
    void* p = nullptr;
    size_t n = 0;
    ~thread_scratch() { std::free(p); }
};
template <int SLOT = 0>
static void* tile_scratch(size_t bytes) {
    static thread_local thread_scratch s;
    if (s.n < bytes) {
        const size_t n = (bytes + 4095) & ~(size_t)4095;
        void* p = std::aligned_alloc(64, n);
        if (!p) throw std::bad_alloc();
        std::free(s.p);
        s.p = p, s.n = n;
    }
    return s.p;
}

// A type's tile() kernel (gemm_tile.h): per token group, the tokens' pair_lanes in the calling
// thread's tile_scratch, read by every row of the tile.
template <class B, dot_u8s8_fn DOT>
struct rows32_kernel {
    template <int N>
    struct group {
        const void* const* acts;
        const float* da;
        group(int64_t n, const void* const* a) : acts(a), da(prepare(n, a)) {}
        void rows(int64_t n, const uint8_t* w, float* out) const { rows32<N, B, DOT, true>(n, w, acts, da, out); }

        static const float* prepare(int64_t n, const void* const* a) {
            const typename B::act* const* ys = (const typename B::act* const*)a;
            const int64_t pairs = n / QK32 / 2;
            float* buf = (float*)tile_scratch(pairs * N * 8 * sizeof(float));
            for (int64_t j = 0; j < pairs; j++)
                for (int r = 0; r < N; r++)
                    _mm256_storeu_ps(buf + (j * N + r) * 8, pair_lanes(ys[r][2 * j].d, ys[r][2 * j + 1].d));
            return buf;
        }
    };
};

// Q8_0's tile() kernel for short tiles (gemm_rowgroups.h's row groups fall back to it): per token
// group the tokens' scales in lanes, [block][8], in the calling thread's tile_scratch, read by
// every row (one token: the decode dot's own kernel).
template <dot_u8s8_fn DOT>
struct q8_0_kernel {
    template <int N>
    struct group {
        const void* const* acts;
        const float* da;
        group(int64_t n, const void* const* a) : acts(a), da(N > 1 ? prepare(n, a) : nullptr) {}
        void rows(int64_t n, const uint8_t* w, float* out) const {
            if constexpr (N == 1) out[0] = dot_q8_0<DOT>(n, w, acts[0]);
            else rows_q8_0_lanes<N, DOT>(n, w, acts, da, out);
        }
        static const float* prepare(int64_t n, const void* const* a) {
            const block_q8_32* const* ys = (const block_q8_32* const*)a;
            const int64_t nb = n / QK32;
            float* buf = (float*)tile_scratch(nb * 8 * sizeof(float));
            for (int64_t b = 0; b < nb; b++)
                for (int t = 0; t < 8; t++) buf[b * 8 + t] = t < N ? ys[t][b].d : 0.f;
            return buf;
        }
    };
};

// ---------------------------------------------------------------- dots: K-quants (AVX2)

// The 8 scales (bytes 0-7) and 8 mins (bytes 8-15) of a Q4_K / Q5_K block, as
// unpack_scales_mins_k4 gives them, from the 12 packed bytes at s, in vector registers (one
// 16-byte load: the 4 bytes after the scales are the block's own quants). Through a stack
// array the vector loads that followed spanned two scalar stores each, which store
// forwarding cannot serve; in scalar registers it cost ~20 uops a block.
// A0: the dword of raw holding a0 (0: raw starts at the scales; 1: at the block, after d, dmin).
template <int A0 = 0>
static inline __m128i scales_mins_k4_of(__m128i raw) {
    const __m128i x = _mm_shuffle_epi32(raw, _MM_SHUFFLE(A0 + 2, A0 + 1, A0 + 2, A0));  // a0 a2 a1 a2
    // sc 0..3 = a0 & 63 | sc 4..7 = a2 & 15 | m 0..3 = a1 & 63 | m 4..7 = (a2 >> 4) & 15
    const __m128i low = _mm_and_si128(_mm_srlv_epi32(x, _mm_setr_epi32(0, 0, 0, 4)),
                                      _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    // the top two bits of sc 4..7 / m 4..7 are bits 6-7 of a0 / a1, moved to bits 4-5
    const __m128i y = _mm_shuffle_epi32(raw, _MM_SHUFFLE(A0 + 1, A0 + 1, A0, A0));  // a0 a0 a1 a1
    const __m128i high = _mm_and_si128(_mm_srli_epi32(y, 2), _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    return _mm_or_si128(low, high);
}
static inline __m128i scales_mins_k4(const uint8_t* s) {
    return scales_mins_k4_of<0>(_mm_loadu_si128((const __m128i*)s));  // a0 a1 a2 (a3: quants)
}

// m[j] * (bsums[2j] + bsums[2j+1]) for the 8 mins of a Q4_K / Q5_K block (sm from
// scales_mins_k4), as 8 int32 lanes: each min doubled against the 16 bsums in one madd.
static inline __m256i k4_min_products(__m128i sm, const int16_t* bsums) {
    const __m256i mins = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
    return _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i*)bsums));
}

// pshufb masks broadcasting int16 word k of each 128-bit lane to the whole lane: k_word[k].
// Q6_K takes a different word per lane: k_word2[i] broadcasts word 2i in the low lane and
// word 2i+1 in the high lane (a table of its own: blending two k_word rows cost a uop each).
#define HYBRID_W(k) 2 * (k), 2 * (k) + 1, 2 * (k), 2 * (k) + 1, 2 * (k), 2 * (k) + 1, 2 * (k), 2 * (k) + 1, \
                    2 * (k), 2 * (k) + 1, 2 * (k), 2 * (k) + 1, 2 * (k), 2 * (k) + 1, 2 * (k), 2 * (k) + 1
alignas(32) static const uint8_t k_word[8][32] = {
    {HYBRID_W(0), HYBRID_W(0)}, {HYBRID_W(1), HYBRID_W(1)}, {HYBRID_W(2), HYBRID_W(2)}, {HYBRID_W(3), HYBRID_W(3)},
    {HYBRID_W(4), HYBRID_W(4)}, {HYBRID_W(5), HYBRID_W(5)}, {HYBRID_W(6), HYBRID_W(6)}, {HYBRID_W(7), HYBRID_W(7)},
};
alignas(32) static const uint8_t k_word2[4][32] = {
    {HYBRID_W(0), HYBRID_W(1)}, {HYBRID_W(2), HYBRID_W(3)}, {HYBRID_W(4), HYBRID_W(5)}, {HYBRID_W(6), HYBRID_W(7)},
};
#undef HYBRID_W
static inline __m256i word_bcast(__m256i v, int k) {
    return _mm256_shuffle_epi8(v, _mm256_load_si256((const __m256i*)k_word[k]));
}
static inline __m256i word_bcast2(__m256i v, int i) {
    return _mm256_shuffle_epi8(v, _mm256_load_si256((const __m256i*)k_word2[i]));
}

// One Q4_K / Q5_K block as k4_rows reads it: scales and mins,
// d and dmin, the quants.
template <bool QH>
struct K4Block {
    static constexpr int64_t stride = QH ? sizeof(block_q5_K) : sizeof(block_q4_K);
    const uint8_t* qs;
    __m128i sm;     // the 8 scales, then the 8 mins
    __m256 dm;      // (d, dmin) pairs
    __m256i hbits;  // Q5_K's fifth bits

    explicit K4Block(const uint8_t* blk)
        : qs(blk + (QH ? offsetof(block_q5_K, qs) : offsetof(block_q4_K, qs))), sm(scales_mins_k4(blk + 4)) {
        uint32_t d_dmin;
        std::memcpy(&d_dmin, blk, 4);
        dm = _mm256_cvtph_ps(_mm_set1_epi32((int)d_dmin));
        hbits = QH ? _mm256_loadu_si256((const __m256i*)(blk + offsetof(block_q5_K, qh))) : _mm256_setzero_si256();
    }
    // chunk c's 64 quants: sub-block 2c in lo, 2c+1 in hi
    void unpack(int c, __m256i& lo, __m256i& hi) const {
        const __m256i m4 = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
        const __m256i q = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
        lo = _mm256_and_si256(q, m4);
        hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        if (QH) {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * c), one), 4));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * c + 1), one), 4));
        }
    }
};

// What a pair of tokens' float step reads per block, prepared once per tile token group
// (k4_kernel): their sub-block sums of the activations as k4_pair_bsums lays them out, and
// their scales (y0.d, y1.d, y0.d, y1.d).
struct K4PairPrep {
    __m256i bsums;
    __m128 d;
};

// The two tokens' 32-sums of the activations per sub-block, int16 (|.| <= 32 * 127), in the
// lanes of the pair's other sums: (t0 sub-blocks 0-3, t1 0-3 | t0 4-7, t1 4-7). One hadd of
// the two tokens' 16-sums.
static inline __m256i k4_pair_bsums(const block_q8_K& y0, const block_q8_K& y1) {
    return _mm256_hadd_epi16(_mm256_loadu_si256((const __m256i*)y0.bsums), _mm256_loadu_si256((const __m256i*)y1.bsums));
}
// The two tokens' scales in the lanes of a pair's float step (S0 S1 M0 M1).
static inline __m128 k4_pair_d(const block_q8_K& y0, const block_q8_K& y1) {
    return _mm_setr_ps(y0.d, y1.d, y0.d, y1.d);
}

// Q4_K / Q5_K dots of one weight row with N activation rows: the single dot (N = 1), the
// 4-row dot and the prefill tiles are this one code, so every grouping of tokens gives the
// same bits. Per block and token the integer part is exact and complete before any float:
// S = sum over sub-blocks of scale * (q . a), M = sum of min * bsums (|S| < 2^26). Then, in
// one order for every N: accS += (d * y.d) * S, accM += (dmin * y.d) * M (fused), and the
// dot is accS - accM. Tokens go in pairs: one hadd adds the two tokens' maddubs pair sums of
// a sub-block (int16: 4 products of |q| <= 31 and |a| <= 127, < 2^15), one madd scales both,
// one float step serves both; an odd last token goes alone. Against a float step per token
// on each sub-block's lanes (the layout before) a tile takes ~12% less time per token on
// Zen 2, the single dot ~5% more (its per-block reduction): from DRAM with 2 cores Q4_K
// decode kept its speed, Q5_K lost ~4% (its decode is compute-bound there). `prep` (the
// tiles): each pair's K4PairPrep per block; null (the dots): the same values made here.
template <int N, bool QH>
static inline void k4_rows(int64_t n, const uint8_t* w, const block_q8_K* const* ys, float* out,
                           const K4PairPrep* prep = nullptr) {
    constexpr int P = N / 2, ODD = N % 2;
    __m128 acc[P + ODD];  // a pair: accS of both tokens, then accM; alone: accS accS accM accM
    for (int i = 0; i < P + ODD; i++) acc[i] = _mm_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        const uint8_t* blk = w + b * K4Block<QH>::stride;
        prefetch_block(blk, K4Block<QH>::stride);
        const K4Block<QH> k(blk);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(k.sm));
        // the 8 mins as int16 (m0-3, m0-3 | m4-7, m4-7): against k4_pair_bsums one madd gives
        // both tokens' min products in the lanes of sumi
        const __m256i mins2 = P ? _mm256_permute4x64_epi64(_mm256_castsi128_si256(_mm_cvtepu8_epi16(_mm_unpackhi_epi64(k.sm, k.sm))), 0x50)
                                : _mm256_setzero_si256();
        __m256i sumi[P + ODD];
        for (int i = 0; i < P + ODD; i++) sumi[i] = _mm256_setzero_si256();
        // chunk c: 64 quants, sub-blocks 2c and 2c+1, against every token
        auto chunk = [&](int c) {
            __m256i lo, hi;
            k.unpack(c, lo, hi);
            const __m256i s0 = word_bcast(scales, 2 * c), s1 = word_bcast(scales, 2 * c + 1);
            for (int p = 0; p < P; p++) {
                const int8_t* y0 = ys[2 * p][b].qs + 64 * c;
                const int8_t* y1 = ys[2 * p + 1][b].qs + 64 * c;
                const __m256i hl = _mm256_hadd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)y0)),
                                                     _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)y1)));
                const __m256i hh =
                    _mm256_hadd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(y0 + 32))),
                                      _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(y1 + 32))));
                sumi[p] = _mm256_add_epi32(sumi[p], _mm256_add_epi32(_mm256_madd_epi16(hl, s0), _mm256_madd_epi16(hh, s1)));
            }
            if (ODD) {
                const int8_t* y = ys[N - 1][b].qs + 64 * c;
                const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)y)), s0);
                const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(y + 32))), s1);
                sumi[P] = _mm256_add_epi32(sumi[P], _mm256_add_epi32(p0, p1));
            }
        };
        // tiles: one chunk at a time in registers (unrolled, the four chunks' quants and scales
        // were spilled to the stack: Q4_K tile 5.7 -> 5.55 ns); the dot keeps the unrolled loop
        if (N >= 4) {
#pragma GCC unroll 1
            for (int c = 0; c < 4; c++) chunk(c);
        } else {
            for (int c = 0; c < 4; c++) chunk(c);
        }
        const __m128 dd = _mm_permute_ps(_mm256_castps256_ps128(k.dm), 0x50);  // d d dmin dmin
        for (int p = 0; p < P; p++) {
            const block_q8_K& y0 = ys[2 * p][b];
            const block_q8_K& y1 = ys[2 * p + 1][b];
            const K4PairPrep* pp = prep ? prep + b * P + p : nullptr;
            // token 2p in lanes 0, 1, 4, 5 and token 2p+1 in 2, 3, 6, 7, the mins alike
            const __m256i mm = _mm256_madd_epi16(mins2, pp ? pp->bsums : k4_pair_bsums(y0, y1));
            const __m256i h = _mm256_hadd_epi32(sumi[p], mm);
            const __m128i v = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));  // S0 S1 M0 M1
            const __m128 dy = pp ? pp->d : k4_pair_d(y0, y1);
            acc[p] = _mm_fmadd_ps(_mm_mul_ps(dd, dy), _mm_cvtepi32_ps(v), acc[p]);
        }
        if (ODD) {
            const block_q8_K& y = ys[N - 1][b];
            const __m256i h = _mm256_hadd_epi32(sumi[P], k4_min_products(k.sm, y.bsums));
            __m128i v = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));   // S S M M
            acc[P] = _mm_fmadd_ps(_mm_mul_ps(dd, _mm_set1_ps(y.d)), _mm_cvtepi32_ps(v), acc[P]);
        }
    }
    alignas(16) float a[4];
    for (int p = 0; p < P; p++) {
        _mm_store_ps(a, acc[p]);
        out[2 * p] = a[0] - a[2];
        out[2 * p + 1] = a[1] - a[3];
    }
    if (ODD) {
        _mm_store_ps(a, acc[P]);
        out[N - 1] = a[0] - a[2];
    }
}

static float dot_q4_K(int64_t n, const void* w, const void* a) {
    const block_q8_K* y = (const block_q8_K*)a;
    float out;
    k4_rows<1, false>(n, (const uint8_t*)w, &y, &out);
    return out;
}

static float dot_q5_K(int64_t n, const void* w, const void* a) {
    const block_q8_K* y = (const block_q8_K*)a;
    float out;
    k4_rows<1, true>(n, (const uint8_t*)w, &y, &out);
    return out;
}

static void dot4_q4_K(int64_t n, const void* w, const void* const* a, float* out) {
    k4_rows<4, false>(n, (const uint8_t*)w, (const block_q8_K* const*)a, out);
}

static void dot4_q5_K(int64_t n, const void* w, const void* const* a, float* out) {
    k4_rows<4, true>(n, (const uint8_t*)w, (const block_q8_K* const*)a, out);
}

// Q4_K / Q5_K's tile() kernel (gemm_tile.h; the row groups' fallback): per token group, each
// pair's K4PairPrep for every block, in the calling thread's tile_scratch, read by every row of
// the tile.
template <bool QH>
struct k4_kernel {
    template <int N>
    struct group {
        const block_q8_K* const* ys;
        const K4PairPrep* prep;
        group(int64_t n, const void* const* a) : ys((const block_q8_K* const*)a), prep(prepare(n, ys)) {}
        void rows(int64_t n, const uint8_t* w, float* out) const { k4_rows<N, QH>(n, w, ys, out, prep); }

        static const K4PairPrep* prepare(int64_t n, const block_q8_K* const* ys) {
            constexpr int P = N / 2;
            if (P == 0) return nullptr;
            const int64_t nb = n / QK_K;
            K4PairPrep* buf = (K4PairPrep*)tile_scratch(nb * P * sizeof(K4PairPrep));
            for (int64_t b = 0; b < nb; b++)
                for (int p = 0; p < P; p++) {
                    const block_q8_K& y0 = ys[2 * p][b];
                    const block_q8_K& y1 = ys[2 * p + 1][b];
                    buf[b * P + p] = {k4_pair_bsums(y0, y1), k4_pair_d(y0, y1)};
                }
            return buf;
        }
    };
};

// 32 * scales[j] * bsums[j] over the 16 sub-blocks of a Q6_K block, as 8 int32 lanes: what
// the +32 offset of the stored quants adds to the dot.
static inline __m256i q6_offset(const int8_t* scales, const int16_t* bsums) {
    const __m256i s = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)scales));
    return _mm256_slli_epi32(_mm256_madd_epi16(s, _mm256_loadu_si256((const __m256i*)bsums)), 5);
}

// A Q6_K block's float step, shared by the dots and every x86 tile (the row groups of
// gemm_avx2.cpp / gemm_avx512.cpp hold 8 / 16 rows' S in the lanes of one register): per block
// the exact integer
// S = sum_j sc_j sum_i (q_i - 32) a_i, then acc = fma(d_w * d_t, float(S), acc), in block order.
// acc's lane 0 is the accumulator (the sum stays in vector registers).
static inline __m128 q6_step(__m128 acc, float dw, float dt, __m256i sumi) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sumi), _mm256_extracti128_si256(sumi, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_fmadd_ss(_mm_set_ss(dw * dt), _mm_cvtepi32_ps(s), acc);
}

template <int R>
static inline void dot_q6_K_rows(int64_t n, const block_q6_K* x, const block_q8_K* const* ys, float* out) {
    __m128 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_q6_K));
        __m256i sumi[R];
        for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
        for (int half = 0; half < 2; half++) {
            __m256i q[4];
            q6_quarters(x[b].ql + 64 * half, x[b].qh + 32 * half, q);
            // this half's 8 scales as int16 in both lanes; quarter i takes 2i (low) and 2i+1 (high)
            const __m256i sc = _mm256_broadcastsi128_si256(
                _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(x[b].scales + 8 * half))));
            for (int i = 0; i < 4; i++) {
                const __m256i s = word_bcast2(sc, i);
                for (int r = 0; r < R; r++) {
                    const __m256i av = _mm256_loadu_si256((const __m256i*)(ys[r][b].qs + 128 * half + 32 * i));
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q[i], av), s));
                }
            }
        }
        const float dw = h2f(x[b].d);
        for (int r = 0; r < R; r++)  // quants are stored +32
            acc[r] = q6_step(acc[r], dw, ys[r][b].d, _mm256_sub_epi32(sumi[r], q6_offset(x[b].scales, ys[r][b].bsums)));
    }
    for (int r = 0; r < R; r++) out[r] = _mm_cvtss_f32(acc[r]);
}

static float dot_q6_K(int64_t n, const void* w, const void* a) {
    const block_q8_K* y = (const block_q8_K*)a;
    float out;
    dot_q6_K_rows<1>(n, (const block_q6_K*)w, &y, &out);
    return out;
}

static void dot4_q6_K(int64_t n, const void* w, const void* const* a, float* out) {
    dot_q6_K_rows<4>(n, (const block_q6_K*)w, (const block_q8_K* const*)a, out);
}

// Q6_K for N tokens at once (the x86 tile tables' short tiles and leftover rows: gemm_rowgroups.h's
// row groups fall back to it).
// k_interleave: the two sub-blocks' pair sums of one hadd, reordered so that one madd by a
// (scale, scale) pair gives each int32 lane the integer two madds give it.
alignas(32) static const uint8_t k_interleave[32] = {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                                     0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15};
// pshufb masks making int16 pairs (scale of quarter 2j, scale of quarter 2j+1) from 8 int16
// scales in both lanes: low lane (4j, 4j+2), high lane (4j+1, 4j+3).
#define HYBRID_P(a, b) 2 * (a), 2 * (a) + 1, 2 * (b), 2 * (b) + 1
alignas(32) static const uint8_t k_q6_pairs[2][32] = {
    {HYBRID_P(0, 2), HYBRID_P(0, 2), HYBRID_P(0, 2), HYBRID_P(0, 2), HYBRID_P(1, 3), HYBRID_P(1, 3), HYBRID_P(1, 3), HYBRID_P(1, 3)},
    {HYBRID_P(4, 6), HYBRID_P(4, 6), HYBRID_P(4, 6), HYBRID_P(4, 6), HYBRID_P(5, 7), HYBRID_P(5, 7), HYBRID_P(5, 7), HYBRID_P(5, 7)},
};
#undef HYBRID_P
// The same trick on x86::dot_q6_K_rows: quarters i and i+1 of a half (4 sub-blocks of 16,
// one per 128-bit lane each) share one hadd, interleave and madd by their scale pairs. The
// int16 sums fit: |q| <= 63, |a| <= 127 (Q8_K never holds -128), 4 products <= 32004.
template <int N>
static void rows_q6_K(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    const block_q6_K* x = (const block_q6_K*)w;
    const block_q8_K* const* ys = (const block_q8_K* const*)a;
    const __m256i inter = _mm256_load_si256((const __m256i*)k_interleave);
    __m128 acc[N];
    for (int r = 0; r < N; r++) acc[r] = _mm_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_q6_K));
        __m256i sumi[N];
        for (int r = 0; r < N; r++) sumi[r] = _mm256_setzero_si256();
        // one half at a time in registers (unrolled, both halves' quants were spilled)
#pragma GCC unroll 1
        for (int half = 0; half < 2; half++) {
            __m256i q[4];
            q6_quarters(x[b].ql + 64 * half, x[b].qh + 32 * half, q);
            // quarter i holds sub-blocks 2i (low lane) and 2i+1 (high lane) of this half, so
            // quarters 2j and 2j+1 pair scales (sc[4j], sc[4j+2]) low and (sc[4j+1], sc[4j+3]) high
            const __m128i s16 = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(x[b].scales + 8 * half)));
            const __m256i s2 = _mm256_broadcastsi128_si256(s16);
            const __m256i sp[2] = {_mm256_shuffle_epi8(s2, _mm256_load_si256((const __m256i*)k_q6_pairs[0])),
                                   _mm256_shuffle_epi8(s2, _mm256_load_si256((const __m256i*)k_q6_pairs[1]))};
            for (int j = 0; j < 2; j++)
                for (int r = 0; r < N; r++) {
                    const int8_t* ay = ys[r][b].qs + 128 * half + 64 * j;
                    const __m256i p0 = _mm256_maddubs_epi16(q[2 * j], _mm256_loadu_si256((const __m256i*)ay));
                    const __m256i p1 = _mm256_maddubs_epi16(q[2 * j + 1], _mm256_loadu_si256((const __m256i*)(ay + 32)));
                    const __m256i h = _mm256_shuffle_epi8(_mm256_hadd_epi16(p0, p1), inter);
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(h, sp[j]));
                }
        }
        const float dw = h2f(x[b].d);
        for (int r = 0; r < N; r++)  // quants are stored +32
            acc[r] = q6_step(acc[r], dw, ys[r][b].d, _mm256_sub_epi32(sumi[r], q6_offset(x[b].scales, ys[r][b].bsums)));
    }
    for (int r = 0; r < N; r++) out[r] = _mm_cvtss_f32(acc[r]);
}

// Q6_K's tile() kernel (gemm_tile.h).
struct q6_K_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) {
        rows_q6_K<N>(n, w, a, out);
    }
};

// The four quarters (32 quants each) of 128-half h of a Q2_K / Q3_K block as unsigned bytes:
// the 2-bit fields (qs: the half's 32 bytes), and for Q3_K (hmask set) + 4 where the high
// bit is set, i.e. the signed quant + 4 (0..7).
static inline void q2_quarters(const uint8_t* qs, const uint8_t* hmask, int h, __m256i q[4]) {
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    const __m256i v = _mm256_loadu_si256((const __m256i*)qs);
    const __m256i hb = hmask ? _mm256_loadu_si256((const __m256i*)hmask) : _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        q[j] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m3);
        if (hmask)
            q[j] = _mm256_or_si256(q[j], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4 * h + j), one), 2));
    }
}

// The 16 sub-block scales of a Q2_K block (low nibbles) or its 16 mins (high nibbles) as int16.
static inline __m256i q2_nibbles16(const uint8_t* scales, int shift) {
    const __m128i v = _mm_loadu_si128((const __m128i*)scales);
    return _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, shift), _mm_set1_epi8(0xF)));
}

// sum_i sc_i * (u . a)_i over the 16 sub-blocks of a Q2_K / Q3_K block with unsigned quants
// u (q2_quarters), R activation rows; sc16: the 16 scales as int16 (lane 0: 0..7, lane 1: 8..15).
template <int R>
static inline void q2_q3_sums(const uint8_t* qs, const uint8_t* hmask, __m256i sc16, const block_q8_K* const* ys,
                              int64_t b, __m256i* sumi) {
    // each half's 8 scales in both lanes
    const __m256i halves[2] = {_mm256_permute2x128_si256(sc16, sc16, 0x00), _mm256_permute2x128_si256(sc16, sc16, 0x11)};
    for (int h = 0; h < 2; h++) {
        __m256i q[4];
        q2_quarters(qs + 32 * h, hmask, h, q);
        const __m256i sc = halves[h];
        for (int j = 0; j < 4; j++) {
            const __m256i s = word_bcast2(sc, j);
            for (int r = 0; r < R; r++) {
                const __m256i av = _mm256_loadu_si256((const __m256i*)(ys[r][b].qs + 128 * h + 32 * j));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q[j], av), s));
            }
        }
    }
}

template <int R>
static inline void dot_q2_K_rows(int64_t n, const block_q2_K* x, const block_q8_K* const* ys, float* out) {
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_q2_K));
        const __m256i mins = q2_nibbles16(x[b].scales, 4);
        __m256i sumi[R];
        for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
        q2_q3_sums<R>(x[b].qs, nullptr, q2_nibbles16(x[b].scales, 0), ys, b, sumi);
        const float d = h2f(x[b].d), dmin = h2f(x[b].dmin);
        for (int r = 0; r < R; r++) {
            const __m256i m = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i*)ys[r][b].bsums));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(ys[r][b].d * d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            acc[r] = _mm256_fnmadd_ps(_mm256_set1_ps(ys[r][b].d * dmin), _mm256_cvtepi32_ps(m), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum_ps(acc[r]);
}

// The 16 signed scales of a Q3_K block (q3_k_scales) in a vector register, without a trip
// through memory: 16 bytes stored as 4 words and reloaded as one vector missed store
// forwarding and cost Q3_K ~40% of its decode rate.
static inline __m128i q3_scales_128(const uint8_t* s) {
    uint32_t a2;
    std::memcpy(&a2, s + 8, 4);
    const __m128i a01 = _mm_shuffle_epi32(_mm_loadl_epi64((const __m128i*)s), _MM_SHUFFLE(1, 0, 1, 0));  // a0 a1 a0 a1
    const __m128i lo = _mm_and_si128(_mm_srlv_epi32(a01, _mm_setr_epi32(0, 0, 4, 4)), _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)a2), _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(0x03));
    return _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi32(hi, 4)), _mm_set1_epi8(32));
}

template <int R>
static inline void dot_q3_K_rows(int64_t n, const block_q3_K* x, const block_q8_K* const* ys, float* out) {
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_q3_K));
        const __m256i sc16 = _mm256_cvtepi8_epi16(q3_scales_128(x[b].scales));
        __m256i sumi[R];
        for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
        q2_q3_sums<R>(x[b].qs, x[b].hmask, sc16, ys, b, sumi);
        const float d = h2f(x[b].d);
        for (int r = 0; r < R; r++) {
            // the quants went in + 4: take 4 * sum_i sc_i * bsums_i back out
            const __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)ys[r][b].bsums));
            sumi[r] = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(off, 2));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(ys[r][b].d * d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum_ps(acc[r]);
}

static float dot_q2_K(int64_t n, const void* w, const void* a) {
    const block_q8_K* y = (const block_q8_K*)a;
    float out;
    dot_q2_K_rows<1>(n, (const block_q2_K*)w, &y, &out);
    return out;
}

static void dot4_q2_K(int64_t n, const void* w, const void* const* a, float* out) {
    dot_q2_K_rows<4>(n, (const block_q2_K*)w, (const block_q8_K* const*)a, out);
}

static float dot_q3_K(int64_t n, const void* w, const void* a) {
    const block_q8_K* y = (const block_q8_K*)a;
    float out;
    dot_q3_K_rows<1>(n, (const block_q3_K*)w, &y, &out);
    return out;
}

static void dot4_q3_K(int64_t n, const void* w, const void* const* a, float* out) {
    dot_q3_K_rows<4>(n, (const block_q3_K*)w, (const block_q8_K* const*)a, out);
}

// ---------------------------------------------------------------- dots: IQ4_XS (IQ4_NL: rows32)

// IQ4_XS: 32 bytes of quants hold sub-blocks 2c (lane 0) and 2c+1 (lane 1), each as low then
// high nibbles: two lane permutes put each sub-block's 32 values in weight order.
// R activation rows: dot is R = 1, dot4 (prefill) unpacks each chunk once for 4 rows, every
// row's operations unchanged (bit-identical to its dot).
template <int R>
static inline void dot_iq4_xs_rows(int64_t n, const block_iq4_xs* x, const block_q8_K* const* ys, float* out) {
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_iq4_xs));
        __m256i sumi[R];
        for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i*)(x[b].qs + 32 * c));
            const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m256i w0 = iq4_lookup(_mm256_permute2x128_si256(lo, hi, 0x20));
            const __m256i w1 = iq4_lookup(_mm256_permute2x128_si256(lo, hi, 0x31));
            const __m256i aw0 = _mm256_sign_epi8(w0, w0), aw1 = _mm256_sign_epi8(w1, w1);
            const __m256i s0 = _mm256_set1_epi16((short)iq4_xs_scale(x[b], 2 * c));
            const __m256i s1 = _mm256_set1_epi16((short)iq4_xs_scale(x[b], 2 * c + 1));
            for (int r = 0; r < R; r++) {
                const int8_t* a = ys[r][b].qs + 64 * c;
                // signed x signed through maddubs: |w| times a with w's sign moved onto a (|w| <= 127,
                // int16 pair sums cannot saturate)
                const __m256i p0 = _mm256_maddubs_epi16(aw0, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)a), w0));
                const __m256i p1 = _mm256_maddubs_epi16(aw1, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(a + 32)), w1));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p0, s0));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p1, s1));
            }
        }
        const float dx = h2f(x[b].d);
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx * ys[r][b].d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = hsum_ps(acc[r]);
}

static float dot_iq4_xs(int64_t n, const void* w, const void* a) {
    const block_q8_K* y = (const block_q8_K*)a;
    float out;
    dot_iq4_xs_rows<1>(n, (const block_iq4_xs*)w, &y, &out);
    return out;
}

static void dot4_iq4_xs(int64_t n, const void* w, const void* const* a, float* out) {
    dot_iq4_xs_rows<4>(n, (const block_iq4_xs*)w, (const block_q8_K* const*)a, out);
}

// ---------------------------------------------------------------- dots: IQ2_XXS / IQ3_S / IQ1_S / ...
// Grid entries are gathered as 4 x 8 bytes (8 x 4 for IQ3_S) per 32 quants with scalar loads
// (the index arithmetic is scalar anyway); signs become +1 / -1 bytes applied to the
// activations, so one maddubs (unsigned grid values x signed activations) and one madd with
// the sub-block's odd scale give 8 int32 lanes per sub-block.
//
// Unpacking a sub-block (table lookups, sign and scale bits) costs several times its
// products, so each kernel is written for R activation rows: dot is R = 1, dot4 (prefill,
// several tokens per expert) unpacks once for 4 rows with each row's operations unchanged,
// bit-identical to its dot.

// One sub-block of 32 weights made ready for the activations: the products are
// madd(maddubs(g, sign(q8, s)), sc), summed per row.
struct lattice_sub {
    __m256i g, s, sc;
};

// The lattice types of this form: `Unpack u(block)` reads what the block shares (scales),
// `u(ib)` gives sub-block ib; the float result is the sum over blocks of d * d8 * (integer
// sum), divided by `div` (the grids' scale: 8 or 4).
template <int R, class Block, int div, class Unpack>
static inline void lattice_rows(int64_t n, const Block* x, const block_q8_K* const* ys, float* out) {
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(Block));
        const Unpack unpack(x[b]);
        __m256i sumi[R];
        for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
        for (int ib = 0; ib < 8; ib++) {
            const lattice_sub u = unpack(ib);
            for (int r = 0; r < R; r++) {
                const __m256i q8 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(ys[r][b].qs + 32 * ib)), u.s);
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u.g, q8), u.sc));
            }
        }
        const float d = h2f(x[b].d);
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * ys[r][b].d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = (1.0f / div) * hsum_ps(acc[r]);
}

// Sub-block scales as madd factors: `s` holds up to 16 odd scales 2s + 1 as bytes (in both
// lanes); the result has byte `lo`'s in the 8 int16 of lane 0, byte `hi`'s in lane 1 (a scale
// per 16 values), with one pshufb instead of two broadcasts and an insert per sub-block.
static inline __m256i pick_scales(__m256i s, int lo, int hi) {
    return _mm256_shuffle_epi8(s, _mm256_set_m128i(_mm_set1_epi16((short)(0x8000 | hi)), _mm_set1_epi16((short)(0x8000 | lo))));
}

// The 2 * nbytes 4-bit scales at p, low nibble first, as odd scales 2s + 1 for pick_scales.
static inline __m256i nibble_scales(const uint8_t* p, int nbytes) {
    uint64_t v = 0;
    std::memcpy(&v, p, nbytes);
    const __m128i b = _mm_cvtsi64_si128((long long)v), m = _mm_set1_epi8(0xF);
    const __m128i s = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    return _mm256_broadcastsi128_si256(_mm_or_si128(_mm_add_epi8(s, s), _mm_set1_epi8(1)));
}

// 4 sign bytes (8 signs each) from 4 7-bit indices into iq_ksigns, bits 0-27 of `bits`.
static inline __m256i ksigns_4(uint32_t bits) {
    return _mm256_set_epi64x((long long)kIQSignBytes.v[(bits >> 21) & 127], (long long)kIQSignBytes.v[(bits >> 14) & 127],
                             (long long)kIQSignBytes.v[(bits >> 7) & 127], (long long)kIQSignBytes.v[bits & 127]);
}

// 8 odd scales 2s + 1 for pick_scales from the top nibbles (bits 28-31) of 8 LE u32 at p,
// `stride` u32 apart (2: IQ2_XXS's second word of each sub-block; 1: IQ3_XXS).
template <int stride>
static inline __m256i top_nibble_scales(const uint8_t* p) {
    __m256i w = _mm256_loadu_si256((const __m256i*)p);
    if (stride == 2)   // the odd dwords of 64 bytes: blended as d1 e1 d3 e3 ..., then in order
        w = _mm256_permutevar8x32_epi32(_mm256_blend_epi32(_mm256_srli_epi64(w, 32),
                                                           _mm256_loadu_si256((const __m256i*)(p + 32)), 0xAA),
                                        _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    const __m256i s = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(w, 28), 1), _mm256_set1_epi32(1));
    const __m128i s16 = _mm_packus_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm256_broadcastsi128_si256(_mm_packus_epi16(s16, _mm_setzero_si128()));
}

struct iq2_xxs_unpack {
    const block_iq2_xxs& x;
    const __m256i sc;
    explicit iq2_xxs_unpack(const block_iq2_xxs& b) : x(b), sc(top_nibble_scales<2>((const uint8_t*)b.qs)) {}
    lattice_sub operator()(int ib) const {
        uint32_t aux[2];
        std::memcpy(aux, x.qs + 4 * ib, 8);
        const uint8_t* idx = (const uint8_t*)aux;
        const __m256i g = _mm256_set_epi64x((long long)kIQ2XXSGrid[idx[3]], (long long)kIQ2XXSGrid[idx[2]],
                                            (long long)kIQ2XXSGrid[idx[1]], (long long)kIQ2XXSGrid[idx[0]]);
        return {g, ksigns_4(aux[1]), pick_scales(sc, ib, ib)};
    }
};

// 32 bytes: 0xff where bit j of `bits` is set, else 0x01 (a sign per element).
static inline __m256i bits_to_signs(uint32_t bits) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
    return _mm256_or_si256(v, _mm256_set1_epi8(1));
}

struct iq3_s_unpack {
    const block_iq3_s& x;
    const __m256i sc;   // sub-block i's scale: nibble i
    alignas(32) uint16_t idx[64];   // grid index of group k: qs[k] | bit k % 8 of qh[k / 8] << 8
    explicit iq3_s_unpack(const block_iq3_s& b) : x(b), sc(nibble_scales(b.scales, 4)) {
        uint64_t h;
        std::memcpy(&h, b.qh, 8);
        const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
        for (int c = 0; c < 2; c++) {   // 32 groups: bit k of qh as 0x0100 in int16 k
            const __m256i hb = _mm256_shuffle_epi8(_mm256_set1_epi32((int)(uint32_t)(h >> 32 * c)),
                                                   _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                                     0x0101010101010101, 0));
            const __m256i set = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hb, bit), bit), _mm256_set1_epi8(1));
            const __m256i q = _mm256_loadu_si256((const __m256i*)(b.qs + 32 * c));
            const __m256i lo = _mm256_unpacklo_epi8(q, set), hi = _mm256_unpackhi_epi8(q, set);
            // unpack works per 128-bit lane: groups 0-7 | 16-23 and 8-15 | 24-31
            _mm256_store_si256((__m256i*)(idx + 32 * c), _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_store_si256((__m256i*)(idx + 32 * c + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
        }
    }
    lattice_sub operator()(int ib) const {
        const uint16_t* i = idx + 8 * ib;
        int e[8];
        for (int k = 0; k < 8; k++) e[k] = (int)kIQ3SGrid[i[k]];
        uint32_t sb;
        std::memcpy(&sb, x.signs + 4 * ib, 4);
        return {_mm256_setr_epi32(e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]), bits_to_signs(sb),
                pick_scales(sc, ib, ib)};
    }
};

// IQ2_XS / IQ2_S: a scale per 16 values (nibbles 2i and 2i + 1 for sub-block i), i.e. per
// 128-bit lane of the madd.
struct iq2_xs_unpack {
    const block_iq2_xs& x;
    const __m256i sc;
    explicit iq2_xs_unpack(const block_iq2_xs& b) : x(b), sc(nibble_scales(b.scales, 8)) {}
    lattice_sub operator()(int ib) const {
        const uint16_t* q = x.qs + 4 * ib;
        const __m256i g = _mm256_set_epi64x((long long)kIQ2XSGrid[q[3] & 511], (long long)kIQ2XSGrid[q[2] & 511],
                                            (long long)kIQ2XSGrid[q[1] & 511], (long long)kIQ2XSGrid[q[0] & 511]);
        const __m256i s = _mm256_set_epi64x((long long)kIQSignBytes.v[q[3] >> 9], (long long)kIQSignBytes.v[q[2] >> 9],
                                            (long long)kIQSignBytes.v[q[1] >> 9], (long long)kIQSignBytes.v[q[0] >> 9]);
        return {g, s, pick_scales(sc, 2 * ib, 2 * ib + 1)};
    }
};

// The 32 grid indices of a block whose group j (of 8 weights) is indexed by
// qs[j] | bits shift * (j % 4) .. of h[j / 4] << 8 (under `mask`), h the block's 8 u16
// high-bit fields (one per sub-block): SIMD for all 32 instead of shift/and/or per index.
static inline void group_indices(const uint8_t* qs, __m128i h, int shift, int mask, uint32_t* idx) {
    const __m256i sh = _mm256_setr_epi32(0, shift, 2 * shift, 3 * shift, 0, shift, 2 * shift, 3 * shift);
    for (int c = 0; c < 4; c++) {   // groups 8c .. 8c + 7: sub-blocks 2c and 2c + 1
        const __m128i pick = _mm_setr_epi8((char)(4 * c), (char)(4 * c + 1), (char)(4 * c), (char)(4 * c + 1), (char)(4 * c),
                                           (char)(4 * c + 1), (char)(4 * c), (char)(4 * c + 1), (char)(4 * c + 2),
                                           (char)(4 * c + 3), (char)(4 * c + 2), (char)(4 * c + 3), (char)(4 * c + 2),
                                           (char)(4 * c + 3), (char)(4 * c + 2), (char)(4 * c + 3));
        const __m256i hw = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_shuffle_epi8(h, pick)), 8);
        const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(hw, sh), _mm256_set1_epi32(mask));
        const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qs + 8 * c)));
        _mm256_storeu_si256((__m256i*)(idx + 8 * c), _mm256_or_si256(lo, hi));
    }
}

struct iq2_s_unpack {
    const block_iq2_s& x;
    const __m256i sc;
    alignas(32) uint32_t idx[32];
    explicit iq2_s_unpack(const block_iq2_s& b) : x(b), sc(nibble_scales(b.scales, 8)) {
        group_indices(b.qs, _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)b.qh)), 2, 0x300, idx);
    }
    lattice_sub operator()(int ib) const {
        const uint32_t* i = idx + 4 * ib;
        const __m256i g = _mm256_set_epi64x((long long)kIQ2SGrid[i[3]], (long long)kIQ2SGrid[i[2]],
                                            (long long)kIQ2SGrid[i[1]], (long long)kIQ2SGrid[i[0]]);
        uint32_t sb;
        std::memcpy(&sb, x.qs + 32 + 4 * ib, 4);
        return {g, bits_to_signs(sb), pick_scales(sc, 2 * ib, 2 * ib + 1)};
    }
};

struct iq3_xxs_unpack {
    const block_iq3_xxs& x;
    const __m256i sc;
    explicit iq3_xxs_unpack(const block_iq3_xxs& b) : x(b), sc(top_nibble_scales<1>(b.qs + 64)) {}
    lattice_sub operator()(int ib) const {
        const uint8_t* q = x.qs + 8 * ib;
        uint32_t aux;
        std::memcpy(&aux, x.qs + 64 + 4 * ib, 4);
        const __m256i g = _mm256_setr_epi32((int)kIQ3XXSGrid[q[0]], (int)kIQ3XXSGrid[q[1]], (int)kIQ3XXSGrid[q[2]],
                                            (int)kIQ3XXSGrid[q[3]], (int)kIQ3XXSGrid[q[4]], (int)kIQ3XXSGrid[q[5]],
                                            (int)kIQ3XXSGrid[q[6]], (int)kIQ3XXSGrid[q[7]]);
        return {g, ksigns_4(aux), pick_scales(sc, ib, ib)};
    }
};

// dot (one row) and dot4 (four rows) of a lattice_rows kernel.
template <class Block, int div, class Unpack>
static float dot_lattice(int64_t n, const void* w, const void* a) {
    const block_q8_K* y = (const block_q8_K*)a;
    float out;
    lattice_rows<1, Block, div, Unpack>(n, (const Block*)w, &y, &out);
    return out;
}

template <class Block, int div, class Unpack>
static void dot4_lattice(int64_t n, const void* w, const void* const* a, float* out) {
    lattice_rows<4, Block, div, Unpack>(n, (const Block*)w, (const block_q8_K* const*)a, out);
}

// IQ1_S: grid values -1 / 0 / 1 apply to the activations with one vpsignb; the +-1/8 shift
// is each sub-block's activation sum (bsums) times its signed scale, as in llama.cpp: one
// madd over the block's 16 bsums.
template <int R>
static inline void dot_iq1_s_rows(int64_t n, const block_iq1_s* x, const block_q8_K* const* ys, float* out) {
    const __m256i ones = _mm256_set1_epi8(1);
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_iq1_s));
        // qh[i]: bits 12-14 the scale s of sub-block i (2s + 1), bit 15 its delta's sign
        const __m128i qh = _mm_loadu_si128((const __m128i*)x[b].qh);
        const __m128i ls = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(qh, 11), _mm_set1_epi16(14)), _mm_set1_epi16(1));
        const __m128i sls = _mm_sign_epi16(ls, _mm_or_si128(qh, _mm_set1_epi16(1)));
        const __m256i sls2 = _mm256_set_m128i(_mm_unpackhi_epi16(sls, sls), _mm_unpacklo_epi16(sls, sls));
        const __m256i ls2 = _mm256_broadcastsi128_si256(ls);
        __m256i sumi[R];
        for (int r = 0; r < R; r++) sumi[r] = _mm256_setzero_si256();
        for (int ib = 0; ib < 8; ib++) {
            const uint8_t* qs = x[b].qs + 4 * ib;
            const int h = x[b].qh[ib];
            const __m256i g = _mm256_set_epi64x((long long)kIQ1SGrid[qs[3] | (((h >> 9) & 7) << 8)],
                                                (long long)kIQ1SGrid[qs[2] | (((h >> 6) & 7) << 8)],
                                                (long long)kIQ1SGrid[qs[1] | (((h >> 3) & 7) << 8)],
                                                (long long)kIQ1SGrid[qs[0] | ((h & 7) << 8)]);
            const __m256i sc = _mm256_shuffle_epi8(ls2, _mm256_set1_epi16((short)(2 * ib | (2 * ib + 1) << 8)));
            for (int r = 0; r < R; r++) {
                const __m256i q8 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(ys[r][b].qs + 32 * ib)), g);
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(ones, q8), sc));
            }
        }
        const float dx = h2f(x[b].d);
        for (int r = 0; r < R; r++) {
            const __m256i bs = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)ys[r][b].bsums), sls2);
            const int sumi1 = hsum_epi32_128(_mm_add_epi32(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1)));
            const float d = dx * ys[r][b].d;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            acc[r] = _mm256_add_ps(acc[r], _mm256_setr_ps(d * kIQ1SDelta * (float)sumi1, 0, 0, 0, 0, 0, 0, 0));
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum_ps(acc[r]);
}

static float dot_iq1_s(int64_t n, const void* w, const void* a) {
    const block_q8_K* y = (const block_q8_K*)a;
    float out;
    dot_iq1_s_rows<1>(n, (const block_iq1_s*)w, &y, &out);
    return out;
}

static void dot4_iq1_s(int64_t n, const void* w, const void* const* a, float* out) {
    dot_iq1_s_rows<4>(n, (const block_iq1_s*)w, (const block_q8_K* const*)a, out);
}

// The lattice dots (IQ2_*, IQ3_*, IQ1_S) as rows of the prefill tiles (gemm.h, gemm_tile.h;
// both x86 tile tables): their unpacking (grid lookups, signs, scales) costs more than a
// token's products, so 8 tokens share it instead of dot4's 4: per 256 weights and token 6-16%
// less (cached, Zen 2). IQ1_M, IQ4_XS, Q2_K and Q3_K measured no better (or worse) with 6 or
// 8 tokens: they keep dot4.
template <class Block, int div, class Unpack>
struct lattice_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) {
        lattice_rows<N, Block, div, Unpack>(n, (const Block*)w, (const block_q8_K* const*)a, out);
    }
};
struct iq1_s_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) {
        dot_iq1_s_rows<N>(n, (const block_iq1_s*)w, (const block_q8_K* const*)a, out);
    }
};

// IQ1_M's 16 3-bit scales (number 4k + f at bit 3f of u16 k; 2i and 2i + 1 are sub-block
// i's halves) as odd scales 2s + 1 for pick_scales.
static inline __m256i iq1_m_scales(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    const __m128i b = _mm_cvtsi64_si128((long long)v);
    // u16 k in 4 int16; times 2^(9 - 3f) then >> 9 leaves field f in bits 0-2
    const __m128i mul = _mm_setr_epi16(1 << 9, 1 << 6, 1 << 3, 1, 1 << 9, 1 << 6, 1 << 3, 1), m7 = _mm_set1_epi16(7);
    const __m128i w01 = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3));
    const __m128i w23 = _mm_shuffle_epi8(b, _mm_setr_epi8(4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7));
    const __m128i f01 = _mm_and_si128(_mm_srli_epi16(_mm_mullo_epi16(w01, mul), 9), m7);
    const __m128i f23 = _mm_and_si128(_mm_srli_epi16(_mm_mullo_epi16(w23, mul), 9), m7);
    const __m128i s = _mm_packus_epi16(f01, f23);
    return _mm256_broadcastsi128_si256(_mm_or_si128(_mm_add_epi8(s, s), _mm_set1_epi8(1)));
}

// IQ1_M: as IQ1_S with a scale per 16 values and a delta sign per group of 8, whose term is
// the group's activation sum (there are no bsums per 8): a second maddubs on the activations
// with the delta signs applied.
template <int R>
static inline void dot_iq1_m_rows(int64_t n, const block_iq1_m* x, const block_q8_K* const* ys, float* out) {
    const __m256i ones = _mm256_set1_epi8(1);
    // bits 3, 7, 11, 15 of qh[2i] | qh[2i + 1] << 8: the delta signs of groups 0-3
    const __m256i dbit = _mm256_set_epi64x(0x8000, 0x800, 0x80, 0x8);
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_iq1_m));
        const __m256i sc = iq1_m_scales(x[b].scales);
        __m256i sumi1[R], sumi2[R];
        for (int r = 0; r < R; r++) sumi1[r] = sumi2[r] = _mm256_setzero_si256();
        alignas(32) uint32_t idx[32];
        group_indices(x[b].qs, _mm_loadu_si128((const __m128i*)x[b].qh), 4, 0x700, idx);
        for (int ib = 0; ib < 8; ib++) {
            const int h0 = x[b].qh[2 * ib], h1 = x[b].qh[2 * ib + 1];
            const uint32_t* i = idx + 4 * ib;
            const __m256i g = _mm256_set_epi64x((long long)kIQ1SGrid[i[3]], (long long)kIQ1SGrid[i[2]],
                                                (long long)kIQ1SGrid[i[1]], (long long)kIQ1SGrid[i[0]]);
            const __m256i ds = _mm256_or_si256(
                _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(h0 | h1 << 8), dbit), dbit), ones);
            const __m256i ls = pick_scales(sc, 2 * ib, 2 * ib + 1);
            for (int r = 0; r < R; r++) {
                const __m256i q8 = _mm256_loadu_si256((const __m256i*)(ys[r][b].qs + 32 * ib));
                sumi1[r] = _mm256_add_epi32(sumi1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(ones, _mm256_sign_epi8(q8, g)), ls));
                sumi2[r] = _mm256_add_epi32(sumi2[r], _mm256_madd_epi16(_mm256_maddubs_epi16(ones, _mm256_sign_epi8(q8, ds)), ls));
            }
        }
        const float dx = h2f(iq1_m_d(x[b]));
        for (int r = 0; r < R; r++) {
            const float d = dx * ys[r][b].d;
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi1[r]), acc[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * kIQ1SDelta), _mm256_cvtepi32_ps(sumi2[r]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum_ps(acc[r]);
}

static float dot_iq1_m(int64_t n, const void* w, const void* a) {
    const block_q8_K* y = (const block_q8_K*)a;
    float out;
    dot_iq1_m_rows<1>(n, (const block_iq1_m*)w, &y, &out);
    return out;
}

static void dot4_iq1_m(int64_t n, const void* w, const void* const* a, float* out) {
    dot_iq1_m_rows<4>(n, (const block_iq1_m*)w, (const block_q8_K* const*)a, out);
}

// Fills every entry this header implements.
static void fill_avx2_level(kernel_table* t) {
    t->dequant[GGML_F16] = dequant_f16;
    t->dequant[GGML_BF16] = dequant_bf16;
    t->dequant[GGML_Q4_0] = dequant_q4_0;
    t->dequant[GGML_Q5_0] = dequant_q5_0;
    t->dequant[GGML_Q8_0] = dequant_q8_0;
    t->dequant[GGML_Q4_K] = dequant_q4_K;
    t->dequant[GGML_Q5_K] = dequant_q5_K;
    t->dequant[GGML_Q6_K] = dequant_q6_K;
    t->quant_act[ACT_Q8_32] = quant_act_q8_32;
    t->quant_act[ACT_Q8_K] = quant_act_q8_K;
    t->quant_act[ACT_Q8_1] = quant_act_q8_1;
    t->attn_scores = attn_scores;
    t->attn_values = attn_values;
    t->exp_sum = exp_sum;
    t->silu_mul = silu_mul;
    t->dot[GGML_F32] = dot_f32;
    t->dot[GGML_F16] = dot_f16;
    t->dot[GGML_BF16] = dot_bf16;
    t->dot[GGML_Q4_0] = dot32<b32_q4_0, dot_u8s8_32>;
    t->dot[GGML_Q5_0] = dot32<b32_q5_0, dot_u8s8_32>;
    t->dot[GGML_Q8_0] = dot_q8_0<dot_u8s8_32>;
    t->dot[GGML_Q4_1] = dot32<b32_q4_1, dot_u8s8_32>;
    t->dot[GGML_Q5_1] = dot32<b32_q5_1, dot_u8s8_32>;
    t->dot[GGML_Q2_K] = dot_q2_K;
    t->dot[GGML_Q3_K] = dot_q3_K;
    t->dot4[GGML_Q2_K] = dot4_q2_K;
    t->dot[GGML_IQ4_NL] = dot32<b32_iq4_nl, dot_u8s8_32>;
    t->dot[GGML_IQ4_XS] = dot_iq4_xs;
    t->dot4[GGML_IQ4_XS] = dot4_iq4_xs;
    t->dot[GGML_IQ2_XXS] = dot_lattice<block_iq2_xxs, 8, iq2_xxs_unpack>;
    t->dot[GGML_IQ2_XS] = dot_lattice<block_iq2_xs, 8, iq2_xs_unpack>;
    t->dot[GGML_IQ2_S] = dot_lattice<block_iq2_s, 8, iq2_s_unpack>;
    t->dot[GGML_IQ3_XXS] = dot_lattice<block_iq3_xxs, 4, iq3_xxs_unpack>;
    t->dot[GGML_IQ3_S] = dot_lattice<block_iq3_s, 1, iq3_s_unpack>;
    t->dot[GGML_IQ1_S] = dot_iq1_s;
    t->dot[GGML_IQ1_M] = dot_iq1_m;
    t->dot4[GGML_IQ2_XXS] = dot4_lattice<block_iq2_xxs, 8, iq2_xxs_unpack>;
    t->dot4[GGML_IQ2_XS] = dot4_lattice<block_iq2_xs, 8, iq2_xs_unpack>;
    t->dot4[GGML_IQ2_S] = dot4_lattice<block_iq2_s, 8, iq2_s_unpack>;
    t->dot4[GGML_IQ3_XXS] = dot4_lattice<block_iq3_xxs, 4, iq3_xxs_unpack>;
    t->dot4[GGML_IQ3_S] = dot4_lattice<block_iq3_s, 1, iq3_s_unpack>;
    t->dot4[GGML_IQ1_S] = dot4_iq1_s;
    t->dot4[GGML_IQ1_M] = dot4_iq1_m;
    t->dot4[GGML_Q3_K] = dot4_q3_K;
    t->dot[GGML_Q4_K] = dot_q4_K;
    t->dot[GGML_Q5_K] = dot_q5_K;
    t->dot[GGML_Q6_K] = dot_q6_K;
    t->dot4[GGML_Q4_K] = dot4_q4_K;
    t->dot4[GGML_Q5_K] = dot4_q5_K;
    t->dot4[GGML_Q6_K] = dot4_q6_K;
}

}  // namespace
}  // namespace x86
}  // namespace hybrid
