// GGML block formats (weights) and hybrid's activation formats, with the kernel table type.
//
// Weight blocks are byte-identical to ggml-common.h so GGUF bytes are used in place.
// Letters: n = elements in a row (a multiple of the block size).
#pragma once

#include "common.h"
#include "iq_tables.h"

namespace hybrid {

constexpr int QK_K = 256;  // super-block of the K-quants
constexpr int QK32 = 32;   // block of Q4_0 / Q5_0 / Q8_0

// Q4_0, 18 B / 32 weights: w[j] = d * (nibble - 8); qs[j] low nibble = w[j], high = w[j+16].
struct block_q4_0 {
    uint16_t d;  // fp16
    uint8_t qs[QK32 / 2];
};
// Q5_0, 22 B / 32 weights: like Q4_0 plus a 5th bit per weight in qh (bit j = w[j]), value - 16.
struct block_q5_0 {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[QK32 / 2];
};
// Q4_1, 20 B / 32 weights: w[j] = d * nibble + m; nibbles as in Q4_0 (low = w[j], high = w[j+16]).
struct block_q4_1 {
    uint16_t d;  // fp16
    uint16_t m;  // fp16
    uint8_t qs[QK32 / 2];
};
// Q5_1, 24 B / 32 weights: Q4_1 plus the 5th bit of w[j] in bit j of qh (LE u32); w = d * q + m.
struct block_q5_1 {
    uint16_t d;
    uint16_t m;
    uint8_t qh[4];
    uint8_t qs[QK32 / 2];
};
// Q8_0, 34 B / 32 weights: w[j] = d * qs[j].
struct block_q8_0 {
    uint16_t d;
    int8_t qs[QK32];
};
// Q2_K, 84 B / 256 weights: 16 sub-blocks of 16; scales[i] low nibble = scale, high nibble =
// min of sub-block i; w = d * scale * q - dmin * min, q = 2 bits. Two halves of 128 weights
// with qs[32] each: element l (0..31) of quarter j of half h is (qs[32h + l] >> 2j) & 3, it is
// weight 128h + 32j + l and belongs to sub-block 8h + 2j + l / 16.
struct block_q2_K {
    uint8_t scales[QK_K / 16];
    uint8_t qs[QK_K / 4];
    uint16_t d;
    uint16_t dmin;
};
// Q3_K, 110 B / 256 weights: 16 sub-blocks of 16 with signed 6-bit scales (q3_k_scales);
// q = (2 low bits, placed as in Q2_K) - (4 if the high bit is clear); the high bit of
// element l of quarter j of half h is bit 4h + j of hmask[l]; w = d * scale * q.
struct block_q3_K {
    uint8_t hmask[QK_K / 8];
    uint8_t qs[QK_K / 4];
    uint8_t scales[12];
    uint16_t d;
};
// The 16 values of IQ4_NL / IQ4_XS's non-linear 4-bit code (ggml's kvalues_iq4nl; the same
// table gguf-py's gguf/quants.py IQ4_NL.kvalues publishes).
alignas(16) static const int8_t kIQ4NLValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                                    1,    13,   25,  38,  53,  69,  89,  113};
// IQ4_NL, 18 B / 32 weights: w[j] = d * kIQ4NLValues[nibble]; nibbles as in Q4_0.
struct block_iq4_nl {
    uint16_t d;  // fp16
    uint8_t qs[QK32 / 2];
};
// IQ4_XS, 136 B / 256 weights: 8 sub-blocks of 32 with 6-bit scales, low 4 bits of
// sub-block i in scales_l[i / 2] (nibble i % 2), high 2 bits in scales_h bits 2i..2i+1; stored
// + 32. Sub-block i's quants are qs[16i .. 16i+15], low nibbles = its elements 0..15, high =
// 16..31; w = d * (scale - 32) * kIQ4NLValues[nibble].
struct block_iq4_xs {
    uint16_t d;
    uint16_t scales_h;
    uint8_t scales_l[QK_K / 64];
    uint8_t qs[QK_K / 2];
};
// IQ2_XXS, 66 B / 256 weights: 8 sub-blocks of 32, each two little-endian u32 words in qs.
// The first holds 4 indices (bytes) into kIQ2XXSGrid, 8 values each; the second four 7-bit
// sign indices (bits 7l..7l+6, see iq_ksigns) and the scale s in bits 28-31.
// w = d * (0.5 + s) / 4 * grid value * sign.
struct block_iq2_xxs {
    uint16_t d;
    uint16_t qs[QK_K / 8];
};
// IQ3_S, 110 B / 256 weights: 8 sub-blocks of 32 = 8 groups of 4 values. Group k of
// sub-block i: 9-bit index qs[8i + k] | bit k of qh[i] << 8 into kIQ3SGrid; the sign of
// element j of the sub-block is bit j % 8 of signs[4i + j / 8] (set: negative); scale s of
// sub-block i is nibble i % 2 of scales[i / 2]; w = d * (1 + 2s) * grid value * sign.
struct block_iq3_s {
    uint16_t d;
    uint8_t qs[QK_K / 4];
    uint8_t qh[QK_K / 32];
    uint8_t signs[QK_K / 8];
    uint8_t scales[QK_K / 64];
};
// IQ1_S, 50 B / 256 weights: 8 sub-blocks of 32 = 4 groups of 8. qh[i] (u16) of sub-block
// i: bits 3l..3l+2 are the high bits of group l's 11-bit index qs[4i + l] | bits << 8 into
// kIQ1SGrid (values -1, 0, 1), bits 12-14 the scale s, bit 15 the sign of the shift:
// w = d * (2s + 1) * (grid value + delta), delta = -1/8 if bit 15 is set, else +1/8.
struct block_iq1_s {
    uint16_t d;
    uint8_t qs[QK_K / 8];
    uint16_t qh[QK_K / 32];
};
constexpr float kIQ1SDelta = 0.125f;
// IQ2_XS, 74 B / 256 weights: 32 groups of 8; qs[g] (u16): bits 0-8 index kIQ2XSGrid, bits
// 9-15 the sign index (iq_ksigns); scales[i] low nibble s for groups 4i, 4i+1, high nibble for
// 4i+2, 4i+3: w = d * (0.5 + s) / 4 * grid value * sign.
struct block_iq2_xs {
    uint16_t d;
    uint16_t qs[QK_K / 8];
    uint8_t scales[QK_K / 32];
};
// IQ2_S, 82 B / 256 weights: 32 groups of 8; group g's 10-bit index is qs[g] | bits
// 2(g%4)..2(g%4)+1 of qh[g/4] << 8 into kIQ2SGrid, its 8 signs the bits of qs[32 + g] (set:
// negative); scales as IQ2_XS: w = d * (0.5 + s) / 4 * grid value * sign.
struct block_iq2_s {
    uint16_t d;
    uint8_t qs[QK_K / 4];
    uint8_t qh[QK_K / 32];
    uint8_t scales[QK_K / 32];
};
// IQ3_XXS, 98 B / 256 weights: qs[0..63] index kIQ3XXSGrid (4 values each), 8 per sub-block;
// then 8 LE u32, one per sub-block: four 7-bit sign indices (bits 7l..; iq_ksigns, 8 values
// each) and the scale s in bits 28-31: w = d * (0.5 + s) / 2 * grid value * sign.
struct block_iq3_xxs {
    uint16_t d;
    uint8_t qs[3 * QK_K / 8];
};
// IQ1_M, 56 B / 256 weights, no d field: the fp16 d is the top 4 bits of the 4 LE u16 of
// scales (bits 12-15 of u16 k = d bits 4k..4k+3); the rest are 3-bit scales, two per
// sub-block i (bits 6(i%2) and 6(i%2)+3 of u16 i/2), one per 16 values. Group l (of 8) of
// sub-block i indexes kIQ1SGrid with qs[4i + l] | bits 0-2 of nibble l of qh[2i..2i+1] << 8;
// bit 3 of the nibble is the sign of its delta: w = d * (2s + 1) * (grid value + delta).
struct block_iq1_m {
    uint8_t qs[QK_K / 8];
    uint8_t qh[QK_K / 16];
    uint8_t scales[QK_K / 32];
};
static inline uint16_t iq1_m_d(const block_iq1_m& x) {
    uint16_t s[4];
    std::memcpy(s, x.scales, 8);
    return (uint16_t)((s[0] >> 12) | ((s[1] >> 8) & 0x00f0) | ((s[2] >> 4) & 0x0f00) | (s[3] & 0xf000));
}

// ggml's ksigns: the 8 signs of a group from 7 stored bits, the 8th making the number of
// negative values even (bit set: negative).
static inline int iq_ksigns(int i) { return i | (__builtin_parity((unsigned)i) << 7); }
// The same as 8 bytes of +1 / -1 (0x01 / 0xff) per 7-bit index, for the SIMD paths.
struct iq_sign_bytes {
    uint64_t v[128];
    constexpr iq_sign_bytes() : v() {
        for (int i = 0; i < 128; i++) {
            int s = i, par = 0;
            for (int j = 0; j < 7; j++) par ^= (i >> j) & 1;
            s |= par << 7;
            uint64_t w = 0;
            for (int j = 0; j < 8; j++) w |= (uint64_t)(((s >> j) & 1) ? 0xff : 0x01) << (8 * j);
            v[i] = w;
        }
    }
};
alignas(64) static constexpr iq_sign_bytes kIQSignBytes{};

// Q4_K, 144 B / 256 weights: 8 sub-blocks of 32 with 6-bit scale sc and min m packed in
// scales[12]; w = d*sc*q - dmin*m. qs: 4 chunks of 32 bytes, low nibbles = sub-block 2c,
// high nibbles = sub-block 2c+1.
struct block_q4_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qs[QK_K / 2];
};
// Q5_K, 176 B / 256 weights: Q4_K plus qh[32]: bit 2c of qh[l] is the 5th bit of element l of
// sub-block 2c, bit 2c+1 that of sub-block 2c+1.
struct block_q5_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
};
// Q6_K, 210 B / 256 weights: 16 sub-blocks of 16 with int8 scales; q = (4 low bits in ql |
// 2 high bits in qh << 4) - 32; w = d * scales[sub] * q. Two halves of 128 weights, each with
// ql[64], qh[32]: element l (0..31) of quarter i takes ql[l + 32*(i&1)] nibble (i>>1) and
// qh[l] bits 2i..2i+1.
struct block_q6_K {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    uint16_t d;
};
// Activation format for K-quant dots (== ggml block_q8_K), 292 B / 256 values:
// x[j] ~= d * qs[j]; bsums[i] = sum of qs[16i .. 16i+15].
struct block_q8_K {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
};
// Activation format for 32-blocks (hybrid's own), 40 B / 32 values: x[j] ~= d * qs[j];
// sum = sum of qs (lets Q4_0 / Q5_0 subtract their offset without unpacking signs).
struct block_q8_32 {
    float d;
    int32_t sum;
    int8_t qs[QK32];
};

// Activation format for Q4_1 / Q5_1 (== llama.cpp's block_q8_1 as its x86 code makes it),
// 40 B / 32 values: x[j] ~= d * qs[j], d = amax / 127 rounded to fp16; s = d' * sum of qs
// with d' the unrounded d, rounded to fp16 (the term the weights' min multiplies).
struct block_q8_1 {
    float d;
    float s;
    int8_t qs[QK32];
};

static_assert(sizeof(block_q4_0) == 18, "block_q4_0 size");
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 size");
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 size");
static_assert(sizeof(block_q2_K) == 84, "block_q2_K size");
static_assert(sizeof(block_q3_K) == 110, "block_q3_K size");
static_assert(sizeof(block_q8_1) == 40, "block_q8_1 size");
static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl size");
static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs size");
static_assert(sizeof(block_iq2_xxs) == 66, "block_iq2_xxs size");
static_assert(sizeof(block_iq3_s) == 110, "block_iq3_s size");
static_assert(sizeof(block_iq1_s) == 50, "block_iq1_s size");
static_assert(sizeof(block_iq2_xs) == 74, "block_iq2_xs size");
static_assert(sizeof(block_iq2_s) == 82, "block_iq2_s size");
static_assert(sizeof(block_iq3_xxs) == 98, "block_iq3_xxs size");
static_assert(sizeof(block_iq1_m) == 56, "block_iq1_m size");
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 size");
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K size");
static_assert(sizeof(block_q5_K) == 176, "block_q5_K size");
static_assert(sizeof(block_q6_K) == 210, "block_q6_K size");
static_assert(sizeof(block_q8_K) == 292, "block_q8_K size");
static_assert(sizeof(block_q8_32) == 40, "block_q8_32 size");

// Which activation format a weight type's dot product consumes.
enum act_format : int { ACT_F32 = 0, ACT_Q8_32 = 1, ACT_Q8_K = 2, ACT_Q8_1 = 3, ACT_COUNT = 4 };

struct type_info {
    const char* name;  // nullptr: not a type we compute
    int block;         // elements per block
    int block_bytes;   // bytes per block
    act_format act;
};

// Indexed by GGML type id; name == nullptr for unsupported ids.
const type_info& get_type_info(int type);
bool type_supported(int type);
std::string supported_type_names();  // "F32, F16, Q4_0, ..." in type id order
int64_t row_bytes(int type, int64_t n);      // bytes of one row of n elements
int64_t act_row_bytes(act_format f, int64_t n);

typedef void (*dequant_fn)(const void* src, float* dst, int64_t n);
// Dot product of one weight row with one activation row (already in the weight's act format).
typedef float (*dot_fn)(int64_t n, const void* w, const void* act);
typedef void (*quant_act_fn)(const float* x, void* dst, int64_t n);
// Dots of one weight row with 4 activation rows (prefill): out[r] = dot(w, act[r]), each
// bit-identical to the table's single dot. Null where a path has none: callers then loop.
typedef void (*dot4_fn)(int64_t n, const void* w, const void* const* act, float* out);
// Attention over S cached rows (row s at rows + s * stride floats) for nq query vectors:
// scores: out[i * S + s] = dot(q[i * W .. +W], row s[0 .. W)), W elements per row;
// values: out[i * C + c] = sum_s p[i * S + s] * row s[c], c < C (out is overwritten).
typedef void (*attn_scores_fn)(const float* q, int64_t nq, const float* rows, int64_t stride, int64_t S, int64_t W,
                               float* out);
// x[i] = exp(x[i] - sub) for i < n; returns the sum (attention's softmax numerators).
typedef float (*exp_sum_fn)(float* x, int64_t n, float sub);
// out[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i] (the routed experts' gate); each
// element's value is the same whatever n and its position (decode and prefill agree).
typedef void (*silu_mul_fn)(int64_t n, const float* g, const float* u, float* out);
typedef void (*attn_values_fn)(const float* p, int64_t nq, const float* rows, int64_t stride, int64_t S, int64_t C,
                               float* out);
// One item of flash.h's causal attention: rows r0 .. r1 (at most kFlashRows) of kv head g,
// written to their outputs; scratch holds flash_scratch_floats(a) floats, 64-byte aligned.
struct flash_args;
typedef void (*flash_fn)(const flash_args& a, int64_t g, int64_t r0, int64_t r1, float* scratch);

// One table per ISA path; entries left null by an ISA fall back to the scalar reference.
struct kernel_table {
    const char* isa;
    dequant_fn dequant[GGML_TYPE_LIMIT];
    dot_fn dot[GGML_TYPE_LIMIT];
    dot4_fn dot4[GGML_TYPE_LIMIT];
    quant_act_fn quant_act[ACT_COUNT];
    attn_scores_fn attn_scores;
    attn_values_fn attn_values;
    exp_sum_fn exp_sum;
    silu_mul_fn silu_mul;
    flash_fn flash;
};

// Reference (scalar) kernels: the definition every SIMD path is tested against.
void fill_scalar_kernels(kernel_table* t);
// Reference 6-bit scale/min unpacking of Q4_K / Q5_K sub-block j.
static inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}
// All 8 scales then all 8 mins of a Q4_K / Q5_K block as 16 bytes, four at a time
// (same result as get_scale_min_k4 for j = 0..7; used by the SIMD paths).
static inline void unpack_scales_mins_k4(const uint8_t* s, uint8_t out[16]) {
    uint32_t a0, a1, a2, r[4];
    std::memcpy(&a0, s, 4);
    std::memcpy(&a1, s + 4, 4);
    std::memcpy(&a2, s + 8, 4);
    r[0] = a0 & 0x3f3f3f3fu;                                         // sc 0..3
    r[1] = (a2 & 0x0f0f0f0fu) | (((a0 >> 6) & 0x03030303u) << 4);    // sc 4..7
    r[2] = a1 & 0x3f3f3f3fu;                                         // m 0..3
    r[3] = ((a2 >> 4) & 0x0f0f0f0fu) | (((a1 >> 6) & 0x03030303u) << 4);  // m 4..7
    std::memcpy(out, r, 16);
}

// Sub-block i's scale of an IQ4_XS block, -32..31.
static inline int iq4_xs_scale(const block_iq4_xs& b, int i) {
    return (((b.scales_l[i / 2] >> (4 * (i % 2))) & 0xF) | (((b.scales_h >> (2 * i)) & 3) << 4)) - 32;
}

// The 16 signed scales of a Q3_K block from its 12 packed bytes: scale i has its low 4 bits
// in byte i % 8 (low nibble for i < 8, high nibble after) and its high 2 bits in byte
// 8 + i % 4, bits 2 * (i / 4); stored + 32.
static inline void q3_k_scales(const uint8_t* s, int8_t out[16]) {
    uint32_t a[3], r[4];
    std::memcpy(a, s, 12);
    r[0] = (a[0] & 0x0f0f0f0fu) | (((a[2] >> 0) & 0x03030303u) << 4);
    r[1] = (a[1] & 0x0f0f0f0fu) | (((a[2] >> 2) & 0x03030303u) << 4);
    r[2] = ((a[0] >> 4) & 0x0f0f0f0fu) | (((a[2] >> 4) & 0x03030303u) << 4);
    r[3] = ((a[1] >> 4) & 0x0f0f0f0fu) | (((a[2] >> 6) & 0x03030303u) << 4);
    std::memcpy(out, r, 16);
    for (int i = 0; i < 16; i++) out[i] = (int8_t)(out[i] - 32);
}

}  // namespace hybrid
