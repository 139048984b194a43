// Scalar reference kernels for every block format: dequantize, activation quantize, dot.
// Plain loops on purpose: these define the results every SIMD path is tested against.
#include "quants.h"

#include "flash.h"

#include <algorithm>
#include <cmath>

namespace hybrid {

static type_info g_types[GGML_TYPE_LIMIT];

static bool init_types() {
    g_types[GGML_F32] = {"F32", 1, 4, ACT_F32};
    g_types[GGML_F16] = {"F16", 1, 2, ACT_F32};
    g_types[GGML_BF16] = {"BF16", 1, 2, ACT_F32};
    g_types[GGML_Q4_0] = {"Q4_0", QK32, (int)sizeof(block_q4_0), ACT_Q8_32};
    g_types[GGML_Q4_1] = {"Q4_1", QK32, (int)sizeof(block_q4_1), ACT_Q8_1};
    g_types[GGML_Q5_0] = {"Q5_0", QK32, (int)sizeof(block_q5_0), ACT_Q8_32};
    g_types[GGML_Q5_1] = {"Q5_1", QK32, (int)sizeof(block_q5_1), ACT_Q8_1};
    g_types[GGML_Q2_K] = {"Q2_K", QK_K, (int)sizeof(block_q2_K), ACT_Q8_K};
    g_types[GGML_Q3_K] = {"Q3_K", QK_K, (int)sizeof(block_q3_K), ACT_Q8_K};
    g_types[GGML_IQ4_NL] = {"IQ4_NL", QK32, (int)sizeof(block_iq4_nl), ACT_Q8_32};
    g_types[GGML_IQ4_XS] = {"IQ4_XS", QK_K, (int)sizeof(block_iq4_xs), ACT_Q8_K};
    g_types[GGML_IQ2_XXS] = {"IQ2_XXS", QK_K, (int)sizeof(block_iq2_xxs), ACT_Q8_K};
    g_types[GGML_IQ3_S] = {"IQ3_S", QK_K, (int)sizeof(block_iq3_s), ACT_Q8_K};
    g_types[GGML_IQ1_S] = {"IQ1_S", QK_K, (int)sizeof(block_iq1_s), ACT_Q8_K};
    g_types[GGML_IQ2_XS] = {"IQ2_XS", QK_K, (int)sizeof(block_iq2_xs), ACT_Q8_K};
    g_types[GGML_IQ2_S] = {"IQ2_S", QK_K, (int)sizeof(block_iq2_s), ACT_Q8_K};
    g_types[GGML_IQ3_XXS] = {"IQ3_XXS", QK_K, (int)sizeof(block_iq3_xxs), ACT_Q8_K};
    g_types[GGML_IQ1_M] = {"IQ1_M", QK_K, (int)sizeof(block_iq1_m), ACT_Q8_K};
    g_types[GGML_Q8_0] = {"Q8_0", QK32, (int)sizeof(block_q8_0), ACT_Q8_32};
    g_types[GGML_Q4_K] = {"Q4_K", QK_K, (int)sizeof(block_q4_K), ACT_Q8_K};
    g_types[GGML_Q5_K] = {"Q5_K", QK_K, (int)sizeof(block_q5_K), ACT_Q8_K};
    g_types[GGML_Q6_K] = {"Q6_K", QK_K, (int)sizeof(block_q6_K), ACT_Q8_K};
    return true;
}
static const bool g_types_ready = init_types();

const type_info& get_type_info(int type) {
    static const type_info none = {nullptr, 0, 0, ACT_F32};
    if (type < 0 || type >= GGML_TYPE_LIMIT) return none;
    return g_types[type];
}

bool type_supported(int type) { return get_type_info(type).name != nullptr; }

std::string supported_type_names() {
    std::string s;
    for (int t = 0; t < GGML_TYPE_LIMIT; t++)
        if (type_supported(t) && t != GGML_Q8_K) s += (s.empty() ? "" : ", ") + std::string(get_type_info(t).name);
    return s;
}

int64_t row_bytes(int type, int64_t n) {
    const type_info& ti = get_type_info(type);
    return n / ti.block * ti.block_bytes;
}

int64_t act_row_bytes(act_format f, int64_t n) {
    switch (f) {
        case ACT_F32: return n * 4;
        case ACT_Q8_32: return n / QK32 * (int64_t)sizeof(block_q8_32);
        case ACT_Q8_K: return n / QK_K * (int64_t)sizeof(block_q8_K);
        case ACT_Q8_1: return n / QK32 * (int64_t)sizeof(block_q8_1);
        default: return 0;
    }
}

// ---------------------------------------------------------------- dequantize

static void dequant_f32(const void* src, float* y, int64_t n) { std::memcpy(y, src, n * 4); }

static void dequant_f16(const void* src, float* y, int64_t n) {
    const uint16_t* x = (const uint16_t*)src;
    for (int64_t i = 0; i < n; i++) y[i] = fp16_to_fp32(x[i]);
}

static void dequant_bf16(const void* src, float* y, int64_t n) {
    const uint16_t* x = (const uint16_t*)src;
    for (int64_t i = 0; i < n; i++) y[i] = bf16_to_fp32(x[i]);
}

// The 32 quants of a Q4_0 / Q4_1 block (qh null) or a Q5_0 / Q5_1 block, unsigned, in weight
// order: low nibbles are elements 0..15, high nibbles 16..31; bit j of qh is element j's 5th bit.
static inline void unpack_32(const uint8_t* qs, const uint8_t* qh, int* q) {
    uint32_t h = 0;
    if (qh) std::memcpy(&h, qh, 4);
    for (int j = 0; j < 16; j++) {
        q[j] = (qs[j] & 0xF) | (((h >> j) & 1) << 4);
        q[j + 16] = (qs[j] >> 4) | (((h >> (j + 16)) & 1) << 4);
    }
}

static inline int dot_32(const int* q, const int8_t* a) {
    int s = 0;
    for (int j = 0; j < QK32; j++) s += q[j] * a[j];
    return s;
}

// Q4_0 / Q5_0 (B with qh): w = d * (q - offset), offset 8 or 16.
template <class B>
static void dequant_offset_32(const B* x, const uint8_t* (*qh)(const B&), float* y, int64_t n, int offset) {
    int q[QK32];
    for (int64_t b = 0; b < n / QK32; b++, y += QK32) {
        const float d = fp16_to_fp32(x[b].d);
        unpack_32(x[b].qs, qh(x[b]), q);
        for (int j = 0; j < QK32; j++) y[j] = (q[j] - offset) * d;
    }
}

// Q4_1 / Q5_1: w = d * q + m.
template <class B>
static void dequant_min_32(const B* x, const uint8_t* (*qh)(const B&), float* y, int64_t n) {
    int q[QK32];
    for (int64_t b = 0; b < n / QK32; b++, y += QK32) {
        const float d = fp16_to_fp32(x[b].d), m = fp16_to_fp32(x[b].m);
        unpack_32(x[b].qs, qh(x[b]), q);
        for (int j = 0; j < QK32; j++) y[j] = q[j] * d + m;
    }
}

template <class B> static const uint8_t* no_qh(const B&) { return nullptr; }
template <class B> static const uint8_t* qh_of(const B& x) { return x.qh; }

static void dequant_q4_0(const void* s, float* y, int64_t n) { dequant_offset_32((const block_q4_0*)s, no_qh<block_q4_0>, y, n, 8); }
static void dequant_q5_0(const void* s, float* y, int64_t n) { dequant_offset_32((const block_q5_0*)s, qh_of<block_q5_0>, y, n, 16); }
static void dequant_q4_1(const void* s, float* y, int64_t n) { dequant_min_32((const block_q4_1*)s, no_qh<block_q4_1>, y, n); }
static void dequant_q5_1(const void* s, float* y, int64_t n) { dequant_min_32((const block_q5_1*)s, qh_of<block_q5_1>, y, n); }

// The 256 quants of a Q2_K / Q3_K block in weight order: 2-bit fields, and for Q3_K (hmask
// set) minus 4 where the high bit is clear.
static void unpack_q2_q3(const uint8_t* qs, const uint8_t* hmask, int8_t* q) {
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) {
                int v = (qs[32 * h + l] >> (2 * j)) & 3;
                if (hmask && !((hmask[l] >> (4 * h + j)) & 1)) v -= 4;
                q[128 * h + 32 * j + l] = (int8_t)v;
            }
}

static void dequant_q2_K(const void* src, float* y, int64_t n) {
    const block_q2_K* x = (const block_q2_K*)src;
    int8_t q[QK_K];
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        const float d = fp16_to_fp32(x[b].d), dmin = fp16_to_fp32(x[b].dmin);
        unpack_q2_q3(x[b].qs, nullptr, q);
        for (int i = 0; i < 16; i++) {
            const float dl = d * (x[b].scales[i] & 0xF), ml = dmin * (x[b].scales[i] >> 4);
            for (int l = 0; l < 16; l++) y[16 * i + l] = dl * q[16 * i + l] - ml;
        }
    }
}

static void dequant_q3_K(const void* src, float* y, int64_t n) {
    const block_q3_K* x = (const block_q3_K*)src;
    int8_t q[QK_K], sc[16];
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        const float d = fp16_to_fp32(x[b].d);
        unpack_q2_q3(x[b].qs, x[b].hmask, q);
        q3_k_scales(x[b].scales, sc);
        for (int i = 0; i < 16; i++) {
            const float dl = d * sc[i];
            for (int l = 0; l < 16; l++) y[16 * i + l] = dl * q[16 * i + l];
        }
    }
}

static void dequant_iq4_nl(const void* src, float* y, int64_t n) {
    const block_iq4_nl* x = (const block_iq4_nl*)src;
    for (int64_t b = 0; b < n / QK32; b++, y += QK32) {
        const float d = fp16_to_fp32(x[b].d);
        for (int j = 0; j < QK32 / 2; j++) {
            y[j] = d * kIQ4NLValues[x[b].qs[j] & 0xF];
            y[j + 16] = d * kIQ4NLValues[x[b].qs[j] >> 4];
        }
    }
}

static void dequant_iq4_xs(const void* src, float* y, int64_t n) {
    const block_iq4_xs* x = (const block_iq4_xs*)src;
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = fp16_to_fp32(x[b].d);
        for (int i = 0; i < QK_K / 32; i++, y += 32) {
            const float dl = d * iq4_xs_scale(x[b], i);
            const uint8_t* qs = x[b].qs + 16 * i;
            for (int j = 0; j < 16; j++) {
                y[j] = dl * kIQ4NLValues[qs[j] & 0xF];
                y[j + 16] = dl * kIQ4NLValues[qs[j] >> 4];
            }
        }
    }
}

// Grid values of the IQ types: byte k of a grid entry.
static inline int grid_byte(uint64_t e, int k) { return (int)(uint8_t)(e >> (8 * k)); }

// IQ2_XXS sub-block ib of block x: the 32 (grid value, sign) pairs and the scale.
static inline void iq2_xxs_sub(const block_iq2_xxs& x, int ib, int8_t* g, bool* neg, int* scale) {
    uint32_t a[2];
    std::memcpy(a, x.qs + 4 * ib, 8);
    for (int l = 0; l < 4; l++) {
        const uint64_t e = kIQ2XXSGrid[(a[0] >> (8 * l)) & 0xFF];
        const int s = iq_ksigns((a[1] >> (7 * l)) & 127);
        for (int j = 0; j < 8; j++) {
            g[8 * l + j] = (int8_t)grid_byte(e, j);
            neg[8 * l + j] = (s >> j) & 1;
        }
    }
    *scale = (int)(a[1] >> 28);
}

static void dequant_iq2_xxs(const void* src, float* y, int64_t n) {
    const block_iq2_xxs* x = (const block_iq2_xxs*)src;
    int8_t g[32];
    bool neg[32];
    int s;
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = fp16_to_fp32(x[b].d);
        for (int ib = 0; ib < 8; ib++, y += 32) {
            iq2_xxs_sub(x[b], ib, g, neg, &s);
            const float db = d * (0.5f + (float)s) * 0.25f;
            for (int j = 0; j < 32; j++) y[j] = db * g[j] * (neg[j] ? -1.f : 1.f);
        }
    }
}

// IQ3_S sub-block ib: grid values and signs in element order.
static inline void iq3_s_sub(const block_iq3_s& x, int ib, int8_t* g, bool* neg) {
    for (int k = 0; k < 8; k++) {
        const uint32_t e = kIQ3SGrid[x.qs[8 * ib + k] | (((x.qh[ib] >> k) & 1) << 8)];
        for (int j = 0; j < 4; j++) g[4 * k + j] = (int8_t)(e >> (8 * j));
    }
    for (int j = 0; j < 32; j++) neg[j] = (x.signs[4 * ib + j / 8] >> (j % 8)) & 1;
}

static inline int iq3_s_scale(const block_iq3_s& x, int ib) { return 1 + 2 * ((x.scales[ib / 2] >> (4 * (ib % 2))) & 0xF); }

static void dequant_iq3_s(const void* src, float* y, int64_t n) {
    const block_iq3_s* x = (const block_iq3_s*)src;
    int8_t g[32];
    bool neg[32];
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = fp16_to_fp32(x[b].d);
        for (int ib = 0; ib < 8; ib++, y += 32) {
            iq3_s_sub(x[b], ib, g, neg);
            const float db = d * (float)iq3_s_scale(x[b], ib);
            for (int j = 0; j < 32; j++) y[j] = db * g[j] * (neg[j] ? -1.f : 1.f);
        }
    }
}

// IQ1_S sub-block ib: the 32 grid values (-1, 0, 1) in element order.
static inline void iq1_s_sub(const block_iq1_s& x, int ib, int8_t* g) {
    for (int l = 0; l < 4; l++) {
        const uint64_t e = kIQ1SGrid[x.qs[4 * ib + l] | (((x.qh[ib] >> (3 * l)) & 7) << 8)];
        for (int j = 0; j < 8; j++) g[8 * l + j] = (int8_t)grid_byte(e, j);
    }
}

static void dequant_iq1_s(const void* src, float* y, int64_t n) {
    const block_iq1_s* x = (const block_iq1_s*)src;
    int8_t g[32];
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = fp16_to_fp32(x[b].d);
        for (int ib = 0; ib < 8; ib++, y += 32) {
            iq1_s_sub(x[b], ib, g);
            const float dl = d * (float)(2 * ((x[b].qh[ib] >> 12) & 7) + 1);
            const float delta = (x[b].qh[ib] & 0x8000) ? -kIQ1SDelta : kIQ1SDelta;
            for (int j = 0; j < 32; j++) y[j] = dl * ((float)g[j] + delta);
        }
    }
}

// IQ2_XS / IQ2_S / IQ3_XXS sub-block ib: 32 grid values, their signs, and the scale nibble
// of each 16 values (s16[0], s16[1]; equal for IQ3_XXS).
static inline void iq2_xs_sub(const block_iq2_xs& x, int ib, int8_t* g, bool* neg, int* s16) {
    for (int l = 0; l < 4; l++) {
        const int q = x.qs[4 * ib + l];
        const uint64_t e = kIQ2XSGrid[q & 511];
        const int s = iq_ksigns(q >> 9);
        for (int j = 0; j < 8; j++) {
            g[8 * l + j] = (int8_t)grid_byte(e, j);
            neg[8 * l + j] = (s >> j) & 1;
        }
    }
    s16[0] = x.scales[ib] & 0xF;
    s16[1] = x.scales[ib] >> 4;
}

static inline void iq2_s_sub(const block_iq2_s& x, int ib, int8_t* g, bool* neg, int* s16) {
    for (int l = 0; l < 4; l++) {
        const uint64_t e = kIQ2SGrid[x.qs[4 * ib + l] | (((x.qh[ib] >> (2 * l)) & 3) << 8)];
        const int s = x.qs[32 + 4 * ib + l];
        for (int j = 0; j < 8; j++) {
            g[8 * l + j] = (int8_t)grid_byte(e, j);
            neg[8 * l + j] = (s >> j) & 1;
        }
    }
    s16[0] = x.scales[ib] & 0xF;
    s16[1] = x.scales[ib] >> 4;
}

static inline void iq3_xxs_sub(const block_iq3_xxs& x, int ib, int8_t* g, bool* neg, int* s16) {
    uint32_t aux;
    std::memcpy(&aux, x.qs + 64 + 4 * ib, 4);
    for (int k = 0; k < 8; k++) {
        const uint32_t e = kIQ3XXSGrid[x.qs[8 * ib + k]];
        for (int j = 0; j < 4; j++) g[4 * k + j] = (int8_t)(e >> (8 * j));
    }
    for (int l = 0; l < 4; l++) {
        const int s = iq_ksigns((aux >> (7 * l)) & 127);
        for (int j = 0; j < 8; j++) neg[8 * l + j] = (s >> j) & 1;
    }
    s16[0] = s16[1] = (int)(aux >> 28);
}

// d * (0.5 + s) * f for each 16 values, in gguf's order of operations (f = 1/4 or 1/2).
template <typename B, void (*sub)(const B&, int, int8_t*, bool*, int*)>
static void dequant_iq_signed(const void* src, float* y, int64_t n, float f) {
    const B* x = (const B*)src;
    int8_t g[32];
    bool neg[32];
    int s16[2];
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = fp16_to_fp32(x[b].d);
        for (int ib = 0; ib < 8; ib++, y += 32) {
            sub(x[b], ib, g, neg, s16);
            for (int j = 0; j < 32; j++) {
                const float db = d * (0.5f + (float)s16[j / 16]) * f;
                y[j] = db * g[j] * (neg[j] ? -1.f : 1.f);
            }
        }
    }
}
static void dequant_iq2_xs(const void* s, float* y, int64_t n) { dequant_iq_signed<block_iq2_xs, iq2_xs_sub>(s, y, n, 0.25f); }
static void dequant_iq2_s(const void* s, float* y, int64_t n) { dequant_iq_signed<block_iq2_s, iq2_s_sub>(s, y, n, 0.25f); }
static void dequant_iq3_xxs(const void* s, float* y, int64_t n) { dequant_iq_signed<block_iq3_xxs, iq3_xxs_sub>(s, y, n, 0.5f); }

// llama.cpp's reference dot of the same types: per 16 values the integer sum times the odd
// scale 2s + 1, one float multiply per block, the constant factor (1/8, 1/4) at the end.
template <typename B, void (*sub)(const B&, int, int8_t*, bool*, int*)>
static float dot_iq_signed(int64_t n, const void* w, const void* a, float f) {
    const B* x = (const B*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    int8_t g[32];
    bool neg[32];
    int s16[2];
    for (int64_t b = 0; b < n / QK_K; b++) {
        int bsum = 0;
        for (int ib = 0; ib < 8; ib++) {
            sub(x[b], ib, g, neg, s16);
            for (int h = 0; h < 2; h++) {
                int sumi = 0;
                for (int j = 16 * h; j < 16 * h + 16; j++) sumi += g[j] * y[b].qs[32 * ib + j] * (neg[j] ? -1 : 1);
                bsum += sumi * (2 * s16[h] + 1);
            }
        }
        s += fp16_to_fp32(x[b].d) * y[b].d * (float)bsum;
    }
    return f * s;
}
static float dot_iq2_xs(int64_t n, const void* w, const void* a) { return dot_iq_signed<block_iq2_xs, iq2_xs_sub>(n, w, a, 0.125f); }
static float dot_iq2_s(int64_t n, const void* w, const void* a) { return dot_iq_signed<block_iq2_s, iq2_s_sub>(n, w, a, 0.125f); }
static float dot_iq3_xxs(int64_t n, const void* w, const void* a) { return dot_iq_signed<block_iq3_xxs, iq3_xxs_sub>(n, w, a, 0.25f); }

// IQ1_M sub-block ib: 32 grid values, the delta sign of each group of 8 (true: -delta), and
// the 3-bit scale of each 16 values.
static inline void iq1_m_sub(const block_iq1_m& x, int ib, int8_t* g, bool* dneg, int* s16) {
    for (int l = 0; l < 4; l++) {
        const int nib = (x.qh[2 * ib + l / 2] >> (4 * (l % 2))) & 0xF;
        const uint64_t e = kIQ1SGrid[x.qs[4 * ib + l] | ((nib & 7) << 8)];
        for (int j = 0; j < 8; j++) g[8 * l + j] = (int8_t)grid_byte(e, j);
        dneg[l] = nib & 8;
    }
    uint16_t sc;
    std::memcpy(&sc, x.scales + 2 * (ib / 2), 2);
    s16[0] = (sc >> (6 * (ib % 2))) & 7;
    s16[1] = (sc >> (6 * (ib % 2) + 3)) & 7;
}

static void dequant_iq1_m(const void* src, float* y, int64_t n) {
    const block_iq1_m* x = (const block_iq1_m*)src;
    int8_t g[32];
    bool dneg[4];
    int s16[2];
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = fp16_to_fp32(iq1_m_d(x[b]));
        for (int ib = 0; ib < 8; ib++, y += 32) {
            iq1_m_sub(x[b], ib, g, dneg, s16);
            for (int j = 0; j < 32; j++) {
                const float dl = d * (float)(2 * s16[j / 16] + 1);
                y[j] = dl * ((float)g[j] + (dneg[j / 8] ? -kIQ1SDelta : kIQ1SDelta));
            }
        }
    }
}

static float dot_iq1_m(int64_t n, const void* w, const void* a) {
    const block_iq1_m* x = (const block_iq1_m*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    int8_t g[32];
    bool dneg[4];
    int s16[2];
    for (int64_t b = 0; b < n / QK_K; b++) {
        int sumi1 = 0, sumi2 = 0;
        for (int ib = 0; ib < 8; ib++) {
            iq1_m_sub(x[b], ib, g, dneg, s16);
            const int8_t* q8 = y[b].qs + 32 * ib;
            for (int l = 0; l < 4; l++) {
                int lsum1 = 0, lsum2 = 0;
                for (int j = 8 * l; j < 8 * l + 8; j++) {
                    lsum1 += g[j] * q8[j];
                    lsum2 += q8[j];
                }
                const int ls = 2 * s16[l / 2] + 1;
                sumi1 += ls * lsum1;
                sumi2 += ls * lsum2 * (dneg[l] ? -1 : 1);
            }
        }
        s += fp16_to_fp32(iq1_m_d(x[b])) * y[b].d * ((float)sumi1 + kIQ1SDelta * (float)sumi2);
    }
    return s;
}

static void dequant_q8_0(const void* src, float* y, int64_t n) {
    const block_q8_0* x = (const block_q8_0*)src;
    for (int64_t b = 0; b < n / QK32; b++, y += QK32) {
        const float d = fp16_to_fp32(x[b].d);
        for (int j = 0; j < QK32; j++) y[j] = x[b].qs[j] * d;
    }
}

// Shared by Q4_K and Q5_K (qh = nullptr for Q4_K): one 256-block.
static void dequant_k4_block(const uint8_t* q, const uint8_t* qh, const uint8_t* scales, float d, float dmin,
                             float* y) {
    for (int c = 0; c < 4; c++, q += 32) {
        uint8_t sc, m;
        get_scale_min_k4(2 * c, scales, &sc, &m);
        const float d1 = d * sc, m1 = dmin * m;
        get_scale_min_k4(2 * c + 1, scales, &sc, &m);
        const float d2 = d * sc, m2 = dmin * m;
        const int u1 = 1 << (2 * c), u2 = 2 << (2 * c);
        for (int l = 0; l < 32; l++) *y++ = d1 * ((q[l] & 0xF) + (qh && (qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * ((q[l] >> 4) + (qh && (qh[l] & u2) ? 16 : 0)) - m2;
    }
}

static void dequant_q4_K(const void* src, float* y, int64_t n) {
    const block_q4_K* x = (const block_q4_K*)src;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K)
        dequant_k4_block(x[b].qs, nullptr, x[b].scales, fp16_to_fp32(x[b].d), fp16_to_fp32(x[b].dmin), y);
}

static void dequant_q5_K(const void* src, float* y, int64_t n) {
    const block_q5_K* x = (const block_q5_K*)src;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K)
        dequant_k4_block(x[b].qs, x[b].qh, x[b].scales, fp16_to_fp32(x[b].d), fp16_to_fp32(x[b].dmin), y);
}

static void dequant_q6_K(const void* src, float* y, int64_t n) {
    const block_q6_K* x = (const block_q6_K*)src;
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = fp16_to_fp32(x[b].d);
        const uint8_t* ql = x[b].ql;
        const uint8_t* qh = x[b].qh;
        const int8_t* sc = x[b].scales;
        for (int half = 0; half < 2; half++, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = (int)((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is + 0] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

// ---------------------------------------------------------------- activation quantization

static void quant_act_f32(const float* x, void* dst, int64_t n) { std::memcpy(dst, x, n * 4); }

// Activations are quantized exactly as llama.cpp's x86 code does (quantize_row_q8_0 /
// quantize_row_q8_K), so that a GGUF gives the same int8 activations, and results close to
// llama.cpp's, whichever engine runs it.
//
// 32-blocks (llama.cpp's Q8_0 activations): d = amax/127 stored as fp16, q = x * 127/amax
// rounded to nearest even.
static void quant_act_q8_32(const float* x, void* dst, int64_t n) {
    block_q8_32* y = (block_q8_32*)dst;
    for (int64_t b = 0; b < n / QK32; b++, x += QK32) {
        float amax = 0.f;
        for (int j = 0; j < QK32; j++) amax = std::fmax(amax, std::fabs(x[j]));
        const float id = amax != 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < QK32; j++) {
            const int q = nearest_int(x[j] * id);
            y[b].qs[j] = (int8_t)q;
            sum += q;
        }
        y[b].d = round_to_fp16(amax / 127.f);
        y[b].sum = sum;
    }
}

// 32-blocks for Q4_1 / Q5_1 (llama.cpp's Q8_1): as Q8_0, plus s = fp16(d * sum of quants)
// with the unrounded d.
static void quant_act_q8_1(const float* x, void* dst, int64_t n) {
    block_q8_1* y = (block_q8_1*)dst;
    for (int64_t b = 0; b < n / QK32; b++, x += QK32) {
        float amax = 0.f;
        for (int j = 0; j < QK32; j++) amax = std::fmax(amax, std::fabs(x[j]));
        const float d = amax / 127.f;
        const float id = amax != 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < QK32; j++) {
            const int q = nearest_int(x[j] * id);
            y[b].qs[j] = (int8_t)q;
            sum += q;
        }
        y[b].d = round_to_fp16(d);
        y[b].s = round_to_fp16(d * (float)sum);
    }
}

// 256-blocks (llama.cpp's Q8_K): the value of largest magnitude (the first one, on ties)
// maps to -127, d = 1/iscale (negative when that value is positive).
static void quant_act_q8_K(const float* x, void* dst, int64_t n) {
    block_q8_K* y = (block_q8_K*)dst;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        float amax = 0.f, mx = 0.f;
        for (int j = 0; j < QK_K; j++) {
            const float ax = std::fabs(x[j]);
            if (ax > amax) {
                amax = ax;
                mx = x[j];
            }
        }
        if (amax == 0.f) {
            std::memset(&y[b], 0, sizeof(y[b]));
            continue;
        }
        const float iscale = -127.f / mx;
        for (int j = 0; j < QK_K; j++) y[b].qs[j] = (int8_t)std::min(127, nearest_int(iscale * x[j]));
        for (int i = 0; i < QK_K / 16; i++) {
            int s = 0;
            for (int j = 0; j < 16; j++) s += y[b].qs[16 * i + j];
            y[b].bsums[i] = (int16_t)s;
        }
        y[b].d = 1.f / iscale;
    }
}

// ---------------------------------------------------------------- dot products

// Float weights: one definition for F32 / F16 / BF16, parameterized by how an element loads.
static inline float load_f32(const void* p, int64_t i) { return ((const float*)p)[i]; }
static inline float load_f16(const void* p, int64_t i) { return fp16_to_fp32(((const uint16_t*)p)[i]); }
static inline float load_bf16(const void* p, int64_t i) { return bf16_to_fp32(((const uint16_t*)p)[i]); }

template <float (*load)(const void*, int64_t)>
static float dot_float(int64_t n, const void* w, const void* a) {
    const float* y = (const float*)a;
    double s = 0;  // the reference sums in double; SIMD paths sum in float lanes
    for (int64_t i = 0; i < n; i++) s += (double)load(w, i) * y[i];
    return (float)s;
}

// Q4_0 / Q5_0: sum d * da * (q . qa - offset * sum(qa)), the offset from the activation's sum.
template <class B>
static float dot_offset_32(int64_t n, const B* x, const uint8_t* (*qh)(const B&), const block_q8_32* y, int offset) {
    float s = 0.f;
    int q[QK32];
    for (int64_t b = 0; b < n / QK32; b++) {
        unpack_32(x[b].qs, qh(x[b]), q);
        s += fp16_to_fp32(x[b].d) * y[b].d * (float)(dot_32(q, y[b].qs) - offset * y[b].sum);
    }
    return s;
}

// Q4_1 / Q5_1: sum d * da * (q . qa) + m * s, the min's term from the activation's s.
template <class B>
static float dot_min_32(int64_t n, const B* x, const uint8_t* (*qh)(const B&), const block_q8_1* y) {
    float s = 0.f;
    int q[QK32];
    for (int64_t b = 0; b < n / QK32; b++) {
        unpack_32(x[b].qs, qh(x[b]), q);
        s += fp16_to_fp32(x[b].d) * y[b].d * (float)dot_32(q, y[b].qs) + fp16_to_fp32(x[b].m) * y[b].s;
    }
    return s;
}

static float dot_q4_0(int64_t n, const void* w, const void* a) {
    return dot_offset_32(n, (const block_q4_0*)w, no_qh<block_q4_0>, (const block_q8_32*)a, 8);
}
static float dot_q5_0(int64_t n, const void* w, const void* a) {
    return dot_offset_32(n, (const block_q5_0*)w, qh_of<block_q5_0>, (const block_q8_32*)a, 16);
}
static float dot_q4_1(int64_t n, const void* w, const void* a) {
    return dot_min_32(n, (const block_q4_1*)w, no_qh<block_q4_1>, (const block_q8_1*)a);
}
static float dot_q5_1(int64_t n, const void* w, const void* a) {
    return dot_min_32(n, (const block_q5_1*)w, qh_of<block_q5_1>, (const block_q8_1*)a);
}

static float dot_q2_K(int64_t n, const void* w, const void* a) {
    const block_q2_K* x = (const block_q2_K*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    int8_t q[QK_K];
    for (int64_t b = 0; b < n / QK_K; b++) {
        unpack_q2_q3(x[b].qs, nullptr, q);
        int sumi = 0, summ = 0;
        for (int i = 0; i < 16; i++) {
            int si = 0;
            for (int l = 0; l < 16; l++) si += q[16 * i + l] * y[b].qs[16 * i + l];
            sumi += (x[b].scales[i] & 0xF) * si;
            summ += (x[b].scales[i] >> 4) * y[b].bsums[i];
        }
        s += y[b].d * fp16_to_fp32(x[b].d) * (float)sumi - y[b].d * fp16_to_fp32(x[b].dmin) * (float)summ;
    }
    return s;
}

static float dot_q3_K(int64_t n, const void* w, const void* a) {
    const block_q3_K* x = (const block_q3_K*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    int8_t q[QK_K], sc[16];
    for (int64_t b = 0; b < n / QK_K; b++) {
        unpack_q2_q3(x[b].qs, x[b].hmask, q);
        q3_k_scales(x[b].scales, sc);
        int sumi = 0;
        for (int i = 0; i < 16; i++) {
            int si = 0;
            for (int l = 0; l < 16; l++) si += q[16 * i + l] * y[b].qs[16 * i + l];
            sumi += sc[i] * si;
        }
        s += fp16_to_fp32(x[b].d) * y[b].d * (float)sumi;
    }
    return s;
}

// IQ4_NL on llama.cpp's Q8_0 activations; IQ4_XS on Q8_K.
static float dot_iq4_nl(int64_t n, const void* w, const void* a) {
    const block_iq4_nl* x = (const block_iq4_nl*)w;
    const block_q8_32* y = (const block_q8_32*)a;
    float s = 0.f;
    for (int64_t b = 0; b < n / QK32; b++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += kIQ4NLValues[x[b].qs[j] & 0xF] * y[b].qs[j] + kIQ4NLValues[x[b].qs[j] >> 4] * y[b].qs[j + 16];
        s += fp16_to_fp32(x[b].d) * y[b].d * (float)sumi;
    }
    return s;
}

static float dot_iq4_xs(int64_t n, const void* w, const void* a) {
    const block_iq4_xs* x = (const block_iq4_xs*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    for (int64_t b = 0; b < n / QK_K; b++) {
        int sumi = 0;
        for (int i = 0; i < QK_K / 32; i++) {
            const uint8_t* qs = x[b].qs + 16 * i;
            const int8_t* q8 = y[b].qs + 32 * i;
            int si = 0;
            for (int j = 0; j < 16; j++) si += kIQ4NLValues[qs[j] & 0xF] * q8[j] + kIQ4NLValues[qs[j] >> 4] * q8[j + 16];
            sumi += iq4_xs_scale(x[b], i) * si;
        }
        s += fp16_to_fp32(x[b].d) * y[b].d * (float)sumi;
    }
    return s;
}

// IQ2_XXS / IQ3_S / IQ1_S on Q8_K activations, as llama.cpp's reference dots: integer sums
// per sub-block times the odd integer scale, one float multiply per block.
static float dot_iq2_xxs(int64_t n, const void* w, const void* a) {
    const block_iq2_xxs* x = (const block_iq2_xxs*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    int8_t g[32];
    bool neg[32];
    int sc;
    for (int64_t b = 0; b < n / QK_K; b++) {
        int bsum = 0;
        for (int ib = 0; ib < 8; ib++) {
            iq2_xxs_sub(x[b], ib, g, neg, &sc);
            int sumi = 0;
            for (int j = 0; j < 32; j++) sumi += g[j] * y[b].qs[32 * ib + j] * (neg[j] ? -1 : 1);
            bsum += sumi * (2 * sc + 1);
        }
        s += fp16_to_fp32(x[b].d) * y[b].d * (float)bsum;
    }
    return 0.125f * s;
}

static float dot_iq3_s(int64_t n, const void* w, const void* a) {
    const block_iq3_s* x = (const block_iq3_s*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    int8_t g[32];
    bool neg[32];
    for (int64_t b = 0; b < n / QK_K; b++) {
        int bsum = 0;
        for (int ib = 0; ib < 8; ib++) {
            iq3_s_sub(x[b], ib, g, neg);
            int sumi = 0;
            for (int j = 0; j < 32; j++) sumi += g[j] * y[b].qs[32 * ib + j] * (neg[j] ? -1 : 1);
            bsum += sumi * iq3_s_scale(x[b], ib);
        }
        s += fp16_to_fp32(x[b].d) * y[b].d * (float)bsum;
    }
    return s;
}

static float dot_iq1_s(int64_t n, const void* w, const void* a) {
    const block_iq1_s* x = (const block_iq1_s*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    int8_t g[32];
    for (int64_t b = 0; b < n / QK_K; b++) {
        int sumi = 0, sumi1 = 0;
        for (int ib = 0; ib < 8; ib++) {
            iq1_s_sub(x[b], ib, g);
            int lsum = 0;
            for (int j = 0; j < 32; j++) lsum += g[j] * y[b].qs[32 * ib + j];
            const int ls = 2 * ((x[b].qh[ib] >> 12) & 7) + 1;
            sumi += ls * lsum;
            sumi1 += ls * ((x[b].qh[ib] & 0x8000) ? -1 : 1) * (y[b].bsums[2 * ib] + y[b].bsums[2 * ib + 1]);
        }
        s += fp16_to_fp32(x[b].d) * y[b].d * ((float)sumi + kIQ1SDelta * (float)sumi1);
    }
    return s;
}

static float dot_q8_0(int64_t n, const void* w, const void* a) {
    const block_q8_0* x = (const block_q8_0*)w;
    const block_q8_32* y = (const block_q8_32*)a;
    float s = 0.f;
    for (int64_t b = 0; b < n / QK32; b++) {
        int sumi = 0;
        for (int j = 0; j < QK32; j++) sumi += x[b].qs[j] * y[b].qs[j];
        s += fp16_to_fp32(x[b].d) * y[b].d * (float)sumi;
    }
    return s;
}

// Shared by Q4_K and Q5_K: q[] holds the 256 unsigned quants of one block already unpacked.
static float dot_k4_block(const uint8_t* q, const uint8_t* scales, float d, float dmin,
                          const block_q8_K* y) {
    int sumi = 0, summ = 0;
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        get_scale_min_k4(j, scales, &sc, &m);
        int s = 0;
        for (int l = 0; l < 32; l++) s += q[32 * j + l] * y->qs[32 * j + l];
        sumi += sc * s;
        summ += m * (y->bsums[2 * j] + y->bsums[2 * j + 1]);
    }
    return y->d * (d * (float)sumi - dmin * (float)summ);
}

static float dot_q4_K(int64_t n, const void* w, const void* a) {
    const block_q4_K* x = (const block_q4_K*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    uint8_t q[QK_K];
    for (int64_t b = 0; b < n / QK_K; b++) {
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                q[64 * c + l] = x[b].qs[32 * c + l] & 0xF;
                q[64 * c + 32 + l] = x[b].qs[32 * c + l] >> 4;
            }
        s += dot_k4_block(q, x[b].scales, fp16_to_fp32(x[b].d), fp16_to_fp32(x[b].dmin), &y[b]);
    }
    return s;
}

static float dot_q5_K(int64_t n, const void* w, const void* a) {
    const block_q5_K* x = (const block_q5_K*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    uint8_t q[QK_K];
    for (int64_t b = 0; b < n / QK_K; b++) {
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                const uint8_t h = x[b].qh[l];
                q[64 * c + l] = (x[b].qs[32 * c + l] & 0xF) | (((h >> (2 * c)) & 1) << 4);
                q[64 * c + 32 + l] = (x[b].qs[32 * c + l] >> 4) | (((h >> (2 * c + 1)) & 1) << 4);
            }
        s += dot_k4_block(q, x[b].scales, fp16_to_fp32(x[b].d), fp16_to_fp32(x[b].dmin), &y[b]);
    }
    return s;
}

static float dot_q6_K(int64_t n, const void* w, const void* a) {
    const block_q6_K* x = (const block_q6_K*)w;
    const block_q8_K* y = (const block_q8_K*)a;
    float s = 0.f;
    for (int64_t b = 0; b < n / QK_K; b++) {
        int8_t q[QK_K];
        const uint8_t* ql = x[b].ql;
        const uint8_t* qh = x[b].qh;
        for (int half = 0; half < 2; half++, ql += 64, qh += 32) {
            int8_t* o = q + 128 * half;
            for (int l = 0; l < 32; l++) {
                o[l] = (int8_t)(((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
                o[l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                o[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                o[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
        }
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            int si = 0;
            for (int l = 0; l < 16; l++) si += q[16 * j + l] * y[b].qs[16 * j + l];
            sumi += x[b].scales[j] * si;
        }
        s += fp16_to_fp32(x[b].d) * y[b].d * (float)sumi;
    }
    return s;
}

static void attn_scores(const float* q, int64_t nq, const float* rows, int64_t stride, int64_t S, int64_t W,
                        float* out) {
    for (int64_t s = 0; s < S; s++)
        for (int64_t i = 0; i < nq; i++) {
            float acc = 0.f;
            for (int64_t c = 0; c < W; c++) acc += q[i * W + c] * rows[s * stride + c];
            out[i * S + s] = acc;
        }
}

static float exp_sum(float* x, int64_t n, float sub) {
    float sum = 0.f;
    for (int64_t i = 0; i < n; i++) sum += (x[i] = std::exp(x[i] - sub));
    return sum;
}

static void silu_mul(int64_t n, const float* g, const float* u, float* out) {
    for (int64_t i = 0; i < n; i++) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

static void attn_values(const float* p, int64_t nq, const float* rows, int64_t stride, int64_t S, int64_t C,
                        float* out) {
    for (int64_t i = 0; i < nq * C; i++) out[i] = 0.f;
    for (int64_t s = 0; s < S; s++)
        for (int64_t i = 0; i < nq; i++)
            for (int64_t c = 0; c < C; c++) out[i * C + c] += p[i * S + s] * rows[s * stride + c];
}

// (here, beside the reference kernel: the emulated AVX-512 test links this file alone)
int64_t flash_scratch_floats(const flash_args& a) {
    // SIMD: packed queries [Dk][R], a block of scores [kFlashKeys][R], the outputs [R][dv] and
    // four per-row vectors; the scalar reference needs less (dv doubles)
    const int64_t R = kFlashRows;
    return (a.dk[0] + a.dk[1]) * R + kFlashKeys * R + R * a.dv + 4 * R + 16;
}

// The definition of flash.h's attention, row by row: every visible key's score and their max,
// then the exponentials, their sum and the weighted values (double sums for the reference;
// the scores are computed twice rather than held, so the scratch does not grow with the keys).
static void flash_rows(const flash_args& a, int64_t g, int64_t r0, int64_t r1, float* scratch) {
    const int64_t G = a.H / a.Hkv;
    double* acc = (double*)scratch;  // [dv]
    for (int64_t r = r0; r < r1; r++) {
        const int64_t t = r / G, h = g * G + r % G, n = std::min(a.pos0 + t + 1, a.S);
        auto score = [&](int64_t s) {
            double d = 0;
            for (int p = 0; p < 2 && a.dk[p]; p++) {
                const float* q = a.q[p] + t * a.q_t[p] + h * a.q_h[p];
                const float* k = a.k[p] + g * a.k_h[p] + s * a.k_s[p];
                for (int64_t i = 0; i < a.dk[p]; i++) d += (double)q[i] * k[i];
            }
            return (float)d * a.scale;
        };
        float mx = -INFINITY;
        for (int64_t s = 0; s < n; s++) mx = std::max(mx, score(s));
        double sum = 0;
        for (int64_t c = 0; c < a.dv; c++) acc[c] = 0;
        for (int64_t s = 0; s < n; s++) {
            const float e = std::exp(score(s) - mx);
            sum += e;
            const float* v = a.v + g * a.v_h + s * a.v_s;
            for (int64_t c = 0; c < a.dv; c++) acc[c] += (double)e * v[c];
        }
        float* o = a.o + t * a.o_t + h * a.o_h;
        for (int64_t c = 0; c < a.dv; c++) o[c] = (float)(acc[c] / sum);
    }
}

void fill_scalar_kernels(kernel_table* t) {
    std::memset(t, 0, sizeof(*t));
    t->isa = "scalar";
    t->dequant[GGML_F32] = dequant_f32;
    t->dequant[GGML_F16] = dequant_f16;
    t->dequant[GGML_BF16] = dequant_bf16;
    t->dequant[GGML_Q4_0] = dequant_q4_0;
    t->dequant[GGML_Q4_1] = dequant_q4_1;
    t->dequant[GGML_Q5_0] = dequant_q5_0;
    t->dequant[GGML_Q5_1] = dequant_q5_1;
    t->dequant[GGML_Q2_K] = dequant_q2_K;
    t->dequant[GGML_Q3_K] = dequant_q3_K;
    t->dequant[GGML_IQ4_NL] = dequant_iq4_nl;
    t->dequant[GGML_IQ4_XS] = dequant_iq4_xs;
    t->dequant[GGML_IQ2_XXS] = dequant_iq2_xxs;
    t->dequant[GGML_IQ3_S] = dequant_iq3_s;
    t->dequant[GGML_IQ1_S] = dequant_iq1_s;
    t->dequant[GGML_IQ2_XS] = dequant_iq2_xs;
    t->dequant[GGML_IQ2_S] = dequant_iq2_s;
    t->dequant[GGML_IQ3_XXS] = dequant_iq3_xxs;
    t->dequant[GGML_IQ1_M] = dequant_iq1_m;
    t->dequant[GGML_Q8_0] = dequant_q8_0;
    t->dequant[GGML_Q4_K] = dequant_q4_K;
    t->dequant[GGML_Q5_K] = dequant_q5_K;
    t->dequant[GGML_Q6_K] = dequant_q6_K;
    t->dot[GGML_F32] = dot_float<load_f32>;
    t->dot[GGML_F16] = dot_float<load_f16>;
    t->dot[GGML_BF16] = dot_float<load_bf16>;
    t->dot[GGML_Q4_0] = dot_q4_0;
    t->dot[GGML_Q4_1] = dot_q4_1;
    t->dot[GGML_Q5_0] = dot_q5_0;
    t->dot[GGML_Q5_1] = dot_q5_1;
    t->dot[GGML_Q2_K] = dot_q2_K;
    t->dot[GGML_Q3_K] = dot_q3_K;
    t->dot[GGML_IQ4_NL] = dot_iq4_nl;
    t->dot[GGML_IQ4_XS] = dot_iq4_xs;
    t->dot[GGML_IQ2_XXS] = dot_iq2_xxs;
    t->dot[GGML_IQ3_S] = dot_iq3_s;
    t->dot[GGML_IQ1_S] = dot_iq1_s;
    t->dot[GGML_IQ2_XS] = dot_iq2_xs;
    t->dot[GGML_IQ2_S] = dot_iq2_s;
    t->dot[GGML_IQ3_XXS] = dot_iq3_xxs;
    t->dot[GGML_IQ1_M] = dot_iq1_m;
    t->dot[GGML_Q8_0] = dot_q8_0;
    t->dot[GGML_Q4_K] = dot_q4_K;
    t->dot[GGML_Q5_K] = dot_q5_K;
    t->dot[GGML_Q6_K] = dot_q6_K;
    t->quant_act[ACT_F32] = quant_act_f32;
    t->quant_act[ACT_Q8_32] = quant_act_q8_32;
    t->quant_act[ACT_Q8_K] = quant_act_q8_K;
    t->quant_act[ACT_Q8_1] = quant_act_q8_1;
    t->attn_scores = attn_scores;
    t->attn_values = attn_values;
    t->exp_sum = exp_sum;
    t->silu_mul = silu_mul;
    t->flash = flash_rows;
}

}  // namespace hybrid
