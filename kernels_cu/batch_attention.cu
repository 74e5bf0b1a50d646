// batch_attention: softmax(q k^T * sm_scale) v for a batch of requests over ragged or paged keys,
// on tensor cores (mma.sync m16n8k16, fp32 accumulate). Prefill, chunked prefill and decode alike.
//
// Grid: (work item of the plan, kv head), one dimension, item-major (common/work_item.cuh).
// Block: WARPS_Q x WARPS_KV warps. A CTA owns ROWS = 16 * M_TILES * WARPS_Q packed rows: row r is query
// q_start + r / group of its request, for query head kv_head * group + r % group, so each K/V tile
// brought into shared memory serves the whole GQA group (decode: the group's heads are the rows).
// Warp (wq, wk) computes the M_TILES blocks of 16 rows from 16 * M_TILES * wq against keys
// [wk * WARP_KEYS, +WARP_KEYS) of each tile (each K / V fragment read from shared memory serves
// M_TILES products); the WARPS_KV partial states of a row are merged through shared memory.
// Tiles of TILE keys stream through STAGES shared-memory buffers with cp.async; keys past the
// item's range are zero-filled (V included: 0 * NaN would poison the output) and masked.
#include "common/dtypes.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/attention_params.cuh"
#include "common/work_item.cuh"

using namespace cpattn;

// Per-thread online-softmax state of the two rows a thread holds (g and g + 8 of its warp's 16).
template <int HEAD_DIM>
struct RowsState {
  float o[HEAD_DIM / 8][4];  // C fragments of O: n-tile of head_dim, then c0..c3
  float m[2];                // running max (log2 domain) of rows g, g + 8
  float d[2];                // this thread's part of the running denominators
};

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
#pragma unroll
  for (int n = 0; n < WARP_KEYS / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = first_key + n * 8 + 2 * (lane % 4) + (e % 2);
      const int query = q_start + (row0 + lane / 4 + 8 * (e / 2)) / p.group_size;
      bool visible = key < kv_end;
      if (p.causal) visible &= key <= query + diag;
      if (p.window_left >= 0) visible &= key >= query + diag - p.window_left;
      if (read_bits && visible && query < qo_len) {
        const long long bit = static_cast<long long>(p.mask_indptr[b]) * 8 +
                              static_cast<long long>(query) * kv_len + key;
        visible = (__ldg(p.mask + (bit >> 3)) >> (bit & 7)) & 1;
      }
      s[n][e] = visible ? s[n][e] : NEG_INF;  // selected, never added: -inf + NaN stays NaN
    }
  }
}

// Online softmax over one tile: new maxima, rescale O and d, scores -> probabilities in place.
// `scale` turns scores into log2-domain logits (1 when the soft cap already did); the running
// maxima st.m are kept in that domain.
template <int HEAD_DIM, int WARP_KEYS>
__device__ __forceinline__ void online_softmax(float (&s)[WARP_KEYS / 8][4], RowsState<HEAD_DIM>& st,
                                               float scale) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float tile_max = NEG_INF;
#pragma unroll
    for (int n = 0; n < WARP_KEYS / 8; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
    const float m_new = fmaxf(st.m[h], tile_max * scale);  // scale > 0: max commutes with it
    // A row that has seen no visible key keeps m = -inf: subtract 0 instead, so that
    // exp2(-inf - m) is 0 and never exp2(-inf + inf) = NaN.
    const float m_ref = m_new == NEG_INF ? 0.f : m_new;
    const float rescale = exp2f(st.m[h] - m_ref);
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
#pragma unroll
    for (int n = 0; n < WARP_KEYS / 8; ++n) {
      s[n][2 * h] = exp2f(fmaf(s[n][2 * h], scale, -m_ref));
      s[n][2 * h + 1] = exp2f(fmaf(s[n][2 * h + 1], scale, -m_ref));
      st.d[h] += s[n][2 * h] + s[n][2 * h + 1];
    }
  }
}

// Decode tiles keep three CTAs per SM (registers capped at 170): memory-bound work wants the
// bytes in flight of more resident CTAs more than it wants registers.
template <int WARPS_KV, int HEAD_DIM>
constexpr int min_ctas_per_sm() { return WARPS_KV > 1 && HEAD_DIM <= 128 ? 3 : 1; }

template <typename T, int HEAD_DIM, int M_TILES, int WARPS_Q, int WARPS_KV, int TILE, int STAGES>
__global__ void __launch_bounds__(32 * WARPS_Q * WARPS_KV, min_ctas_per_sm<WARPS_KV, HEAD_DIM>())
batch_attention_kernel(const AttentionParams p) {
  constexpr int ROWS = 16 * M_TILES * WARPS_Q;
  constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row of q, k, v
  constexpr int THREADS = 32 * WARPS_Q * WARPS_KV;
  constexpr int WARP_KEYS = TILE / WARPS_KV;
  static_assert(HEAD_DIM % 64 == 0, "head_dim must be a multiple of 64 (swizzled tiles)");
  static_assert(WARP_KEYS % 16 == 0, "each warp takes whole 16-key steps of a tile");
  static_assert(STAGES >= 2, "cp.async pipeline needs two stages at least");
  static_assert(M_TILES == 1 || WARPS_KV == 1, "warps split rows or keys, not both");

  WorkItem w;
  if (!load_work_item<ROWS>(p, p.num_qo_heads / p.group_size, w)) return;
  const int item = w.item, kv_head = w.head_block, b = w.request, q_start = w.q_start;
  const int qo_begin = w.qo_begin, qo_len = w.qo_len, kv_len = w.kv_len, group = p.group_size;
  const int valid_rows = w.valid_rows, diag = w.diag, kv_end = w.kv_end;
  int kv_begin = w.kv_begin;
  if (p.window_left >= 0) kv_begin = max(kv_begin, q_start + diag - p.window_left);
  // With a classified custom mask, tiles are those of the plan: [TILE * i, TILE * (i + 1)).
  const int* tile_class = p.tile_class != nullptr ? p.tile_class + p.item_class_offset[item] : nullptr;
  if (tile_class != nullptr) kv_begin -= kv_begin % TILE;
  const int num_tiles = kv_end > kv_begin ? (kv_end - kv_begin + TILE - 1) / TILE : 0;

  extern __shared__ uint4 smem[];
  uint4* q_tile = smem;                                // [ROWS][CHUNKS]
  uint4* k_tiles = q_tile + ROWS * CHUNKS;             // [STAGES][TILE][CHUNKS]
  uint4* v_tiles = k_tiles + STAGES * TILE * CHUNKS;   // [STAGES][TILE][CHUNKS]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wq = warp % WARPS_Q, wk = warp / WARPS_Q;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  // Q rows of this CTA (padding rows zero-filled).
  for (int c = tid; c < ROWS * CHUNKS; c += THREADS) {
    const int r = c / CHUNKS, chunk = c % CHUNKS;
    const bool valid = r < valid_rows;
    const long long offset = valid ? (qo_begin + q_start + r / group) * p.q_stride_token +
                                         (kv_head * group + r % group) * p.q_stride_head
                                   : 0;
    cp_async_16(q_tile + swizzle<CHUNKS>(r, chunk), q + offset + chunk * 8, valid);
  }
  // Each thread copies one 16-byte chunk column of KEYS_PER_THREAD key rows of every tile. The
  // page ids of the next tile to issue are fetched one iteration early, so the wait for them
  // overlaps a tile of compute instead of stalling the copy.
  constexpr int ROW_STEP = THREADS / CHUNKS;
  constexpr int KEYS_PER_THREAD = TILE / ROW_STEP;
  static_assert(THREADS % CHUNKS == 0 && TILE % ROW_STEP == 0, "copy layout must tile the tile");
  const int copy_chunk = tid % CHUNKS, copy_row = tid / CHUNKS;
  const bool paged = p.kv_indices != nullptr;
  const int* page_table = p.kv_indices + (paged ? p.kv_indptr[b] : 0);
  const long long ragged_row = paged ? 0 : p.kv_indptr[b];
  int pages[KEYS_PER_THREAD];
  auto fetch_pages = [&](int tile) {
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
      const int key = kv_begin + tile * TILE + copy_row + i * ROW_STEP;
      pages[i] = paged && key < kv_end ? __ldg(page_table + key / p.page_size) : 0;
    }
  };
  // K and V of a tile travel in two commit groups: S = Q K^T waits for K only, while V is still
  // arriving; P V waits for V.
  auto issue_rows = [&](int tile, int stage, uint4* tiles, const T* base, long long stride_page,
                        long long stride_slot, long long stride_head) {
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
      const int r = copy_row + i * ROW_STEP, key = kv_begin + tile * TILE + r;
      const bool valid = key < kv_end;
      // NOTE: 64-bit offsets: page * stride_page passes 2^31 elements in pools over 4 GB.
      const long long slot = paged ? key % p.page_size : ragged_row + key;
      const long long offset = pages[i] * stride_page + slot * stride_slot + kv_head * stride_head;
      cp_async_16(tiles + stage * TILE * CHUNKS + swizzle<CHUNKS>(r, copy_chunk),
                  base + (valid ? offset : 0) + copy_chunk * 8, valid);
    }
  };
  auto issue_tile = [&](int tile, int stage) {
    issue_rows(tile, stage, k_tiles, k, p.k_stride_page, p.k_stride_slot, p.k_stride_head);
    cp_async_commit();
    issue_rows(tile, stage, v_tiles, v, p.v_stride_page, p.v_stride_slot, p.v_stride_head);
    cp_async_commit();
  };
#pragma unroll
  for (int t = 0; t < STAGES - 1; ++t) {  // prologue; Q travels in the first group
    if (t < num_tiles) {
      fetch_pages(t);
      issue_tile(t, t);
    } else {
      cp_async_commit();
      cp_async_commit();
    }
  }
  fetch_pages(STAGES - 1);

  RowsState<HEAD_DIM> st[M_TILES];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
    for (int n = 0; n < HEAD_DIM / 8; ++n) st[mt].o[n][0] = st[mt].o[n][1] = st[mt].o[n][2] = st[mt].o[n][3] = 0.f;
    st[mt].m[0] = st[mt].m[1] = NEG_INF;
    st[mt].d[0] = st[mt].d[1] = 0.f;
  }
  const int warp_row0 = wq * M_TILES * 16;  // first row of this warp
  const float logits_scale = p.soft_cap_log2 > 0.f ? 1.f : p.logits_scale;
  const int last_row = max(valid_rows - 1, 0);

  // Groups so far at iteration t, after its issue: K(0) V(0) ... K(t + STAGES - 1) V(...), so
  // K(t) has landed once 2 * STAGES - 1 groups are pending at most, V(t) at 2 * STAGES - 2.
  for (int t = 0; t < num_tiles; ++t) {
    if (t + STAGES - 1 < num_tiles) {
      issue_tile(t + STAGES - 1, (t + STAGES - 1) % STAGES);
      fetch_pages(t + STAGES);
    } else {
      cp_async_commit();
      cp_async_commit();
    }
    cp_async_wait<2 * STAGES - 1>();  // K(t)
    __syncthreads();
    const uint4* k_tile = k_tiles + (t % STAGES) * TILE * CHUNKS;
    const uint4* v_tile = v_tiles + (t % STAGES) * TILE * CHUNKS;
    const int warp_key0 = wk * WARP_KEYS;            // first key of this warp within the tile
    const int first_key = kv_begin + t * TILE + warp_key0;  // ... within the request
    // Custom mask tile class: empty tiles cost no math, full tiles read no bits.
    const int mask_class = tile_class != nullptr ? tile_class[(kv_begin + t * TILE) / TILE]
                                                 : (p.mask != nullptr ? 2 : 1);
    if (mask_class == 0) {
      cp_async_wait<2 * STAGES - 2>();  // V(t) too: the stage is refilled next
      __syncthreads();
      continue;
    }

    // S = Q K^T for this warp's rows x WARP_KEYS keys.
    float s[M_TILES][WARP_KEYS / 8][4];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int n = 0; n < WARP_KEYS / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
      unsigned a[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
        ldmatrix_x4(a[mt], q_tile + swizzle<CHUNKS>(warp_row0 + mt * 16 + lane % 16, kk * 2 + lane / 16));
#pragma unroll
      for (int n = 0; n < WARP_KEYS / 16; ++n) {
        unsigned bk[4];
        const int key_row = warp_key0 + n * 16 + (lane / 16) * 8 + lane % 8;
        ldmatrix_x4(bk, k_tile + swizzle<CHUNKS>(key_row, kk * 2 + (lane / 8) % 2));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_16816<T>(s[mt][2 * n], a[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][2 * n + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      // Only tiles that cross the key range, the causal diagonal, the window edge, or that have
      // a custom mask test each score. Queries of these 16 rows: [first_query, last_query].
      const int row0 = warp_row0 + mt * 16;
      const int first_query = q_start + min(row0, last_row) / group;
      const int last_query = q_start + min(row0 + 15, last_row) / group;
      const int last_key = first_key + WARP_KEYS - 1;
      const bool masked = last_key >= kv_end || mask_class == 2 ||
                          (p.causal && last_key > first_query + diag) ||
                          (p.window_left >= 0 && first_key < last_query + diag - p.window_left);
      scores_to_logits<WARP_KEYS>(s[mt], p, masked, mask_class == 2, first_key, kv_end, row0,
                                  q_start, diag, b, qo_len, kv_len);
      online_softmax<HEAD_DIM, WARP_KEYS>(s[mt], st[mt], logits_scale);
    }

    cp_async_wait<2 * STAGES - 2>();  // V(t)
    __syncthreads();
    // O += P V: the probabilities' C fragments are the A fragments of this product.
#pragma unroll
    for (int kt = 0; kt < WARP_KEYS / 16; ++kt) {
      unsigned a[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) {
        a[mt][0] = pack_pair<T>(s[mt][2 * kt][0], s[mt][2 * kt][1]);
        a[mt][1] = pack_pair<T>(s[mt][2 * kt][2], s[mt][2 * kt][3]);
        a[mt][2] = pack_pair<T>(s[mt][2 * kt + 1][0], s[mt][2 * kt + 1][1]);
        a[mt][3] = pack_pair<T>(s[mt][2 * kt + 1][2], s[mt][2 * kt + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < HEAD_DIM / 16; ++dn) {
        unsigned bv[4];
        const int key_row = warp_key0 + kt * 16 + ((lane / 8) % 2) * 8 + lane % 8;
        ldmatrix_x4_trans(bv, v_tile + swizzle<CHUNKS>(key_row, dn * 2 + lane / 16));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_16816<T>(st[mt].o[2 * dn], a[mt], bv[0], bv[1]);
          mma_16816<T>(st[mt].o[2 * dn + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // the stage is refilled by the next iteration's load
  }
  cp_async_wait<0>();

  // Whole-row denominators: the four threads of a quad hold disjoint keys of the same rows.
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      st[mt].d[h] += __shfl_xor_sync(0xffffffff, st[mt].d[h], 1);
      st[mt].d[h] += __shfl_xor_sync(0xffffffff, st[mt].d[h], 2);
    }
  if constexpr (WARPS_KV > 1) {
    // Warps wk > 0 publish (o, m, d); warp wk = 0 of each row block folds them into its own.
    constexpr int STATE = HEAD_DIM / 2 + 4;  // floats per thread: o, then m[2], d[2]
    float* shared_state = reinterpret_cast<float*>(smem);  // [WARPS_KV][WARPS_Q][STATE][32]
    __syncthreads();
    if (wk > 0) {
      float* mine = shared_state + ((wk * WARPS_Q + wq) * STATE) * 32 + lane;
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[(n * 4 + e) * 32] = st[0].o[n][e];
      mine[(HEAD_DIM / 2 + 0) * 32] = st[0].m[0];
      mine[(HEAD_DIM / 2 + 1) * 32] = st[0].m[1];
      mine[(HEAD_DIM / 2 + 2) * 32] = st[0].d[0];
      mine[(HEAD_DIM / 2 + 3) * 32] = st[0].d[1];
    }
    __syncthreads();
    if (wk > 0) return;
    for (int w = 1; w < WARPS_KV; ++w) {
      const float* other = shared_state + ((w * WARPS_Q + wq) * STATE) * 32 + lane;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_other = other[(HEAD_DIM / 2 + h) * 32];
        const float d_other = other[(HEAD_DIM / 2 + 2 + h) * 32];
        const float m_new = fmaxf(st[0].m[h], m_other);
        const float m_ref = m_new == NEG_INF ? 0.f : m_new;
        const float mine_scale = exp2f(st[0].m[h] - m_ref), other_scale = exp2f(m_other - m_ref);
        st[0].m[h] = m_new;
        st[0].d[h] = st[0].d[h] * mine_scale + d_other * other_scale;
#pragma unroll
        for (int n = 0; n < HEAD_DIM / 8; ++n) {
          st[0].o[n][2 * h] = st[0].o[n][2 * h] * mine_scale + other[(n * 4 + 2 * h) * 32] * other_scale;
          st[0].o[n][2 * h + 1] =
              st[0].o[n][2 * h + 1] * mine_scale + other[(n * 4 + 2 * h + 1) * 32] * other_scale;
        }
      }
    }
  }

  // Normalise and write: rows past valid_rows are padding.
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const RowsState<HEAD_DIM>& row_state = st[mt];
    const int r = warp_row0 + mt * 16 + lane / 4 + 8 * h;
    if (r >= valid_rows) continue;
    const int query = q_start + r / group, head = kv_head * group + r % group;
    const bool empty = row_state.d[h] == 0.f;  // no visible key: output 0, lse -inf
    const float inv_d = empty ? 0.f : 1.f / row_state.d[h];
    const float lse = empty ? NEG_INF : (row_state.m[h] + log2f(row_state.d[h])) * LN2;
    const int dim0 = 2 * (lane % 4);
    if (p.partial_o != nullptr) {
      const long long state = p.item_state[item] + (r / group) * p.item_state_stride[item];
      const long long row = state * p.num_qo_heads + head;
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n)
        store_pair<float>(p.partial_o + row * HEAD_DIM + n * 8 + dim0, row_state.o[n][2 * h] * inv_d,
                          row_state.o[n][2 * h + 1] * inv_d);
      if (lane % 4 == 0) p.partial_lse[row] = lse;
    } else {
      const long long row = static_cast<long long>(qo_begin + query) * p.num_qo_heads + head;
      T* o = static_cast<T*>(p.o);
#pragma unroll
      for (int n = 0; n < HEAD_DIM / 8; ++n)
        store_pair<T>(o + row * HEAD_DIM + n * 8 + dim0, row_state.o[n][2 * h] * inv_d,
                      row_state.o[n][2 * h + 1] * inv_d);
      if (lane % 4 == 0 && p.lse != nullptr) p.lse[row] = lse;
    }
  }
}
