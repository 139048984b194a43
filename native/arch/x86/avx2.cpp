// AVX2 kernel table. Compiled with -mavx2 -mfma -mf16c -mbmi2; called only after cpuid says so.
#include "x86_avx2_kernels.h"

namespace hybrid {

bool fill_avx2_kernels(kernel_table* t) {
    t->isa = "avx2";
    x86::fill_avx2_level(t);
    return true;
}

}  // namespace hybrid
