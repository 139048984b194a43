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
// x86::k4_rows: the dots' own code (tokens in pairs), so the tiles equal the dots bit for bit.
// k_interleave (Q6_K below): the two sub-blocks' pair sums of one hadd, reordered so that one
// madd by a (scale, scale) pair gives each int32 lane the integer two madds give it.
alignas(32) static const uint8_t k_interleave[32] = {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                                     0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15};

// ---------------------------------------------------------------- Q4_K / Q5_K, reassociated
// x86::k4_rows takes 13 vector multiplies per 256 weights and token (8 maddubs, 4 scale
// madds shared by a pair of tokens, 1 for the mins), on Zen 2's one multiplier pipe. Here a
// hadd first adds the four-product sums of each sub-block pairwise, so one madd scales four
// sub-blocks (two chunks) and a block takes 11. Each int32 lane then holds other products
// than the dot's lane, so the result differs from the dot by float reassociation (gemm.h states the bound); only with
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
        for (int r = 0; r < N; r++) {
            sumi[r] = _mm256_sub_epi32(sumi[r], q6_offset(x[b].scales, ys[r][b].bsums));  // quants are stored +32
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(ys[r][b].d * dw), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    for (int r = 0; r < N; r++) out[r] = hsum_ps(acc[r]);
}

// Each type's dots of one weight row with N activation rows, for tile().
// Q4_K / Q5_K: per token group, each pair's K4PairPrep for every block, in the calling thread's
// tile_scratch, read by every row of the tile.
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
    // Q4_K / Q5_K: 8 tokens, 4 pairs (Zen 2, ns per 256 weights and token at 8 tokens: 6.0 with
    // 4, 5.8 with 8); Q6_K: 8 tokens, one half of a block at a time (6.7 with 4 tokens and
    // unrolled halves, 6.4 so)
    g[GGML_Q4_K] = tile<8, k4_kernel<false>>;
    g[GGML_Q5_K] = tile<8, k4_kernel<true>>;
    g[GGML_Q6_K] = tile<8, q6_K_kernel>;
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
