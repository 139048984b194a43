// NUMA placement of expert memory and CPU affinity, with plain Linux syscalls (no libnuma
// headers needed to build; calls the kernel refuses are reported, never fatal).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace hybrid {

// CPUs this process may run on (sched_getaffinity: what taskset / numactl / cpusets allow).
std::vector<int> allowed_cpus();

// Bytes of the file at `path` currently in the page cache (mincore over a mapping of it).
int64_t file_resident_bytes(const std::string& path);

enum class mem_policy { none, interleave, bind };

// Anonymous memory with a NUMA policy applied before first touch.
class NumaBuffer {
   public:
    // nodes: for interleave, the nodes to spread pages over; for bind, the node(s) to use.
    // hugepages: madvise(MADV_HUGEPAGE) (transparent huge pages) on the range.
    NumaBuffer(int64_t bytes, mem_policy policy, const std::vector<int>& nodes, bool hugepages);
    ~NumaBuffer();
    NumaBuffer(const NumaBuffer&) = delete;
    NumaBuffer& operator=(const NumaBuffer&) = delete;

    uint8_t* data() { return data_; }
    int64_t size() const { return size_; }
    // Empty when the policy was applied; else why not (e.g. "mbind: Operation not permitted").
    const std::string& policy_error() const { return policy_error_; }
    const std::string& hugepage_error() const { return hugepage_error_; }

   private:
    uint8_t* data_ = nullptr;
    int64_t size_ = 0;
    std::string policy_error_, hugepage_error_;
};

}  // namespace hybrid
