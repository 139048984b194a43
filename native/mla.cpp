#include "mla.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dispatch.h"
#include "matmul.h"
#include "ops.h"

namespace hybrid {

namespace {

void linear(ThreadPool& pool, const qlinear& W, const float* x, int64_t x_stride, int64_t T, float* y,
            int64_t y_stride) {
    matmul_args a;
    a.w = W.w;
    a.w_type = W.type;
    a.N = W.rows;
    a.K = W.cols;
    a.w_stride = W.stride;
    a.x = x;
    a.x_bf16 = false;
    a.T = T;
    a.x_stride = x_stride;
    a.y = y;
    a.y_stride = y_stride;
    matmul(pool, a);
}

// Per-head linears over H matrices of Q8_0 rows [H][rows][cols]: y[h] = W[h] x[h].
void head_linear(ThreadPool& pool, const uint8_t* w, int64_t H, int64_t rows, int64_t cols, const float* x,
                 int64_t x_stride, int64_t x_bstride, int64_t T, float* y, int64_t y_stride, int64_t y_bstride) {
    matmul_args a;
    a.w = w;
    a.w_type = GGML_Q8_0;
    a.N = rows;
    a.K = cols;
    a.w_stride = row_bytes(GGML_Q8_0, cols);
    a.x = x;
    a.x_bf16 = false;
    a.T = T;
    a.x_stride = x_stride;
    a.y = y;
    a.y_stride = y_stride;
    a.batch = H;
    a.w_bstride = a.w_stride * rows;
    a.x_bstride = x_bstride;
    a.y_bstride = y_bstride;
    matmul(pool, a);
}

// Normal (adjacent-pair) RoPE: (v0 + i v1) * (cos + i sin), as the torch path's complex product.
void rope_pairs(float* v, const float* cs, int64_t R) {
    for (int64_t i = 0; i < R / 2; i++) {
        const float v0 = v[2 * i], v1 = v[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
        v[2 * i] = v0 * c - v1 * s;
        v[2 * i + 1] = v0 * s + v1 * c;
    }
}

// Attention in latent space. Item (t, g): heads [g*hpi, (g+1)*hpi) of token t over the cache
// rows up to its position; the kernels read each row once for several heads.
struct attn_job {
    const kernel_table* k;
    const float* qc;  // [T, H, C+R]: absorbed query | roped query
    const float* cache;
    float* olat;      // [T, H, C]
    int64_t H, T, C, R, pos0, heads_per_item, groups;
    float scale;
    chunk_counter items;
};

void attn_worker(void* p, int ith, int nth) {
    attn_job& j = *(attn_job*)p;
    const int64_t W = j.C + j.R;
    thread_local std::vector<float> scores;
    for (int64_t it = j.items.take(); it < j.T * j.groups; it = j.items.take()) {
        const int64_t t = it / j.groups, h0 = (it % j.groups) * j.heads_per_item;
        const int64_t nh = std::min(j.H, h0 + j.heads_per_item) - h0;
        const int64_t S = j.pos0 + t + 1;
        if ((int64_t)scores.size() < nh * S) scores.resize(nh * S);
        j.k->attn_scores(j.qc + (t * j.H + h0) * W, nh, j.cache, W, S, W, scores.data());
        for (int64_t h = 0; h < nh; h++) {  // softmax of the scaled scores
            float* sc = scores.data() + h * S;
            float mx = -std::numeric_limits<float>::infinity();
            for (int64_t s = 0; s < S; s++) mx = std::max(mx, sc[s] *= j.scale);
            float sum = 0.f;
            for (int64_t s = 0; s < S; s++) sum += (sc[s] = std::exp(sc[s] - mx));
            for (int64_t s = 0; s < S; s++) sc[s] /= sum;
        }
        j.k->attn_values(scores.data(), nh, j.cache, W, S, j.C, j.olat + (t * j.H + h0) * j.C);
    }
}

template <class T>
T* grown(std::vector<T>& v, int64_t n) {
    if ((int64_t)v.size() < n) v.resize(n);
    return v.data();
}

}  // namespace

void mla_decode(ThreadPool& pool, const mla_layer& L, const float* x, int64_t T, int64_t pos0, float* cache,
                const float* rope, float* out) {
    if (T <= 0) return;
    const int64_t D = L.D, H = L.H, N = L.N, R = L.R, V = L.V, C = L.C, W = C + R, QD = H * (N + R);
    thread_local std::vector<float> h_buf, qa_buf, q_buf, kv_buf, qc_buf, olat_buf, o_buf;
    float* h = grown(h_buf, T * D);
    float* q = grown(q_buf, T * QD);
    float* kv = grown(kv_buf, T * W);
    float* qc = grown(qc_buf, H * T * W);
    float* olat = grown(olat_buf, H * T * C);
    float* o = grown(o_buf, T * H * V);

    rms_norm(x, D, L.attn_norm, h, D, T, D, L.eps);
    if (L.q_a.w) {
        const int64_t Q = L.q_a.rows;
        float* qa = grown(qa_buf, T * Q);
        linear(pool, L.q_a, h, D, T, qa, Q);
        rms_norm(qa, Q, L.q_a_norm, qa, Q, T, Q, L.eps);
        linear(pool, L.q_b, qa, Q, T, q, QD);
    } else {
        linear(pool, L.q, h, D, T, q, QD);
    }
    linear(pool, L.kv_a, h, D, T, kv, W);

    for (int64_t t = 0; t < T; t++) {
        float* row = cache + (pos0 + t) * W;  // [normalized latent | roped key]
        rms_norm(kv + t * W, W, L.kv_a_norm, row, W, 1, C, L.eps);
        std::copy_n(kv + t * W + C, R, row + C);
        rope_pairs(row + C, rope + (pos0 + t) * R, R);
        for (int64_t hh = 0; hh < H; hh++) {
            float* qpe = qc + (t * H + hh) * W + C;
            std::copy_n(q + t * QD + hh * (N + R) + N, R, qpe);
            rope_pairs(qpe, rope + (pos0 + t) * R, R);
        }
    }
    // absorbed query: qc[t, h, :C] = k_up[h] q_nope[t, h]
    head_linear(pool, L.k_up, H, C, N, q, QD, N + R, T, qc, H * W, W);

    attn_job j;
    j.k = &kernels();
    j.qc = qc;
    j.cache = cache;
    j.olat = olat;
    j.H = H;
    j.T = T;
    j.C = C;
    j.R = R;
    j.pos0 = pos0;
    j.groups = std::min<int64_t>(H, pool.size());
    j.heads_per_item = (H + j.groups - 1) / j.groups;
    j.groups = (H + j.heads_per_item - 1) / j.heads_per_item;
    j.scale = L.kq_scale;
    pool.run(attn_worker, &j);

    // values: o[t, h*V:(h+1)*V] = v_up[h] olat[t, h]
    head_linear(pool, L.v_up, H, V, C, olat, H * C, C, T, o, H * V, V);
    linear(pool, L.wo, o, H * V, T, out, D);
}

}  // namespace hybrid
