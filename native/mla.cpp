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

// Per-head linears over H matrices of Q8_0 rows [H][rows][cols]: y[h] = W[h] x[h].
void head_linear(ThreadPool& pool, const uint8_t* w, int64_t H, int64_t rows, int64_t cols, const float* x,
                 int64_t x_stride, int64_t x_bstride, int64_t T, float* y, int64_t y_stride, int64_t y_bstride) {
    const qlinear W{w, GGML_Q8_0, rows, cols, row_bytes(GGML_Q8_0, cols)};
    matmul_args a = linear_args(W, x, x_stride, T, y, y_stride);
    a.batch = H;
    a.w_bstride = W.stride * rows;
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

// Attention in latent space, split over the cached rows ("flash decoding"): item (t, b)
// takes block b of token t's rows for all heads (the kernels read each row once for four
// heads, the block stays in L2 between scores and values) and leaves unnormalized partial
// outputs with their max and sum; after a barrier each (t, head) merges its blocks. Every
// cached row is read from memory once per token.
struct attn_job {
    const kernel_table* k;
    const float* qc;  // [T, H, C+R]: absorbed query | roped query
    const float* cache;
    float* olat;      // [T, H, C]
    float *part_o, *part_m, *part_l;  // [T, blocks, H, C], [T, blocks, H] x 2
    int64_t H, T, C, R, pos0, blocks;
    float scale;
    chunk_counter items, merges;
    ThreadPool* pool;
};

void attn_worker(void* p, int ith, int nth) {
    attn_job& j = *(attn_job*)p;
    const int64_t W = j.C + j.R, H = j.H, C = j.C;
    thread_local std::vector<float> scores;
    for (int64_t it = j.items.take(); it < j.T * j.blocks; it = j.items.take()) {
        const int64_t t = it / j.blocks, b = it % j.blocks, S = j.pos0 + t + 1;
        const int64_t r0 = S * b / j.blocks, nb = S * (b + 1) / j.blocks - r0;
        float* m = j.part_m + it * H;
        float* l = j.part_l + it * H;
        float* o = j.part_o + it * H * C;
        if (nb == 0) {
            std::fill_n(m, H, -std::numeric_limits<float>::infinity());
            std::fill_n(l, H, 0.f);
            std::fill_n(o, H * C, 0.f);
            continue;
        }
        if ((int64_t)scores.size() < H * nb) scores.resize(H * nb);
        const float* rows = j.cache + r0 * W;
        j.k->attn_scores(j.qc + t * H * W, H, rows, W, nb, W, scores.data());
        for (int64_t h = 0; h < H; h++) {
            float* sc = scores.data() + h * nb;
            float mx = -std::numeric_limits<float>::infinity();
            for (int64_t s = 0; s < nb; s++) mx = std::max(mx, sc[s] *= j.scale);
            m[h] = mx;
            l[h] = j.k->exp_sum(sc, nb, mx);
        }
        j.k->attn_values(scores.data(), H, rows, W, nb, C, o);
    }
    j.pool->barrier();
    for (int64_t it = j.merges.take(); it < j.T * H; it = j.merges.take()) {
        const int64_t t = it / H, h = it % H;
        float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
        for (int64_t b = 0; b < j.blocks; b++) mx = std::max(mx, j.part_m[(t * j.blocks + b) * H + h]);
        for (int64_t b = 0; b < j.blocks; b++) {
            const int64_t i = (t * j.blocks + b) * H + h;
            sum += j.part_l[i] * std::exp(j.part_m[i] - mx);
        }
        float* out = j.olat + (t * H + h) * C;
        std::fill_n(out, C, 0.f);
        for (int64_t b = 0; b < j.blocks; b++) {
            const int64_t i = (t * j.blocks + b) * H + h;
            if (j.part_l[i] == 0.f) continue;
            const float f = std::exp(j.part_m[i] - mx) / sum;
            const float* o = j.part_o + i * C;
            for (int64_t c = 0; c < C; c++) out[c] += f * o[c];
        }
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

    // Row blocks per token: enough items for every worker (about 4 each over the tokens),
    // blocks of at least 32 rows.
    const int64_t min_rows = pos0 + 1;
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>((4 * pool.size() + T - 1) / T, (min_rows + 31) / 32));
    thread_local std::vector<float> part_o, part_ml;
    attn_job j;
    j.k = &kernels();
    j.qc = qc;
    j.cache = cache;
    j.olat = olat;
    j.part_o = grown(part_o, T * blocks * H * C);
    j.part_m = grown(part_ml, 2 * T * blocks * H);
    j.part_l = j.part_m + T * blocks * H;
    j.H = H;
    j.T = T;
    j.C = C;
    j.R = R;
    j.pos0 = pos0;
    j.blocks = blocks;
    j.scale = L.kq_scale;
    j.pool = &pool;
    pool.run(attn_worker, &j);

    // values: o[t, h*V:(h+1)*V] = v_up[h] olat[t, h]
    head_linear(pool, L.v_up, H, V, C, olat, H * C, C, T, o, H * V, V);
    linear(pool, L.wo, o, H * V, T, out, D);
}

}  // namespace hybrid
