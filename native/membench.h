// Memory read bandwidth probe for benchmarks: the baseline kernels are measured against it.
#pragma once

#include <cstdint>

#include "pool.h"

namespace hybrid {

// Sums n bytes of data as 64-bit words on every worker of pool (contiguous slices), so the
// hardware prefetchers see the same streaming pattern as a T=1 matmul. Returns the sum so
// the compiler cannot drop the reads.
uint64_t stream_read(ThreadPool& pool, const uint8_t* data, int64_t n);

}  // namespace hybrid
