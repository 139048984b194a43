// AVX-512 VNNI prefill tiles (gemm.h). Compiled with avx512.cpp's flags; filled only for a
// kernel table cpuid admitted. That file's K-quant dots have no multi-token versions (their
// dot4 slots stay empty): here each is written once more for N tokens, instruction for
// instruction per token, so every result is bit-identical to the single dot while the weight
// block is unpacked once per N tokens. The 32-block and lattice types share their rows with
// the AVX2 tiles (gemm_tile.h fill_shared, x86::rows32 with the VNNI product).
// tests/native/avx512_emulated.cpp checks the identity under SIMDe on CPUs without AVX-512.
#include "../../gemm.h"
// the header's table filler is avx2.cpp's business, unused here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "x86_avx2_kernels.h"
#pragma GCC diagnostic pop
#include "gemm_tile.h"

namespace hybrid {
namespace x86_gemm512 {
using namespace x86;
using x86_gemm::tile;

static inline __m512i join256(__m256i lo, __m256i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
static inline float reduce_add(__m512 v) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return hsum_ps(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}

// ---------------------------------------------------------------- 32-blocks
// x86::rows32 with the VNNI product avx512.cpp's 32-block dots use
static inline __m256i dot_vnni(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }

// ---------------------------------------------------------------- K-quants (avx512.cpp dot_k4_512, dot_q6_K)

alignas(64) static const int16_t k_k4_scale_idx[4][32] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
    {2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5},
    {6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7},
};

// Q4_K (QH = false) and Q5_K: 64 quants per 512-bit register, maddubs then vpdpwssd by scale.
template <int N, bool QH>
static void rows_k4(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    const block_q8_K* const* ys = (const block_q8_K* const*)a;
    const int64_t stride = QH ? sizeof(block_q5_K) : sizeof(block_q4_K);
    const int qs_off = QH ? offsetof(block_q5_K, qs) : offsetof(block_q4_K, qs);
    const __m256i m4 = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
    __m512 acc[N];
    __m256 acc_m[N];
    for (int r = 0; r < N; r++) acc[r] = _mm512_setzero_ps(), acc_m[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        const uint8_t* blk = w + b * stride;
        prefetch_block(blk, stride);
        uint16_t dh, mh;
        std::memcpy(&dh, blk, 2);
        std::memcpy(&mh, blk + 2, 2);
        const __m128i sm = scales_mins_k4(blk + 4);
        const float dmin = h2f(mh), d = h2f(dh);
        for (int r = 0; r < N; r++)
            acc_m[r] = _mm256_fmadd_ps(_mm256_set1_ps(ys[r][b].d * dmin),
                                       _mm256_cvtepi32_ps(k4_min_products(sm, ys[r][b].bsums)), acc_m[r]);
        const uint8_t* qs = blk + qs_off;
        const __m256i hbits = QH ? _mm256_loadu_si256((const __m256i*)(blk + offsetof(block_q5_K, qh))) : _mm256_setzero_si256();
        const __m512i scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
        __m512i sumi[N];
        for (int r = 0; r < N; r++) sumi[r] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i*)(qs + 32 * c));
            __m256i lo = _mm256_and_si256(q, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if (QH) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * c), one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * c + 1), one), 4));
            }
            const __m512i qv = join256(lo, hi);
            const __m512i s = _mm512_permutexvar_epi16(_mm512_load_si512((const void*)k_k4_scale_idx[c]), scales);
            for (int r = 0; r < N; r++) {
                const __m512i av = _mm512_loadu_si512((const void*)(ys[r][b].qs + 64 * c));
                sumi[r] = _mm512_dpwssd_epi32(sumi[r], _mm512_maddubs_epi16(qv, av), s);
            }
        }
        for (int r = 0; r < N; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(ys[r][b].d * d), _mm512_cvtepi32_ps(sumi[r]), acc[r]);
    }
    for (int r = 0; r < N; r++) out[r] = reduce_add(acc[r]) - hsum_ps(acc_m[r]);
}

alignas(64) static const int16_t k_q6_scale_idx[2][32] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
};

template <int N>
static void rows_q6_K(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    const block_q6_K* x = (const block_q6_K*)w;
    const block_q8_K* const* ys = (const block_q8_K* const*)a;
    const __m512i idx0 = _mm512_load_si512((const void*)k_q6_scale_idx[0]);
    const __m512i idx1 = _mm512_load_si512((const void*)k_q6_scale_idx[1]);
    __m512 acc[N];
    for (int r = 0; r < N; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_q6_K));
        __m512i sumi[N];
        for (int r = 0; r < N; r++) sumi[r] = _mm512_setzero_si512();
        for (int half = 0; half < 2; half++) {
            __m256i q[4];
            q6_quarters(x[b].ql + 64 * half, x[b].qh + 32 * half, q);
            const __m128i sc16 = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i*)(x[b].scales + 8 * half)));
            const __m512i sc = _mm512_castsi128_si512(sc16);
            const __m512i q01 = join256(q[0], q[1]), q23 = join256(q[2], q[3]);
            const __m512i s01 = _mm512_permutexvar_epi16(idx0, sc), s23 = _mm512_permutexvar_epi16(idx1, sc);
            for (int r = 0; r < N; r++) {
                const int8_t* ay = ys[r][b].qs + 128 * half;
                const __m512i a01 = _mm512_loadu_si512((const void*)ay);
                const __m512i a23 = _mm512_loadu_si512((const void*)(ay + 64));
                sumi[r] = _mm512_dpwssd_epi32(sumi[r], _mm512_maddubs_epi16(q01, a01), s01);
                sumi[r] = _mm512_dpwssd_epi32(sumi[r], _mm512_maddubs_epi16(q23, a23), s23);
            }
        }
        const float dw = h2f(x[b].d);
        for (int r = 0; r < N; r++) {
            // quants are stored +32: subtract 32 * sc[j] * bsums[j] (8 lanes) from the low half
            sumi[r] = _mm512_sub_epi32(sumi[r], _mm512_inserti64x4(_mm512_setzero_si512(),
                                                                   q6_offset(x[b].scales, ys[r][b].bsums), 0));
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(ys[r][b].d * dw), _mm512_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for (int r = 0; r < N; r++) out[r] = reduce_add(acc[r]);
}

// Each type's dots of one weight row with N activation rows, for tile().
template <bool QH>
struct k4_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) { rows_k4<N, QH>(n, w, a, out); }
};
struct q6_K_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) { rows_q6_K<N>(n, w, a, out); }
};

static void fill(gemm_tile_fn* g) {
    x86_gemm::fill_shared<dot_vnni>(g);
    // the K-quants: 4 tokens (three registers per token of the 32; not yet measured on an
    // AVX-512 machine)
    g[GGML_Q4_K] = tile<4, k4_kernel<false>>;
    g[GGML_Q5_K] = tile<4, k4_kernel<true>>;
    g[GGML_Q6_K] = tile<4, q6_K_kernel>;
}

}  // namespace x86_gemm512

bool fill_avx512_gemm(gemm_tile_fn* t) {
    x86_gemm512::fill(t);
    return true;
}

}  // namespace hybrid
