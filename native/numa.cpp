// NUMA and affinity helpers. Only plain Linux syscalls: builds without libnuma headers.
#include "numa.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <stdexcept>

namespace hybrid {

namespace {
// Linux mempolicy modes (linux/mempolicy.h)
constexpr int kMpolBind = 2;
constexpr int kMpolInterleave = 3;
constexpr int kMaskWords = 16;  // up to 1024 nodes
}  // namespace

std::vector<int> allowed_cpus() {
    std::vector<int> cpus;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return cpus;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &set)) cpus.push_back(c);
    return cpus;
}

int64_t file_resident_bytes(const std::string& path) {
    const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw std::invalid_argument(path + ": " + strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size == 0) {
        close(fd);
        return 0;
    }
    void* p = mmap(nullptr, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) throw std::runtime_error(path + ": mmap failed: " + strerror(errno));
    const long page = sysconf(_SC_PAGESIZE);
    const size_t pages = ((size_t)st.st_size + page - 1) / page;
    std::vector<unsigned char> vec(pages);
    int64_t resident = 0;
    if (mincore(p, (size_t)st.st_size, vec.data()) == 0)
        for (unsigned char v : vec) resident += (v & 1) ? page : 0;
    munmap(p, (size_t)st.st_size);
    return std::min<int64_t>(resident, st.st_size);
}

NumaBuffer::NumaBuffer(int64_t bytes, mem_policy policy, const std::vector<int>& nodes, bool hugepages) {
    if (bytes <= 0) throw std::invalid_argument("NumaBuffer: size must be positive");
    void* p = mmap(nullptr, (size_t)bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        throw std::runtime_error("NumaBuffer: mmap of " + std::to_string(bytes) + " bytes failed: " + strerror(errno));
    data_ = (uint8_t*)p;
    size_ = bytes;
    if (hugepages && madvise(p, (size_t)bytes, MADV_HUGEPAGE) != 0)
        hugepage_error_ = std::string("madvise(MADV_HUGEPAGE): ") + strerror(errno);
    if (policy == mem_policy::none) return;
    unsigned long mask[kMaskWords] = {0};
    for (int n : nodes) {
        if (n < 0 || n >= kMaskWords * 64) {
            policy_error_ = "node " + std::to_string(n) + " is out of range";
            return;
        }
        mask[n / 64] |= 1ul << (n % 64);
    }
    if (nodes.empty()) {
        policy_error_ = "no nodes given";
        return;
    }
    const int mode = policy == mem_policy::bind ? kMpolBind : kMpolInterleave;
    // Pages are not touched yet: the policy decides where each is first allocated.
    if (syscall(SYS_mbind, p, (unsigned long)bytes, mode, mask, (unsigned long)(kMaskWords * 64 + 1), 0u) != 0)
        policy_error_ = std::string("mbind: ") + strerror(errno);
}

NumaBuffer::~NumaBuffer() {
    if (data_) munmap(data_, (size_t)size_);
}

}  // namespace hybrid
