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
struct moe_part;

// Rows [first_row, first_row + rows) of one projection of all experts of a layer, in GGUF
// layout: expert e, row r at data + e * expert_stride + (r - first_row) * row_stride (rows of
// `cols` elements of `type`). A whole GGUF tensor has first_row 0; a NUMA slice does not.
struct expert_matrix {
    const uint8_t* data = nullptr;
    int type = -1;
    int64_t first_row = 0, rows = 0, cols = 0;
    int64_t expert_stride = 0, row_stride = 0;
    const uint8_t* row(int64_t e, int64_t r) const { return data + e * expert_stride + (r - first_row) * row_stride; }
};

// One partition's share of a layer (a partition = a NUMA node's worker group): gate/up rows
// [f0, f1) and down rows [d0, d1) of every expert. Its workers compute exactly those rows, so
// every output element is computed once, by the same dot as with one partition.
struct moe_slice {
    expert_matrix gate, up, down;
    int64_t f0 = 0, f1 = 0, d0 = 0, d1 = 0;
};

struct moe_layer {
    int64_t E = 0, D = 0, F = 0;
    std::vector<moe_slice> parts;  // one per engine partition, covering F and D in order
    std::vector<uint8_t> skip;     // [E] 1 = computed elsewhere (e.g. on the GPU)
    int gate_type() const { return parts[0].gate.type; }
    int up_type() const { return parts[0].up.type; }
    int down_type() const { return parts[0].down.type; }
};

class MoEEngine {
   public:
    // partition_cpus[p]: the CPUs partition p's workers are pinned to (-1: not pinned), one
    // worker per entry. max_tokens: largest T per call; max_k: largest K; d_model: D of every
    // layer. Scratch is sized for min(max_tokens, kTokenChunk) tokens: longer inputs are
    // processed in chunks. The slots of a token are min(K, E) per layer (K <= E is checked),
    // so a one-expert layer (a dense FFN, the shared experts) sizes its h rows for 1.
    MoEEngine(const std::vector<std::vector<int>>& partition_cpus, int64_t max_tokens, int64_t max_k,
              int64_t d_model);
    ~MoEEngine();

    // Validates shapes, types and coverage; returns the layer id. One slice per partition.
    int add_layer(int64_t E, int64_t F, const std::vector<moe_slice>& parts);
    int n_partitions() const { return (int)part_threads_.size(); }
    const std::vector<int>& partition_threads() const { return part_threads_; }
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
    // Bytes of the engine's own buffers (the I/O buffers and a chunk's scratch, once a forward
    // has sized it): what placement/solver.py's expert_engine_bytes counts for the Plan.
    int64_t buffer_bytes() const;

    // Starts the forward pass of `layer` on the first T rows of the buffers (K ids per row)
    // and returns at once. Throws std::invalid_argument on bad ids / sizes (before starting).
    // shared_layer >= 0: that layer's expert 0 (the shared experts registered as a one-expert
    // layer) is added for every token with weight 1, in the same job, after the routed ones.
    void submit(int layer, int64_t T, int64_t K, int shared_layer = -1);
    // Blocks until the pending forward finished; y() then holds the result.
    void wait();
    // submit + wait with the calling thread working as one of the workers (no GPU to overlap).
    void forward(int layer, int64_t T, int64_t K, int shared_layer = -1);
    bool busy() const { return pool_.busy(); }
    ThreadPool& pool() { return pool_; }

    // Tokens per chunk of a call: a longer chunk gives each expert more tokens per tile (the
    // row-group rewrite of its weights is shared by more of them). Zen 4, 2 threads, 256
    // experts of 2048 x 1024 Q4_K/Q4_K/Q6_K, top-8 (DeepSeek's density), 2048-token calls,
    // medians of 3 alternating processes: chunks of 2048 vs 512 run 1.17x (AVX-512 groups) and
    // 1.11x (AVX2). The runtime's prefill chunk (--prefill-chunk, the engine's max_tokens)
    // decides how many tokens a call has; the scratch follows min(max_tokens, kTokenChunk).
    static constexpr int64_t kTokenChunk = 2048;

   private:
    static void worker(void* job, int ith, int nth);
    static void run_part(moe_job& j, const moe_part& P, bool accumulate, int ith, int nth);
    void group_chunk(moe_job& j, const moe_part& P);
    void ensure_scratch();
    bool prepare(int layer, int64_t T, int64_t K, int shared_layer);  // validates, fills job_; false when T == 0

    std::vector<int> part_threads_;   // workers per partition
    std::vector<int> part_of_;        // partition of each worker
    std::vector<int> part_first_;     // first worker of each partition (a partition's are contiguous)
    ThreadPool pool_;
    int64_t max_tokens_, max_k_, d_model_;
    std::vector<std::unique_ptr<moe_layer>> layers_;
    // I/O buffers
    std::vector<float> x_, w_, y_;
    std::vector<int32_t> ids_;  // [max_tokens * (max_k + 1)]: room for an always-on expert
    // scratch, sized for one chunk of tokens
    std::vector<uint8_t> xq_gate_, xq_up_;   // [chunk, act row of D]
    std::vector<float> h_;                   // [chunk*K, F]
    std::vector<uint8_t> hq_;                // [chunk*K, act row of F]
    std::vector<int32_t> slot_list_;         // slots grouped by expert
    std::vector<int32_t> expert_begin_;      // [E+1] offsets into slot_list_
    std::vector<int32_t> cursor_;            // [E] fill positions while grouping
    std::vector<int32_t> active_;            // experts with at least one slot
    std::vector<int64_t> slot_chunk_begin_;  // [active+1] prefix of 64-slot chunks per active expert
    std::unique_ptr<moe_job> job_;
};

}  // namespace hybrid
