// Routed-expert engine: y[t] = sum_k w[t,k] * down_e(silu(gate_e x[t]) * up_e x[t]), e = ids[t,k].
//
// Letters: T tokens, K experts per token, E experts, D model dim, F expert FFN dim,
// S = T*K token-expert slots.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "pool.h"
#include "quants.h"

namespace hybrid {

struct moe_job;

// One projection of all experts of a layer, in GGUF layout: expert e, row r at
// data + e * expert_stride + r * row_stride (rows of `cols` elements of `type`).
struct expert_matrix {
    const uint8_t* data = nullptr;
    int type = -1;
    int64_t rows = 0, cols = 0;
    int64_t expert_stride = 0, row_stride = 0;
};

struct moe_layer {
    expert_matrix gate, up, down;  // gate/up: [E, F, D]; down: [E, D, F]
    int64_t E = 0, D = 0, F = 0;
    std::vector<uint8_t> skip;     // [E] 1 = computed elsewhere (e.g. on the GPU)
};

class MoEEngine {
   public:
    // max_tokens: largest T per call; max_k: largest K; d_model: D of every layer. Scratch is
    // sized for min(max_tokens, kTokenChunk) tokens: longer inputs are processed in chunks.
    MoEEngine(int threads, const std::vector<int>& cpus, int64_t max_tokens, int64_t max_k, int64_t d_model);
    ~MoEEngine();

    // Validates shapes and types; returns the layer id.
    int add_layer(int64_t E, const expert_matrix& gate, const expert_matrix& up, const expert_matrix& down);
    void set_skip(int layer, const uint8_t* skip, int64_t E);
    int n_layers() const { return (int)layers_.size(); }
    const moe_layer& layer(int i) const { return *layers_[i]; }

    // The engine's own input / output buffers, allocated once: x [max_tokens, D],
    // ids / weights [max_tokens * max_k] (read as [T, K] for a call with K), y [max_tokens, D].
    float* x() { return x_.data(); }
    int32_t* ids() { return ids_.data(); }
    float* weights() { return w_.data(); }
    float* y() { return y_.data(); }
    int64_t max_tokens() const { return max_tokens_; }
    int64_t max_k() const { return max_k_; }
    int64_t d_model() const { return d_model_; }

    // Starts the forward pass of `layer` on the first T rows of the buffers (K ids per row)
    // and returns at once. Throws std::invalid_argument on bad ids / sizes (before starting).
    void submit(int layer, int64_t T, int64_t K);
    // Blocks until the pending forward finished; y() then holds the result.
    void wait();
    bool busy() const { return pool_.busy(); }
    ThreadPool& pool() { return pool_; }

    static constexpr int64_t kTokenChunk = 512;

   private:
    static void worker(void* job, int ith, int nth);
    void group_chunk(moe_job& j);
    void ensure_scratch();

    ThreadPool pool_;
    int64_t max_tokens_, max_k_, d_model_, max_f_ = 0;
    std::vector<std::unique_ptr<moe_layer>> layers_;
    // I/O buffers
    std::vector<float> x_, w_, y_;
    std::vector<int32_t> ids_;
    // scratch, sized for one chunk of tokens
    std::vector<uint8_t> xq_gate_, xq_up_;   // [chunk, act row of D]
    std::vector<float> h_;                   // [chunk*K, F]
    std::vector<uint8_t> hq_;                // [chunk*K, act row of F]
    std::vector<int32_t> slot_list_;         // slots grouped by expert
    std::vector<int32_t> expert_begin_;      // [E+1] offsets into slot_list_
    std::vector<int32_t> cursor_;            // [E] fill positions while grouping
    std::vector<int32_t> active_;            // experts with at least one slot
    std::vector<int64_t> item_begin_;        // [active+1] gate/up work items per active expert
    std::unique_ptr<moe_job> job_;
};

}  // namespace hybrid
