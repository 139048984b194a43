// Kernel table selection. Nothing here is compiled with ISA flags: it must run anywhere.
#include "dispatch.h"

#include <atomic>
#include <mutex>

#if defined(HYBRID_X86)
#include <cpuid.h>
#endif

namespace hybrid {

#if !defined(HYBRID_X86)
bool fill_avx2_kernels(kernel_table*) { return false; }
bool fill_avx512_kernels(kernel_table*) { return false; }
#endif

namespace {

struct cpu_flags {
    bool avx2 = false, fma = false, f16c = false, bmi2 = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512vnni = false;
    bool os_avx = false, os_avx512 = false;
};

cpu_flags detect() {
    cpu_flags f;
#if defined(HYBRID_X86)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    f.fma = c & (1u << 12);
    f.f16c = c & (1u << 29);
    const bool osxsave = c & (1u << 27);
    if (osxsave) {
        // XCR0: the OS must save YMM (bits 1,2) and for AVX-512 also opmask/ZMM (bits 5,6,7).
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        f.os_avx = (lo & 0x6) == 0x6;
        f.os_avx512 = (lo & 0xE6) == 0xE6;
    }
    if (__get_cpuid_max(0, nullptr) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        f.avx2 = b & (1u << 5);
        f.bmi2 = b & (1u << 8);
        f.avx512f = b & (1u << 16);
        f.avx512dq = b & (1u << 17);
        f.avx512bw = b & (1u << 30);
        f.avx512vl = b & (1u << 31);
        f.avx512vnni = c & (1u << 11);
    }
#endif
    return f;
}

const cpu_flags& flags() {
    static const cpu_flags f = detect();
    return f;
}

bool can_avx2() {
    const cpu_flags& f = flags();
    return f.os_avx && f.avx2 && f.fma && f.f16c && f.bmi2;
}

bool can_avx512() {
    const cpu_flags& f = flags();
    return can_avx2() && f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq &&
           f.avx512vnni;
}

struct tables {
    kernel_table scalar, avx2, avx512;
    bool have_avx2 = false, have_avx512 = false;
};

void fill_gaps(kernel_table* t, const kernel_table& ref) {
    for (int i = 0; i < GGML_TYPE_LIMIT; i++) {
        if (!t->dequant[i]) t->dequant[i] = ref.dequant[i];
        if (!t->dot[i]) t->dot[i] = ref.dot[i];
    }
    for (int i = 0; i < ACT_COUNT; i++)
        if (!t->quant_act[i]) t->quant_act[i] = ref.quant_act[i];
    if (!t->attn_scores) t->attn_scores = ref.attn_scores;
    if (!t->attn_values) t->attn_values = ref.attn_values;
    if (!t->exp_sum) t->exp_sum = ref.exp_sum;
    if (!t->silu_mul) t->silu_mul = ref.silu_mul;
    if (!t->flash) t->flash = ref.flash;
}

const tables& all_tables() {
    static const tables t = [] {
        tables t;
        fill_scalar_kernels(&t.scalar);
        t.avx2 = t.scalar;
        t.avx512 = t.scalar;
        std::memset(t.avx2.dequant, 0, sizeof(t.avx2.dequant));
        std::memset(t.avx2.dot, 0, sizeof(t.avx2.dot));
        std::memset(t.avx2.dot4, 0, sizeof(t.avx2.dot4));
        std::memset(t.avx2.quant_act, 0, sizeof(t.avx2.quant_act));
        t.avx512 = t.avx2;
        // Nothing compiled with ISA flags runs before cpuid says so: even the fill functions,
        // since the compiler may use wide vector stores for them.
        t.have_avx2 = can_avx2() && fill_avx2_kernels(&t.avx2);
        t.have_avx512 = can_avx512() && fill_avx512_kernels(&t.avx512);
        fill_gaps(&t.avx2, t.scalar);
        fill_gaps(&t.avx512, t.avx2);
        return t;
    }();
    return t;
}

std::atomic<const kernel_table*> g_active{nullptr};
std::mutex g_init_mutex;

}  // namespace

std::vector<std::string> available_isas() {
    std::vector<std::string> v{"scalar"};
    if (all_tables().have_avx2) v.push_back("avx2");
    if (all_tables().have_avx512) v.push_back("avx512");
    return v;
}

std::string cpu_features() {
    const cpu_flags& f = flags();
    std::string s;
    auto add = [&](bool on, const char* name) {
        if (on) s += (s.empty() ? "" : " ") + std::string(name);
    };
    add(f.avx2, "avx2");
    add(f.fma, "fma");
    add(f.f16c, "f16c");
    add(f.bmi2, "bmi2");
    add(f.avx512f, "avx512f");
    add(f.avx512bw, "avx512bw");
    add(f.avx512vl, "avx512vl");
    add(f.avx512dq, "avx512dq");
    add(f.avx512vnni, "avx512vnni");
    return s;
}

const kernel_table& kernels_for(const std::string& isa) {
    const tables& t = all_tables();
    if (isa == "scalar") return t.scalar;
    if (isa == "avx2") {
        if (!t.have_avx2)
            throw std::invalid_argument(
                "HYBRID_ISA=avx2: this CPU lacks AVX2/FMA/F16C/BMI2 (has: " + cpu_features() +
                "); use HYBRID_ISA=scalar or unset it");
        return t.avx2;
    }
    if (isa == "avx512") {
        if (!t.have_avx512)
            throw std::invalid_argument(
                "HYBRID_ISA=avx512: this CPU lacks AVX-512 F/BW/VL/DQ/VNNI (has: " +
                cpu_features() + "); use HYBRID_ISA=avx2 or unset it");
        return t.avx512;
    }
    throw std::invalid_argument("HYBRID_ISA=" + isa + ": unknown; use scalar, avx2 or avx512");
}

const kernel_table& kernels() {
    const kernel_table* k = g_active.load(std::memory_order_acquire);
    if (k) return *k;
    std::lock_guard<std::mutex> lock(g_init_mutex);
    k = g_active.load(std::memory_order_relaxed);
    if (!k) {
        const char* env = std::getenv("HYBRID_ISA");
        if (env && *env) {
            k = &kernels_for(env);
        } else {
            const std::vector<std::string> v = available_isas();
            k = &kernels_for(v.back());
        }
        g_active.store(k, std::memory_order_release);
    }
    return *k;
}

void set_isa(const std::string& isa) { g_active.store(&kernels_for(isa), std::memory_order_release); }

std::string current_isa() { return kernels().isa; }

}  // namespace hybrid
