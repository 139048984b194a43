// AVX2 prefill tiles (gemm.h). Compiled with -mavx2 -mfma -mf16c -mbmi2; filled only for a
// kernel table cpuid admitted.
#include "../../gemm.h"
// the header's table filler is avx2.cpp's business, unused here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "x86_avx2_kernels.h"
#pragma GCC diagnostic pop
#include "gemm_tile.h"

namespace hybrid {
namespace x86_gemm {
using namespace x86;

// ---------------------------------------------------------------- Q4_K / Q5_K, N tokens at once
// x86::dot_k4_rows takes two multiplies per 32 quants per token (maddubs, then madd by the
// sub-block scale). Here the two maddubs of a chunk (sub-blocks 2c and 2c+1, 16 int16 pair sums
// each) are added pairwise with one hadd and interleaved so that one madd by (s_2c, s_2c+1)
// gives each int32 lane exactly the integer the dot's two madds give it: the same lane sums,
// so the float steps that follow are the dot's and the result is bit-identical, with three
// multiplies instead of four. The int16 sums fit: |q| <= 31, |a| <= 127, 4 products < 2^15.
alignas(32) static const uint8_t k_interleave[32] = {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                                     0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15};
// One Q4_K / Q5_K block as both tiles below read it: scales and mins, d and dmin, the quants.
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
    // acc += d * y.d * sumi - dmin * y.d * (mins . bsums)
    void accumulate(__m256& acc, __m256i sumi, const block_q8_K& y) const {
        const __m256 f = _mm256_mul_ps(dm, _mm256_broadcast_ss(&y.d));
        acc = _mm256_fmadd_ps(_mm256_permute_ps(f, 0x00), _mm256_cvtepi32_ps(sumi), acc);
        acc = _mm256_fnmadd_ps(_mm256_permute_ps(f, 0x55), _mm256_cvtepi32_ps(k4_min_products(sm, y.bsums)), acc);
    }
};

template <int N, bool QH>
static void rows_k4(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    const block_q8_K* const* ys = (const block_q8_K* const*)a;
    const __m256i inter = _mm256_load_si256((const __m256i*)k_interleave);
    __m256 acc[N];
    for (int r = 0; r < N; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        const uint8_t* blk = w + b * K4Block<QH>::stride;
        prefetch_block(blk, K4Block<QH>::stride);
        const K4Block<QH> k(blk);
        // (s_2c, s_2c+1) int16 pairs: scales as int16 in both lanes, then dword c broadcast
        const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(k.sm));
        const __m256i sc[4] = {_mm256_shuffle_epi32(scales, 0x00), _mm256_shuffle_epi32(scales, 0x55),
                               _mm256_shuffle_epi32(scales, 0xAA), _mm256_shuffle_epi32(scales, 0xFF)};
        __m256i sumi[N];
        for (int r = 0; r < N; r++) sumi[r] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i lo, hi;
            k.unpack(c, lo, hi);
            for (int r = 0; r < N; r++) {
                const __m256i a0 = _mm256_loadu_si256((const __m256i*)(ys[r][b].qs + 64 * c));
                const __m256i a1 = _mm256_loadu_si256((const __m256i*)(ys[r][b].qs + 64 * c + 32));
                const __m256i h = _mm256_hadd_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(_mm256_shuffle_epi8(h, inter), sc[c]));
            }
        }
        for (int r = 0; r < N; r++) k.accumulate(acc[r], sumi[r], ys[r][b]);
    }
    for (int r = 0; r < N; r++) out[r] = hsum_ps(acc[r]);
}

// ---------------------------------------------------------------- Q4_K / Q5_K, reassociated
// rows_k4 is bound by the one AVX2 multiplier pipe of Zen 2 (13 multiplies per 256 weights
// and token: 8 maddubs, 4 scale madds, 1 for the mins). Here a second hadd first adds the
// four-product sums of each sub-block pairwise, so one madd scales four sub-blocks (two chunks)
// and a block takes 11. Each int32 lane then holds other products than the dot's lane, so the
// result differs from the dot by float reassociation (gemm.h states the bound); only with
// set_prefill_exact(false). The int16 sums fit: 8 products of |q| <= 31 and |a| <= 127 <= 31496.
template <int N, bool QH>
static void rows_k4_sum8(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    const block_q8_K* const* ys = (const block_q8_K* const*)a;
    __m256 acc[N];
    for (int r = 0; r < N; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        const uint8_t* blk = w + b * K4Block<QH>::stride;
        prefetch_block(blk, K4Block<QH>::stride);
        const K4Block<QH> k(blk);
        // after two hadds each 128-bit lane holds two 8-product sums of each of sub-blocks
        // 4h..4h+3 in order: scales s_4h+i as int16 pairs
        const __m256i s16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(k.sm));
        const __m256i sc[2] = {_mm256_unpacklo_epi16(s16, s16), _mm256_unpackhi_epi16(s16, s16)};
        __m256i sumi[N];
        for (int r = 0; r < N; r++) sumi[r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i u[4];  // sub-blocks 4h .. 4h+3
            for (int j = 0; j < 2; j++) {
                k.unpack(2 * h + j, u[2 * j], u[2 * j + 1]);
            }
            for (int r = 0; r < N; r++) {
                const int8_t* y = ys[r][b].qs + 128 * h;
                __m256i p[4];
                for (int i = 0; i < 4; i++) p[i] = _mm256_maddubs_epi16(u[i], _mm256_loadu_si256((const __m256i*)(y + 32 * i)));
                const __m256i s8 = _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3]));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(s8, sc[h]));
            }
        }
        for (int r = 0; r < N; r++) k.accumulate(acc[r], sumi[r], ys[r][b]);
    }
    for (int r = 0; r < N; r++) out[r] = hsum_ps(acc[r]);
}

// ---------------------------------------------------------------- Q6_K, N tokens at once
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
    __m256 acc[N];
    for (int r = 0; r < N; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK_K; b++) {
        prefetch_block((const uint8_t*)&x[b], sizeof(block_q6_K));
        __m256i sumi[N];
        for (int r = 0; r < N; r++) sumi[r] = _mm256_setzero_si256();
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
        for (int r = 0; r < N; r++) {
            sumi[r] = _mm256_sub_epi32(sumi[r], q6_offset(x[b].scales, ys[r][b].bsums));  // quants are stored +32
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(ys[r][b].d * dw), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for (int r = 0; r < N; r++) out[r] = hsum_ps(acc[r]);
}

// Each type's dots of one weight row with N activation rows, for tile().
template <bool QH>
struct k4_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) {
        rows_k4<N, QH>(n, w, a, out);
    }
};
template <bool QH>
struct k4_sum8_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) {
        rows_k4_sum8<N, QH>(n, w, a, out);
    }
};
struct q6_K_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) {
        rows_q6_K<N>(n, w, a, out);
    }
};

static void fill(gemm_tile_fn* g) {
    fill_shared<dot_u8s8_32>(g);
    // the K-quants: 4 tokens (with 8 they lost 3-10% on Zen 2: their per-token state no longer
    // fits 16 registers)
    g[GGML_Q4_K] = tile<4, k4_kernel<false>>;
    g[GGML_Q5_K] = tile<4, k4_kernel<true>>;
    g[GGML_Q6_K] = tile<4, q6_K_kernel>;
}

static void fill_reassociated(gemm_tile_fn* g) {
    // 6 tokens: ~15% over 4 on Zen 2 (two registers per token; the weights take four)
    g[GGML_Q4_K] = tile<6, k4_sum8_kernel<false>>;
    g[GGML_Q5_K] = tile<6, k4_sum8_kernel<true>>;
}

}  // namespace x86_gemm

bool fill_avx2_gemm(gemm_tile_fn* t) {
    x86_gemm::fill(t);
    return true;
}

bool fill_avx2_gemm_reassociated(gemm_tile_fn* t) {
    x86_gemm::fill_reassociated(t);
    return true;
}

}  // namespace hybrid
