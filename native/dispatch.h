// Runtime choice of the kernel table (scalar / avx2 / avx512) from cpuid and HYBRID_ISA.
#pragma once

#include <string>
#include <vector>

#include "quants.h"

namespace hybrid {

// The active table. Every entry but dot4 is non-null (SIMD gaps are filled from the scalar
// table; dot4 is only set where it is bit-identical to the same path's dot).
const kernel_table& kernels();
// Table for a named ISA; throws if the CPU cannot run it ("avx512 needs ...").
const kernel_table& kernels_for(const std::string& isa);
// Switch the active table (tests and HYBRID_ISA); same errors as kernels_for.
void set_isa(const std::string& isa);
std::string current_isa();
// ISAs this CPU can run, best last.
std::vector<std::string> available_isas();
// Human-readable CPU feature summary for reports.
std::string cpu_features();

// Filled by arch/x86/*.cpp; each returns false when the file was built without that ISA.
bool fill_avx2_kernels(kernel_table* t);
bool fill_avx512_kernels(kernel_table* t);

}  // namespace hybrid
