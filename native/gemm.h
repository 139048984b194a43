// Prefill tiles: (weight rows x tokens) of dot products with each weight block unpacked once
// for several tokens, per ISA. Every output is bit-identical to the same ISA's single dot
// (kernel_table::dot), so prefill equals token-by-token decode exactly.
//
// Letters: n = elements per row, R = weight rows of a tile, T = tokens of a tile.
#pragma once

#include "quants.h"

namespace hybrid {

// out[r * r_stride + t * t_stride] = dot(n, w + r * w_stride, acts[t]) for r < R, t < T;
// acts in the weight type's activation format.
typedef void (*gemm_tile_fn)(int64_t n, const uint8_t* w, int64_t w_stride, int64_t R, const void* const* acts,
                             int64_t T, float* out, int64_t r_stride, int64_t t_stride);

// The tile kernel of kernel table `k`'s ISA for weight type `type`; null where that ISA has
// none (the scalar reference, other types): callers then loop over the table's dot / dot4.
gemm_tile_fn gemm_tile_for(const kernel_table& k, int type);

// Off: gemm_tile_for returns null for every type, so prefill takes the per-row dot / dot4
// loops (benchmarks compare both paths in one process). On by default.
void set_gemm_tiles(bool on);
bool gemm_tiles();

// Filled by arch/x86/gemm_*.cpp ([GGML_TYPE_LIMIT] entries); false when built without the ISA.
bool fill_avx2_gemm(gemm_tile_fn* t);
bool fill_avx512_gemm(gemm_tile_fn* t);

}  // namespace hybrid
