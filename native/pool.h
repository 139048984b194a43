// Persistent thread pool: pinned workers, spin-then-sleep, async submit / wait, in-job barrier.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <algorithm>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace hybrid {

// A job runs once on every worker: fn(ctx, ith, nth). Jobs split work themselves (usually an
// atomic chunk counter in ctx) and may call ThreadPool::barrier() to separate phases.
typedef void (*job_fn)(void* ctx, int ith, int nth);

class ThreadPool {
   public:
    // cpus: worker i is pinned to cpus[i % cpus.size()]; empty = not pinned.
    ThreadPool(int n_threads, const std::vector<int>& cpus);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_; }
    const std::vector<int>& cpus() const { return cpus_; }

    // Starts fn on all workers and returns at once. One job at a time: a second submit
    // before wait() is a caller bug (CHECK).
    void submit(job_fn fn, void* ctx);
    // Blocks until the submitted job finished on every worker (no-op when none is pending).
    void wait();
    // Synchronous: the calling thread runs slot 0 itself and workers 1..n-1 the rest, so n
    // threads are busy, not n + a waiting caller. Worker 0 only serves submit().
    void run(job_fn fn, void* ctx);
    bool busy() const { return pending_.load(std::memory_order_acquire) != 0 || submitted_; }

    // Called by every worker of the current job; returns when all have arrived.
    void barrier();

    // Affinity each worker actually got (-1: not pinned / pinning refused).
    std::vector<int> worker_cpus() const;
    // How long idle workers spin for the next job before sleeping (default HYBRID_SPIN_US,
    // else 100 us). Decode issues a job every few hundred us: spinning through the gaps saves
    // a futex wake-up (~50 us here) per job; prefill's gaps are long, sleeping frees the cores.
    void set_spin_us(long us);
    long spin_us() const { return spin_us_.load(std::memory_order_relaxed); }

   private:
    void start(job_fn fn, void* ctx, bool async);
    std::chrono::microseconds spin_budget() const;
    void worker_main(int ith);

    int n_;
    std::vector<int> cpus_;
    std::vector<std::thread> threads_;
    std::vector<int> pinned_;  // written by each worker at start

    std::atomic<uint64_t> gen_{0};   // every job: workers 1..n-1
    std::atomic<uint64_t> gen0_{0};  // submit() jobs: worker 0
    std::atomic<int> pending_{0};
    std::atomic<bool> stop_{false};
    std::atomic<int> started_{0};
    bool submitted_ = false;  // owner side only
    bool caller_spins_ = false;
    std::atomic<long> spin_us_;
    bool async_ = false;  // the current job came from submit(): worker 0 takes slot 0
    job_fn fn_ = nullptr;
    void* ctx_ = nullptr;

    std::mutex mutex_;
    std::condition_variable cv_work_, cv_work0_, cv_done_;

    alignas(64) std::atomic<int> bar_count_{0};
    alignas(64) std::atomic<uint32_t> bar_phase_{0};
};

// Splits [0, n) into chunks handed out in order by an atomic counter.
struct chunk_counter {
    alignas(64) std::atomic<int64_t> next{0};
    void reset() { next.store(0, std::memory_order_relaxed); }
    int64_t take() { return next.fetch_add(1, std::memory_order_relaxed); }
};

// Hands out [0, n) to nth workers so that worker i first takes its own contiguous share
// [n*i/nth, n*(i+1)/nth) in order, then helps the others with what they have left. With a
// shared counter consecutive items alternate between workers and each one's reads are
// broken into item-sized pieces the prefetchers restart on; here each worker streams its
// share and the balance stays dynamic at the end. (TinyConfig.mid decode, 2 workers: the
// routed experts' item-by-item split lost ~10% against one contiguous share per worker.)
class range_counter {
   public:
    explicit range_counter(int max_workers = 1) : slots_(new slot[std::max(1, max_workers)]), cap_(std::max(1, max_workers)) {}
    // Not thread-safe: call before the workers start taking (e.g. before a barrier).
    void reset(int64_t n, int nth) {
        nth_ = std::min(nth, cap_);
        n_ = n;
        for (int i = 0; i < nth_; i++) {
            slots_[i].next.store(n * i / nth_, std::memory_order_relaxed);
            slots_[i].end = n * (i + 1) / nth_;
        }
    }
    // The next item for worker i (0 <= i < nth), or n when every share is taken.
    int64_t take(int i) {
        for (int k = 0; k < nth_; k++) {
            slot& s = slots_[(i + k) % nth_];
            if (s.next.load(std::memory_order_relaxed) >= s.end) continue;
            const int64_t it = s.next.fetch_add(1, std::memory_order_relaxed);
            if (it < s.end) return it;
        }
        return n_;
    }

   private:
    struct alignas(64) slot {
        std::atomic<int64_t> next{0};
        int64_t end = 0;
    };
    std::unique_ptr<slot[]> slots_;
    int cap_, nth_ = 1;
    int64_t n_ = 0;
};

// cpu_relax for spin loops.
static inline void cpu_pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
}

}  // namespace hybrid
