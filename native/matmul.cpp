// Quantized matmul: quantize activations once, then tiles of (rows x tokens) dot products
// handed out dynamically. Each output element is one dot product computed by one thread, so
// results do not depend on the thread count.
#include "matmul.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "gemm.h"

namespace hybrid {

namespace {

// Weight rows per tile: long enough runs of contiguous rows for the hardware prefetchers
// (16 rows measured ~0.1 below 128 in read-bandwidth ratio at T=1), while leaving at least
// 8 tiles per worker for load balance on noisy machines.
int64_t row_tile(int64_t N, int nth) {
    const int64_t t = N / (8 * (int64_t)nth) / 16 * 16;
    return std::max<int64_t>(16, std::min<int64_t>(128, t));
}
constexpr int64_t kTokenTile = 64;  // tokens per tile: their activations stay in L2

}  // namespace

void quantize_act_row(act_format f, const void* x, bool x_bf16, int64_t K, void* dst, float* scratch) {
    const kernel_table& k = kernels();
    const float* xf = (const float*)x;
    if (x_bf16) {
        k.dequant[GGML_BF16](x, scratch, K);
        xf = scratch;
    }
    k.quant_act[f](xf, dst, K);
}

void matmul_check(const matmul_args& a) {
    const type_info& ti = get_type_info(a.w_type);
    if (!ti.name || a.w_type == GGML_Q8_K)
        throw std::invalid_argument("matmul: weight type " + std::to_string(a.w_type) +
                                    " is not supported (supported: " + supported_type_names() + ")");
    if (a.K <= 0 || a.N <= 0 || a.T < 0 || a.batch < 0) throw std::invalid_argument("matmul: empty or negative shape");
    if (a.K % ti.block != 0)
        throw std::invalid_argument("matmul: K=" + std::to_string(a.K) + " is not a multiple of the " +
                                    ti.name + " block size " + std::to_string(ti.block));
    if (row_bytes(a.w_type, a.K) > a.w_stride)
        throw std::invalid_argument("matmul: weight rows are shorter than K elements of " + std::string(ti.name));
}

void matmul(ThreadPool& pool, const matmul_args& a) {
    matmul_check(a);
    if (a.T == 0 || a.batch == 0) return;
    const kernel_table& k = kernels();
    const act_format act = get_type_info(a.w_type).act;
    const int64_t act_bytes = act_row_bytes(act, a.K);
    const int64_t x_batches = a.x_bstride ? a.batch : 1;  // activation sets to quantize

    // Scratch lives in the calling thread and only grows: no allocation in steady state.
    thread_local std::vector<uint8_t> act_buf;
    thread_local int tiles_cap = 0;
    thread_local std::vector<std::vector<float>> scratch;
    if ((int64_t)act_buf.size() < x_batches * a.T * act_bytes) act_buf.resize(x_batches * a.T * act_bytes);
    if ((int)scratch.size() < pool.size()) scratch.resize(pool.size());
    if (a.x_bf16)
        for (auto& s : scratch)
            if ((int64_t)s.size() < a.K) s.resize(a.K);

    struct job_t {
        const matmul_args* a;
        const kernel_table* k;
        act_format act;
        int64_t act_bytes, x_batches;
        uint8_t* act_buf;
        std::vector<std::vector<float>>* scratch;
        int64_t row_tile, n_row_tiles, n_tok_tiles;
        range_counter* tiles;
        ThreadPool* pool;
    } job;
    job.a = &a;
    job.k = &k;
    job.act = act;
    job.act_bytes = act_bytes;
    job.x_batches = x_batches;
    job.act_buf = act_buf.data();
    job.scratch = &scratch;
    job.row_tile = row_tile(a.N * a.batch, pool.size());
    job.n_row_tiles = (a.N + job.row_tile - 1) / job.row_tile;
    job.n_tok_tiles = (a.T + kTokenTile - 1) / kTokenTile;
    job.pool = &pool;
    thread_local std::unique_ptr<range_counter> tiles;
    if (!tiles || tiles_cap < pool.size()) {
        tiles = std::make_unique<range_counter>(pool.size());
        tiles_cap = pool.size();
    }
    job.tiles = tiles.get();
    job.tiles->reset(job.n_row_tiles * job.n_tok_tiles * a.batch, pool.size());

    auto worker = [](void* p, int ith, int nth) {
        job_t& j = *(job_t*)p;
        const matmul_args& a = *j.a;
        const int64_t esize = a.x_bf16 ? 2 : 4;
        for (int64_t i = ith; i < j.x_batches * a.T; i += nth) {
            const int64_t b = i / a.T, t = i % a.T;
            const char* xr = (const char*)a.x + (b * a.x_bstride + t * a.x_stride) * esize;
            const float* xf = (const float*)xr;
            if (a.x_bf16) {
                float* s = (*j.scratch)[ith].data();
                j.k->dequant[GGML_BF16](xr, s, a.K);
                xf = s;
            }
            j.k->quant_act[j.act](xf, j.act_buf + i * j.act_bytes, a.K);
        }
        j.pool->barrier();
        const dot_fn dot = j.k->dot[a.w_type];
        const dot4_fn dot4 = j.k->dot4[a.w_type];
        const gemm_tile_fn gemm = gemm_tile_for(*j.k, a.w_type);
        const int64_t per_batch = j.n_row_tiles * j.n_tok_tiles;
        const int64_t n_tiles = per_batch * a.batch;
        for (int64_t tile = j.tiles->take(ith); tile < n_tiles; tile = j.tiles->take(ith)) {
            // Row tiles vary fastest: with many tokens, neighbouring workers share activations.
            const int64_t b = tile / per_batch, in_b = tile % per_batch;
            const int64_t r0 = (in_b % j.n_row_tiles) * j.row_tile;
            const int64_t t0 = (in_b / j.n_row_tiles) * kTokenTile;
            const int64_t r1 = std::min(a.N, r0 + j.row_tile), t1 = std::min(a.T, t0 + kTokenTile);
            const uint8_t* w = a.w + b * a.w_bstride;
            const uint8_t* acts = j.act_buf + (a.x_bstride ? b : 0) * a.T * j.act_bytes;
            float* y = a.y + b * a.y_bstride;
            if (gemm && t1 - t0 > 1) {  // decode (one token) keeps the plain dot
                const void* act[kTokenTile];
                for (int64_t t = t0; t < t1; t++) act[t - t0] = acts + t * j.act_bytes;
                gemm(a.K, w + r0 * a.w_stride, a.w_stride, r1 - r0, act, t1 - t0, y + t0 * a.y_stride + r0, 1, a.y_stride);
                continue;
            }
            for (int64_t r = r0; r < r1; r++) {
                const uint8_t* wr = w + r * a.w_stride;
                int64_t t = t0;
                if (dot4)  // unpack each weight block once for 4 tokens
                    for (; t + 4 <= t1; t += 4) {
                        const void* act[4];
                        float o[4];
                        for (int i = 0; i < 4; i++) act[i] = acts + (t + i) * j.act_bytes;
                        dot4(a.K, wr, act, o);
                        for (int i = 0; i < 4; i++) y[(t + i) * a.y_stride + r] = o[i];
                    }
                for (; t < t1; t++) y[t * a.y_stride + r] = dot(a.K, wr, acts + t * j.act_bytes);
            }
        }
    };
    pool.run(worker, &job);
}

matmul_args linear_args(const qlinear& W, const float* x, int64_t x_stride, int64_t T, float* y, int64_t y_stride) {
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
    return a;
}

void linear(ThreadPool& pool, const qlinear& W, const float* x, int64_t x_stride, int64_t T, float* y,
            int64_t y_stride) {
    matmul(pool, linear_args(W, x, x_stride, T, y, y_stride));
}

}  // namespace hybrid
