#include "ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

void moe_route(const float* logits, int64_t T, int64_t E, const float* bias, const route_params& p, int64_t* ids,
               float* weights) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    thread_local std::vector<float> probs, sel, gscore;
    probs.resize(E);
    sel.resize(E);
    const int64_t G = p.n_group > 1 ? p.n_group : 1, per_group = E / G;
    gscore.resize(G);
    for (int64_t t = 0; t < T; t++) {
        const float* l = logits + t * E;
        if (p.gating == 1) {
            float mx = kNegInf, sum = 0.f;
            for (int64_t e = 0; e < E; e++) mx = std::max(mx, l[e]);
            for (int64_t e = 0; e < E; e++) sum += (probs[e] = std::exp(l[e] - mx));
            for (int64_t e = 0; e < E; e++) probs[e] /= sum;
        } else {
            for (int64_t e = 0; e < E; e++) probs[e] = 1.f / (1.f + std::exp(-l[e]));
        }
        for (int64_t e = 0; e < E; e++) sel[e] = bias ? probs[e] + bias[e] : probs[e];
        if (G > 1) {
            for (int64_t g = 0; g < G; g++) {  // sum of the group's two best
                float a = kNegInf, b = kNegInf;
                for (int64_t e = g * per_group; e < (g + 1) * per_group; e++) {
                    if (sel[e] > a) {
                        b = a;
                        a = sel[e];
                    } else if (sel[e] > b) {
                        b = sel[e];
                    }
                }
                gscore[g] = per_group > 1 ? a + b : a;
            }
            for (int64_t kept = 0; kept < G; kept++) {  // mark the best n_group_used groups
                int64_t best = -1;
                for (int64_t g = 0; g < G; g++)
                    if (gscore[g] != kNegInf && (best < 0 || gscore[g] > gscore[best])) best = g;
                if (best < 0) break;
                gscore[best] = kNegInf;
                if (kept >= p.n_group_used)
                    std::fill(sel.begin() + best * per_group, sel.begin() + (best + 1) * per_group, kNegInf);
            }
        }
        float sum = 0.f;
        for (int64_t k = 0; k < p.K; k++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (sel[e] != kNegInf && (best < 0 || sel[e] > sel[best])) best = e;
            ids[t * p.K + k] = best;
            if (best < 0) {
                weights[t * p.K + k] = 0.f;
                continue;
            }
            sel[best] = kNegInf;
            weights[t * p.K + k] = probs[best];
            sum += probs[best];
        }
        if (p.norm)
            for (int64_t k = 0; k < p.K; k++) weights[t * p.K + k] /= std::max(sum, 6.103515625e-5f);
        if (p.scale != 0.f && p.scale != 1.f)
            for (int64_t k = 0; k < p.K; k++) weights[t * p.K + k] *= p.scale;
    }
}

}  // namespace hybrid
