// Thread pool implementation. Workers spin for a short while after each job (decode issues
// many small jobs back to back), then sleep on a condition variable; no lock is held while
// a job runs.
#include "pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "common.h"

namespace hybrid {

namespace {

// How long an idle worker spins for the next job before sleeping, unless set per pool
// (HYBRID_SPIN_US).
long default_spin_us() {
    static const long us = [] {
        const char* e = std::getenv("HYBRID_SPIN_US");
        return e && *e ? std::max(0L, std::atol(e)) : 100L;
    }();
    return us;
}

template <class Pred>
bool spin_until(Pred pred, std::chrono::microseconds budget) {
    if (pred()) return true;
    if (budget.count() == 0) return false;
    const auto until = std::chrono::steady_clock::now() + budget;
    for (int i = 0;; i++) {
        if (pred()) return true;
        cpu_pause();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) return false;
    }
}

int n_allowed_cpus() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
    return CPU_COUNT(&set);
}

int pin_self(int cpu) {
    if (cpu < 0) return -1;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0 ? cpu : -1;
}

}  // namespace

ThreadPool::ThreadPool(int n_threads, const std::vector<int>& cpus)
    : n_(n_threads), cpus_(cpus), spin_us_(default_spin_us()) {
    CHECK(n_threads >= 1 && n_threads <= 1024, "thread count must be in 1..1024");
    // A caller spinning in wait() would take a core from a worker when the workers already
    // fill every core: then it sleeps at once and the last worker wakes it.
    caller_spins_ = n_threads < n_allowed_cpus();
    pinned_.assign(n_, -1);
    threads_.reserve(n_);
    for (int i = 0; i < n_; i++) threads_.emplace_back(&ThreadPool::worker_main, this, i);
    // Let every worker pin itself before anyone asks where they run.
    while (started_.load(std::memory_order_acquire) < n_) std::this_thread::yield();
}

ThreadPool::~ThreadPool() {
    wait();
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true, std::memory_order_release);
        gen_.fetch_add(1, std::memory_order_release);
        gen0_.fetch_add(1, std::memory_order_release);
    }
    cv_work_.notify_all();
    cv_work0_.notify_all();
    for (auto& t : threads_) t.join();
}

std::vector<int> ThreadPool::worker_cpus() const { return pinned_; }

void ThreadPool::set_spin_us(long us) { spin_us_.store(std::max(0L, us), std::memory_order_relaxed); }

std::chrono::microseconds ThreadPool::spin_budget() const {
    return std::chrono::microseconds(spin_us_.load(std::memory_order_relaxed));
}

void ThreadPool::start(job_fn fn, void* ctx, bool async) {
    CHECK(!submitted_, "ThreadPool: a job is pending: call wait() first");
    fn_ = fn;
    ctx_ = ctx;
    async_ = async;
    pending_.store(async ? n_ : n_ - 1, std::memory_order_relaxed);
    submitted_ = true;
    if (!async && n_ == 1) return;  // the caller does it all
    {
        std::lock_guard<std::mutex> lock(mutex_);
        gen_.fetch_add(1, std::memory_order_release);
        if (async) gen0_.fetch_add(1, std::memory_order_release);
    }
    cv_work_.notify_all();
    if (async) cv_work0_.notify_all();
}

void ThreadPool::submit(job_fn fn, void* ctx) { start(fn, ctx, true); }

void ThreadPool::run(job_fn fn, void* ctx) {
    start(fn, ctx, false);
    fn(ctx, 0, n_);  // the caller is worker 0: n threads busy on n cores, as llama.cpp does
    wait();
}

void ThreadPool::wait() {
    if (!submitted_) return;
    auto done = [this] { return pending_.load(std::memory_order_acquire) == 0; };
    // After run() the caller's core is its own, so it spins; after submit() it sleeps when the
    // workers fill every core.
    const bool spin = !async_ || caller_spins_;
    if (!spin_until(done, spin ? spin_budget() : std::chrono::microseconds(0))) {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_done_.wait(lock, done);
    }
    submitted_ = false;
}

void ThreadPool::barrier() {
    const uint32_t phase = bar_phase_.load(std::memory_order_acquire);
    if (bar_count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
        bar_count_.store(0, std::memory_order_relaxed);
        bar_phase_.fetch_add(1, std::memory_order_release);
        return;
    }
    // Barriers are short (between phases of one layer); yield now and then in case the
    // machine is oversubscribed.
    for (int i = 0; bar_phase_.load(std::memory_order_acquire) == phase; i++) {
        cpu_pause();
        if ((i & 1023) == 1023) std::this_thread::yield();
    }
}

void ThreadPool::worker_main(int ith) {
    if (!cpus_.empty()) pinned_[ith] = pin_self(cpus_[ith % cpus_.size()]);
    started_.fetch_add(1, std::memory_order_release);
    // Worker 0 serves submit() only (run()'s caller takes slot 0 itself), so it follows its
    // own generation counter: were it woken by run() jobs, it would spin beside the caller
    // and the other workers for nothing, on a core they need.
    std::atomic<uint64_t>& gen = ith == 0 ? gen0_ : gen_;
    std::condition_variable& cv = ith == 0 ? cv_work0_ : cv_work_;
    uint64_t seen = 0;
    for (;;) {
        auto ready = [&] { return gen.load(std::memory_order_acquire) != seen; };
        if (!spin_until(ready, spin_budget())) {
            std::unique_lock<std::mutex> lock(mutex_);
            cv.wait(lock, ready);
        }
        seen = gen.load(std::memory_order_acquire);
        if (stop_.load(std::memory_order_acquire)) return;
        fn_(ctx_, ith, n_);
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            { std::lock_guard<std::mutex> lock(mutex_); }
            cv_done_.notify_all();
        }
    }
}

}  // namespace hybrid
