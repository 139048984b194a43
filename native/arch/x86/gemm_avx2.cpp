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

// ---------------------------------------------------------------- Q6_K, N tokens at once
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

// ---------------------------------------------------------------- Q4_K / Q5_K, 8 rows interleaved
// k4_rows spends 12.5 vector multiplies per 256 weights and token: a register holds 32 quants
// of one row, so maddubs leaves 16 int16 sums per sub-block that a madd (by the scale) has to
// fold. Here a tile first rewrites 8 rows' blocks (k4_x8, in the thread's scratch) so that a
// register holds 4 quants of each of the 8 rows: maddubs against one token's 4 activations
// broadcast leaves each row's sums in its own two int16 lanes, which add up in int16 over a
// sub-block (Q4_K: 8 registers, 8 x 2 x 15 x 127 = 30480; Q5_K: 4, 4 x 2 x 31 x 127 = 31496)
// before one madd by the 8 rows' scales: 9.5 multiplies per 256 weights and token for Q4_K,
// 10.5 for Q5_K (the mins: one madd per sub-block pair). Per block, row and token the integer
// sums S (scaled quants x activations) and M (mins x sub-block sums) are exact, as in k4_rows,
// and the float step is k4_rows' own: accS += (d * d_t) * S, accM += (dmin * d_t) * M,
// out = accS - accM, so every output equals the single dot bit for bit.
template <bool QH>
struct alignas(32) k4_x8 {
    // chunk c, group k: quants 4k..4k+3 of sub-blocks 2c and 2c+1, row r in bytes 4r..4r+3 of
    // each 32; Q4_K: nibbles as stored (2c low, 2c+1 high); Q5_K: 5-bit bytes, 2c then 2c+1
    uint8_t qs[4][8][QH ? 64 : 32];
    int16_t sc[8][16];  // sub-block j: row r's scale in lanes 2r and 2r+1
    int16_t mn[4][16];  // sub-block pair i: row r's mins m_2i, m_2i+1 in lanes 2r, 2r+1
    float d[8], dmin[8];
};

// 32 bytes of each of 8 rows -> out[k]: bytes 4k..4k+3 of every row, row r at 4r (an 8 x 8
// transpose of 4-byte groups).
static inline void transpose_4byte_groups(const __m256i v_in[8], __m256i out[8]) {
    __m256i t[8], u[8];
    for (int r = 0; r < 8; r += 2) {
        t[r] = _mm256_unpacklo_epi32(v_in[r], v_in[r + 1]);      // groups 0, 1 | 4, 5 of rows r, r+1
        t[r + 1] = _mm256_unpackhi_epi32(v_in[r], v_in[r + 1]);  // groups 2, 3 | 6, 7
    }
    for (int h = 0; h < 8; h += 4) {                             // rows 0-3, rows 4-7
        u[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]);            // group 0 | 4 of 4 rows
        u[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);        // group 1 | 5
        u[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);    // group 2 | 6
        u[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);    // group 3 | 7
    }
    for (int k = 0; k < 4; k++) {
        out[k] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x20);
        out[k + 4] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x31);
    }
}

// Bytes 0-7 of rows[r]: scales 0-7 of row r (unsigned, or signed with SIGNED) -> out[j]: the 8
// rows' scale j as int16, row r in lanes 2r and 2r+1 (a madd's pair).
template <bool SIGNED>
static inline void scale_pairs_of_8_rows(const __m128i rows[8], int16_t (*out)[16]) {
    __m128i a[4];
    for (int r = 0; r < 8; r += 2) a[r / 2] = _mm_unpacklo_epi8(rows[r], rows[r + 1]);  // scale j of rows r, r+1: bytes 2j, 2j+1
    const __m128i b0 = _mm_unpacklo_epi16(a[0], a[1]), b1 = _mm_unpackhi_epi16(a[0], a[1]);  // rows 0-3: j 0-3, 4-7
    const __m128i b2 = _mm_unpacklo_epi16(a[2], a[3]), b3 = _mm_unpackhi_epi16(a[2], a[3]);  // rows 4-7
    const __m128i s8[4] = {_mm_unpacklo_epi32(b0, b2), _mm_unpackhi_epi32(b0, b2),            // j 0, 1 | 2, 3
                           _mm_unpacklo_epi32(b1, b3), _mm_unpackhi_epi32(b1, b3)};           // j 4, 5 | 6, 7
    for (int j = 0; j < 8; j++) {
        const __m128i dup = j % 2 ? _mm_unpackhi_epi8(s8[j / 2], s8[j / 2]) : _mm_unpacklo_epi8(s8[j / 2], s8[j / 2]);
        _mm256_store_si256((__m256i*)out[j], SIGNED ? _mm256_cvtepi8_epi16(dup) : _mm256_cvtepu8_epi16(dup));
    }
}

// One token's 8 row results (lanes of v) to out[r * r_stride].
static inline void store_8_rows(__m256 v, float* out, int64_t r_stride) {
    alignas(32) float o[8];
    _mm256_store_ps(o, v);
    for (int r = 0; r < 8; r++) out[r * r_stride] = o[r];
}

// Block b of rows w, w + stride, ..., w + 7 stride into x.
template <bool QH>
static inline void k4_x8_pack(const uint8_t* w, int64_t stride, int64_t b, k4_x8<QH>& x) {
    typedef typename std::conditional<QH, block_q5_K, block_q4_K>::type block;
    const uint8_t* blk[8];
    for (int r = 0; r < 8; r++) {  // the rewrite is the rows' first read: prefetch as the dots do
        blk[r] = w + r * stride + b * (int64_t)sizeof(block);
        prefetch_block(blk[r], sizeof(block));
    }
    __m256i v[8], hb[8];
    if (QH) {
        for (int r = 0; r < 8; r++) v[r] = _mm256_loadu_si256((const __m256i*)(blk[r] + offsetof(block_q5_K, qh)));
        transpose_4byte_groups(v, hb);
    }
    const __m256i m4 = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
    for (int c = 0; c < 4; c++) {
        __m256i q[8];
        for (int r = 0; r < 8; r++) v[r] = _mm256_loadu_si256((const __m256i*)(blk[r] + offsetof(block, qs) + 32 * c));
        transpose_4byte_groups(v, q);
        for (int k = 0; k < 8; k++) {
            if (QH) {  // the fifth bits: bit 2c (sub-block 2c) and 2c+1 of the quant's qh byte
                const __m256i lo = _mm256_or_si256(_mm256_and_si256(q[k], m4),
                                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb[k], 2 * c), one), 4));
                const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q[k], 4), m4),
                                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb[k], 2 * c + 1), one), 4));
                _mm256_store_si256((__m256i*)x.qs[c][k], lo);
                _mm256_store_si256((__m256i*)(x.qs[c][k] + 32), hi);
            } else {
                _mm256_store_si256((__m256i*)x.qs[c][k], q[k]);
            }
        }
    }
    __m128i sm[8];  // scales 0-7 then mins 0-7 of each row, bytes
    for (int r = 0; r < 8; r++) sm[r] = scales_mins_k4(blk[r] + offsetof(block, scales));
    scale_pairs_of_8_rows<false>(sm, x.sc);
    __m128i m[4];
    for (int r = 0; r < 8; r += 2) m[r / 2] = _mm_unpackhi_epi16(sm[r], sm[r + 1]);  // min pair i of rows r, r+1: words 2i, 2i+1
    const __m128i g0 = _mm_unpacklo_epi32(m[0], m[1]), g1 = _mm_unpackhi_epi32(m[0], m[1]);  // rows 0-3: pairs 0, 1 | 2, 3
    const __m128i g2 = _mm_unpacklo_epi32(m[2], m[3]), g3 = _mm_unpackhi_epi32(m[2], m[3]);  // rows 4-7
    _mm256_store_si256((__m256i*)x.mn[0], _mm256_cvtepu8_epi16(_mm_unpacklo_epi64(g0, g2)));
    _mm256_store_si256((__m256i*)x.mn[1], _mm256_cvtepu8_epi16(_mm_unpackhi_epi64(g0, g2)));
    _mm256_store_si256((__m256i*)x.mn[2], _mm256_cvtepu8_epi16(_mm_unpacklo_epi64(g1, g3)));
    _mm256_store_si256((__m256i*)x.mn[3], _mm256_cvtepu8_epi16(_mm_unpackhi_epi64(g1, g3)));
    alignas(16) uint16_t dh[8], mh[8];
    for (int r = 0; r < 8; r++) {
        std::memcpy(&dh[r], blk[r] + offsetof(block, d), 2);
        std::memcpy(&mh[r], blk[r] + offsetof(block, dmin), 2);
    }
    _mm256_store_ps(x.d, _mm256_cvtph_ps(_mm_load_si128((const __m128i*)dh)));
    _mm256_store_ps(x.dmin, _mm256_cvtph_ps(_mm_load_si128((const __m128i*)mh)));
}

// out[t * t_stride + r * r_stride] for the 8 rows of x (nb blocks) and N tokens ys.
template <int N, bool QH>
static void k4_x8_rows(int64_t nb, const k4_x8<QH>* x, const block_q8_K* const* ys, float* out, int64_t r_stride,
                       int64_t t_stride) {
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m256 accS[N], accM[N];
    for (int t = 0; t < N; t++) accS[t] = accM[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, x++) {
        __m256i s32[N];
        for (int t = 0; t < N; t++) s32[t] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++) {  // sub-block 2c + h
                const __m256i sc = _mm256_load_si256((const __m256i*)x->sc[2 * c + h]);
                // Q5_K: two runs of 4 groups, each folded by its own madd (int16 range)
                for (int k0 = 0; k0 < 8; k0 += QH ? 4 : 8) {
                    __m256i s16[N];
                    for (int t = 0; t < N; t++) s16[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
                    for (int k = k0; k < k0 + (QH ? 4 : 8); k++) {
                        __m256i u;
                        if (QH) {
                            u = _mm256_load_si256((const __m256i*)(x->qs[c][k] + 32 * h));
                        } else {
                            const __m256i q = _mm256_load_si256((const __m256i*)x->qs[c][k]);
                            u = _mm256_and_si256(h ? _mm256_srli_epi16(q, 4) : q, m4);
                        }
                        for (int t = 0; t < N; t++) {
                            int32_t a4;
                            std::memcpy(&a4, ys[t][b].qs + 64 * c + 32 * h + 4 * k, 4);
                            s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(u, _mm256_set1_epi32(a4)));
                        }
                    }
                    for (int t = 0; t < N; t++) s32[t] = _mm256_add_epi32(s32[t], _mm256_madd_epi16(s16[t], sc));
                }
            }
        const __m256 d = _mm256_load_ps(x->d), dmin = _mm256_load_ps(x->dmin);
        for (int t = 0; t < N; t++) {
            const block_q8_K& y = ys[t][b];
            // the 8 sub-block sums of the activations as int16 in both lanes: dword i = pair i
            const __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i*)y.bsums),
                                              _mm_loadu_si128((const __m128i*)(y.bsums + 8)));
            const __m256i bs2 = _mm256_broadcastsi128_si256(bs);
            __m256i mi = _mm256_madd_epi16(_mm256_load_si256((const __m256i*)x->mn[0]), _mm256_shuffle_epi32(bs2, 0x00));
            mi = _mm256_add_epi32(mi, _mm256_madd_epi16(_mm256_load_si256((const __m256i*)x->mn[1]), _mm256_shuffle_epi32(bs2, 0x55)));
            mi = _mm256_add_epi32(mi, _mm256_madd_epi16(_mm256_load_si256((const __m256i*)x->mn[2]), _mm256_shuffle_epi32(bs2, 0xAA)));
            mi = _mm256_add_epi32(mi, _mm256_madd_epi16(_mm256_load_si256((const __m256i*)x->mn[3]), _mm256_shuffle_epi32(bs2, 0xFF)));
            const __m256 dt = _mm256_set1_ps(y.d);
            accS[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, dt), _mm256_cvtepi32_ps(s32[t]), accS[t]);
            accM[t] = _mm256_fmadd_ps(_mm256_mul_ps(dmin, dt), _mm256_cvtepi32_ps(mi), accM[t]);
        }
    }
    for (int t = 0; t < N; t++) store_8_rows(_mm256_sub_ps(accS[t], accM[t]), out + t * t_stride, r_stride);
}

// ---------------------------------------------------------------- Q6_K, 8 rows interleaved
// The same layout for Q6_K, the quants as stored (0..63, unsigned): maddubs against a token's
// activations gives int16 sums of at most 2 x 63 x 127, so two registers (8 quants) add up in
// int16 (32004) before one madd by the rows' scales, and the offset comes off once per block
// and token, 32 x sum_j sc_j x bsum_j (one madd per sub-block pair), as the single dot's
// q6_offset does. 13 multiplies per 256 weights and token where q - 32 (signed, 4 registers
// per madd) took 10, but no sign per maddubs: the rows kernel went from 1.96 to 1.70 cycles
// per 32 products on Zen 2 (1024-weight rows, 48 tokens), these loops being bound by their
// count of vector uops rather than by the multiplier. Per block, row and token the integer sum
// S = sum_j sc_j (sum_i q_i a_i - 32 bsum_j) = sum_j sc_j sum_i (q_i - 32) a_i is exact and the
// float step is dot_q6_K_rows' own: acc += (d * d_t) * S.
struct alignas(32) q6_K_x8 {
    uint8_t q[2][4][8][32];  // half h, quarter j, group k: quants 4k..4k+3 of the quarter as
                             // stored (0..63), row r in bytes 4r..4r+3 (sub-block 8h + 2j + k / 4)
    int16_t scp[8][16];      // sub-block pair i: row r's scales 2i, 2i+1 in lanes 2r, 2r+1
    float d[8];
};

// placement/solver.py TILE_SCRATCH_PER_BLOCK budgets the largest 8-row block per worker
static_assert(sizeof(k4_x8<true>) == 2496 && sizeof(k4_x8<false>) <= 2496 && sizeof(q6_K_x8) <= 2496,
              "the Plan's tile_scratch line counts 2496 B per 256 weights of a row");

static inline void q6_K_x8_pack(const uint8_t* w, int64_t stride, int64_t b, q6_K_x8& x) {
    const block_q6_K* blk[8];
    for (int r = 0; r < 8; r++) {
        blk[r] = (const block_q6_K*)(w + r * stride) + b;
        prefetch_block((const uint8_t*)blk[r], sizeof(block_q6_K));
    }
    for (int h = 0; h < 2; h++) {
        __m256i q[8][4];
        for (int r = 0; r < 8; r++) q6_quarters(blk[r]->ql + 64 * h, blk[r]->qh + 32 * h, q[r]);
        for (int j = 0; j < 4; j++) {
            __m256i v[8], t[8];
            for (int r = 0; r < 8; r++) v[r] = q[r][j];
            transpose_4byte_groups(v, t);
            for (int k = 0; k < 8; k++) _mm256_store_si256((__m256i*)x.q[h][j][k], t[k]);
        }
    }
    __m128i lo[8], hi[8];  // the 16 int8 scales of each row: sub-blocks 0-7, then 8-15
    for (int r = 0; r < 8; r++) {
        lo[r] = _mm_loadu_si128((const __m128i*)blk[r]->scales);
        hi[r] = _mm_srli_si128(lo[r], 8);
    }
    alignas(32) int16_t sc[16][16];
    scale_pairs_of_8_rows<true>(lo, sc);
    scale_pairs_of_8_rows<true>(hi, sc + 8);
    for (int i = 0; i < 8; i++)
        _mm256_store_si256((__m256i*)x.scp[i], _mm256_blend_epi16(_mm256_load_si256((const __m256i*)sc[2 * i]),
                                                                  _mm256_load_si256((const __m256i*)sc[2 * i + 1]), 0xAA));
    alignas(16) uint16_t dh[8];
    for (int r = 0; r < 8; r++) dh[r] = blk[r]->d;
    _mm256_store_ps(x.d, _mm256_cvtph_ps(_mm_load_si128((const __m128i*)dh)));
}

// pshufb masks repeating the even (0) or the odd (1) int16 of each pair
#define HYBRID_D(o) 0 + 2 * (o), 1 + 2 * (o), 0 + 2 * (o), 1 + 2 * (o), 4 + 2 * (o), 5 + 2 * (o), 4 + 2 * (o), 5 + 2 * (o), \
                    8 + 2 * (o), 9 + 2 * (o), 8 + 2 * (o), 9 + 2 * (o), 12 + 2 * (o), 13 + 2 * (o), 12 + 2 * (o), 13 + 2 * (o)
alignas(32) static const uint8_t k_dup_words[2][32] = {{HYBRID_D(0), HYBRID_D(0)}, {HYBRID_D(1), HYBRID_D(1)}};
#undef HYBRID_D

template <int N>
static void q6_K_x8_rows(int64_t nb, const q6_K_x8* x, const block_q8_K* const* ys, float* out, int64_t r_stride,
                         int64_t t_stride) {
    constexpr int run = 2;  // groups per int16 sum: 2 x 2 x 63 x 127 = 32004
    __m256 acc[N];
    for (int t = 0; t < N; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, x++) {
        __m256i s32[N];
        for (int t = 0; t < N; t++) s32[t] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int hj = 0; hj < 8; hj++) {  // quarter j = hj % 4 of half h = hj / 4
            for (int k0 = 0; k0 < 8; k0 += run) {  // sub-block 2 hj + k0 / 4
                __m256i s16[N];
                for (int t = 0; t < N; t++) s16[t] = _mm256_setzero_si256();
                for (int k = k0; k < k0 + run; k++) {
                    const __m256i q = _mm256_load_si256((const __m256i*)x->q[hj / 4][hj % 4][k]);
                    for (int t = 0; t < N; t++) {
                        int32_t a4;
                        std::memcpy(&a4, ys[t][b].qs + 32 * hj + 4 * k, 4);
                        s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(q, _mm256_set1_epi32(a4)));
                    }
                }
                const __m256i sc = _mm256_shuffle_epi8(_mm256_load_si256((const __m256i*)x->scp[hj]),
                                                       _mm256_load_si256((const __m256i*)k_dup_words[k0 / 4]));
                for (int t = 0; t < N; t++) s32[t] = _mm256_add_epi32(s32[t], _mm256_madd_epi16(s16[t], sc));
            }
        }
        const __m256 d = _mm256_load_ps(x->d);
        for (int t = 0; t < N; t++) {
            const int16_t* bs = ys[t][b].bsums;
            __m256i o = _mm256_setzero_si256();
            for (int i = 0; i < 8; i++) {
                int32_t pair;
                std::memcpy(&pair, bs + 2 * i, 4);
                const __m256i sp = _mm256_load_si256((const __m256i*)x->scp[i]);
                o = _mm256_add_epi32(o, _mm256_madd_epi16(sp, _mm256_set1_epi32(pair)));
            }
            const __m256i s = _mm256_sub_epi32(s32[t], _mm256_slli_epi32(o, 5));
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(ys[t][b].d)), _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
    for (int t = 0; t < N; t++) store_8_rows(acc[t], out + t * t_stride, r_stride);
}

// ---------------------------------------------------------------- Q8_0, 8 rows interleaved
// A register holds 4 quants of each of 8 rows (the K-quants' layout): per token the 4
// activations broadcast, carry each row's quant signs (sign), maddubs against the rows' |q|
// and madd fold them to one int32 per row, and 8 registers make each row's block sum S, exact;
// then one float step for the 8 rows, acc = fma(d * d_act, S, acc), x86::rows_q8_0's step in
// its order, so every output equals the decode dot bit for bit. Zen 2, 2048-weight rows in
// cache (bench_matmul --cached --k 2048), ns per 256 weights and token, the pair kernel this
// replaced -> now: 16 tokens 7.9 -> 7.7, 32 7.8 -> 7.1, 48 7.8 -> 6.8. The rewrite (~9 ns per
// 8 blocks) costs more than it saves below 12 tokens, which the short tiles take
// (x86::rows_q8_0_lanes: 2 tokens 9.8 -> 12.4, 4 8.4 -> 9.4, 8 7.9 -> 8.1: each token's block
// sum is now reduced to one integer, where the pair kernel kept partial sums to the end).
struct alignas(32) q8_0_x8 {
    int8_t q[8][32];  // group k: quants 4k..4k+3, row r in bytes 4r..4r+3
    float d[8];
};
static_assert(8 * sizeof(q8_0_x8) <= 2496, "8 of them (256 weights of a row) within the Plan's tile_scratch line");

static inline void q8_0_x8_pack(const uint8_t* w, int64_t stride, int64_t b, q8_0_x8& x) {
    __m256i v[8], t[8];
    alignas(16) uint16_t dh[8];
    for (int r = 0; r < 8; r++) {
        const block_q8_0* blk = (const block_q8_0*)(w + r * stride) + b;
        v[r] = _mm256_loadu_si256((const __m256i*)blk->qs);
        dh[r] = blk->d;
    }
    transpose_4byte_groups(v, t);
    for (int k = 0; k < 8; k++) _mm256_store_si256((__m256i*)x.q[k], t[k]);
    _mm256_store_ps(x.d, _mm256_cvtph_ps(_mm_load_si128((const __m128i*)dh)));
}

template <int N>
static void q8_0_x8_rows(int64_t nb, const q8_0_x8* x, const block_q8_32* const* ys, float* out, int64_t r_stride,
                         int64_t t_stride) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[N];
    for (int t = 0; t < N; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, x++) {
        __m256i S[N];
        for (int t = 0; t < N; t++) S[t] = _mm256_setzero_si256();
        for (int k = 0; k < 8; k++) {
            const __m256i q = _mm256_load_si256((const __m256i*)x->q[k]);
            const __m256i u = _mm256_abs_epi8(q);
            for (int t = 0; t < N; t++) {
                int32_t a4;
                std::memcpy(&a4, ys[t][b].qs + 4 * k, 4);
                const __m256i p = _mm256_maddubs_epi16(u, _mm256_sign_epi8(_mm256_set1_epi32(a4), q));
                S[t] = _mm256_add_epi32(S[t], _mm256_madd_epi16(p, ones));
            }
        }
        const __m256 d = _mm256_load_ps(x->d);
        for (int t = 0; t < N; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(ys[t][b].d)), _mm256_cvtepi32_ps(S[t]), acc[t]);
    }
    for (int t = 0; t < N; t++) store_8_rows(acc[t], out + t * t_stride, r_stride);
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
namespace {  // internal linkage: no member may be shared with another ISA's object file

// Q8_0's short tiles: per token group the tokens' scales in lanes, [block][8], in the calling
// thread's tile_scratch, read by every row (one token: the decode dot's own kernel).
struct q8_0_kernel {
    template <int N>
    struct group {
        const void* const* acts;
        const float* da;
        group(int64_t n, const void* const* a) : acts(a), da(N > 1 ? prepare(n, a) : nullptr) {}
        void rows(int64_t n, const uint8_t* w, float* out) const {
            if constexpr (N == 1) rows_q8_0<1>(n, w, acts, out);
            else rows_q8_0_lanes<N>(n, w, acts, da, out);
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
struct q6_K_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) {
        rows_q6_K<N>(n, w, a, out);
    }
};

// Row-group tiles (Q4_K, Q5_K, Q6_K): with G::min_tokens tokens or more, each 8-row group is
// rewritten once (G::pack) and then multiplied by every token, 4 at a time; fewer tokens, and
// the last R % 8 rows, go through the type's pair / 8-token kernel (G::fallback), which gives
// the same results. The rewrite costs what the new form saves on a few tokens (Zen 2: ~54 ns
// per 8 Q4_K blocks, ~130 per 8 Q6_K blocks, including their first read); cached, ns per 256
// weights and token, fallback -> row groups: Q4_K 4 tokens 6.1 -> 6.2, 5 tokens 6.6 -> 6.1,
// 64 tokens 5.7 -> 4.4; Q5_K 4 tokens 7.4 -> 8.7, 5 tokens 8.5 -> 8.0, 64 tokens 6.4 -> 4.8.
template <class G>
static void tile_row_groups(int64_t n, const uint8_t* w, int64_t w_stride, int64_t R, const void* const* acts,
                            int64_t T, float* out, int64_t r_stride, int64_t t_stride) {
    typedef typename G::packed P;
    const int64_t R8 = T >= G::min_tokens ? R / 8 * 8 : 0, nb = n / G::block_elems;
    const typename G::act* const* ys = (const typename G::act* const*)acts;
    for (int64_t r = 0; r < R8; r += 8) {
        // the next group's rows towards L2 while this one computes: the rewrite reads 8 rows a
        // block at a time, 8 streams the hardware prefetchers pick up only after their misses
        for (int64_t i = r + 8; i < std::min(R, r + 16); i++)
            for (int64_t o = 0; o < nb * G::block_bytes; o += 64)
                _mm_prefetch((const char*)w + i * w_stride + o, _MM_HINT_T1);
        P* x = (P*)tile_scratch<1>(nb * sizeof(P));
        for (int64_t b = 0; b < nb; b++) G::pack(w + r * w_stride, w_stride, b, x[b]);
        float* o = out + r * r_stride;
        int64_t t = 0;
        for (; t + 4 <= T; t += 4) G::template rows<4>(nb, x, ys + t, o + t * t_stride, r_stride, t_stride);
        switch (T - t) {
            case 3: G::template rows<3>(nb, x, ys + t, o + t * t_stride, r_stride, t_stride); break;
            case 2: G::template rows<2>(nb, x, ys + t, o + t * t_stride, r_stride, t_stride); break;
            case 1: G::template rows<1>(nb, x, ys + t, o + t * t_stride, r_stride, t_stride); break;
            default: break;
        }
    }
    if (R8 < R)
        tile<8, typename G::fallback>(n, w + R8 * w_stride, w_stride, R - R8, acts, T, out + R8 * r_stride, r_stride,
                                      t_stride);
}
template <bool QH>
struct k4_groups {
    typedef k4_x8<QH> packed;
    typedef block_q8_K act;
    static constexpr int64_t block_elems = QK_K;
    static constexpr int64_t block_bytes = QH ? sizeof(block_q5_K) : sizeof(block_q4_K);
    static constexpr int64_t min_tokens = 5;
    static void pack(const uint8_t* w, int64_t stride, int64_t b, packed& x) { k4_x8_pack<QH>(w, stride, b, x); }
    template <int N>
    static void rows(int64_t nb, const packed* x, const block_q8_K* const* ys, float* out, int64_t rs, int64_t ts) {
        k4_x8_rows<N, QH>(nb, x, ys, out, rs, ts);
    }
    typedef k4_kernel<QH> fallback;  // short tiles and the last R % 8 rows, 8 tokens at a time
};
struct q6_K_groups {
    typedef q6_K_x8 packed;
    typedef block_q8_K act;
    static constexpr int64_t block_elems = QK_K;
    static constexpr int64_t block_bytes = sizeof(block_q6_K);
    static constexpr int64_t min_tokens = 8;
    static void pack(const uint8_t* w, int64_t stride, int64_t b, packed& x) { q6_K_x8_pack(w, stride, b, x); }
    template <int N>
    static void rows(int64_t nb, const packed* x, const block_q8_K* const* ys, float* out, int64_t rs, int64_t ts) {
        q6_K_x8_rows<N>(nb, x, ys, out, rs, ts);
    }
    typedef q6_K_kernel fallback;  // short tiles and the last R % 8 rows, 8 tokens at a time
};

struct q8_0_groups {
    typedef q8_0_x8 packed;
    typedef block_q8_32 act;
    static constexpr int64_t block_elems = QK32;
    static constexpr int64_t block_bytes = sizeof(block_q8_0);
    static constexpr int64_t min_tokens = 12;
    static void pack(const uint8_t* w, int64_t stride, int64_t b, packed& x) { q8_0_x8_pack(w, stride, b, x); }
    template <int N>
    static void rows(int64_t nb, const packed* x, const block_q8_32* const* ys, float* out, int64_t rs, int64_t ts) {
        q8_0_x8_rows<N>(nb, x, ys, out, rs, ts);
    }
    typedef q8_0_kernel fallback;  // short tiles and the last R % 8 rows, 8 tokens at a time
};

}  // namespace

static void fill(gemm_tile_fn* g) {
    fill_shared<dot_u8s8_32>(g);
    // K-quants: 8-row groups rewritten per tile (tile_row_groups); their fallbacks: Q4_K / Q5_K
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
