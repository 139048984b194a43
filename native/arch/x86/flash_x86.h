// flash.h's attention item with the queries across vector lanes, for any vector width: V is
// x86_avx2_kernels.h's vec8 or avx512.cpp's vec16 (W lanes of float).
// Included by the ISA files after x86_avx2_kernels.h; everything has internal linkage.
//
// Per item (one kv head, kFlashRows query rows): the queries, scaled, are packed transposed
// ([dim][row]) once. Per block of kFlashKeys keys:
// - scores, transposed [key][row]: a tile of KR keys x NV vectors of rows keeps KR x NV sums
//   in registers; per dim it loads NV query vectors and broadcasts KR key elements, read in
//   place from each key part;
// - the causal mask (only where a key lies beyond the block's first row), then the online
//   softmax with the rows in lanes: the column max, exp, the sums, each row's rescale factor;
// - values: a tile of QR rows x CV vectors of value dims, the rows' outputs rescaled and
//   summed over the block's keys in registers (a value vector loaded once for QR rows).
// The outputs are divided by their sums at the end. The exp is exp_v's polynomial (within 2 ulp
// of std::exp); sums run in float in another order than the scalar reference: the results
// agree to a few float ulp of the output's magnitude (tests/test_flash.py states the bound).
#pragma once

#include <algorithm>
#include <cmath>

#include "../../flash.h"

namespace hybrid {
namespace {

// Scores of KR keys (kp[p][r]: part p of key r) with NV vectors of packed query rows (qt, row
// stride kFlashRows), into st (row stride kFlashRows).
template <class V, int KR, int NV>
inline void flash_score_tile(const float* const (&kp)[2][KR], const int64_t* dk, const float* qt, float* st) {
    using T = typename V::T;
    T acc[KR][NV];
    for (int r = 0; r < KR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = V::zero();
    for (int p = 0; p < 2; p++)
        for (int64_t d = 0; d < dk[p]; d++, qt += kFlashRows) {
            T q[NV];
            for (int v = 0; v < NV; v++) q[v] = V::load(qt + v * V::W);
            for (int r = 0; r < KR; r++) {
                const T b = V::bcast(kp[p][r] + d);
                for (int v = 0; v < NV; v++) acc[r][v] = V::fma(b, q[v], acc[r][v]);
            }
        }
    for (int r = 0; r < KR; r++)
        for (int v = 0; v < NV; v++) V::store(st + r * kFlashRows + v * V::W, acc[r][v]);
}

template <class V, int KR, int NV>
inline void flash_scores(const flash_args& a, int64_t g, int64_t key, const float* qt, float* st) {
    const float* kp[2][KR];
    for (int p = 0; p < 2; p++)
        for (int r = 0; r < KR; r++)
            kp[p][r] = a.dk[p] ? a.k[p] + g * a.k_h[p] + (key + r) * a.k_s[p] : a.k[0];
    for (int64_t c = 0; c < kFlashRows; c += NV * V::W) flash_score_tile<V, KR, NV>(kp, a.dk, qt + c, st + c);
}

// Outputs of QR rows (o, row stride dv) x CV vectors of value dims: rescaled by al, plus the
// block's nk keys' weights p (row stride kFlashRows) times their values (vr, row stride v_s).
template <class V, int QR, int CV>
inline void flash_value_tile(const float* p, const float* al, const float* vr, int64_t v_s, int64_t nk, float* o,
                             int64_t dv) {
    using T = typename V::T;
    T acc[QR][CV];
    for (int r = 0; r < QR; r++) {
        const T s = V::bcast(al + r);
        for (int c = 0; c < CV; c++) acc[r][c] = V::mul(V::load(o + r * dv + c * V::W), s);
    }
    for (int64_t j = 0; j < nk; j++, p += kFlashRows, vr += v_s) {
        T x[CV];
        for (int c = 0; c < CV; c++) x[c] = V::load(vr + c * V::W);
        for (int r = 0; r < QR; r++) {
            const T b = V::bcast(p + r);
            for (int c = 0; c < CV; c++) acc[r][c] = V::fma(b, x[c], acc[r][c]);
        }
    }
    for (int r = 0; r < QR; r++)
        for (int c = 0; c < CV; c++) V::store(o + r * dv + c * V::W, acc[r][c]);
}

template <class V, int KR, int NV, int QR, int CV>
void flash_rows_simd(const flash_args& a, int64_t g, int64_t r0, int64_t r1, float* scratch) {
    using T = typename V::T;
    constexpr int W = V::W;
    constexpr int64_t R = kFlashRows, NVEC = R / W;
    static_assert(R % W == 0 && NVEC % NV == 0 && R % QR == 0, "tile shapes must divide the item");
    const int64_t G = a.H / a.Hkv, Dk = a.dk[0] + a.dk[1], dv = a.dv, n = r1 - r0;
    float* qt = scratch;              // [Dk][R] queries, scaled
    float* st = qt + Dk * R;          // [kFlashKeys][R] scores, then weights
    float* ob = st + kFlashKeys * R;  // [R][dv] outputs, unnormalized
    float* pos = ob + R * dv;         // [R] each row's position
    float* m = pos + R;               // [R] running max
    float* l = m + R;                 // [R] running sum
    float* al = l + R;                // [R] this block's rescale factor
    for (int64_t i = 0; i < R; i++) {
        // rows past the item's last repeat it (their results are dropped)
        const int64_t r = r0 + std::min(i, n - 1), t = r / G, h = g * G + r % G;
        pos[i] = (float)(a.pos0 + t);
        float* dst = qt + i;
        for (int p = 0; p < 2 && a.dk[p]; p++) {
            const float* q = a.q[p] + t * a.q_t[p] + h * a.q_h[p];
            for (int64_t d = 0; d < a.dk[p]; d++, dst += R) *dst = q[d] * a.scale;
        }
        m[i] = -INFINITY;
        l[i] = 0.f;
    }
    std::fill(ob, ob + R * dv, 0.f);
    const int64_t first = a.pos0 + r0 / G, last = a.pos0 + (r1 - 1) / G;  // positions of the rows
    const int64_t keys = std::min(last + 1, a.S);
    for (int64_t j0 = 0; j0 < keys; j0 += kFlashKeys) {
        const int64_t nk = std::min(kFlashKeys, keys - j0);
        int64_t j = 0;
        for (; j + KR <= nk; j += KR) flash_scores<V, KR, NV>(a, g, j0 + j, qt, st + j * R);
        for (; j < nk; j++) flash_scores<V, 1, NV>(a, g, j0 + j, qt, st + j * R);
        for (j = std::max<int64_t>(0, first + 1 - j0); j < nk; j++)  // keys some rows cannot see
            for (int64_t v = 0; v < NVEC; v++)
                V::store(st + j * R + v * W, V::select(V::below(V::load(pos + v * W), V::set1((float)(j0 + j))),
                                                       V::set1(-INFINITY), V::load(st + j * R + v * W)));
        for (int64_t v = 0; v < NVEC; v++) {
            float* s = st + v * W;
            T mx = V::load(s);
            for (j = 1; j < nk; j++) mx = V::max(mx, V::load(s + j * R));
            const T mo = V::load(m + v * W), mn = V::max(mo, mx);
            const T scale = x86::exp_v<V>(V::sub(mo, mn));  // 0 on the first block (mo = -inf)
            T sum = V::zero();
            for (j = 0; j < nk; j++) {
                const T e = x86::exp_v<V>(V::sub(V::load(s + j * R), mn));
                V::store(s + j * R, e);
                sum = V::add(sum, e);
            }
            V::store(l + v * W, V::fma(V::load(l + v * W), scale, sum));
            V::store(m + v * W, mn);
            V::store(al + v * W, scale);
        }
        const float* vb = a.v + g * a.v_h + j0 * a.v_s;
        // a column slice of the block's values stays in L1 while every row tile reads it
        int64_t c0 = 0;
        for (; c0 + CV * W <= dv; c0 += CV * W)
            for (int64_t i0 = 0; i0 < n; i0 += QR)
                flash_value_tile<V, QR, CV>(st + i0, al + i0, vb + c0, a.v_s, nk, ob + i0 * dv + c0, dv);
        for (; c0 + W <= dv; c0 += W)
            for (int64_t i0 = 0; i0 < n; i0 += QR)
                flash_value_tile<V, QR, 1>(st + i0, al + i0, vb + c0, a.v_s, nk, ob + i0 * dv + c0, dv);
        for (; c0 < dv; c0++)  // value dims past the last whole vector
            for (int64_t r = 0; r < (n + QR - 1) / QR * QR; r++) {
                float acc = ob[r * dv + c0] * al[r];
                for (j = 0; j < nk; j++) acc += st[j * R + r] * vb[j * a.v_s + c0];
                ob[r * dv + c0] = acc;
            }
    }
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = r0 + i, t = r / G, h = g * G + r % G;
        float* o = a.o + t * a.o_t + h * a.o_h;
        const float inv = 1.f / l[i];
        for (int64_t c = 0; c < dv; c++) o[c] = ob[i * dv + c] * inv;
    }
}

}  // namespace
}  // namespace hybrid
