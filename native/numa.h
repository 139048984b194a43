// Process CPU / memory-node affinity helpers (NUMA placement grows here).
#pragma once

#include <vector>

namespace hybrid {

// CPUs this process may run on (sched_getaffinity: what taskset / numactl / cpusets allow).
std::vector<int> allowed_cpus();

}  // namespace hybrid
