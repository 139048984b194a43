// Grouped-query attention (qwen2moe, qwen3moe, glm4moe, Mixtral-style llama) for the few new
// tokens of a CPU decode step, in one native call: the input norm, the q / k / v projections
// (+ biases), per-head q / k norms, RoPE, the cache write, causal attention with each kv head
// shared by a group of query heads, and the output projection. The counterpart of mla.h; the
// residual add stays with the caller.
//
// Letters: T new tokens, D model dim, H query heads, Hkv key/value heads, G = H / Hkv query
// heads per kv head (query head h reads kv head h / G, as ggml's broadcast), Dk key (and
// query) dims per head, Dv value dims per head, R rotated dims per head (the first R of Dk),
// P cache rows, S cached rows a token attends to.
#pragma once

#include <cstdint>

#include "matmul.h"  // qlinear
#include "pool.h"

namespace hybrid {

struct gqa_layer {
    int64_t D = 0, H = 0, Hkv = 0, Dk = 0, Dv = 0, R = 0;
    bool neox = true;  // NEOX rope pairs (i, i + R/2); else adjacent pairs (2i, 2i + 1)
    float eps = 0.f, kq_scale = 0.f;
    const float* attn_norm = nullptr;  // [D]
    qlinear q, k, v, o;                // q [H*Dk, D], k [Hkv*Dk, D], v [Hkv*Dv, D], o [D, H*Dv]
    const float* bq = nullptr;         // [H*Dk], or null
    const float* bk = nullptr;         // [Hkv*Dk], or null
    const float* bv = nullptr;         // [Hkv*Dv], or null
    const float* q_norm = nullptr;     // [Dk] RMS weights of every query head, or null
    const float* k_norm = nullptr;     // [Dk] RMS weights of every key head, or null
};

// x [T, D] are the tokens at positions pos0 .. pos0+T-1; each attends to cache rows 0 .. its
// own position. k_cache [P, Hkv, Dk], v_cache [P, Hkv, Dv], float32: rows pos0 .. pos0+T-1
// are written (keys after norm + rope, values after bias). rope [P, R] holds the (cos, sin)
// pairs of the R/2 frequencies at each position. out [T, D] (no residual). The pool's
// workers all take part; scratch is the calling and worker threads' own, grown to the
// largest call so far (no allocation in steady state).
void gqa_decode(ThreadPool& pool, const gqa_layer& L, const float* x, int64_t T, int64_t pos0, float* k_cache,
                float* v_cache, const float* rope, float* out);

}  // namespace hybrid
