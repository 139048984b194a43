// AVX2 prefill tiles (gemm.h). Compiled with -mavx2 -mfma -mf16c -mbmi2; filled only for a
// kernel table cpuid admitted.
#include "../../gemm.h"
// the header's table filler is avx2.cpp's business, unused here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "x86_avx2_kernels.h"
#pragma GCC diagnostic pop
#include "gemm_tile.h"
#include "gemm_rowgroups.h"

namespace hybrid {
namespace x86_gemm {
using namespace x86;

// One token's 8 row results (lanes of v) to out[r * r_stride].
static inline void store_8_rows(__m256 v, float* out, int64_t r_stride) {
    alignas(32) float o[8];
    _mm256_store_ps(o, v);
    for (int r = 0; r < 8; r++) out[r * r_stride] = o[r];
}

// The K-quants' row groups are the AVX-512 tiles' (gemm_rowgroups.h): 16 rows, the first 32
// bytes of a line hold 4 quants of rows 0-7, the next 32 those of rows 8-15. A step takes 3
// tokens: each token's 4 activations, broadcast once, multiply both halves, so per 6 maddubs
// the loop spends 2 loads, 3 broadcasts and 6 adds, where the 8-row groups of 4 tokens before
// (Q4_K with its nibbles as stored) spent per 4 maddubs an and (and a shift every other
// sub-block), 4 broadcasts and 4 adds; a broadcast from memory takes a vector pipe on AMD's
// cores (Zen 4: broadcast + maddubs + add 0.75 cycles, broadcast + xor 0.5). The kernels
// alone, Zen 4 (AVX2 code), 2048-weight rows and 48 tokens in cache, best of 6 runs, ns per
// 256 weights and token, 8 rows x 4 tokens -> 16 x 2 -> 16 x 3: Q4_K 2.27 -> 2.09 -> 1.94,
// Q6_K 2.52 -> 2.31 -> 2.20; 16 x 4 spills (Q4_K 2.57), 16 rows of nibbles x 3 gained
// nothing (2.28 vs 2.32 in that run). The expert engine (bench_moe.py --prefill 512: 64
// experts of 2048 x 1024 Q4_K/Q4_K/Q6_K, top-6, 2 threads, six pairs of alternating
// processes): 1.06-1.28x tokens/s, though the rewrite of 16 rows a byte per quant costs twice
// the 8 rows of nibbles (4.2% of the time, was 2.3%).
//
// One 64-byte line of a 16-row group (4 unsigned quants of rows 0-7, then of rows 8-15) times
// each token's 4 activations at a[t] + i: its maddubs added into s16[half][token].
template <int N>
static inline __attribute__((always_inline)) void line_times_tokens(const uint8_t* line, const int8_t* const* a, int i,
                                                                    __m256i (&s16)[2][N]) {
    const __m256i u0 = _mm256_load_si256((const __m256i*)line), u1 = _mm256_load_si256((const __m256i*)(line + 32));
    for (int t = 0; t < N; t++) {
        int32_t a4;
        std::memcpy(&a4, a[t] + i, 4);
        const __m256i v = _mm256_set1_epi32(a4);
        s16[0][t] = _mm256_add_epi16(s16[0][t], _mm256_maddubs_epi16(u0, v));
        s16[1][t] = _mm256_add_epi16(s16[1][t], _mm256_maddubs_epi16(u1, v));
    }
}

// Q4_K / Q5_K: a byte per quant (Q5_K with its fifth bit); maddubs against a token's 4
// activations broadcast leaves each row's sums in its own two int16 lanes, which add up in
// int16 over a sub-block (Q4_K: 8 registers, 8 x 2 x 15 x 127 = 30480; Q5_K: 4, 4 x 2 x 31 x
// 127 = 31496) before one madd by the rows' scales; the mins: one madd per sub-block pair. Per
// block, row and token the integer sums S (scaled quants x activations) and M (mins x sub-block
// sums) are exact, as in k4_rows, and the float step is k4_rows' own: accS += (d * d_t) * S,
// accM += (dmin * d_t) * M, out = accS - accM, so every output equals the single dot bit for bit.
// out[t * t_stride + r * r_stride] for the 16 rows of x (nb blocks) and N <= 3 tokens ys.
template <int N, bool QH>
static void k4_x16_rows(int64_t nb, const k4_x16<QH>* x, const block_q8_K* const* ys, float* out, int64_t r_stride,
                        int64_t t_stride) {
    constexpr int run = QH ? 4 : 8;  // registers per int16 sum
    __m256 accS[2][N], accM[2][N];   // [rows 0-7, rows 8-15][token]
    for (int g = 0; g < 2; g++)
        for (int t = 0; t < N; t++) accS[g][t] = accM[g][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, x++) {
        __m256i s32[2][N];
        for (int g = 0; g < 2; g++)
            for (int t = 0; t < N; t++) s32[g][t] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int j = 0; j < 8; j++) {  // sub-block j: chunk j / 2, its first (even j) or second 64 bytes
            const uint8_t* q = x->qs[j / 2][0] + 64 * (j % 2);
            const int8_t* a[N];
            for (int t = 0; t < N; t++) a[t] = ys[t][b].qs + 32 * j;
            for (int k0 = 0; k0 < 8; k0 += run) {
                __m256i s16[2][N];
                for (int g = 0; g < 2; g++)
                    for (int t = 0; t < N; t++) s16[g][t] = _mm256_setzero_si256();
                // unrolled 4: GCC fully unrolled reassociates the int16 sums into a tree and spills
#pragma GCC unroll 4
                for (int k = k0; k < k0 + run; k++) line_times_tokens<N>(q + k * sizeof(x->qs[0][0]), a, 4 * k, s16);
                for (int g = 0; g < 2; g++) {
                    const __m256i sc = _mm256_load_si256((const __m256i*)(x->sc[j] + 16 * g));
                    for (int t = 0; t < N; t++) s32[g][t] = _mm256_add_epi32(s32[g][t], _mm256_madd_epi16(s16[g][t], sc));
                }
            }
        }
        for (int t = 0; t < N; t++) {
            const block_q8_K& y = ys[t][b];
            // the 8 sub-block sums of the activations as int16 in both lanes: dword i = pair i
            const __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i*)y.bsums),
                                              _mm_loadu_si128((const __m128i*)(y.bsums + 8)));
            const __m256i bs2 = _mm256_broadcastsi128_si256(bs);
            const __m256i p[4] = {_mm256_shuffle_epi32(bs2, 0x00), _mm256_shuffle_epi32(bs2, 0x55),
                                  _mm256_shuffle_epi32(bs2, 0xAA), _mm256_shuffle_epi32(bs2, 0xFF)};
            const __m256 dt = _mm256_set1_ps(y.d);
            for (int g = 0; g < 2; g++) {
                __m256i mi = _mm256_madd_epi16(_mm256_load_si256((const __m256i*)(x->mn[0] + 16 * g)), p[0]);
                for (int i = 1; i < 4; i++)
                    mi = _mm256_add_epi32(mi, _mm256_madd_epi16(_mm256_load_si256((const __m256i*)(x->mn[i] + 16 * g)), p[i]));
                const __m256 d = _mm256_load_ps(x->d + 8 * g), dmin = _mm256_load_ps(x->dmin + 8 * g);
                accS[g][t] = _mm256_fmadd_ps(_mm256_mul_ps(d, dt), _mm256_cvtepi32_ps(s32[g][t]), accS[g][t]);
                accM[g][t] = _mm256_fmadd_ps(_mm256_mul_ps(dmin, dt), _mm256_cvtepi32_ps(mi), accM[g][t]);
            }
        }
    }
    for (int g = 0; g < 2; g++)
        for (int t = 0; t < N; t++)
            store_8_rows(_mm256_sub_ps(accS[g][t], accM[g][t]), out + t * t_stride + 8 * g * r_stride, r_stride);
}

// ---------------------------------------------------------------- Q6_K, 16 rows
// The quants as stored (0..63, unsigned): maddubs against a token's activations gives int16
// sums of at most 2 x 63 x 127, so two registers (8 quants) add up in int16 (32004) before one
// madd by the rows' scales, and the offset comes off once per block and token, 32 x sum_j sc_j
// x bsum_j (one madd per sub-block pair), as the single dot's q6_offset does. On Zen 2 this
// (13 multiplies per 256 weights and token) beat q - 32 signed (10, but a sign per maddubs):
// these loops are bound by their count of vector uops rather than by the multiplier. Per
// block, row and token the integer sum S = sum_j sc_j (sum_i q_i a_i - 32 bsum_j) = sum_j sc_j
// sum_i (q_i - 32) a_i is exact and the float step is dot_q6_K_rows' own: acc += (d * d_t) * S.
// pshufb masks repeating the even (0) or the odd (1) int16 of each pair
#define HYBRID_D(o) 0 + 2 * (o), 1 + 2 * (o), 0 + 2 * (o), 1 + 2 * (o), 4 + 2 * (o), 5 + 2 * (o), 4 + 2 * (o), 5 + 2 * (o), \
                    8 + 2 * (o), 9 + 2 * (o), 8 + 2 * (o), 9 + 2 * (o), 12 + 2 * (o), 13 + 2 * (o), 12 + 2 * (o), 13 + 2 * (o)
alignas(32) static const uint8_t k_dup_words[2][32] = {{HYBRID_D(0), HYBRID_D(0)}, {HYBRID_D(1), HYBRID_D(1)}};
#undef HYBRID_D

template <int N>
static void q6_K_x16_rows(int64_t nb, const q6_K_x16* x, const block_q8_K* const* ys, float* out, int64_t r_stride,
                          int64_t t_stride) {
    constexpr int run = 2;  // registers per int16 sum: 2 x 2 x 63 x 127 = 32004
    __m256 acc[2][N];
    for (int g = 0; g < 2; g++)
        for (int t = 0; t < N; t++) acc[g][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, x++) {
        __m256i s32[2][N];
        for (int g = 0; g < 2; g++)
            for (int t = 0; t < N; t++) s32[g][t] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int hj = 0; hj < 8; hj++) {  // quarter j = hj % 4 of half h = hj / 4
            const int8_t* a[N];
            for (int t = 0; t < N; t++) a[t] = ys[t][b].qs + 32 * hj;
            for (int k0 = 0; k0 < 8; k0 += run) {  // sub-block 2 hj + k0 / 4
                __m256i s16[2][N];
                for (int g = 0; g < 2; g++)
                    for (int t = 0; t < N; t++) s16[g][t] = _mm256_setzero_si256();
                for (int k = k0; k < k0 + run; k++) line_times_tokens<N>(x->q[hj / 4][hj % 4][k], a, 4 * k, s16);
                const __m256i dup = _mm256_load_si256((const __m256i*)k_dup_words[k0 / 4]);
                for (int g = 0; g < 2; g++) {
                    const __m256i sc = _mm256_shuffle_epi8(_mm256_load_si256((const __m256i*)(x->scp[hj] + 16 * g)), dup);
                    for (int t = 0; t < N; t++) s32[g][t] = _mm256_add_epi32(s32[g][t], _mm256_madd_epi16(s16[g][t], sc));
                }
            }
        }
        for (int t = 0; t < N; t++) {
            const int16_t* bs = ys[t][b].bsums;
            __m256i o[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int i = 0; i < 8; i++) {
                int32_t pair;
                std::memcpy(&pair, bs + 2 * i, 4);
                const __m256i pr = _mm256_set1_epi32(pair);
                for (int g = 0; g < 2; g++)
                    o[g] = _mm256_add_epi32(o[g], _mm256_madd_epi16(_mm256_load_si256((const __m256i*)(x->scp[i] + 16 * g)), pr));
            }
            const __m256 dt = _mm256_set1_ps(ys[t][b].d);
            for (int g = 0; g < 2; g++) {
                const __m256i s = _mm256_sub_epi32(s32[g][t], _mm256_slli_epi32(o[g], 5));
                acc[g][t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_load_ps(x->d + 8 * g), dt), _mm256_cvtepi32_ps(s), acc[g][t]);
            }
        }
    }
    for (int g = 0; g < 2; g++)
        for (int t = 0; t < N; t++) store_8_rows(acc[g][t], out + t * t_stride + 8 * g * r_stride, r_stride);
}

// ---------------------------------------------------------------- Q8_0, 8 rows interleaved
// A register holds 4 quants of each of 8 rows (gemm_rowgroups.h's layout): per token the 4
// activations broadcast, carry each row's quant signs (sign), maddubs against the rows' |q|
// and madd fold them to one int32 per row, and 8 registers make each row's block sum S, exact;
// then one float step for the 8 rows, acc = fma(d * d_act, S, acc), x86::dot_q8_0's steps in
// its order (four chains of blocks), so every output equals the decode dot bit
// for bit. Zen 2, 2048-weight rows in
// cache (bench_matmul --cached --k 2048), ns per 256 weights and token, the pair kernel this
// replaced -> now: 16 tokens 7.9 -> 7.7, 32 7.8 -> 7.1, 48 7.8 -> 6.8. The rewrite (~9 ns per
// 8 blocks) costs more than it saves below 12 tokens, which the short tiles take
// (x86::rows_q8_0_lanes: 2 tokens 9.8 -> 12.4, 4 8.4 -> 9.4, 8 7.9 -> 8.1: each token's block
// sum is now reduced to one integer, where the pair kernel kept partial sums to the end).
typedef q8_0_group<8, false> q8_0_x8;

template <int N>
static void q8_0_x8_rows(int64_t nb, const q8_0_x8* x, const block_q8_32* const* ys, float* out, int64_t r_stride,
                         int64_t t_stride) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][N];  // the four chains of blocks (x86::dot_q8_0)
    for (int c = 0; c < 4; c++)
        for (int t = 0; t < N; t++) acc[c][t] = _mm256_setzero_ps();
    auto block = [&](int64_t b, __m256* a) {
        __m256i S[N];
        for (int t = 0; t < N; t++) S[t] = _mm256_setzero_si256();
        for (int k = 0; k < 8; k++) {
            const __m256i q = _mm256_load_si256((const __m256i*)x[b].q[k]);
            const __m256i u = _mm256_abs_epi8(q);
            for (int t = 0; t < N; t++) {
                int32_t a4;
                std::memcpy(&a4, ys[t][b].qs + 4 * k, 4);
                const __m256i p = _mm256_maddubs_epi16(u, _mm256_sign_epi8(_mm256_set1_epi32(a4), q));
                S[t] = _mm256_add_epi32(S[t], _mm256_madd_epi16(p, ones));
            }
        }
        const __m256 d = _mm256_load_ps(x[b].d);
        for (int t = 0; t < N; t++)
            a[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(ys[t][b].d)), _mm256_cvtepi32_ps(S[t]), a[t]);
    };
    for (int64_t b = 0; b < nb; b++) block(b, acc[b % 4]);
    for (int t = 0; t < N; t++)
        store_8_rows(_mm256_add_ps(_mm256_add_ps(acc[0][t], acc[1][t]), _mm256_add_ps(acc[2][t], acc[3][t])), out + t * t_stride, r_stride);
}

// The groups, for gemm_rowgroups.h's tile_row_groups. min_tokens: the rewrite costs about what
// the new form saves on a few tokens. Measured on Zen 2 with the 8-row groups (~54 ns per 8 Q4_K
// blocks, ~130 per 8 Q6_K blocks, including their first read; cached, ns per 256 weights and
// token, fallback -> row groups: Q4_K 4 tokens 6.1 -> 6.2, 5 tokens 6.6 -> 6.1, 64 tokens 5.7
// -> 4.4; Q5_K 4 tokens 7.4 -> 8.7, 5 tokens 8.5 -> 8.0, 64 tokens 6.4 -> 4.8) and kept for the
// 16-row groups, which gave the 8-row groups' times at 5, 6 and 8 tokens on Zen 4 and gain from
// 12 (Q4_K 3.3 ns, Q5_K 3.8, Q6_K 3.8).
namespace {  // internal linkage: no member may be shared with another ISA's object file

template <bool QH>
struct k4_groups {
    typedef k4_x16<QH> packed;
    typedef block_q8_K act;
    static constexpr int64_t block_elems = QK_K;
    static constexpr int64_t block_bytes = QH ? sizeof(block_q5_K) : sizeof(block_q4_K);
    static constexpr int64_t min_tokens = 5;
    static constexpr int group_rows = 16, tokens = 3;
    static void pack(const uint8_t* w, int64_t stride, int64_t b, packed& x) { k4_pack(w, stride, b, x); }
    template <int N>
    static void rows(int64_t nb, const packed* x, const block_q8_K* const* ys, float* out, int64_t rs, int64_t ts) {
        k4_x16_rows<N, QH>(nb, x, ys, out, rs, ts);
    }
    typedef k4_kernel<QH> fallback;  // short tiles and the last R % 16 rows, 8 tokens at a time
};
struct q6_K_groups {
    typedef q6_K_x16 packed;
    typedef block_q8_K act;
    static constexpr int64_t block_elems = QK_K;
    static constexpr int64_t block_bytes = sizeof(block_q6_K);
    static constexpr int64_t min_tokens = 8;
    static constexpr int group_rows = 16, tokens = 3;
    static void pack(const uint8_t* w, int64_t stride, int64_t b, packed& x) { q6_K_pack(w, stride, b, x); }
    template <int N>
    static void rows(int64_t nb, const packed* x, const block_q8_K* const* ys, float* out, int64_t rs, int64_t ts) {
        q6_K_x16_rows<N>(nb, x, ys, out, rs, ts);
    }
    typedef q6_K_kernel fallback;  // short tiles and the last R % 16 rows, 8 tokens at a time
};

struct q8_0_groups {
    typedef q8_0_x8 packed;
    typedef block_q8_32 act;
    static constexpr int64_t block_elems = QK32;
    static constexpr int64_t block_bytes = sizeof(block_q8_0);
    static constexpr int64_t min_tokens = 12;
    static constexpr int group_rows = 8, tokens = 4;
    static void pack(const uint8_t* w, int64_t stride, int64_t b, packed& x) { q8_0_pack(w, stride, b, x); }
    template <int N>
    static void rows(int64_t nb, const packed* x, const block_q8_32* const* ys, float* out, int64_t rs, int64_t ts) {
        q8_0_x8_rows<N>(nb, x, ys, out, rs, ts);
    }
    typedef q8_0_kernel<dot_u8s8_32> fallback;  // short tiles and the last R % 8 rows, 8 tokens at a time
};

}  // namespace

static void fill(gemm_tile_fn* g) {
    fill_shared<dot_u8s8_32>(g);
    // K-quants: 16-row groups rewritten per tile (tile_row_groups); their fallbacks: Q4_K / Q5_K
    // 8 tokens in 4 pairs (6.0 ns per 256 weights and token with 4 tokens, 5.8 with 8), Q6_K 8
    // tokens, one half of a block at a time (6.7 with 4 tokens and unrolled halves, 6.4 so)
    g[GGML_Q4_K] = tile_row_groups<k4_groups<false>>;
    g[GGML_Q5_K] = tile_row_groups<k4_groups<true>>;
    g[GGML_Q6_K] = tile_row_groups<q6_K_groups>;
    g[GGML_Q8_0] = tile_row_groups<q8_0_groups>;
}

}  // namespace x86_gemm

bool fill_avx2_gemm(gemm_tile_fn* t) {
    x86_gemm::fill(t);
    return true;
}

}  // namespace hybrid
