// Shared basics for the native module: CHECK, fp16/bf16 conversion, GGML type ids.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

// Invariants that must hold even in release builds. Outside the hot path a failed CHECK
// throws (pybind11 turns it into a Python RuntimeError); inside worker threads we never
// throw, we use CHECK_ABORT, which prints file:line and aborts.
#define HYBRID_STR2(x) #x
#define HYBRID_STR(x) HYBRID_STR2(x)
#define CHECK(cond, msg)                                                                  \
    do {                                                                                  \
        if (!(cond))                                                                      \
            throw std::runtime_error(std::string(__FILE__ ":" HYBRID_STR(__LINE__) ": ") + \
                                     (msg));                                              \
    } while (0)
#define CHECK_ABORT(cond)                                                                 \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            std::fprintf(stderr, "hybrid: %s:%d: check failed: %s\n", __FILE__, __LINE__, \
                         #cond);                                                          \
            std::abort();                                                                 \
        }                                                                                 \
    } while (0)

namespace hybrid {

// How far ahead of the bytes they compute the weight-streaming kernels (and the read
// bandwidth probe that they are measured against) prefetch, in bytes. The hardware
// prefetchers alone keep too few lines in flight while a dot's arithmetic runs: on Zen 3 with
// 2 threads, Q4_K rows went from 0.70 of the plain read rate to 0.90-0.95 from 1 KiB on, and
// the plain read itself gains ~10% at 2 KiB; 4 KiB was no better than 2 KiB on one thread.
constexpr int kPrefetchAhead = 2048;

// GGML type ids as stored in GGUF (ggml.h `enum ggml_type`).
enum ggml_type : int {
    GGML_F32 = 0,
    GGML_F16 = 1,
    GGML_Q4_0 = 2,
    GGML_Q4_1 = 3,
    GGML_Q5_0 = 6,
    GGML_Q5_1 = 7,
    GGML_Q8_0 = 8,
    GGML_Q2_K = 10,
    GGML_Q3_K = 11,
    GGML_Q4_K = 12,
    GGML_Q5_K = 13,
    GGML_Q6_K = 14,
    GGML_Q8_K = 15,
    GGML_IQ2_XXS = 16,
    GGML_IQ2_XS = 17,
    GGML_IQ3_XXS = 18,
    GGML_IQ1_S = 19,
    GGML_IQ4_NL = 20,
    GGML_IQ3_S = 21,
    GGML_IQ2_S = 22,
    GGML_IQ4_XS = 23,
    GGML_IQ1_M = 29,
    GGML_BF16 = 30,
    GGML_TYPE_LIMIT = 31,  // size of tables indexed by ggml type id
};

// IEEE half <-> float, exact (no rounding issues in this direction).
static inline float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  // subnormal: renormalize
            int e = -1;
            do {
                mant <<= 1;
                e++;
            } while (!(mant & 0x400));
            mant &= 0x3ff;
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | mant << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | mant << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | mant << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// Rounds a float to the nearest fp16 value (ties to even), returned as a float. Used where
// llama.cpp stores an activation scale as fp16, so our activations quantize like its own.
static inline float round_to_fp16(float f) {
    if (f == 0.f || !std::isfinite(f)) return f;
    int e;
    const double m = std::frexp((double)f, &e);  // f = m * 2^e, 0.5 <= |m| < 1
    if (e - 1 > 15) return f > 0 ? INFINITY : -INFINITY;
    if (e - 1 >= -14) return (float)std::ldexp(std::nearbyint(std::ldexp(m, 11)), e - 11);
    return (float)std::ldexp(std::nearbyint(std::ldexp((double)f, 24)), -24);  // subnormal half
}

static inline int nearest_int(float x) {
    // Round half away from zero is not needed; round-to-nearest-even via the magic number
    // is what ggml uses and is exact for |x| < 2^22.
    float val = x + 12582912.f;
    int i;
    std::memcpy(&i, &val, 4);
    return (i & 0x007fffff) - 0x00400000;
}

}  // namespace hybrid
