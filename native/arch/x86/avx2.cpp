// AVX2 kernel table. Compiled with -mavx2 -mfma -mf16c -mbmi2; called only after cpuid says so.
#include "x86_avx2_kernels.h"
#include "flash_x86.h"

namespace hybrid {

bool fill_avx2_kernels(kernel_table* t) {
    t->isa = "avx2";
    x86::fill_avx2_level(t);
    // 4 keys x 24 rows (12 sums) per score tile, 6 rows x 16 value dims (12 sums) per value tile
    t->flash = flash_rows_simd<x86::vec8, 4, 3, 6, 2>;
    return true;
}

}  // namespace hybrid
