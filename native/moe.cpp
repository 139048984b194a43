// Routed-expert engine. One forward = for each part (the routed layer, then optionally a
// one-expert layer added for every token: the shared experts) and each chunk of tokens,
// four phases on the pool; items are handed out by range_counter (each worker streams its
// own contiguous share first):
//   A quantize x rows (once, reused by gate and up)        all workers, split by token
//   B fused gate/up + SiLU*mul into h[slot, F]             each partition its own F rows,
//                                                          items = (expert, 16-128 rows, 64 slots)
//   C quantize h rows for down                             all workers, split by slot
//   D down rows, weighted sum over experts into y          each partition its own D rows,
//                                                          items = 16-128 rows
// Every output element is accumulated by one thread in a fixed order (experts ascending)
// with the same dot products whatever the partitioning, so results are bit-identical for
// any thread count and any number of NUMA partitions.
#include "moe.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "dispatch.h"
#include "gemm.h"

namespace hybrid {

namespace {
// Weight rows per work item: long contiguous runs for the prefetchers (the T=1 matmul went
// from ~0.65 to ~0.8 of the read bandwidth with 128 instead of 16 rows), but at least 8
// items per worker for balance.
constexpr int64_t kMaxItemRows = 128;
int64_t rows_per_item(int64_t rows, int threads) {
    const int64_t t = rows / (8 * (int64_t)threads) / 16 * 16;
    return std::max<int64_t>(16, std::min<int64_t>(kMaxItemRows, t));
}
constexpr int64_t kSlots = 64;  // token slots per gate/up work item

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

void check_matrix(const expert_matrix& m, const std::string& name, int64_t first, int64_t rows, int64_t cols) {
    const type_info& ti = get_type_info(m.type);
    if (!ti.name) bad(name + ": GGML type " + std::to_string(m.type) + " is not supported");
    if (m.cols != cols) bad(name + ": rows of " + std::to_string(m.cols) + " elements, expected " + std::to_string(cols));
    if (m.first_row > first || m.first_row + m.rows < first + rows)
        bad(name + ": holds rows " + std::to_string(m.first_row) + ".." + std::to_string(m.first_row + m.rows) +
            " but must cover " + std::to_string(first) + ".." + std::to_string(first + rows));
    if (cols % ti.block) bad(name + ": row length is not a multiple of the " + ti.name + " block");
    if (m.row_stride < row_bytes(m.type, cols) || m.expert_stride < m.row_stride * m.rows)
        bad(name + ": strides are smaller than the rows they hold");
    if (!m.data) bad(name + ": null data");
}

}  // namespace

// One layer's share of a forward: its ids / weights are [T, K] at ids_ / w_ + ids_off.
struct moe_part {
    const moe_layer* L = nullptr;
    int64_t K = 0, ids_off = 0;
    act_format act_gate = ACT_F32, act_up = ACT_F32, act_down = ACT_F32;
    int64_t xg_bytes = 0, xu_bytes = 0, hq_bytes = 0;
};

struct moe_job {
    MoEEngine* eng;
    const kernel_table* k;
    int64_t T;
    moe_part parts[2];  // the routed layer, then optionally an always-on one (shared experts)
    int n_parts = 1;
    // per chunk, written by worker 0 between barriers
    int64_t t0 = 0, tc = 0, n_slots = 0;
    std::vector<range_counter> items, down_items;        // one per partition
    std::vector<int64_t> rows_b, rows_d;                 // rows per item, per partition
};

void MoEEngine::group_chunk(moe_job& j, const moe_part& P) {
    const moe_layer& L = *P.L;
    const int32_t* ids = ids_.data() + P.ids_off + j.t0 * P.K;
    const int64_t S = j.tc * P.K;
    int32_t* begin = expert_begin_.data();
    std::fill(begin, begin + L.E + 1, 0);
    for (int64_t s = 0; s < S; s++) {
        const int32_t e = ids[s];
        if (e >= 0 && !L.skip[e]) begin[e + 1]++;
    }
    for (int64_t e = 0; e < L.E; e++) begin[e + 1] += begin[e];
    j.n_slots = begin[L.E];
    // slot lists, stable: slots ascending within an expert
    int32_t* cursor = cursor_.data();
    std::copy(begin, begin + L.E, cursor);
    for (int64_t s = 0; s < S; s++) {
        const int32_t e = ids[s];
        if (e >= 0 && !L.skip[e]) slot_list_[cursor[e]++] = (int32_t)s;
    }
    active_.clear();
    slot_chunk_begin_.clear();
    int64_t chunks = 0;
    for (int64_t e = 0; e < L.E; e++) {
        const int64_t n = begin[e + 1] - begin[e];
        if (!n) continue;
        active_.push_back((int32_t)e);
        slot_chunk_begin_.push_back(chunks);
        chunks += (n + kSlots - 1) / kSlots;
    }
    slot_chunk_begin_.push_back(chunks);
    for (int p = 0; p < n_partitions(); p++) {
        const moe_slice& sl = L.parts[p];
        j.rows_b[p] = rows_per_item((sl.f1 - sl.f0) * (int64_t)active_.size(), part_threads_[p]);
        j.rows_d[p] = rows_per_item(sl.d1 - sl.d0, part_threads_[p]);
        const int64_t n_b = (sl.f1 - sl.f0 + j.rows_b[p] - 1) / j.rows_b[p] * slot_chunk_begin_.back();
        j.items[p].reset(n_b, part_threads_[p]);
        j.down_items[p].reset((sl.d1 - sl.d0 + j.rows_d[p] - 1) / j.rows_d[p], part_threads_[p]);
    }
}

void MoEEngine::worker(void* p, int ith, int nth) {
    moe_job& j = *(moe_job*)p;
    for (int pi = 0; pi < j.n_parts; pi++) run_part(j, j.parts[pi], pi > 0, ith, nth);
}

// The four phases of one part; `accumulate`: add to y (a previous part wrote it) instead
// of overwriting it, element by element in the same order, so y = y_part0 + y_part1 exactly
// as two calls and a float add would give.
void MoEEngine::run_part(moe_job& j, const moe_part& P, bool accumulate, int ith, int nth) {
    MoEEngine& m = *j.eng;
    const moe_layer& L = *P.L;
    const kernel_table& k = *j.k;
    const int64_t D = L.D, F = L.F, K = P.K;
    const int part = m.part_of_[ith];
    const int local = ith - m.part_first_[part];  // this worker's index within its partition
    const moe_slice& sl = L.parts[part];
    const int64_t chunk = std::min(m.max_tokens_, MoEEngine::kTokenChunk);
    const bool same_act = P.act_gate == P.act_up;
    const dot_fn dot_gate = k.dot[L.gate_type()], dot_up = k.dot[L.up_type()], dot_down = k.dot[L.down_type()];
    const dot4_fn dot4_gate = k.dot4[L.gate_type()], dot4_up = k.dot4[L.up_type()], dot4_down = k.dot4[L.down_type()];
    const gemm_tile_fn gemm_gate = gemm_tile_for(k, L.gate_type()), gemm_up = gemm_tile_for(k, L.up_type()),
                       gemm_down = gemm_tile_for(k, L.down_type());

    for (int64_t t0 = 0; t0 < j.T; t0 += chunk) {
        if (ith == 0) {
            j.t0 = t0;
            j.tc = std::min(chunk, j.T - t0);
            m.group_chunk(j, P);
        }
        // A: quantize activations
        const int64_t tc = std::min(chunk, j.T - t0);
        for (int64_t t = ith; t < tc; t += nth) {
            const float* xr = m.x_.data() + (t0 + t) * m.d_model_;
            k.quant_act[P.act_gate](xr, m.xq_gate_.data() + t * P.xg_bytes, D);
            if (!same_act) k.quant_act[P.act_up](xr, m.xq_up_.data() + t * P.xu_bytes, D);
        }
        m.pool_.barrier();
        const uint8_t* xq_gate = m.xq_gate_.data();
        const uint8_t* xq_up = same_act ? m.xq_gate_.data() : m.xq_up_.data();
        const int64_t xu_bytes = same_act ? P.xg_bytes : P.xu_bytes;
        const int64_t n_active = (int64_t)m.active_.size();
        const int32_t* slot_list = m.slot_list_.data();
        const int32_t* begin = m.expert_begin_.data();
        // B: gate/up rows [f0, f1) of this partition
        const int64_t rows_b = j.rows_b[part], rows_d = j.rows_d[part];
        const int64_t f_chunks = (sl.f1 - sl.f0 + rows_b - 1) / rows_b;
        const int64_t n_items = f_chunks * m.slot_chunk_begin_[n_active];
        for (int64_t it = j.items[part].take(local); it < n_items; it = j.items[part].take(local)) {
            const int64_t sc = it / f_chunks;
            const int64_t a = std::upper_bound(m.slot_chunk_begin_.begin(), m.slot_chunk_begin_.begin() + n_active + 1, sc) -
                              m.slot_chunk_begin_.begin() - 1;
            const int64_t local = it - f_chunks * m.slot_chunk_begin_[a];
            const int32_t e = m.active_[a];
            const int32_t* slots = slot_list + begin[e];
            const int64_t n_e = begin[e + 1] - begin[e];
            const int64_t f0 = sl.f0 + (local % f_chunks) * rows_b, f1 = std::min(sl.f1, f0 + rows_b);
            const int64_t s0 = (local / f_chunks) * kSlots, s1 = std::min(n_e, s0 + kSlots);
            // the item's activation rows and h rows, once for all its weight rows (a division
            // per slot and row had cost prefill ~a third of its gate/up time)
            const void *ag[kSlots], *au[kSlots];
            float* hs[kSlots];
            for (int64_t i = s0; i < s1; i++) {
                const int64_t t = slots[i] / K;
                ag[i - s0] = xq_gate + t * P.xg_bytes;
                au[i - s0] = xq_up + t * xu_bytes;
                hs[i - s0] = m.h_.data() + slots[i] * F;
            }
            const int64_t ns = s1 - s0;
            // gate and up values gather in tiles, row by row, silu(gate) * up goes over the whole
            // tile in one call, and the h values go to the slots' h rows at the end: the h rows
            // are F floats apart (4 KiB for F = 1024), so storing into them row by row hit one L1
            // set with every slot and missed on nearly every store
            float tile[kMaxItemRows * kSlots], up[kMaxItemRows * kSlots];
            if (gemm_gate && gemm_up && ns > 1) {  // decode (one slot) keeps the plain dots
                gemm_gate(D, sl.gate.row(e, f0), sl.gate.row_stride, f1 - f0, ag, ns, tile, ns, 1);
                gemm_up(D, sl.up.row(e, f0), sl.up.row_stride, f1 - f0, au, ns, up, ns, 1);
            } else
            for (int64_t f = f0; f < f1; f++) {
                const uint8_t* grow = sl.gate.row(e, f);
                const uint8_t* urow = sl.up.row(e, f);
                const int64_t o = (f - f0) * ns;
                int64_t i = 0;
                if (dot4_gate && dot4_up)  // unpack each weight block once for 4 slots
                    for (; i + 4 <= ns; i += 4) {
                        dot4_gate(D, grow, ag + i, tile + o + i);
                        dot4_up(D, urow, au + i, up + o + i);
                    }
                for (; i < ns; i++) tile[o + i] = dot_gate(D, grow, ag[i]), up[o + i] = dot_up(D, urow, au[i]);
            }
            k.silu_mul((f1 - f0) * ns, tile, up, tile);
            for (int64_t i = 0; i < ns; i++)
                for (int64_t f = f0; f < f1; f++) hs[i][f] = tile[(f - f0) * ns + i];
        }
        m.pool_.barrier();
        // C: quantize the h rows of the slots in use
        for (int64_t i = ith; i < j.n_slots; i += nth) {
            const int64_t s = slot_list[i];
            k.quant_act[P.act_down](m.h_.data() + s * F, m.hq_.data() + s * P.hq_bytes, F);
        }
        m.pool_.barrier();
        // D: down rows [d0, d1) of this partition, weighted sum with experts ascending
        const int64_t d_chunks = (sl.d1 - sl.d0 + rows_d - 1) / rows_d;
        const float* wts = m.w_.data() + P.ids_off + t0 * K;
        float* y = m.y_.data() + t0 * m.d_model_;
        for (int64_t it = j.down_items[part].take(local); it < d_chunks; it = j.down_items[part].take(local)) {
            const int64_t d0 = sl.d0 + it * rows_d, d1 = std::min(sl.d1, d0 + rows_d);
            if (!accumulate)
                for (int64_t t = 0; t < tc; t++) std::fill(y + t * m.d_model_ + d0, y + t * m.d_model_ + d1, 0.f);
            for (int64_t a = 0; a < n_active; a++) {
                const int32_t e = m.active_[a];
                const int32_t* slots = slot_list + begin[e];
                const int64_t n_e = begin[e + 1] - begin[e];
                // kSlots of this expert's slots at a time: their h rows, output rows and weights
                // once for all rows d (per output element the slots still add in ascending order)
                for (int64_t i0 = 0; i0 < n_e; i0 += kSlots) {
                    const int64_t ns = std::min(kSlots, n_e - i0);
                    const void* ah[kSlots];
                    float* yo[kSlots];
                    float ws[kSlots];
                    for (int64_t i = 0; i < ns; i++) {
                        const int64_t s = slots[i0 + i];
                        ah[i] = m.hq_.data() + s * P.hq_bytes;
                        yo[i] = y + (s / K) * m.d_model_;
                        ws[i] = wts[s];
                    }
                    // the dots gather in a tile first (see B: the output rows are D floats apart)
                    float tile[kMaxItemRows * kSlots];
                    if (gemm_down && ns > 1)
                        gemm_down(F, sl.down.row(e, d0), sl.down.row_stride, d1 - d0, ah, ns, tile, ns, 1);
                    else
                    for (int64_t d = d0; d < d1; d++) {
                        const uint8_t* drow = sl.down.row(e, d);
                        float* od = tile + (d - d0) * ns;
                        int64_t i = 0;
                        if (dot4_down)
                            for (; i + 4 <= ns; i += 4) dot4_down(F, drow, ah + i, od + i);
                        for (; i < ns; i++) od[i] = dot_down(F, drow, ah[i]);
                    }
                    for (int64_t i = 0; i < ns; i++)
                        for (int64_t d = d0; d < d1; d++) yo[i][d] += ws[i] * tile[(d - d0) * ns + i];
                }
            }
        }
        m.pool_.barrier();  // the next chunk's grouping rewrites the lists read above
    }
}

static std::vector<int> flatten_cpus(const std::vector<std::vector<int>>& parts) {
    std::vector<int> cpus;
    for (auto& p : parts) cpus.insert(cpus.end(), p.begin(), p.end());
    return cpus;
}

static int count_threads(const std::vector<std::vector<int>>& parts) {
    if (parts.empty()) bad("at least one partition of workers is needed");
    size_t n = 0;
    for (auto& p : parts) {
        if (p.empty()) bad("every partition needs at least one worker");
        n += p.size();
    }
    return (int)n;
}

MoEEngine::MoEEngine(const std::vector<std::vector<int>>& partition_cpus, int64_t max_tokens, int64_t max_k,
                     int64_t d_model)
    : pool_(count_threads(partition_cpus), flatten_cpus(partition_cpus)),
      max_tokens_(max_tokens),
      max_k_(max_k),
      d_model_(d_model) {
    if (max_tokens < 1) bad("max_tokens must be >= 1");
    if (max_k < 1) bad("max_k must be >= 1");
    if (d_model < 1) bad("d_model must be >= 1");
    for (size_t p = 0; p < partition_cpus.size(); p++) {
        part_threads_.push_back((int)partition_cpus[p].size());
        part_first_.push_back((int)part_of_.size());
        for (size_t i = 0; i < partition_cpus[p].size(); i++) part_of_.push_back((int)p);
    }
    x_.assign(max_tokens * d_model, 0.f);
    y_.assign(max_tokens * d_model, 0.f);
    ids_.assign(max_tokens * (max_k + 1), -1);  // + one always-on expert per token
    w_.assign(max_tokens * (max_k + 1), 0.f);
    job_ = std::make_unique<moe_job>();
    for (size_t p = 0; p < partition_cpus.size(); p++) {
        job_->items.emplace_back((int)partition_cpus[p].size());
        job_->down_items.emplace_back((int)partition_cpus[p].size());
    }
    job_->rows_b.assign(partition_cpus.size(), 16);
    job_->rows_d.assign(partition_cpus.size(), 16);
}

MoEEngine::~MoEEngine() { pool_.wait(); }

int MoEEngine::add_layer(int64_t E, int64_t F, const std::vector<moe_slice>& parts) {
    if (busy()) bad("add_layer while a forward is pending");
    if (E < 1 || E > (1 << 20)) bad("expert count " + std::to_string(E) + " is out of range");
    if (F < 1) bad("expert FFN size must be positive");
    if ((int)parts.size() != n_partitions())
        bad("expected " + std::to_string(n_partitions()) + " slices (one per partition), got " + std::to_string(parts.size()));
    const int64_t D = d_model_;
    int64_t f_next = 0, d_next = 0;
    for (size_t p = 0; p < parts.size(); p++) {
        const moe_slice& s = parts[p];
        const std::string tag = parts.size() > 1 ? " (partition " + std::to_string(p) + ")" : "";
        if (s.f0 != f_next || s.f1 < s.f0 || s.d0 != d_next || s.d1 < s.d0)
            bad("slices must cover F and D in order" + tag);
        f_next = s.f1;
        d_next = s.d1;
        check_matrix(s.gate, "gate" + tag, s.f0, s.f1 - s.f0, D);
        check_matrix(s.up, "up" + tag, s.f0, s.f1 - s.f0, D);
        check_matrix(s.down, "down" + tag, s.d0, s.d1 - s.d0, F);
        if (s.gate.type != parts[0].gate.type || s.up.type != parts[0].up.type || s.down.type != parts[0].down.type)
            bad("all slices of a layer must have the same types" + tag);
    }
    if (f_next != F || d_next != D) bad("slices cover F=" + std::to_string(f_next) + ", D=" + std::to_string(d_next) +
                                        " instead of F=" + std::to_string(F) + ", D=" + std::to_string(D));
    auto L = std::make_unique<moe_layer>();
    L->E = E;
    L->D = D;
    L->F = F;
    L->parts = parts;
    L->skip.assign(E, 0);
    layers_.push_back(std::move(L));
    return (int)layers_.size() - 1;
}

void MoEEngine::set_skip(int layer, const uint8_t* skip, int64_t E) {
    if (busy()) bad("set_skip while a forward is pending");
    if (layer < 0 || layer >= n_layers()) bad("layer " + std::to_string(layer) + " does not exist");
    moe_layer& L = *layers_[layer];
    if (E != L.E) bad("mask: expected " + std::to_string(L.E) + " entries, got " + std::to_string(E));
    L.skip.assign(skip, skip + E);
}

void MoEEngine::ensure_scratch() {
    const int64_t chunk = std::min(max_tokens_, kTokenChunk);
    int64_t xg = 0, xu = 0, h = 0, hq = 0, E = 0;
    for (auto& L : layers_) {
        const int64_t slots = std::min(max_k_, L->E);  // per token: a one-expert layer has 1
        xg = std::max(xg, act_row_bytes(get_type_info(L->gate_type()).act, L->D));
        xu = std::max(xu, act_row_bytes(get_type_info(L->up_type()).act, L->D));
        h = std::max(h, slots * L->F);
        hq = std::max(hq, slots * act_row_bytes(get_type_info(L->down_type()).act, L->F));
        E = std::max(E, L->E);
    }
    auto grow = [](auto& v, int64_t n) {
        if ((int64_t)v.size() < n) v.resize(n);
    };
    grow(xq_gate_, chunk * xg);
    grow(xq_up_, chunk * xu);
    grow(h_, chunk * h);
    grow(hq_, chunk * hq);
    grow(slot_list_, chunk * max_k_);
    grow(expert_begin_, E + 1);
    grow(cursor_, E);
    active_.reserve(E);
    slot_chunk_begin_.reserve(E + 1);
}

int64_t MoEEngine::buffer_bytes() const {
    auto bytes = [](const auto& v) { return (int64_t)(v.capacity() * sizeof(v[0])); };
    return bytes(x_) + bytes(y_) + bytes(w_) + bytes(ids_) + bytes(xq_gate_) + bytes(xq_up_) + bytes(h_) +
           bytes(hq_) + bytes(slot_list_) + bytes(expert_begin_) + bytes(cursor_) + bytes(active_) +
           bytes(slot_chunk_begin_);
}

bool MoEEngine::prepare(int layer, int64_t T, int64_t K, int shared_layer) {
    if (busy()) bad("submit while a forward is pending: call wait() first");
    if (layer < 0 || layer >= n_layers()) bad("layer " + std::to_string(layer) + " does not exist");
    if (shared_layer >= n_layers() || shared_layer == layer)
        bad("shared layer " + std::to_string(shared_layer) + " does not exist or is the routed layer");
    if (T < 0 || T > max_tokens_) bad("T=" + std::to_string(T) + " exceeds max_tokens " + std::to_string(max_tokens_));
    if (K < 1 || K > max_k_) bad("K=" + std::to_string(K) + " is outside 1.." + std::to_string(max_k_));
    const moe_layer& L = *layers_[layer];
    if (K > L.E) bad("ids: " + std::to_string(K) + " experts per token, but the layer has " + std::to_string(L.E));
    for (int64_t i = 0; i < T * K; i++)
        if (ids_[i] >= L.E) bad("ids: expert id " + std::to_string(ids_[i]) + " >= E=" + std::to_string(L.E));
    ensure_scratch();
    moe_job& j = *job_;
    j.eng = this;
    j.k = &kernels();
    j.T = T;
    auto describe = [](moe_part& P, const moe_layer& Lp, int64_t Kp, int64_t off) {
        P.L = &Lp;
        P.K = Kp;
        P.ids_off = off;
        P.act_gate = get_type_info(Lp.gate_type()).act;
        P.act_up = get_type_info(Lp.up_type()).act;
        P.act_down = get_type_info(Lp.down_type()).act;
        P.xg_bytes = act_row_bytes(P.act_gate, Lp.D);
        P.xu_bytes = act_row_bytes(P.act_up, Lp.D);
        P.hq_bytes = act_row_bytes(P.act_down, Lp.F);
    };
    describe(j.parts[0], L, K, 0);
    j.n_parts = 1;
    if (shared_layer >= 0) {  // expert 0 of that layer, weight 1, for every token
        std::fill(ids_.begin() + T * K, ids_.begin() + T * K + T, 0);
        std::fill(w_.begin() + T * K, w_.begin() + T * K + T, 1.f);
        describe(j.parts[1], *layers_[shared_layer], 1, T * K);
        j.n_parts = 2;
    }
    return T > 0;
}

void MoEEngine::submit(int layer, int64_t T, int64_t K, int shared_layer) {
    if (prepare(layer, T, K, shared_layer)) pool_.submit(&MoEEngine::worker, job_.get());
}

void MoEEngine::forward(int layer, int64_t T, int64_t K, int shared_layer) {
    if (prepare(layer, T, K, shared_layer)) pool_.run(&MoEEngine::worker, job_.get());
}

void MoEEngine::wait() { pool_.wait(); }

}  // namespace hybrid
