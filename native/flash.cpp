// The driver of flash.h: work items, their order, per-worker scratch.
#include "flash.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"

namespace hybrid {

namespace {

void flash_check(const flash_args& a) {
    auto bad = [](const std::string& m) { throw std::invalid_argument("flash_attention: " + m); };
    if (a.H <= 0 || a.Hkv <= 0 || a.H % a.Hkv)
        bad("q has " + std::to_string(a.H) + " heads, v " + std::to_string(a.Hkv) +
            ": the query heads must be a positive multiple of the kv heads");
    if (a.T < 0 || a.pos0 < 0 || a.S < a.pos0 + a.T)
        bad("the cache holds " + std::to_string(a.S) + " keys; tokens at positions " + std::to_string(a.pos0) +
            " .. " + std::to_string(a.pos0 + a.T - 1) + " need them all");
    if (a.dk[0] <= 0 || a.dk[1] < 0 || a.dv <= 0) bad("key and value dims must be positive");
    if (!a.q[0] || !a.k[0] || !a.v || !a.o || (a.dk[1] > 0 && (!a.q[1] || !a.k[1]))) bad("missing tensor");
}

struct item {
    int64_t g, r0, r1;
};

struct free_delete {
    void operator()(float* p) const { std::free(p); }
};

struct flash_job {
    const flash_args* a;
    const kernel_table* k;
    std::vector<item> items;
    std::atomic<size_t> next{0};
    float* scratch;          // worker ith's at ith * per_worker floats
    int64_t per_worker;
};

void flash_worker(void* ctx, int ith, int) {
    flash_job& j = *(flash_job*)ctx;
    float* scratch = j.scratch + ith * j.per_worker;
    for (size_t i; (i = j.next.fetch_add(1, std::memory_order_relaxed)) < j.items.size();)
        j.k->flash(*j.a, j.items[i].g, j.items[i].r0, j.items[i].r1, scratch);
}

}  // namespace

void flash_attention(ThreadPool& pool, const flash_args& a) {
    flash_check(a);
    if (a.T == 0) return;
    flash_job j;
    j.a = &a;
    j.k = &kernels();
    // every worker's scratch from the caller, where a failed allocation can throw (64-byte
    // aligned slices of ~75 KB at R1's head shapes, whatever the number of keys)
    j.per_worker = (flash_scratch_floats(a) + 15) / 16 * 16;
    std::unique_ptr<float, free_delete> scratch(
        (float*)std::aligned_alloc(64, (size_t)(j.per_worker * pool.size()) * sizeof(float)));
    if (!scratch) throw std::bad_alloc();
    j.scratch = scratch.get();
    // An item's cost grows with the keys its last row sees: the last row blocks first, so
    // that the short ones fill in at the end.
    const int64_t rows = a.T * (a.H / a.Hkv), blocks = (rows + kFlashRows - 1) / kFlashRows;
    j.items.reserve(blocks * a.Hkv);
    for (int64_t b = blocks - 1; b >= 0; b--)
        for (int64_t g = 0; g < a.Hkv; g++) j.items.push_back({g, b * kFlashRows, std::min(rows, (b + 1) * kFlashRows)});
    pool.run(flash_worker, &j);
}

}  // namespace hybrid
