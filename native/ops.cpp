#include "ops.h"

#include <cmath>

namespace hybrid {

void rms_norm(const float* x, int64_t x_stride, const float* w, float* y, int64_t y_stride, int64_t T, int64_t n,
              float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float* xr = x + t * x_stride;
        float* yr = y + t * y_stride;
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) sum += (double)(xr[i] * xr[i]);
        const float mean = (float)(sum / (double)n);
        const float scale = 1.0f / std::sqrt(mean + eps);
        for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] * scale) * w[i];
    }
}

}  // namespace hybrid
