// tile_softmax.cuh: the online softmax of a warp's 16 query rows over one tile of keys, in the
// C-fragment layout shared by mma.sync m16n8k16 and wgmma m64nNk16 (each warp of a warpgroup holds
// 16 rows): thread (g = lane / 4, c = lane % 4) holds rows g and g + 8, and of each 8 columns the
// pair 2c, 2c + 1. Scores come in as s[n][e] = S(row g + 8 * (e / 2), key n * 8 + 2c + e % 2).
#pragma once
#include "common/state.cuh"
#include "common/attention_params.cuh"
#include "common/mma.cuh"
#include "common/work_item.cuh"

namespace cpattn {

// Per-thread online-softmax state of the two rows a thread holds (g and g + 8 of its warp's 16).
template <int HEAD_DIM>
struct RowsState {
  float o[HEAD_DIM / 8][4];  // C fragments of O: n-tile of head_dim, then c0..c3
  float m[2];                // running max (log2 domain) of rows g, g + 8
  float d[2];                // this thread's part of the running denominators
};

// KEYS bits of a packed (little-endian) mask from bit `bit` on: bits[k] holds bits bit + 32 k ..
// bit + 32 k + 31. Read as the KEYS / 8 + 1 bytes that cover them, one funnel shift a word, and
// only bytes that start before `keys` (the bits of the row from `bit` on), so nothing past the
// row's mask is read.
template <int KEYS>
__device__ __forceinline__ void row_mask_bits(const unsigned char* mask, long long bit, int keys,
                                              unsigned (&bits)[(KEYS + 31) / 32]) {
  constexpr int BYTES = KEYS / 8 + 1, WORDS = (KEYS + 31) / 32;
  const unsigned char* src = mask + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  unsigned raw[WORDS + 1];
#pragma unroll
  for (int k = 0; k <= WORDS; ++k) raw[k] = 0;
#pragma unroll
  for (int i = 0; i < BYTES; ++i)
    if (8 * i - shift < keys) raw[i / 4] |= static_cast<unsigned>(__ldg(src + i)) << (8 * (i % 4));
#pragma unroll
  for (int k = 0; k < WORDS; ++k) bits[k] = __funnelshift_r(raw[k], raw[k + 1], shift);
}

// Scores of one tile: soft cap (if on), then (tiles that need it) mask. s[n][e] is key
// (n * 8 + 2c + e % 2) of the warp's keys for row g + 8 * (e / 2). Without a soft cap the
// scores stay unscaled: online_softmax folds the scale into the exponent's FMA.
template <int WARP_KEYS>
__device__ __forceinline__ void scores_to_logits(float (&s)[WARP_KEYS / 8][4], const AttentionParams& p,
                                                 bool masked, bool read_bits, int first_key,
                                                 int kv_end, int row0,
                                                 int q_start, int diag, int b, int qo_len, int kv_len) {
  const int lane = threadIdx.x % 32;
  if (p.soft_cap_log2 > 0.f) {  // uniform: tanh only when a soft cap is on
#pragma unroll
    for (int n = 0; n < WARP_KEYS / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = p.soft_cap_log2 * tanhf(s[n][e] * p.logits_scale);
  }
  if (!masked) return;
  // Row h's visible keys [lo, hi) (absolute), then as offsets from first_key.
  int lo[2], hi[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int query = q_start + (row0 + lane / 4 + 8 * h) / p.group_size;
    hi[h] = p.causal ? min(kv_end, query + diag + 1) : kv_end;
    lo[h] = p.window_left >= 0
                ? static_cast<int>(max(static_cast<long long>(query) + diag - p.window_left,
                                       static_cast<long long>(first_key)))
                : first_key;
    if (read_bits && query < qo_len) {  // a partial custom-mask tile: the row's bits too
      const int col = 2 * (lane % 4);
      unsigned bits[(WARP_KEYS + 31) / 32];  // bit n * 8 + e: key first_key + col + n * 8 + e
      row_mask_bits<WARP_KEYS>(p.mask, static_cast<long long>(p.mask_indptr[b]) * 8 +
                                           static_cast<long long>(query) * kv_len + first_key + col,
                               kv_len - first_key - col, bits);
#pragma unroll
      for (int n = 0; n < WARP_KEYS / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = n * 8 + e;
          s[n][2 * h + e] = (bits[j / 32] >> (j % 32)) & 1 ? s[n][2 * h + e] : NEG_INF;
        }
    }
    lo[h] -= first_key;
    hi[h] -= first_key;
  }
  mask_outside(s, lo, hi);
}

// Online softmax over one tile, in two phases (a Hopper kernel issues its next Q K^T between
// them: O must not change while a product accumulating into it may be in flight). `scale` turns
// scores into log2-domain logits (1 when the soft cap already did); the running maxima st.m are
// kept in that domain.
// Phase 1: new row maxima from the tile's (masked) scores; O and d rescaled to them. m_ref gets
// the maxima to subtract: a row that has seen no visible key keeps m = -inf and subtracts 0
// instead, so that exp2(-inf - m) is 0 and never exp2(-inf + inf) = NaN.
template <int HEAD_DIM, int WARP_KEYS>
__device__ __forceinline__ void softmax_rescale(const float (&s)[WARP_KEYS / 8][4],
                                                RowsState<HEAD_DIM>& st, float scale,
                                                float (&m_ref)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float tile_max = quad_row_max(s, h);
    const float m_new = fmaxf(st.m[h], tile_max * scale);  // scale > 0: max commutes with it
    m_ref[h] = m_new == NEG_INF ? 0.f : m_new;
    const float rescale = exp2f(st.m[h] - m_ref[h]);
    st.m[h] = m_new;
    st.d[h] *= rescale;
    // Once the maxima settle most tiles leave them unchanged: skip the multiply by 1 when no row
    // of the warp moved (warp-uniform, so no divergence).
    if (__any_sync(0xffffffff, rescale != 1.f)) {
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n) {
        st.o[n][2 * h] *= rescale;
        st.o[n][2 * h + 1] *= rescale;
      }
    }
  }
}

// Phase 2: scores -> probabilities in place, added into this thread's part of the denominators.
template <int WARP_KEYS>
__device__ __forceinline__ void softmax_exponentiate(float (&s)[WARP_KEYS / 8][4], float (&d)[2],
                                                     const float (&m_ref)[2], float scale) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int n = 0; n < WARP_KEYS / 8; ++n) {
      s[n][2 * h] = exp2f(fmaf(s[n][2 * h], scale, -m_ref[h]));
      s[n][2 * h + 1] = exp2f(fmaf(s[n][2 * h + 1], scale, -m_ref[h]));
      d[h] += s[n][2 * h] + s[n][2 * h + 1];
    }
}

template <int HEAD_DIM, int WARP_KEYS>
__device__ __forceinline__ void online_softmax(float (&s)[WARP_KEYS / 8][4], RowsState<HEAD_DIM>& st,
                                               float scale) {
  float m_ref[2];
  softmax_rescale<HEAD_DIM, WARP_KEYS>(s, st, scale, m_ref);
  softmax_exponentiate<WARP_KEYS>(s, st.d, m_ref, scale);
}

// The first and last query of a warp's 16 rows from row0 (rows past the item's valid ones
// count as its last): the divisions by the group size that mask_block needs, which the Hopper
// prefill does once a work rather than once a tile.
struct WarpQueries {
  int first, last;
};

__device__ __forceinline__ WarpQueries warp_queries(const AttentionParams& p, const WorkItem& w,
                                                    int row0) {
  const int last_row = max(w.valid_rows - 1, 0);
  return {w.q_start + min(row0, last_row) / p.group_size,
          w.q_start + min(row0 + 15, last_row) / p.group_size};
}

// One tile's scores of the 16 rows from row0 (queries `wq`, warp_queries of row0) against KEYS
// keys from first_key, masked where this block needs it: it crosses the key range's end, the
// causal diagonal, the window's edge, or has a partial custom mask tile.
template <int KEYS>
__device__ __forceinline__ void mask_block(float (&s)[KEYS / 8][4], const AttentionParams& p,
                                           const WorkItem& w, const WarpQueries& wq, int row0,
                                           int first_key, int mask_class) {
  const int last_key = first_key + KEYS - 1;
  const bool masked = last_key >= w.kv_end || mask_class == 2 ||
                      (p.causal && last_key > wq.first + w.diag) ||
                      (p.window_left >= 0 && first_key < wq.last + w.diag - p.window_left);
  scores_to_logits<KEYS>(s, p, masked, mask_class == 2, first_key, w.kv_end, row0, w.q_start,
                         w.diag, w.request, w.qo_len, w.kv_len);
}

// mask_block, then the tile folded into the rows' online softmax.
template <int HEAD_DIM, int KEYS>
__device__ __forceinline__ void softmax_block(float (&s)[KEYS / 8][4], RowsState<HEAD_DIM>& st,
                                              const AttentionParams& p, const WorkItem& w,
                                              const WarpQueries& wq, int row0, int first_key,
                                              int mask_class, float logits_scale) {
  mask_block<KEYS>(s, p, w, wq, row0, first_key, mask_class);
  online_softmax<HEAD_DIM, KEYS>(s, st, logits_scale);
}

template <int HEAD_DIM>
__device__ __forceinline__ void init_rows(RowsState<HEAD_DIM>& st) {
#pragma unroll
  for (int n = 0; n < HEAD_DIM / 8; ++n) st.o[n][0] = st.o[n][1] = st.o[n][2] = st.o[n][3] = 0.f;
  st.m[0] = st.m[1] = NEG_INF;
  st.d[0] = st.d[1] = 0.f;
}

// Whole-row denominators: the four threads of a quad hold disjoint keys of the same rows.
template <int HEAD_DIM>
__device__ __forceinline__ void sum_row_denominators(RowsState<HEAD_DIM>& st) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    st.d[h] += __shfl_xor_sync(0xffffffff, st.d[h], 1);
    st.d[h] += __shfl_xor_sync(0xffffffff, st.d[h], 2);
  }
}

// Warps that split the keys of the same 16 rows merge their states through shared memory:
// each other warp publishes its (o, m, d), HEAD_DIM / 2 + 4 floats a thread, and one warp folds
// them into its own. `slot` is a warp's [STATE_FLOATS][32] floats; lanes index the last axis.
template <int HEAD_DIM>
constexpr int state_floats() { return HEAD_DIM / 2 + 4; }

template <int HEAD_DIM>
__device__ __forceinline__ void publish_rows(float* slot, const RowsState<HEAD_DIM>& st) {
  float* mine = slot + threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < HEAD_DIM / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) mine[(n * 4 + e) * 32] = st.o[n][e];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mine[(HEAD_DIM / 2 + h) * 32] = st.m[h];
    mine[(HEAD_DIM / 2 + 2 + h) * 32] = st.d[h];
  }
}

// st <- st merged with a published state over other keys of the same rows (denominators of
// both already summed over the quad, or both not).
template <int HEAD_DIM>
__device__ __forceinline__ void fold_rows(RowsState<HEAD_DIM>& st, const float* slot) {
  const float* other = slot + threadIdx.x % 32;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float m_other = other[(HEAD_DIM / 2 + h) * 32];
    const float d_other = other[(HEAD_DIM / 2 + 2 + h) * 32];
    const float m_new = fmaxf(st.m[h], m_other);
    const float m_ref = m_new == NEG_INF ? 0.f : m_new;
    const float mine_scale = exp2f(st.m[h] - m_ref), other_scale = exp2f(m_other - m_ref);
    st.m[h] = m_new;
    st.d[h] = st.d[h] * mine_scale + d_other * other_scale;
#pragma unroll
    for (int n = 0; n < HEAD_DIM / 8; ++n) {
      st.o[n][2 * h] = st.o[n][2 * h] * mine_scale + other[(n * 4 + 2 * h) * 32] * other_scale;
      st.o[n][2 * h + 1] =
          st.o[n][2 * h + 1] * mine_scale + other[(n * 4 + 2 * h + 1) * 32] * other_scale;
    }
  }
}

// Normalise the two rows a thread holds (g and g + 8 of the 16 from row0, denominators summed)
// and write them: to out and lse, or as the fp32 partial states of a split-KV item. Rows past
// the item's valid rows are padding; a row that saw no key gives 0 and lse -inf.
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void store_rows(const AttentionParams& p, const WorkItem& w, int row0,
                                           const RowsState<HEAD_DIM>& st) {
  const int lane = threadIdx.x % 32, dim0 = 2 * (lane % 4);
  const RowDivider div(p.group_size);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + lane / 4 + 8 * h;
    if (r >= w.valid_rows) continue;
    const PackedRow pr = packed_row(r, div);
    const bool empty = st.d[h] == 0.f;
    const float inv_d = empty ? 0.f : 1.f / st.d[h];
    const float lse = empty ? NEG_INF : (st.m[h] + log2f(st.d[h])) * LN2;
    if (p.partial_o != nullptr) {
      const long long state = p.item_state[w.item] + pr.query * p.item_state_stride[w.item];
      const long long row = state * p.num_qo_heads + w.head_block * p.group_size + pr.head;
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n)
        store_pair<float>(p.partial_o + row * HEAD_DIM + n * 8 + dim0, st.o[n][2 * h] * inv_d,
                          st.o[n][2 * h + 1] * inv_d);
      if (lane % 4 == 0) p.partial_lse[row] = lse;
    } else {
      const long long row = output_row(p, w, pr);
      T* o = static_cast<T*>(p.o);
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n)
        store_pair<T>(o + row * HEAD_DIM + n * 8 + dim0, st.o[n][2 * h] * inv_d,
                      st.o[n][2 * h + 1] * inv_d);
      if (lane % 4 == 0 && p.lse != nullptr) p.lse[row] = lse;
    }
  }
}

}  // namespace cpattn
