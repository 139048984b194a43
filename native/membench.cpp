// STREAM-like read probe. Compiled with baseline flags: wide loads do not read DRAM faster.
// It prefetches ahead like the kernels do (common.h: kPrefetchAhead), which reads ~10%
// faster than the hardware prefetchers alone: the kernels are held to the best plain read.
#include "membench.h"

#include "common.h"

#include <algorithm>
#include <atomic>

namespace hybrid {

uint64_t stream_read(ThreadPool& pool, const uint8_t* data, int64_t n) {
    struct job_t {
        const uint8_t* data;
        int64_t words;
        std::atomic<uint64_t> total{0};
    } job;
    job.data = data;
    job.words = n / 8;
    pool.run(
        [](void* p, int ith, int nth) {
            job_t& j = *(job_t*)p;
            const int64_t per = (j.words + nth - 1) / nth;
            const int64_t b = std::min(j.words, per * ith), e = std::min(j.words, b + per);
            const uint64_t* w = (const uint64_t*)j.data;
            uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            int64_t i = b;
            for (; i + 8 <= e; i += 8) {  // a cache line per step
                __builtin_prefetch(w + i + kPrefetchAhead / 8, 0, 3);
                s0 += w[i] + w[i + 4];
                s1 += w[i + 1] + w[i + 5];
                s2 += w[i + 2] + w[i + 6];
                s3 += w[i + 3] + w[i + 7];
            }
            for (; i < e; i++) s0 += w[i];
            j.total.fetch_add(s0 + s1 + s2 + s3, std::memory_order_relaxed);
        },
        &job);
    return job.total.load();
}

}  // namespace hybrid
