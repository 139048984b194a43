// AVX-512 VNNI prefill tiles (gemm.h). Compiled with avx512.cpp's flags; filled only for a
// kernel table cpuid admitted. Q4_K, Q5_K, Q6_K and Q8_0 go in 16-row groups
// (gemm_rowgroups.h): a 512-bit register holds 4 quants of each of 16 rows, and one vpdpbusd
// per token (its 4 activations broadcast from memory) adds 4 products into each row's int32
// lane. Per block, row and token the integer sums are exact and the float step is the AVX2
// dots' (avx512.cpp keeps those dots for these types), so every output equals the decode dot
// bit for bit, and the AVX2 table's results too. The other 32-block and lattice types share
// their rows with the AVX2 tiles (gemm_tile.h fill_shared, x86::rows32 with the VNNI product).
// tests/native/avx512_emulated.cpp checks the identity under SIMDe on CPUs without AVX-512.
#include "../../gemm.h"
// the header's table filler is avx2.cpp's business, unused here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "x86_avx2_kernels.h"
#pragma GCC diagnostic pop
#include "gemm_tile.h"
#include "gemm_rowgroups.h"

namespace hybrid {
namespace x86_gemm512 {
using namespace x86;
using namespace x86_gemm;

// x86::rows32 with the VNNI product avx512.cpp's 32-block dots use
static inline __m256i dot_vnni(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }

// One token's 16 row results (lanes of v) to out[r * r_stride].
static inline void store_16_rows(__m512 v, float* out, int64_t r_stride) {
    alignas(64) float o[16];
    _mm512_store_ps(o, v);
    for (int r = 0; r < 16; r++) out[r * r_stride] = o[r];
}

// Token t's 4 activations at p, in every lane (a broadcast load: GCC 12 does not fold it into
// vpdpbusd's {1to16} memory operand).
static inline __m512i bcast4(const int8_t* p) {
    int32_t a4;
    std::memcpy(&a4, p, 4);
    return _mm512_set1_epi32(a4);
}

namespace {  // internal linkage: no member may be shared with another ISA's object file

// ---------------------------------------------------------------- Q4_K / Q5_K
// The end of a Q4_K / Q5_K block of a 16-row group (x: its mn, d, dmin) for one token y whose
// scaled sums are S: the mins M = sum_i (m_2i, m_2i+1) . (bsum_2i, bsum_2i+1), 4 vpdpwssd, then
// k4_rows' float step: accS += (d * d_t) * S, accM += (dmin * d_t) * M (out = accS - accM).
template <class G>
static inline __attribute__((always_inline)) void k4_block_step(const G& x, const block_q8_K& y, __m512i S,
                                                                __m512& accS, __m512& accM) {
    // the 8 sub-block sums of the activations as int16 pairs: pair i = dword i
    alignas(16) int32_t bs[4];
    _mm_store_si128((__m128i*)bs, _mm_hadd_epi16(_mm_loadu_si128((const __m128i*)y.bsums),
                                                 _mm_loadu_si128((const __m128i*)(y.bsums + 8))));
    __m512i mi = _mm512_setzero_si512();
    for (int i = 0; i < 4; i++)
        mi = _mm512_dpwssd_epi32(mi, _mm512_load_si512((const void*)x.mn[i]), _mm512_set1_epi32(bs[i]));
    const __m512 dt = _mm512_set1_ps(y.d);
    accS = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_load_ps(x.d), dt), _mm512_cvtepi32_ps(S), accS);
    accM = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_load_ps(x.dmin), dt), _mm512_cvtepi32_ps(mi), accM);
}

// Q5_K: a byte per quant, its fifth bit included (Q4_K, which took these rows before, now has
// q4_K_nib_rows below). Per sub-block j and token: 8 vpdpbusd give each row's s_j = q . a (int32,
// |s_j| <= 32 x 31 x 127), one vpmulld by the rows' scales adds sc_j s_j to S; then
// k4_block_step.
template <int N, bool QH>
static void k4_x16_rows(int64_t nb, const k4_x16<QH>* x, const block_q8_K* const* ys, float* out, int64_t r_stride,
                        int64_t t_stride) {
    __m512 accS[N], accM[N];
    for (int t = 0; t < N; t++) accS[t] = accM[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, x++) {
        __m512i S[N];
        for (int t = 0; t < N; t++) S[t] = _mm512_setzero_si512();
#pragma GCC unroll 1
        for (int j = 0; j < 8; j++) {  // sub-block j: chunk j / 2, its low (even j) or high half
            const uint8_t* q = x->qs[j / 2][0] + 64 * (j % 2);
            __m512i s[N];
            for (int t = 0; t < N; t++) s[t] = _mm512_setzero_si512();
            for (int k = 0; k < 8; k++) {
                const __m512i u = _mm512_load_si512((const void*)(q + k * sizeof(x->qs[0][0])));
                for (int t = 0; t < N; t++) s[t] = _mm512_dpbusd_epi32(s[t], u, bcast4(ys[t][b].qs + 32 * j + 4 * k));
            }
            const __m512i sc = _mm512_srli_epi32(_mm512_load_si512((const void*)x->sc[j]), 16);  // scale pairs -> int32
            for (int t = 0; t < N; t++) S[t] = _mm512_add_epi32(S[t], _mm512_mullo_epi32(s[t], sc));
        }
        for (int t = 0; t < N; t++) k4_block_step(*x, ys[t][b], S[t], accS[t], accM[t]);
    }
    for (int t = 0; t < N; t++) store_16_rows(_mm512_sub_ps(accS[t], accM[t]), out + t * t_stride, r_stride);
}

// Q4_K from its nibbles as stored (q4_K_nib_group): per chunk c a line gives sub-block 2c's
// quants (and) and 2c+1's (shift, and), each 8 vpdpbusd per token into its own s; then
// k4_x16_rows' steps in its order, so the results are its results bit for bit. Against the
// byte-per-quant group (k4_x16_rows), the rewrite is the transposes alone and stores half the
// bytes, which the multiplies read back: Zen 4, one thread, 256 rows of 2048 in L2, the tile
// (rewrite included), best of 200, ns per 256 weights and token: 4 tokens 3.95 -> 3.08, 16
// tokens 1.88 -> 1.70, 64 tokens 1.53 -> 1.48; the expert engine at DeepSeek's density (256
// experts of 2048 x 1024, top-8, T = 512: 16 tokens per expert, Q4_K/Q4_K/Q6_K, 2 threads,
// old and new alternating in one process) 1.03-1.05x, at 48 tokens per expert 1.04x.
template <int N>
static void q4_K_nib_rows(int64_t nb, const q4_K_nib_group<16>* x, const block_q8_K* const* ys, float* out,
                          int64_t r_stride, int64_t t_stride) {
    const __m512i m4 = _mm512_set1_epi8(0xF);
    __m512 accS[N], accM[N];
    for (int t = 0; t < N; t++) accS[t] = accM[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, x++) {
        __m512i S[N];
        for (int t = 0; t < N; t++) S[t] = _mm512_setzero_si512();
#pragma GCC unroll 1
        for (int c = 0; c < 4; c++) {  // sub-blocks 2c, 2c + 1
            __m512i s0[N], s1[N];
            for (int t = 0; t < N; t++) s0[t] = s1[t] = _mm512_setzero_si512();
            for (int k = 0; k < 8; k++) {
                const __m512i v = _mm512_load_si512((const void*)x->qs[c][k]);
                const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                for (int t = 0; t < N; t++) {
                    s0[t] = _mm512_dpbusd_epi32(s0[t], lo, bcast4(ys[t][b].qs + 64 * c + 4 * k));
                    s1[t] = _mm512_dpbusd_epi32(s1[t], hi, bcast4(ys[t][b].qs + 64 * c + 32 + 4 * k));
                }
            }
            const __m512i sc0 = _mm512_srli_epi32(_mm512_load_si512((const void*)x->sc[2 * c]), 16);
            const __m512i sc1 = _mm512_srli_epi32(_mm512_load_si512((const void*)x->sc[2 * c + 1]), 16);
            for (int t = 0; t < N; t++) {  // in the order of k4_x16_rows: sub-block 2c, then 2c + 1
                S[t] = _mm512_add_epi32(S[t], _mm512_mullo_epi32(s0[t], sc0));
                S[t] = _mm512_add_epi32(S[t], _mm512_mullo_epi32(s1[t], sc1));
            }
        }
        for (int t = 0; t < N; t++) k4_block_step(*x, ys[t][b], S[t], accS[t], accM[t]);
    }
    for (int t = 0; t < N; t++) store_16_rows(_mm512_sub_ps(accS[t], accM[t]), out + t * t_stride, r_stride);
}

// ---------------------------------------------------------------- Q6_K
// The quants as stored (0..63). Per sub-block of 16 and token: 4 vpdpbusd, one vpmulld by the
// rows' scales (int16 pairs of the layout, sign-extended per quarter); per block and token the
// offset 32 sum_j sc_j bsum_j (8 vpdpwssd) off S, then dot_q6_K_rows' step: acc += (d * d_t) * S.
template <int N>
static void q6_K_x16_rows(int64_t nb, const q6_K_x16* x, const block_q8_K* const* ys, float* out, int64_t r_stride,
                          int64_t t_stride) {
    __m512 acc[N];
    for (int t = 0; t < N; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, x++) {
        __m512i S[N];
        for (int t = 0; t < N; t++) S[t] = _mm512_setzero_si512();
#pragma GCC unroll 1
        for (int hj = 0; hj < 8; hj++) {  // quarter j = hj % 4 of half h = hj / 4: sub-blocks 2 hj, 2 hj + 1
            const __m512i scp = _mm512_load_si512((const void*)x->scp[hj]);
            const __m512i sc[2] = {_mm512_srai_epi32(_mm512_slli_epi32(scp, 16), 16), _mm512_srai_epi32(scp, 16)};
            for (int e = 0; e < 2; e++) {
                __m512i s[N];
                for (int t = 0; t < N; t++) s[t] = _mm512_setzero_si512();
                for (int k = 4 * e; k < 4 * e + 4; k++) {
                    const __m512i u = _mm512_load_si512((const void*)x->q[hj / 4][hj % 4][k]);
                    for (int t = 0; t < N; t++) s[t] = _mm512_dpbusd_epi32(s[t], u, bcast4(ys[t][b].qs + 32 * hj + 4 * k));
                }
                for (int t = 0; t < N; t++) S[t] = _mm512_add_epi32(S[t], _mm512_mullo_epi32(s[t], sc[e]));
            }
        }
        const __m512 d = _mm512_load_ps(x->d);
        for (int t = 0; t < N; t++) {
            const int16_t* bs = ys[t][b].bsums;
            __m512i o = _mm512_setzero_si512();
            for (int i = 0; i < 8; i++) {
                int32_t pair;
                std::memcpy(&pair, bs + 2 * i, 4);
                o = _mm512_dpwssd_epi32(o, _mm512_load_si512((const void*)x->scp[i]), _mm512_set1_epi32(pair));
            }
            const __m512i s = _mm512_sub_epi32(S[t], _mm512_slli_epi32(o, 5));
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(ys[t][b].d)), _mm512_cvtepi32_ps(s), acc[t]);
        }
    }
    for (int t = 0; t < N; t++) store_16_rows(acc[t], out + t * t_stride, r_stride);
}

// ---------------------------------------------------------------- Q8_0
// The quants + 128 (unsigned, vpdpbusd's first operand): per block and token 8 vpdpbusd give
// sum (q + 128) a, and 128 x the activation block's sum comes off (exact), then dot_q8_0's steps:
// acc += (d * d_t) * S in four chains of blocks, out = (c0 + c1) + (c2 + c3).
typedef q8_0_group<16, true> q8_0_x16;

template <int N>
static void q8_0_x16_rows(int64_t nb, const q8_0_x16* x, const block_q8_32* const* ys, float* out, int64_t r_stride,
                          int64_t t_stride) {
    __m512 acc[4][N];  // the four chains of blocks (x86::dot_q8_0)
    for (int c = 0; c < 4; c++)
        for (int t = 0; t < N; t++) acc[c][t] = _mm512_setzero_ps();
    auto block = [&](int64_t b, __m512* a) {
        __m512i s[N];
        for (int t = 0; t < N; t++) s[t] = _mm512_set1_epi32(-128 * ys[t][b].sum);
        for (int k = 0; k < 8; k++) {
            const __m512i u = _mm512_load_si512((const void*)x[b].q[k]);
            for (int t = 0; t < N; t++) s[t] = _mm512_dpbusd_epi32(s[t], u, bcast4(ys[t][b].qs + 4 * k));
        }
        const __m512 d = _mm512_load_ps(x[b].d);
        for (int t = 0; t < N; t++)
            a[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(ys[t][b].d)), _mm512_cvtepi32_ps(s[t]), a[t]);
    };
    for (int64_t b = 0; b < nb; b++) block(b, acc[b % 4]);
    for (int t = 0; t < N; t++)
        store_16_rows(_mm512_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]), _mm512_add_ps(acc[2][t], acc[3][t])), out + t * t_stride, r_stride);
}

// ---------------------------------------------------------------- the groups (gemm_rowgroups.h)
// Zen 4 (2 cores, AVX-512 on 256-bit units), bench_matmul --cached, ns per 256 weights and
// token, the 512-bit per-row tiles these replaced -> 16-row groups: 4 tokens Q4_K 5.5 -> 3.8,
// Q5_K 6.3 -> 4.3, Q6_K 5.5 -> 4.7, Q8_0 8.8 -> 3.6; 16 tokens 4.3 -> 2.5, 4.7 -> 2.6, 4.4 -> 2.8,
// 5.6 -> 2.2; 64 tokens 4.6 -> 2.1, 4.8 -> 2.1, 4.4 -> 2.3, 5.5 -> 1.9. min_tokens: at 2 tokens
// the per-row kernels were ahead for the K-quants (Q4_K 5.2 vs 5.6), Q8_0's groups already
// (5.6 vs 9.0); at 3 the groups for all (Q4_K 4.2 vs 4.8, Q6_K 5.6 vs 5.8).
template <bool QH>
struct k4_groups {
    typedef k4_x16<QH> packed;
    typedef block_q8_K act;
    static constexpr int64_t block_elems = QK_K;
    static constexpr int64_t block_bytes = QH ? sizeof(block_q5_K) : sizeof(block_q4_K);
    static constexpr int64_t min_tokens = 3;
    static constexpr int group_rows = 16, tokens = 4;
    static void pack(const uint8_t* w, int64_t stride, int64_t b, packed& x) { k4_pack(w, stride, b, x); }
    template <int N>
    static void rows(int64_t nb, const packed* x, const block_q8_K* const* ys, float* out, int64_t rs, int64_t ts) {
        k4_x16_rows<N, QH>(nb, x, ys, out, rs, ts);
    }
    typedef k4_kernel<QH> fallback;  // the AVX2 dots' multi-token kernel: short tiles, last R % 16 rows
};
// Q4_K: the K-quant groups' sizes, token steps and fallback, in the nibble layout
struct q4_K_nib_groups : k4_groups<false> {
    typedef q4_K_nib_group<16> packed;
    static void pack(const uint8_t* w, int64_t stride, int64_t b, packed& x) { q4_K_nib_pack(w, stride, b, x); }
    template <int N>
    static void rows(int64_t nb, const packed* x, const block_q8_K* const* ys, float* out, int64_t rs, int64_t ts) {
        q4_K_nib_rows<N>(nb, x, ys, out, rs, ts);
    }
};
struct q6_K_groups {
    typedef q6_K_x16 packed;
    typedef block_q8_K act;
    static constexpr int64_t block_elems = QK_K;
    static constexpr int64_t block_bytes = sizeof(block_q6_K);
    static constexpr int64_t min_tokens = 3;
    static constexpr int group_rows = 16, tokens = 4;
    static void pack(const uint8_t* w, int64_t stride, int64_t b, packed& x) { q6_K_pack(w, stride, b, x); }
    template <int N>
    static void rows(int64_t nb, const packed* x, const block_q8_K* const* ys, float* out, int64_t rs, int64_t ts) {
        q6_K_x16_rows<N>(nb, x, ys, out, rs, ts);
    }
    typedef q6_K_kernel fallback;
};
struct q8_0_groups {
    typedef q8_0_x16 packed;
    typedef block_q8_32 act;
    static constexpr int64_t block_elems = QK32;
    static constexpr int64_t block_bytes = sizeof(block_q8_0);
    static constexpr int64_t min_tokens = 2;
    static constexpr int group_rows = 16, tokens = 4;
    static void pack(const uint8_t* w, int64_t stride, int64_t b, packed& x) { q8_0_pack(w, stride, b, x); }
    template <int N>
    static void rows(int64_t nb, const packed* x, const block_q8_32* const* ys, float* out, int64_t rs, int64_t ts) {
        q8_0_x16_rows<N>(nb, x, ys, out, rs, ts);
    }
    typedef q8_0_kernel<dot_vnni> fallback;
};

}  // namespace

static void fill(gemm_tile_fn* g) {
    fill_shared<dot_vnni>(g);
    g[GGML_Q4_K] = tile_row_groups<q4_K_nib_groups>;
    g[GGML_Q5_K] = tile_row_groups<k4_groups<true>>;
    g[GGML_Q6_K] = tile_row_groups<q6_K_groups>;
    g[GGML_Q8_0] = tile_row_groups<q8_0_groups>;
}

}  // namespace x86_gemm512

bool fill_avx512_gemm(gemm_tile_fn* t) {
    x86_gemm512::fill(t);
    return true;
}

}  // namespace hybrid
