// AVX2 prefill tiles (gemm.h). Compiled with -mavx2 -mfma -mf16c -mbmi2; filled only for a
// kernel table cpuid admitted.
#include "../../gemm.h"
#include "gemm_tile.h"
// the header's table filler is avx2.cpp's business, unused here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "x86_avx2_kernels.h"
#pragma GCC diagnostic pop

namespace hybrid {
namespace x86_gemm {
using namespace x86;


// ---------------------------------------------------------------- 32-blocks, R tokens
// Per token the same instructions in the same order as x86::dot_q8_0 / dot_q4_0 / dot_q5_0,
// so each result is bit-identical to the single dot; only the unpacking is shared.

template <int R>
static inline void dot_q8_0_rows(int64_t n, const block_q8_0* x, const block_q8_32* const* ys, float* out) {
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK32; b++) {
        prefetch_block((const uint8_t*)&x[b], 1);
        const __m256i qx = _mm256_loadu_si256((const __m256i*)x[b].qs);
        const __m256i ax = _mm256_sign_epi8(qx, qx);
        const float dx = h2f(x[b].d);
        for (int r = 0; r < R; r++) {
            const __m256i qy = _mm256_loadu_si256((const __m256i*)ys[r][b].qs);
            const __m256i p = dot_u8s8_32(ax, _mm256_sign_epi8(qy, qx));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx * ys[r][b].d), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum_ps(acc[r]);
}

// Q4_0 (qh == nullptr) and Q5_0: unsigned quants, the offset (8 or 16) subtracted at the end.
template <int R, bool Q5>
static inline void dot_q45_0_rows(int64_t n, const uint8_t* base, const block_q8_32* const* ys, float* out) {
    const int64_t bytes = Q5 ? sizeof(block_q5_0) : sizeof(block_q4_0);
    __m256 acc[R];
    float offset[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), offset[r] = 0.f;
    for (int64_t b = 0; b < n / QK32; b++) {
        const uint8_t* blk = base + b * bytes;
        prefetch_block(blk, 1);
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const float dx = h2f(dh);
        __m256i q;
        if (Q5) {
            const block_q5_0* x = (const block_q5_0*)blk;
            uint32_t qh;
            std::memcpy(&qh, x->qh, 4);
            q = _mm256_or_si256(nibbles_32(x->qs), bits_to_0x10(qh));
        } else {
            q = nibbles_32(((const block_q4_0*)blk)->qs);
        }
        for (int r = 0; r < R; r++) {
            const float d = dx * ys[r][b].d;
            const __m256i p = dot_u8s8_32(q, _mm256_loadu_si256((const __m256i*)ys[r][b].qs));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc[r]);
            offset[r] += d * (float)((Q5 ? 16 : 8) * ys[r][b].sum);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum_ps(acc[r]) - offset[r];
}

// ROWS functions: the dots of one weight row with N activation rows.
template <int N>
static void rows_q8_0(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    dot_q8_0_rows<N>(n, (const block_q8_0*)w, (const block_q8_32* const*)a, out);
}
template <int N>
static void rows_q4_0(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    dot_q45_0_rows<N, false>(n, w, (const block_q8_32* const*)a, out);
}
template <int N>
static void rows_q5_0(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    dot_q45_0_rows<N, true>(n, w, (const block_q8_32* const*)a, out);
}
// The K-quants' 4-token dots are the kernel table's own dot4 (x86_avx2_kernels.h).
static void rows_q4_K(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    dot4_q4_K(n, w, a, out);
}
static void rows_q5_K(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    dot4_q5_K(n, w, a, out);
}
static void rows_q6_K(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    dot4_q6_K(n, w, a, out);
}

static void fill(gemm_tile_fn* g) {
    // 8 tokens per pass paid for the 32-blocks (Q8_0 +7%, Q5_0 +5% over 4 on Zen 2); the
    // K-quants' 4-token dots already fill the 16 registers.
    g[GGML_Q8_0] = tile<8, rows_q8_0<8>, rows_q8_0<4>, dot_q8_0>;
    g[GGML_Q4_0] = tile<8, rows_q4_0<8>, rows_q4_0<4>, dot_q4_0>;
    g[GGML_Q5_0] = tile<8, rows_q5_0<8>, rows_q5_0<4>, dot_q5_0>;
    g[GGML_Q4_K] = tile<4, rows_q4_K, rows_q4_K, dot_q4_K>;
    g[GGML_Q5_K] = tile<4, rows_q5_K, rows_q5_K, dot_q5_K>;
    g[GGML_Q6_K] = tile<4, rows_q6_K, rows_q6_K, dot_q6_K>;
}

}  // namespace x86_gemm

bool fill_avx2_gemm(gemm_tile_fn* t) {
    x86_gemm::fill(t);
    return true;
}

}  // namespace hybrid
