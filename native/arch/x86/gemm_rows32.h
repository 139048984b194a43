// The 32-block prefill rows (Q8_0, Q4_0, Q5_0) for N tokens, shared by the AVX2 and the
// AVX-512 tiles: per token the same instructions in the same order as that path's single dot
// (x86::dot_q8_0 / dot_q4_0 / dot_q5_0, or avx512.cpp's), so each result is bit-identical to
// it; only the unpacking is shared. DOT is the path's 32 x u8 . s8 -> 8 x int32 product
// (maddubs + madd on AVX2, vpdpbusd on VNNI). Included after x86_avx2_kernels.h.
#pragma once

namespace hybrid {
namespace x86_gemm {

typedef __m256i (*dot_u8s8_fn)(__m256i u, __m256i s);

template <int N, dot_u8s8_fn DOT>
static void rows_q8_0(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    const block_q8_0* x = (const block_q8_0*)w;
    const block_q8_32* const* ys = (const block_q8_32* const*)a;
    __m256 acc[N];
    for (int r = 0; r < N; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / QK32; b++) {
        x86::prefetch_block((const uint8_t*)&x[b], 1);
        const __m256i qx = _mm256_loadu_si256((const __m256i*)x[b].qs);
        const __m256i ax = _mm256_sign_epi8(qx, qx);
        const float dx = x86::h2f(x[b].d);
        for (int r = 0; r < N; r++) {
            const __m256i qy = _mm256_loadu_si256((const __m256i*)ys[r][b].qs);
            const __m256i p = DOT(ax, _mm256_sign_epi8(qy, qx));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dx * ys[r][b].d), _mm256_cvtepi32_ps(p), acc[r]);
        }
    }
    for (int r = 0; r < N; r++) out[r] = x86::hsum_ps(acc[r]);
}

// Q4_0 and (Q5) Q5_0: unsigned quants, the offset (8 or 16) subtracted at the end.
template <int N, bool Q5, dot_u8s8_fn DOT>
static void rows_q45_0(int64_t n, const uint8_t* w, const void* const* a, float* out) {
    const block_q8_32* const* ys = (const block_q8_32* const*)a;
    const int64_t bytes = Q5 ? sizeof(block_q5_0) : sizeof(block_q4_0);
    __m256 acc[N];
    float offset[N];
    for (int r = 0; r < N; r++) acc[r] = _mm256_setzero_ps(), offset[r] = 0.f;
    for (int64_t b = 0; b < n / QK32; b++) {
        const uint8_t* blk = w + b * bytes;
        x86::prefetch_block(blk, 1);
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const float dx = x86::h2f(dh);
        __m256i q;
        if (Q5) {
            const block_q5_0* x = (const block_q5_0*)blk;
            uint32_t qh;
            std::memcpy(&qh, x->qh, 4);
            q = _mm256_or_si256(x86::nibbles_32(x->qs), x86::bits_to_0x10(qh));
        } else {
            q = x86::nibbles_32(((const block_q4_0*)blk)->qs);
        }
        for (int r = 0; r < N; r++) {
            const float d = dx * ys[r][b].d;
            const __m256i p = DOT(q, _mm256_loadu_si256((const __m256i*)ys[r][b].qs));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc[r]);
            offset[r] += d * (float)((Q5 ? 16 : 8) * ys[r][b].sum);
        }
    }
    for (int r = 0; r < N; r++) out[r] = x86::hsum_ps(acc[r]) - offset[r];
}

// The tile() kernels of the three types.
template <dot_u8s8_fn DOT>
struct q8_0_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) { rows_q8_0<N, DOT>(n, w, a, out); }
};
template <bool Q5, dot_u8s8_fn DOT>
struct q45_0_kernel {
    template <int N>
    static void rows(int64_t n, const uint8_t* w, const void* const* a, float* out) {
        rows_q45_0<N, Q5, DOT>(n, w, a, out);
    }
};

}  // namespace x86_gemm
}  // namespace hybrid
