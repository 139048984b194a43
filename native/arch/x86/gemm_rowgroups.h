// Row groups: a prefill tile rewrites the blocks of 16 weight rows (8 for AVX2's Q8_0) so that
// one 32-byte half of a 64-byte line holds 4 quants of each of 8 rows, then multiplies the
// group by every token of the tile (a token's 4 activations broadcast). The layouts and their
// rewrite, and the tile loop over groups, shared by gemm_avx2.cpp and gemm_avx512.cpp (each
// includes this after x86_avx2_kernels.h and gemm_tile.h, with its own ISA flags: everything is
// static). The rewrite is AVX2 code for 8 rows at a time; a 16-row group is two of them side by
// side: in every 64-byte line rows 0-7 fill the first 32 bytes and rows 8-15 the second. The
// AVX-512 kernels read a line as one register, the AVX2 ones as two.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace hybrid {
namespace x86_gemm {
namespace {  // internal linkage, as x86_avx2_kernels.h: one copy per ISA file
using namespace x86;

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

// Bytes 0-7 of rows[r]: scales 0-7 of row r (unsigned, or signed with SIGNED) -> out + j *
// j_stride: the 8 rows' scale j as int16, row r in lanes 2r and 2r+1 (a madd's pair).
template <bool SIGNED>
static inline void scale_pairs_of_8_rows(const __m128i rows[8], int16_t* out, int64_t j_stride) {
    __m128i a[4];
    for (int r = 0; r < 8; r += 2) a[r / 2] = _mm_unpacklo_epi8(rows[r], rows[r + 1]);  // scale j of rows r, r+1: bytes 2j, 2j+1
    const __m128i b0 = _mm_unpacklo_epi16(a[0], a[1]), b1 = _mm_unpackhi_epi16(a[0], a[1]);  // rows 0-3: j 0-3, 4-7
    const __m128i b2 = _mm_unpacklo_epi16(a[2], a[3]), b3 = _mm_unpackhi_epi16(a[2], a[3]);  // rows 4-7
    const __m128i s8[4] = {_mm_unpacklo_epi32(b0, b2), _mm_unpackhi_epi32(b0, b2),            // j 0, 1 | 2, 3
                           _mm_unpacklo_epi32(b1, b3), _mm_unpackhi_epi32(b1, b3)};           // j 4, 5 | 6, 7
    for (int j = 0; j < 8; j++) {
        const __m128i dup = j % 2 ? _mm_unpackhi_epi8(s8[j / 2], s8[j / 2]) : _mm_unpacklo_epi8(s8[j / 2], s8[j / 2]);
        _mm256_store_si256((__m256i*)(out + j * j_stride), SIGNED ? _mm256_cvtepi8_epi16(dup) : _mm256_cvtepu8_epi16(dup));
    }
}

// Eight fp16 scales (dh[r]: row r) as floats at out.
static inline void store_8_scales(const uint16_t* dh, float* out) {
    _mm256_store_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)dh)));
}

// ---------------------------------------------------------------- Q4_K / Q5_K
// One block of ROWS rows, a byte per quant (Q5_K with its fifth bit). Chunk c, group k: quants
// 4k..4k+3 of sub-block 2c (ROWS * 4 bytes, row r in bytes 4r..4r+3), then those of sub-block
// 2c+1.
template <bool QH, int ROWS>
struct alignas(ROWS * 4) k4_group {
    uint8_t qs[4][8][2 * ROWS * 4];
    int16_t sc[8][2 * ROWS];  // sub-block j: row r's scale in lanes 2r and 2r+1
    int16_t mn[4][2 * ROWS];  // sub-block pair i: row r's mins m_2i, m_2i+1 in lanes 2r, 2r+1
    float d[ROWS], dmin[ROWS];
};

// the K-quant tiles' groups (both ISAs)
template <bool QH>
using k4_x16 = k4_group<QH, 16>;

// The scales, mins, d and dmin of block b of 8 rows (blk[r]: row r's block) into a group's
// sc / mn / d / dmin at rows 8 h8 .. 8 h8 + 7 (ROWS rows in all).
template <int ROWS>
static inline void k4_pack_scales(const uint8_t* const blk[8], int h8, int16_t (*sc)[2 * ROWS],
                                  int16_t (*mn)[2 * ROWS], float* d, float* dmin) {
    // each row's first 16 bytes: d, dmin, then the 12 bytes of scales and mins
    static_assert(offsetof(block_q4_K, dmin) == 2 && offsetof(block_q4_K, scales) == 4 &&
                      offsetof(block_q5_K, dmin) == 2 && offsetof(block_q5_K, scales) == 4,
                  "d, dmin, scales lead the block");
    __m128i head[8], sm[8];  // sm: scales 0-7 then mins 0-7 of each row, bytes
    for (int r = 0; r < 8; r++) {
        head[r] = _mm_loadu_si128((const __m128i*)blk[r]);
        sm[r] = scales_mins_k4_of<1>(head[r]);
    }
    scale_pairs_of_8_rows<false>(sm, &sc[0][16 * h8], 2 * ROWS);
    __m128i m[4];
    for (int r = 0; r < 8; r += 2) m[r / 2] = _mm_unpackhi_epi16(sm[r], sm[r + 1]);  // min pair i of rows r, r+1: words 2i, 2i+1
    const __m128i g0 = _mm_unpacklo_epi32(m[0], m[1]), g1 = _mm_unpackhi_epi32(m[0], m[1]);  // rows 0-3: pairs 0, 1 | 2, 3
    const __m128i g2 = _mm_unpacklo_epi32(m[2], m[3]), g3 = _mm_unpackhi_epi32(m[2], m[3]);  // rows 4-7
    _mm256_store_si256((__m256i*)&mn[0][16 * h8], _mm256_cvtepu8_epi16(_mm_unpacklo_epi64(g0, g2)));
    _mm256_store_si256((__m256i*)&mn[1][16 * h8], _mm256_cvtepu8_epi16(_mm_unpackhi_epi64(g0, g2)));
    _mm256_store_si256((__m256i*)&mn[2][16 * h8], _mm256_cvtepu8_epi16(_mm_unpacklo_epi64(g1, g3)));
    _mm256_store_si256((__m256i*)&mn[3][16 * h8], _mm256_cvtepu8_epi16(_mm_unpackhi_epi64(g1, g3)));
    // d | dmin << 16 of rows 0-3 and 4-7 (the heads' first dwords), then the 8 rows' d and dmin
    // as fp16 (in registers: 2-byte stores read back as one vector would stall store forwarding)
    const __m128i dd[2] = {_mm_unpacklo_epi64(_mm_unpacklo_epi32(head[0], head[1]), _mm_unpacklo_epi32(head[2], head[3])),
                           _mm_unpacklo_epi64(_mm_unpacklo_epi32(head[4], head[5]), _mm_unpacklo_epi32(head[6], head[7]))};
    const __m128i lo16 = _mm_set1_epi32(0xFFFF);
    _mm256_store_ps(d + 8 * h8, _mm256_cvtph_ps(_mm_packus_epi32(_mm_and_si128(dd[0], lo16), _mm_and_si128(dd[1], lo16))));
    _mm256_store_ps(dmin + 8 * h8, _mm256_cvtph_ps(_mm_packus_epi32(_mm_srli_epi32(dd[0], 16), _mm_srli_epi32(dd[1], 16))));
}

// Block b of the ROWS rows w, w + stride, ... into x.
template <bool QH, int ROWS>
static inline void k4_pack(const uint8_t* w, int64_t stride, int64_t b, k4_group<QH, ROWS>& x) {
    typedef typename std::conditional<QH, block_q5_K, block_q4_K>::type block;
    const __m256i m4 = _mm256_set1_epi8(0xF), one = _mm256_set1_epi8(1);
    for (int h8 = 0; h8 < ROWS / 8; h8++) {  // rows 8 h8 .. 8 h8 + 7: bytes 32 h8.. of each line
        const uint8_t* blk[8];
        for (int r = 0; r < 8; r++) {  // the rewrite is the rows' first read: prefetch as the dots do
            blk[r] = w + (8 * h8 + r) * stride + b * (int64_t)sizeof(block);
            prefetch_block(blk[r], sizeof(block));
        }
        __m256i v[8], hb[8];
        if (QH) {
            for (int r = 0; r < 8; r++) v[r] = _mm256_loadu_si256((const __m256i*)(blk[r] + offsetof(block_q5_K, qh)));
            transpose_4byte_groups(v, hb);
        }
        for (int c = 0; c < 4; c++) {
            __m256i q[8];
            for (int r = 0; r < 8; r++) v[r] = _mm256_loadu_si256((const __m256i*)(blk[r] + offsetof(block, qs) + 32 * c));
            transpose_4byte_groups(v, q);
            for (int k = 0; k < 8; k++) {
                uint8_t* dst = x.qs[c][k] + 32 * h8;
                __m256i lo = _mm256_and_si256(q[k], m4), hi = _mm256_and_si256(_mm256_srli_epi16(q[k], 4), m4);
                if (QH) {  // the fifth bits: bit 2c (sub-block 2c) and 2c+1 of the quant's qh byte
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb[k], 2 * c), one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb[k], 2 * c + 1), one), 4));
                }
                _mm256_store_si256((__m256i*)dst, lo);
                _mm256_store_si256((__m256i*)(dst + ROWS * 4), hi);
            }
        }
        k4_pack_scales<ROWS>(blk, h8, x.sc, x.mn, x.d, x.dmin);
    }
}

// Q4_K with its nibbles as stored: chunk c, group k: bytes 4k..4k+3 of the rows' 32-byte chunk
// c (row r in bytes 4r..4r+3), each byte a quant of sub-block 2c (low nibble) and of 2c+1 (high):
// the rewrite is the transposes alone, with half the bytes of k4_group to store and to read back.
template <int ROWS>
struct alignas(ROWS * 4) q4_K_nib_group {
    uint8_t qs[4][8][ROWS * 4];
    int16_t sc[8][2 * ROWS];
    int16_t mn[4][2 * ROWS];
    float d[ROWS], dmin[ROWS];
};

template <int ROWS>
static inline void q4_K_nib_pack(const uint8_t* w, int64_t stride, int64_t b, q4_K_nib_group<ROWS>& x) {
    for (int h8 = 0; h8 < ROWS / 8; h8++) {
        const uint8_t* blk[8];
        for (int r = 0; r < 8; r++) {
            blk[r] = w + (8 * h8 + r) * stride + b * (int64_t)sizeof(block_q4_K);
            prefetch_block(blk[r], sizeof(block_q4_K));
        }
        for (int c = 0; c < 4; c++) {
            __m256i v[8], q[8];
            for (int r = 0; r < 8; r++) v[r] = _mm256_loadu_si256((const __m256i*)(blk[r] + offsetof(block_q4_K, qs) + 32 * c));
            transpose_4byte_groups(v, q);
            for (int k = 0; k < 8; k++) _mm256_store_si256((__m256i*)(x.qs[c][k] + 32 * h8), q[k]);
        }
        k4_pack_scales<ROWS>(blk, h8, x.sc, x.mn, x.d, x.dmin);
    }
}

// ---------------------------------------------------------------- Q6_K
// One block of ROWS rows: the quants as stored (0..63, unsigned).
template <int ROWS>
struct alignas(ROWS * 4) q6_K_group {
    uint8_t q[2][4][8][ROWS * 4];  // half h, quarter j, group k: quants 4k..4k+3 of the quarter,
                                   // row r in bytes 4r..4r+3 (sub-block 8h + 2j + k / 4)
    int16_t scp[8][2 * ROWS];      // sub-block pair i: row r's scales 2i, 2i+1 in lanes 2r, 2r+1
    float d[ROWS];
};

typedef q6_K_group<16> q6_K_x16;

template <int ROWS>
static inline void q6_K_pack(const uint8_t* w, int64_t stride, int64_t b, q6_K_group<ROWS>& x) {
    for (int h8 = 0; h8 < ROWS / 8; h8++) {
        const block_q6_K* blk[8];
        for (int r = 0; r < 8; r++) {
            blk[r] = (const block_q6_K*)(w + (8 * h8 + r) * stride) + b;
            prefetch_block((const uint8_t*)blk[r], sizeof(block_q6_K));
        }
        for (int h = 0; h < 2; h++) {
            __m256i q[8][4];
            for (int r = 0; r < 8; r++) q6_quarters(blk[r]->ql + 64 * h, blk[r]->qh + 32 * h, q[r]);
            for (int j = 0; j < 4; j++) {
                __m256i v[8], t[8];
                for (int r = 0; r < 8; r++) v[r] = q[r][j];
                transpose_4byte_groups(v, t);
                for (int k = 0; k < 8; k++) _mm256_store_si256((__m256i*)(x.q[h][j][k] + 32 * h8), t[k]);
            }
        }
        __m128i lo[8], hi[8];  // the 16 int8 scales of each row: sub-blocks 0-7, then 8-15
        for (int r = 0; r < 8; r++) {
            lo[r] = _mm_loadu_si128((const __m128i*)blk[r]->scales);
            hi[r] = _mm_srli_si128(lo[r], 8);
        }
        alignas(32) int16_t sc[16][16];
        scale_pairs_of_8_rows<true>(lo, sc[0], 16);
        scale_pairs_of_8_rows<true>(hi, sc[8], 16);
        for (int i = 0; i < 8; i++)
            _mm256_store_si256((__m256i*)&x.scp[i][16 * h8],
                               _mm256_blend_epi16(_mm256_load_si256((const __m256i*)sc[2 * i]),
                                                  _mm256_load_si256((const __m256i*)sc[2 * i + 1]), 0xAA));
        uint16_t dh[8];
        for (int r = 0; r < 8; r++) dh[r] = blk[r]->d;
        store_8_scales(dh, x.d + 8 * h8);
    }
}

// ---------------------------------------------------------------- Q8_0
// One 32-block of ROWS rows. BIAS (the VNNI kernels' unsigned operand): each quant + 128.
template <int ROWS, bool BIAS>
struct alignas(ROWS * 4) q8_0_group {
    uint8_t q[8][ROWS * 4];  // group k: quants 4k..4k+3, row r in bytes 4r..4r+3
    float d[ROWS];
};

template <int ROWS, bool BIAS>
static inline void q8_0_pack(const uint8_t* w, int64_t stride, int64_t b, q8_0_group<ROWS, BIAS>& x) {
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (int h8 = 0; h8 < ROWS / 8; h8++) {
        __m256i v[8], t[8];
        uint16_t dh[8];
        for (int r = 0; r < 8; r++) {
            const block_q8_0* blk = (const block_q8_0*)(w + (8 * h8 + r) * stride) + b;
            v[r] = _mm256_loadu_si256((const __m256i*)blk->qs);
            dh[r] = blk->d;
        }
        transpose_4byte_groups(v, t);
        for (int k = 0; k < 8; k++)
            _mm256_store_si256((__m256i*)(x.q[k] + 32 * h8), BIAS ? _mm256_xor_si256(t[k], bias) : t[k]);
        store_8_scales(dh, x.d + 8 * h8);
    }
}

// placement/solver.py TILE_SCRATCH_PER_BLOCK budgets the largest group block per worker, per
// 256 weights of a row
static_assert(sizeof(k4_group<true, 16>) == 4992 && sizeof(q4_K_nib_group<16>) <= 4992 && sizeof(q6_K_group<16>) <= 4992 &&
                  8 * sizeof(q8_0_group<16, true>) <= 4992,
              "the Plan's tile_scratch line counts 4992 B per 256 weights of a row");

// ---------------------------------------------------------------- the tile loop
// Row-group tiles: with G::min_tokens tokens or more, each group of G::group_rows rows is rewritten
// once (G::pack, in the thread's tile_scratch) and then multiplied by every token, G::tokens at
// a time; fewer tokens, and the last R % G::group_rows rows, go through the type's per-row kernel
// (G::fallback, tile() of 8 tokens), which gives the same results bit for bit. The rewrite
// costs about what the new form saves on a few tokens (figures at each type's min_tokens).
template <class G, int N>
static inline void group_tail(int64_t left, int64_t nb, const typename G::packed* x, const typename G::act* const* ys,
                              float* out, int64_t r_stride, int64_t t_stride) {
    if constexpr (N > 0) {
        if (left == N) G::template rows<N>(nb, x, ys, out, r_stride, t_stride);
        else group_tail<G, N - 1>(left, nb, x, ys, out, r_stride, t_stride);
    }
}
// Rows [r0, r1) of a tile's weights, 64-byte lines handed to the prefetcher a share at a time.
// A tile's rows are one run of memory (row i at w + i * stride), but the rewrite reads 8 or 16
// rows a block at a time: as many streams, which the hardware prefetchers pick up late. So the
// tile asks for the next group's lines itself, spread over the current group's token steps
// rather than as one burst before the rewrite, which the miss queues could not take in at once.
// Zen 4, 2 threads, 256 experts of 2048 x 1024 Q4_K/Q4_K/Q6_K, top-8, T = 512 (16 tokens per
// expert: DeepSeek's routing density at a 512-token chunk), medians of 4 alternating processes:
// 2364 -> 2918 tokens/s per layer with the AVX-512 groups (1.23x), 1928 -> 2203 with the AVX2
// ones (1.14x). (Counting lines with a division per line had cost a third of that back.)
struct row_lines {
    const char* row;  // the row of the next line
    int64_t stride, per_row, total, issued = 0, col = 0;
    row_lines(const uint8_t* w, int64_t stride_, int64_t row_bytes, int64_t r0, int64_t r1)
        : row((const char*)w + r0 * stride_), stride(stride_), per_row((row_bytes + 63) / 64),
          total(std::max<int64_t>(0, r1 - r0) * per_row) {}
    // lines up to the share num / den of the rows; HINT _MM_HINT_T0 (to L1) or _MM_HINT_T1 (L2)
    template <int HINT>
    void upto(int64_t num, int64_t den) {
        for (const int64_t end = total * num / den; issued < end; issued++) {
            _mm_prefetch(row + 64 * col, (_mm_hint)HINT);
            if (++col == per_row) col = 0, row += stride;
        }
    }
};

template <class G>
static void tile_row_groups(int64_t n, const uint8_t* w, int64_t w_stride, int64_t R, const void* const* acts,
                            int64_t T, float* out, int64_t r_stride, int64_t t_stride) {
    typedef typename G::packed P;
    constexpr int64_t G_ROWS = G::group_rows;
    const int64_t RG = T >= G::min_tokens ? R / G_ROWS * G_ROWS : 0, nb = n / G::block_elems;
    const int64_t row_bytes = nb * G::block_bytes, steps = std::max<int64_t>(1, T / G::tokens);
    const typename G::act* const* ys = (const typename G::act* const*)acts;
    if (RG > 0) row_lines(w, w_stride, row_bytes, 0, G_ROWS).upto<_MM_HINT_T0>(1, 1);  // the first group: now
    for (int64_t r = 0; r < RG; r += G_ROWS) {
        P* x = (P*)tile_scratch<1>(nb * sizeof(P));
        for (int64_t b = 0; b < nb; b++) G::pack(w + r * w_stride, w_stride, b, x[b]);
        // the next group's rows (or the rows left to the fallback) while this one computes
        row_lines next(w, w_stride, row_bytes, r + G_ROWS, std::min(R, r + 2 * G_ROWS));
        float* o = out + r * r_stride;
        int64_t t = 0;
        for (int64_t s = 1; t + G::tokens <= T; t += G::tokens, s++) {
            next.upto<_MM_HINT_T1>(s, steps);
            G::template rows<G::tokens>(nb, x, ys + t, o + t * t_stride, r_stride, t_stride);
        }
        next.upto<_MM_HINT_T1>(1, 1);
        group_tail<G, G::tokens - 1>(T - t, nb, x, ys + t, o + t * t_stride, r_stride, t_stride);
    }
    if (RG < R)
        tile<8, typename G::fallback>(n, w + RG * w_stride, w_stride, R - RG, acts, T, out + RG * r_stride, r_stride,
                                      t_stride);
}

}  // namespace
}  // namespace x86_gemm
}  // namespace hybrid
