// Causal softmax attention of a long prompt chunk ("flash attention" on the CPU): every query
// of the chunk against the cached keys it may see, in blocks of kFlashRows query rows and
// kFlashKeys keys, with the softmax carried online from key block to key block, so no more
// than one block of scores per worker ever exists and K / V are read once per query block.
//
// One call serves both attention forms of the models: grouped-query attention (query head h
// reads kv head h / G, G = H / Hkv) and MLA's decompressed path (G = 1; its keys come in two
// parts, the per-head no-rope dims and the rope dims shared by every head, read where they
// lie with no concatenated copy). Query (t, h) sits at position pos0 + t and sees keys
// 0 .. pos0 + t.
//
// A work item is one kv head and kFlashRows consecutive rows r = t * G + j of its queries
// (token t, query head g * G + j), so a block of G query heads shares every K / V read. The
// kernel table's `flash` computes one item (scalar: the plain two-pass softmax, the
// reference; AVX2 / AVX-512: queries across vector lanes, both products register-blocked).
#pragma once

#include <cstdint>

#include "pool.h"

namespace hybrid {

constexpr int64_t kFlashRows = 48;  // query rows per item: 6 AVX2 / 3 AVX-512 vectors of lanes
constexpr int64_t kFlashKeys = 64;  // keys per step of an item's online softmax

struct flash_args {
    int64_t H = 0, Hkv = 0;   // query heads, kv heads (H % Hkv == 0)
    int64_t T = 0, S = 0;     // queries (tokens) of the chunk; keys held (S >= pos0 + T)
    int64_t pos0 = 0;         // position of token 0
    int64_t dk[2] = {0, 0};   // key dims in two parts (dk[1] may be 0)
    int64_t dv = 0;           // value dims
    float scale = 1.f;        // softmax scale of the scores
    // part p of query (t, h): q[p] + t * q_t[p] + h * q_h[p], dk[p] contiguous floats
    const float* q[2] = {nullptr, nullptr};
    int64_t q_t[2] = {0, 0}, q_h[2] = {0, 0};
    // part p of key s of kv head g: k[p] + g * k_h[p] + s * k_s[p] (k_h 0: shared by all heads)
    const float* k[2] = {nullptr, nullptr};
    int64_t k_s[2] = {0, 0}, k_h[2] = {0, 0};
    // value s of kv head g: v + g * v_h + s * v_s, dv floats
    const float* v = nullptr;
    int64_t v_s = 0, v_h = 0;
    // output of query (t, h): o + t * o_t + h * o_h, dv floats
    float* o = nullptr;
    int64_t o_t = 0, o_h = 0;
};

// Floats of scratch one item needs (any ISA's kernel).
int64_t flash_scratch_floats(const flash_args& a);

// All items on the pool's workers (longest first, taken from a shared counter), with the
// active kernel table. Throws std::invalid_argument first when `a` is inconsistent (heads,
// dims, a cache shorter than pos0 + T), naming what.
void flash_attention(ThreadPool& pool, const flash_args& a);

}  // namespace hybrid
