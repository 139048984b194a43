// The loop of a prefill tile (gemm.h) over token groups and weight rows, shared by the x86
// tile kernels. Included by gemm_avx2.cpp and gemm_avx512.cpp, each with its own ISA flags:
// everything is static.
#pragma once

#include <cstdint>

namespace hybrid {
namespace x86_gemm {

typedef void (*rows_fn)(int64_t n, const uint8_t* w, const void* const* acts, float* out);

// Tokens [t, t + N) of a tile against every row.
template <int N, rows_fn ROWS>
static inline void tile_tokens(int64_t n, const uint8_t* w, int64_t w_stride, int64_t R, const void* const* acts,
                               float* out, int64_t r_stride, int64_t t_stride) {
    for (int64_t r = 0; r < R; r++) {
        float o[N];
        ROWS(n, w + r * w_stride, acts, o);
        for (int i = 0; i < N; i++) out[r * r_stride + i * t_stride] = o[i];
    }
}
// A tile: groups of N8 tokens, then of 4, then the last 1-3 tokens in one group, each group
// over every row. KERNEL::rows<N> are one type's dots of a weight row with N activation rows.
// Token groups outside, rows inside: a group's activations stay in L1 while the tile's weight
// rows (a few hundred KiB at most) come from L2, which halves the L2 traffic of the other
// order for K-quants (their activation rows have twice the bytes of the weight rows).
template <int N8, class KERNEL>
static void tile(int64_t n, const uint8_t* w, int64_t w_stride, int64_t R, const void* const* acts, int64_t T,
                 float* out, int64_t r_stride, int64_t t_stride) {
    int64_t t = 0;
    for (; t + N8 <= T; t += N8)
        tile_tokens<N8, KERNEL::template rows<N8>>(n, w, w_stride, R, acts + t, out + t * t_stride, r_stride, t_stride);
    for (; t + 4 <= T; t += 4)
        tile_tokens<4, KERNEL::template rows<4>>(n, w, w_stride, R, acts + t, out + t * t_stride, r_stride, t_stride);
    const void* const* a = acts + t;
    float* o = out + t * t_stride;
    switch (T - t) {
        case 3: tile_tokens<3, KERNEL::template rows<3>>(n, w, w_stride, R, a, o, r_stride, t_stride); break;
        case 2: tile_tokens<2, KERNEL::template rows<2>>(n, w, w_stride, R, a, o, r_stride, t_stride); break;
        case 1: tile_tokens<1, KERNEL::template rows<1>>(n, w, w_stride, R, a, o, r_stride, t_stride); break;
        default: break;
    }
}

}  // namespace x86_gemm
}  // namespace hybrid
