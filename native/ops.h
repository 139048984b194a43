// Small per-token operations of a CPU decode step, natively: in torch each costs more in
// dispatch than in arithmetic (an rms_norm of 2048 floats: ~40 us in torch, ~2 us here).
#pragma once

#include <cstdint>

namespace hybrid {

// y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w for T rows of n floats, as llama.cpp computes
// it (squares summed in double, scale in float, then the weight multiply). Rows of x and y
// start x_stride / y_stride floats apart; y may alias x.
void rms_norm(const float* x, int64_t x_stride, const float* w, float* y, int64_t y_stride, int64_t T, int64_t n,
              float eps);

// Expert selection of llama.cpp's build_moe_ffn (deepseek2) for T rows of E router logits:
// probabilities (gating 1 softmax, 2 sigmoid); selection on probs + bias (bias may be null);
// with n_group > 1 only the n_group_used groups whose two best selection scores sum highest
// compete; the K best experts, best first (ties: lower id); their weights are the unbiased
// probabilities, normalized to sum 1 (floor 2^-14) when norm, times scale unless it is 0 or 1.
struct route_params {
    int gating = 2;
    int64_t n_group = 0, n_group_used = 0, K = 8;
    bool norm = true;
    float scale = 1.f;
};
void moe_route(const float* logits, int64_t T, int64_t E, const float* bias, const route_params& p, int64_t* ids,
               float* weights);

}  // namespace hybrid
