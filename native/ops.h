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

}  // namespace hybrid
