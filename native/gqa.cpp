// The grouped-query attention layer of gqa.h: four quantized linears on the pool, the per-token
// work (bias, q / k norms, RoPE) on the calling thread, and one job for the attention.
#include "gqa.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dispatch.h"
#include "matmul.h"
#include "ops.h"

namespace hybrid {

namespace {

template <class T>
T* grown(std::vector<T>& v, int64_t n) {
    if ((int64_t)v.size() < n) v.resize(n);
    return v.data();
}

// Rotates the first R dims of one head by the (cos, sin) pairs cs[2i], cs[2i+1]: NEOX turns
// the pairs (i, i + R/2), the normal mode adjacent pairs (2i, 2i+1); dims R.. pass through.
void rope_head(float* v, const float* cs, int64_t R, bool neox) {
    const int64_t half = R / 2;
    if (neox) {
        for (int64_t i = 0; i < half; i++) {
            const float v0 = v[i], v1 = v[i + half], c = cs[2 * i], s = cs[2 * i + 1];
            v[i] = v0 * c - v1 * s;
            v[i + half] = v0 * s + v1 * c;
        }
    } else {
        for (int64_t i = 0; i < half; i++) {
            const float v0 = v[2 * i], v1 = v[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
            v[2 * i] = v0 * c - v1 * s;
            v[2 * i + 1] = v0 * s + v1 * c;
        }
    }
}

// One token's projections after the linears, in llama.cpp's order: bias, per-head RMS norm,
// RoPE. q [H, Dk] is scratch; k [Hkv, Dk] and v [Hkv, Dv] are already its cache rows.
void finish_token(const gqa_layer& L, float* q, float* k, float* v, const float* cs) {
    const int64_t H = L.H, Hkv = L.Hkv, Dk = L.Dk, Dv = L.Dv;
    if (L.bq)
        for (int64_t i = 0; i < H * Dk; i++) q[i] += L.bq[i];
    if (L.bk)
        for (int64_t i = 0; i < Hkv * Dk; i++) k[i] += L.bk[i];
    if (L.bv)
        for (int64_t i = 0; i < Hkv * Dv; i++) v[i] += L.bv[i];
    if (L.q_norm) rms_norm(q, Dk, L.q_norm, q, Dk, H, Dk, L.eps);
    if (L.k_norm) rms_norm(k, Dk, L.k_norm, k, Dk, Hkv, Dk, L.eps);
    if (L.R == 0) return;
    for (int64_t h = 0; h < H; h++) rope_head(q + h * Dk, cs, L.R, L.neox);
    for (int64_t g = 0; g < Hkv; g++) rope_head(k + g * Dk, cs, L.R, L.neox);
}

// The attention, split over the cached rows ("flash decoding"): item (t, b) takes row block b
// of token t for all heads and leaves unnormalized partial outputs with their max and sum;
// after a barrier each (t, head) merges its blocks.
//
// An item walks its block in chunks of kChunkRows rows, all kv heads of a chunk before the
// next chunk: a cache row holds every kv head's slice, so K and V are read front to back and
// the chunk stays in L2 between scores and values. Each head group's G queries share every
// K / V slice read (the row kernels take four queries per pass). The softmax runs online over
// the chunks: a chunk that raises a head's max rescales what that head has summed so far.
// While a chunk is computed the next one is prefetched, a kv head's share before each
// kernel call. Measured on one thread of a 2-core EPYC VM at S = 4096 (qwen3moe heads), per
// call: 64-row chunks 4.8 ms, 32-row 4.5 ms, 32-row with the prefetch 4.3 ms. At S = 512 it
// takes 0.24 ms with the rows in L3 and 0.53 ms from memory: the rest is waiting for memory.
constexpr int64_t kChunkRows = 32;

void prefetch_range(const float* p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 3);
}

struct attn_job {
    const gqa_layer* L;
    const kernel_table* k;
    float* q;                          // [T, H, Dk]
    float *k_rows, *v_rows;            // the caches from row 0: [P, Hkv, Dk], [P, Hkv, Dv]
    float* o;                          // [T, H, Dv]
    float *part_o, *part_m, *part_l;   // [T, blocks, H, Dv], [T, blocks, H] x 2
    int64_t T, pos0, blocks;
    chunk_counter items, merges;
    ThreadPool* pool;
};

// Attention of token t's heads over cache rows r0 .. r0+nb-1 (nb >= 1) into the partials
// m, l [H] and o [H, Dv] (unnormalized).
void attn_block(const attn_job& j, int64_t t, int64_t r0, int64_t nb, float* m, float* l, float* o) {
    const gqa_layer& L = *j.L;
    const int64_t H = L.H, Hkv = L.Hkv, G = H / Hkv, Dk = L.Dk, Dv = L.Dv, KW = Hkv * Dk, VW = Hkv * Dv;
    thread_local std::vector<float> sc_buf, oc_buf;
    float* sc = grown(sc_buf, G * kChunkRows);  // [G, cn] scores, then probabilities
    float* oc = grown(oc_buf, G * Dv);          // [G, Dv] one chunk's values
    for (int64_t c0 = 0; c0 < nb; c0 += kChunkRows) {
        const int64_t cn = std::min(kChunkRows, nb - c0), r = r0 + c0;
        const int64_t r_next = r + cn, cn_next = std::min(kChunkRows, r0 + nb - r_next);
        for (int64_t g = 0; g < Hkv; g++) {
            const int64_t p0 = r_next + cn_next * g / Hkv, p1 = r_next + cn_next * (g + 1) / Hkv;
            prefetch_range(j.k_rows + p0 * KW, (p1 - p0) * KW);
            j.k->attn_scores(j.q + (t * H + g * G) * Dk, G, j.k_rows + r * KW + g * Dk, KW, cn, Dk, sc);
            for (int64_t i = 0; i < G; i++) {
                const int64_t h = g * G + i;
                float* s = sc + i * cn;
                float mx = -std::numeric_limits<float>::infinity();
                for (int64_t x = 0; x < cn; x++) mx = std::max(mx, s[x] *= L.kq_scale);
                if (c0 == 0) {
                    m[h] = mx;
                    l[h] = 0.f;
                } else if (mx > m[h]) {
                    const float f = std::exp(m[h] - mx);
                    l[h] *= f;
                    for (int64_t c = 0; c < Dv; c++) o[h * Dv + c] *= f;
                    m[h] = mx;
                }
                l[h] += j.k->exp_sum(s, cn, m[h]);
            }
            prefetch_range(j.v_rows + p0 * VW, (p1 - p0) * VW);
            float* og = o + g * G * Dv;
            j.k->attn_values(sc, G, j.v_rows + r * VW + g * Dv, VW, cn, Dv, c0 == 0 ? og : oc);
            if (c0 > 0)
                for (int64_t e = 0; e < G * Dv; e++) og[e] += oc[e];
        }
    }
}

void attn_worker(void* p, int ith, int nth) {
    attn_job& j = *(attn_job*)p;
    const gqa_layer& L = *j.L;
    const int64_t H = L.H, Dv = L.Dv;
    for (int64_t it = j.items.take(); it < j.T * j.blocks; it = j.items.take()) {
        const int64_t t = it / j.blocks, b = it % j.blocks, S = j.pos0 + t + 1;
        const int64_t r0 = S * b / j.blocks, nb = S * (b + 1) / j.blocks - r0;
        float* m = j.part_m + it * H;
        float* l = j.part_l + it * H;
        float* o = j.part_o + it * H * Dv;
        if (nb > 0) {
            attn_block(j, t, r0, nb, m, l, o);
        } else {
            std::fill_n(m, H, -std::numeric_limits<float>::infinity());
            std::fill_n(l, H, 0.f);
            std::fill_n(o, H * Dv, 0.f);
        }
    }
    j.pool->barrier();

    for (int64_t it = j.merges.take(); it < j.T * H; it = j.merges.take()) {
        const int64_t t = it / H, h = it % H;
        auto part = [&](int64_t b) { return (t * j.blocks + b) * H + h; };
        float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
        for (int64_t b = 0; b < j.blocks; b++) mx = std::max(mx, j.part_m[part(b)]);
        for (int64_t b = 0; b < j.blocks; b++) sum += j.part_l[part(b)] * std::exp(j.part_m[part(b)] - mx);
        float* out = j.o + it * Dv;
        std::fill_n(out, Dv, 0.f);
        for (int64_t b = 0; b < j.blocks; b++) {
            if (j.part_l[part(b)] == 0.f) continue;
            const float f = std::exp(j.part_m[part(b)] - mx) / sum;
            const float* po = j.part_o + part(b) * Dv;
            for (int64_t c = 0; c < Dv; c++) out[c] += f * po[c];
        }
    }
}

}  // namespace

void gqa_decode(ThreadPool& pool, const gqa_layer& L, const float* x, int64_t T, int64_t pos0, float* k_cache,
                float* v_cache, const float* rope, float* out) {
    if (T <= 0) return;
    const int64_t D = L.D, H = L.H, Hkv = L.Hkv, Dk = L.Dk, Dv = L.Dv, KW = Hkv * Dk, VW = Hkv * Dv;
    thread_local std::vector<float> h_buf, q_buf, o_buf, part_o, part_ml;
    float* h = grown(h_buf, T * D);
    float* q = grown(q_buf, T * H * Dk);
    float* o = grown(o_buf, T * H * Dv);

    rms_norm(x, D, L.attn_norm, h, D, T, D, L.eps);
    linear(pool, L.q, h, D, T, q, H * Dk);
    // k and v land in their cache rows directly; the job finishes them there
    linear(pool, L.k, h, D, T, k_cache + pos0 * KW, KW);
    linear(pool, L.v, h, D, T, v_cache + pos0 * VW, VW);
    // on this thread: a few microseconds a token, less than a job's barrier costs at T = 1
    for (int64_t t = 0; t < T; t++) {
        const int64_t pos = pos0 + t;
        finish_token(L, q + t * H * Dk, k_cache + pos * KW, v_cache + pos * VW, rope + pos * L.R);
    }

    // Row blocks per token: enough items for every worker (about 4 each over the tokens),
    // blocks of at least 32 rows.
    const int64_t min_rows = pos0 + 1;
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>((4 * pool.size() + T - 1) / T, (min_rows + 31) / 32));
    attn_job j;
    j.L = &L;
    j.k = &kernels();
    j.q = q;
    j.k_rows = k_cache;
    j.v_rows = v_cache;
    j.o = o;
    j.part_o = grown(part_o, T * blocks * H * Dv);
    j.part_m = grown(part_ml, 2 * T * blocks * H);
    j.part_l = j.part_m + T * blocks * H;
    j.T = T;
    j.pos0 = pos0;
    j.blocks = blocks;
    j.pool = &pool;
    pool.run(attn_worker, &j);

    linear(pool, L.o, o, H * Dv, T, out, D);
}

}  // namespace hybrid
