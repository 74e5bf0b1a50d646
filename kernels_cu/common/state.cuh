// state.cuh: the online-softmax state of one query row over a set of keys.
//
//   o = sum_j exp(s_j - m) * v_j   (unnormalised output, N of its elements per thread)
//   m = max_j s_j                  (running maximum score; -inf while no key was seen)
//   d = sum_j exp(s_j - m)         (running denominator; 0 while no key was seen)
//
// A normalised state is (v, lse) with v = o / d and lse = m + log(d) (natural log).
// Why the empty state never gives NaN: merge() and combine() only update when the new maximum is
// finite, and exp(m - m_new) is exp(-inf) = 0 or a finite number, never
// exp(-inf - -inf); normalize() of an empty state returns v = 0 and lse = -inf explicitly.
#pragma once
#include <math_constants.h>

namespace cpattn {

constexpr float LOG2E = 1.4426950408889634f;  // log2(e): exp(x) = exp2(x * LOG2E)
constexpr float LN2 = 0.6931471805599453f;    // ln(2): log(x) = log2(x) * LN2
#define NEG_INF (-CUDART_INF_F)  // the score of a masked key; the lse of no key

template <int N> struct SoftmaxState {
  float o[N];
  float m;
  float d;

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = 0.f;
    m = NEG_INF;
    d = 0.f;
  }

  // Fold in a normalised state (v, lse) computed over other keys.
  __device__ __forceinline__ void merge(const float (&v)[N], float lse) {
    if (lse == NEG_INF) return;  // an empty state adds nothing
    combine(v, lse, 1.f);
  }

  // Fold in an unnormalised state (o2, m2, d2) over other keys; two empty states stay empty.
  __device__ __forceinline__ void combine(const float (&o2)[N], float m2, float d2) {
    const float m_new = fmaxf(m, m2);
    if (m_new == NEG_INF) return;
    const float scale_old = expf(m - m_new);
    const float scale_new = expf(m2 - m_new);
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = o[i] * scale_old + o2[i] * scale_new;
    d = d * scale_old + d2 * scale_new;
    m = m_new;
  }

  // v = o / d and lse = m + log(d); an empty state gives v = 0 and lse = -inf.
  __device__ __forceinline__ float normalize(float (&v)[N]) const {
    const float inv_d = d > 0.f ? 1.f / d : 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = o[i] * inv_d;
    return d > 0.f ? m + logf(d) : NEG_INF;
  }
};

}  // namespace cpattn
