// Quantized matmul Y[T,N] = X[T,K] @ W[N,K]^T for W in any supported GGML type, optionally
// batched over several (W, X, Y) of one shape.
#pragma once

#include <cstdint>
#include <vector>

#include "pool.h"
#include "quants.h"

namespace hybrid {

struct matmul_args {
    const uint8_t* w;   // N rows of K elements in GGML blocks, row r at w + r * w_stride
    int w_type;
    int64_t N, K, w_stride;
    const void* x;      // [T, K] row r at x + r * x_stride elements
    bool x_bf16;        // x holds bf16 (uint16) instead of float32
    int64_t T, x_stride;
    float* y;           // [T, N] row t at y + t * y_stride
    int64_t y_stride;
    // `batch` independent products of the same shape (per-head linears): product b reads
    // w + b * w_bstride bytes and x + b * x_bstride elements (0: all share one x) and writes
    // y + b * y_bstride elements.
    int64_t batch = 1, w_bstride = 0, x_bstride = 0, y_bstride = 0;
};

// A weight matrix in GGML blocks: `rows` rows of `cols` elements, `stride` bytes apart.
struct qlinear {
    const uint8_t* w = nullptr;
    int type = -1;
    int64_t rows = 0, cols = 0, stride = 0;
};

// The matmul of y[T, rows] = x[T, cols] @ W^T, rows of x and y x_stride / y_stride apart.
matmul_args linear_args(const qlinear& W, const float* x, int64_t x_stride, int64_t T, float* y,
                        int64_t y_stride);
// Runs it on every worker of pool (the native layers' projections).
void linear(ThreadPool& pool, const qlinear& W, const float* x, int64_t x_stride, int64_t T, float* y,
            int64_t y_stride);

// Validates shapes and types (throws std::invalid_argument with a readable message).
void matmul_check(const matmul_args& a);
// Runs on every worker of pool; blocks until done. Deterministic for any pool size.
void matmul(ThreadPool& pool, const matmul_args& a);

// Converts one activation row (float32 or bf16) to the act format `f` (scratch: >= K floats
// when x is bf16).
void quantize_act_row(act_format f, const void* x, bool x_bf16, int64_t K, void* dst, float* scratch);

}  // namespace hybrid
