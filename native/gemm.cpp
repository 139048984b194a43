// Selection of the prefill tile kernels. Compiled without ISA flags: the ISA files' fill
// functions run only for a kernel table that cpuid already admitted.
#include "gemm.h"

#include <atomic>
#include <cstring>
#include <mutex>

namespace hybrid {

namespace {
std::atomic<bool> g_tiles{true};
}

void set_gemm_tiles(bool on) { g_tiles.store(on, std::memory_order_relaxed); }
bool gemm_tiles() { return g_tiles.load(std::memory_order_relaxed); }

#if !defined(HYBRID_X86)
bool fill_avx2_gemm(gemm_tile_fn*) { return false; }
bool fill_avx512_gemm(gemm_tile_fn*) { return false; }
#endif

gemm_tile_fn gemm_tile_for(const kernel_table& k, int type) {
    static gemm_tile_fn avx2[GGML_TYPE_LIMIT], avx512[GGML_TYPE_LIMIT];
    static std::once_flag avx2_once, avx512_once;
    if (type < 0 || type >= GGML_TYPE_LIMIT || !gemm_tiles()) return nullptr;
    if (std::strcmp(k.isa, "avx2") == 0) {
        std::call_once(avx2_once, [] { fill_avx2_gemm(avx2); });
        return avx2[type];
    }
    if (std::strcmp(k.isa, "avx512") == 0) {
        std::call_once(avx512_once, [] { fill_avx512_gemm(avx512); });
        return avx512[type];
    }
    return nullptr;
}

}  // namespace hybrid
