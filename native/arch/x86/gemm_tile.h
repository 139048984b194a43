// The loop of a prefill tile (gemm.h) over token groups and weight rows, shared by the x86
// tile kernels. Included by gemm_avx2.cpp and gemm_avx512.cpp, each with its own ISA flags:
// everything is static.
#pragma once

#include <cstdint>
#include <type_traits>

namespace hybrid {
namespace x86_gemm {
namespace {  // internal linkage, as x86_avx2_kernels.h: one copy per ISA file

// One token group of a tile: KERNEL::group<N> where the kernel prepares something per group
// (built once, read by every row), else its rows<N> on the group's activations.
template <class KERNEL, int N>
struct plain_group {
    const void* const* acts;
    plain_group(int64_t, const void* const* a) : acts(a) {}
    void rows(int64_t n, const uint8_t* w, float* out) const { KERNEL::template rows<N>(n, w, acts, out); }
};
template <class KERNEL, int N, class = void>
struct group_of {
    typedef plain_group<KERNEL, N> type;
};
template <class KERNEL, int N>
struct group_of<KERNEL, N, std::void_t<typename KERNEL::template group<N>>> {
    typedef typename KERNEL::template group<N> type;
};

// Tokens [t, t + N) of a tile against every row.
template <int N, class KERNEL>
static inline void tile_tokens(int64_t n, const uint8_t* w, int64_t w_stride, int64_t R, const void* const* acts,
                               float* out, int64_t r_stride, int64_t t_stride) {
    const typename group_of<KERNEL, N>::type g(n, acts);
    for (int64_t r = 0; r < R; r++) {
        float o[N];
        g.rows(n, w + r * w_stride, o);
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
        tile_tokens<N8, KERNEL>(n, w, w_stride, R, acts + t, out + t * t_stride, r_stride, t_stride);
    for (; t + 4 <= T; t += 4)
        tile_tokens<4, KERNEL>(n, w, w_stride, R, acts + t, out + t * t_stride, r_stride, t_stride);
    const void* const* a = acts + t;
    float* o = out + t * t_stride;
    switch (T - t) {
        case 3: tile_tokens<3, KERNEL>(n, w, w_stride, R, a, o, r_stride, t_stride); break;
        case 2: tile_tokens<2, KERNEL>(n, w, w_stride, R, a, o, r_stride, t_stride); break;
        case 1: tile_tokens<1, KERNEL>(n, w, w_stride, R, a, o, r_stride, t_stride); break;
        default: break;
    }
}

// The entries both x86 tile tables fill alike: the five 32-block types other than Q8_0 with the
// ISA's u8 x s8 product DOT (x86::rows32; 8 tokens measured best on Zen 2: Q5_0 +5% over 4, as
// Q8_0 +7% was when it used these rows; Q8_0 now has each table's row groups,
// gemm_rowgroups.h), and the lattice types, whose dots both kernel tables take from
// x86_avx2_kernels.h (included before this header).
template <x86::dot_u8s8_fn DOT>
static void fill_shared(gemm_tile_fn* g) {
    g[GGML_Q4_0] = tile<8, x86::rows32_kernel<x86::b32_q4_0, DOT>>;
    g[GGML_Q5_0] = tile<8, x86::rows32_kernel<x86::b32_q5_0, DOT>>;
    g[GGML_Q4_1] = tile<8, x86::rows32_kernel<x86::b32_q4_1, DOT>>;
    g[GGML_Q5_1] = tile<8, x86::rows32_kernel<x86::b32_q5_1, DOT>>;
    g[GGML_IQ4_NL] = tile<8, x86::rows32_kernel<x86::b32_iq4_nl, DOT>>;
    g[GGML_IQ2_XXS] = tile<8, x86::lattice_kernel<block_iq2_xxs, 8, x86::iq2_xxs_unpack>>;
    g[GGML_IQ2_XS] = tile<8, x86::lattice_kernel<block_iq2_xs, 8, x86::iq2_xs_unpack>>;
    g[GGML_IQ2_S] = tile<8, x86::lattice_kernel<block_iq2_s, 8, x86::iq2_s_unpack>>;
    g[GGML_IQ3_XXS] = tile<8, x86::lattice_kernel<block_iq3_xxs, 4, x86::iq3_xxs_unpack>>;
    g[GGML_IQ3_S] = tile<8, x86::lattice_kernel<block_iq3_s, 1, x86::iq3_s_unpack>>;
    g[GGML_IQ1_S] = tile<8, x86::iq1_s_kernel>;
}

}  // namespace
}  // namespace x86_gemm
}  // namespace hybrid
