// Multi-head latent attention (DeepSeek-V2/V3/R1) for the few new tokens of a decode step,
// in one native call: norms, the q / kv projections, RoPE, the latent cache write, attention
// in latent space (k_b absorbed into the query, v_b applied after) and the output projection.
// The Python path (hybrid/models/deepseek2.py, MLAttention._absorbed) is the reference; in
// torch the same step is ~60 small ops whose dispatch cost more than their arithmetic.
//
// Letters: T new tokens, D model dim, H heads, N no-rope query/key dims per head, R rope
// dims, V value dims per head, C latent (kv_lora_rank), Q q_lora_rank, P cache rows.
#pragma once

#include <cstdint>

#include "matmul.h"  // qlinear
#include "pool.h"

namespace hybrid {

struct mla_layer {
    int64_t D = 0, H = 0, N = 0, R = 0, V = 0, C = 0;
    float eps = 0.f, kq_scale = 0.f;
    const float* attn_norm = nullptr;  // [D]
    const float* q_a_norm = nullptr;   // [Q], with q_a / q_b; null when the model has one q
    const float* kv_a_norm = nullptr;  // [C]
    qlinear q_a, q_b, q, kv_a, wo;     // q_a [Q, D], q_b [H*(N+R), Q] | q [H*(N+R), D];
                                       // kv_a [C+R, D]; wo [D, H*V]
    const uint8_t* k_up = nullptr;     // Q8_0 rows [H][C][N]: q_nope -> latent space
    const uint8_t* v_up = nullptr;     // Q8_0 rows [H][V][C]: latent output -> values
};

// x [T, D] are the tokens at positions pos0 .. pos0+T-1; each attends to cache rows up to its
// own position. cache: the layer's rows [P, C+R] (normalized latent, roped key), float32;
// rows pos0 .. pos0+T-1 are written. rope: [P, R/2] (cos, sin) pairs with the YaRN magnitude
// folded in. out [T, D]. The pool's workers all take part.
void mla_decode(ThreadPool& pool, const mla_layer& L, const float* x, int64_t T, int64_t pos0, float* cache,
                const float* rope, float* out);

}  // namespace hybrid
