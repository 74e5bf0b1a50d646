// mla_tiles.cuh: what the MLA kernels (mla_attention, mla_attention_sm90) share: the cp.async of
// a work item's [q_nope | q_pe] rows and of its [ckv | kpe] key tiles from the paged latent
// cache, the mask of a block of scores, and the store of finished rows.
//
// Rows of Q and of a key tile are 72 16-byte chunks: 64 of ckv (or q_nope), 8 of kpe (or q_pe),
// placed by a Layout (`static int at(int row, int chunk)`: SwizzledRows<72> for mma.sync,
// SwizzledBlocks<rows> for wgmma). Keys past the item's range are zero-filled: the ckv chunks
// are V, and 0 * NaN would poison the output.
#pragma once
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/mla_params.cuh"
#include "common/work_item.cuh"
#include "common/paged.cuh"
#include "common/mbarrier.cuh"

namespace cpattn {

constexpr int MLA_CKV_DIM = 512, MLA_KPE_DIM = 64;
constexpr int MLA_CKV_CHUNKS = MLA_CKV_DIM / 8;                    // 64
constexpr int MLA_ROW_CHUNKS = (MLA_CKV_DIM + MLA_KPE_DIM) / 8;    // 72

// Row r of the CTA is query w.q_start + r / group of the request, head w.head_block * group +
// r % group; rows past w.valid_rows are zero-filled.
template <typename Layout, typename T, int ROWS, int THREADS>
__device__ __forceinline__ void issue_mla_q_rows(const MLAParams& p, const WorkItem& w,
                                                 uint4* q_tile) {
  const T* q_nope = static_cast<const T*>(p.q_nope);
  const T* q_pe = static_cast<const T*>(p.q_pe);
  const int group = p.group_size;
  for (int c = threadIdx.x; c < ROWS * MLA_ROW_CHUNKS; c += THREADS) {
    const int r = c / MLA_ROW_CHUNKS, chunk = c % MLA_ROW_CHUNKS;
    const bool valid = r < w.valid_rows;
    const T* src = q_nope;
    if (valid) {
      const long long token = w.qo_begin + w.q_start + r / group;
      const int head = w.head_block * group + r % group;
      src = chunk < MLA_CKV_CHUNKS
                ? q_nope + token * p.q_nope_stride_token + head * p.q_nope_stride_head + chunk * 8
                : q_pe + token * p.q_pe_stride_token + head * p.q_pe_stride_head +
                      (chunk - MLA_CKV_CHUNKS) * 8;
    }
    cp_async_16(q_tile + Layout::at(r, chunk), src, valid);
  }
}

// Key tiles [w.kv_begin + TILE * t, + TILE) through STAGES buffers (tile t in stage t % STAGES),
// one commit group a tile: start() issues tiles 0 .. STAGES - 2, refill(t) tile t + STAGES - 1
// (an empty group past the last). Thread (row, col) copies chunks col, col + 8, ..., col + 56 of
// ckv and chunk col of kpe of key rows row, row + ROW_STEP, ...; page ids are fetched a tile
// ahead of their copies.
template <typename Layout, typename T, int THREADS, int TILE, int STAGES>
struct MLATiles {
  static constexpr int ROW_STEP = THREADS / 8;
  static constexpr int KEYS_PER_THREAD = TILE / ROW_STEP;
  static_assert(TILE % ROW_STEP == 0, "copy layout must tile the tile");

  const MLAParams& p;
  uint4* tiles;        // [STAGES] tiles of TILE rows of 72 chunks, in Layout
  const int* page_table;
  int kv_begin, kv_end, num_tiles, copy_col, copy_row;
  PageSplit split;
  int pages[KEYS_PER_THREAD];

  __device__ __forceinline__ MLATiles(const MLAParams& params, uint4* stages, const WorkItem& w,
                                      int tile_count)
      : p(params), tiles(stages), kv_begin(w.kv_begin), kv_end(w.kv_end), num_tiles(tile_count),
        split(params.page_size) {
    page_table = p.kv_indices + p.kv_indptr[w.request];
    copy_col = threadIdx.x % 8;
    copy_row = threadIdx.x / 8;
  }

  __device__ __forceinline__ const uint4* stage(int t) const {
    return tiles + (t % STAGES) * TILE * MLA_ROW_CHUNKS;
  }

  __device__ __forceinline__ void fetch_pages(int tile) {
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
      const int key = kv_begin + tile * TILE + copy_row + i * ROW_STEP;
      pages[i] = key < kv_end ? __ldg(page_table + split.index(key)) : 0;
    }
  }

  // Tile `tile` into dst, uncommitted.
  __device__ __forceinline__ void copy(int tile, uint4* dst) {
    const T* ckv = static_cast<const T*>(p.ckv);
    const T* kpe = static_cast<const T*>(p.kpe);
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
      const int r = copy_row + i * ROW_STEP, key = kv_begin + tile * TILE + r;
      const bool valid = key < kv_end;
      // NOTE: 64-bit offsets: page * stride_page passes 2^31 elements in pools over 4 GB.
      const long long page = pages[i], slot = valid ? split.slot(key) : 0;
      const T* ckv_row = valid ? ckv + page * p.ckv_stride_page + slot * p.ckv_stride_slot : ckv;
      const T* kpe_row = valid ? kpe + page * p.kpe_stride_page + slot * p.kpe_stride_slot : kpe;
      // Both layouts swizzle within 8-chunk groups: chunk copy_col + 8 j of row r lies
      // Layout::at(0, 8 j) (a constant) past chunk copy_col.
      uint4* row_dst = dst + Layout::at(r, copy_col);
#pragma unroll
      for (int j = 0; j < MLA_CKV_CHUNKS / 8; ++j)
        cp_async_16(row_dst + Layout::at(0, 8 * j), ckv_row + (copy_col + 8 * j) * 8, valid);
      cp_async_16(row_dst + Layout::at(0, MLA_CKV_CHUNKS), kpe_row + copy_col * 8, valid);
    }
  }

  // One commit group: copy(), committed.
  __device__ __forceinline__ void issue(int tile, uint4* dst) {
    copy(tile, dst);
    cp_async_commit();
  }

  // Producer / consumer pipelines (mbarrier.cuh): tile t into stage `stage`, one arrival on
  // `full` when this thread's copies have landed, then the page ids of tile t + 1.
  __device__ __forceinline__ void produce(int t, int stage, unsigned long long* full) {
    copy(t, tiles + stage * TILE * MLA_ROW_CHUNKS);
    cp_async_arrive(full);
    fetch_pages(t + 1);
  }

  __device__ __forceinline__ void start() {
#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) {
      if (t < num_tiles) {
        fetch_pages(t);
        issue(t, tiles + t * TILE * MLA_ROW_CHUNKS);
      } else {
        cp_async_commit();
      }
    }
    fetch_pages(STAGES - 1);
  }

  // Tile t + STAGES - 1 into the stage of tile t - 1, which every thread must be done with.
  __device__ __forceinline__ void refill(int t) {
    if (t + STAGES - 1 < num_tiles) {
      issue(t + STAGES - 1, tiles + ((t + STAGES - 1) % STAGES) * TILE * MLA_ROW_CHUNKS);
      fetch_pages(t + STAGES);
    } else {
      cp_async_commit();
    }
  }
};

// Scores s[n][e] of the 16 rows from row0 (C fragments) against KEYS keys from first_key: -inf
// past the item's keys and, causal, past each row's diagonal. Only blocks that cross either
// test each score; -inf is selected, never added (-inf + NaN stays NaN).
template <int KEYS>
__device__ __forceinline__ void mla_mask_block(float (&s)[KEYS / 8][4], const MLAParams& p,
                                               const WorkItem& w, int row0, int first_key) {
  const int lane = threadIdx.x % 32;
  const int first_query = w.q_start + min(row0, max(w.valid_rows - 1, 0)) / p.group_size;
  const int last_key = first_key + KEYS - 1;
  if (last_key < w.kv_end && !(p.causal && last_key > first_query + w.diag)) return;
  int lo[2] = {0, 0}, hi[2];  // each row's visible keys, as offsets from first_key
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int query = w.q_start + (row0 + lane / 4 + 8 * h) / p.group_size;
    hi[h] = (p.causal ? min(w.kv_end, query + w.diag + 1) : w.kv_end) - first_key;
  }
  mask_outside(s, lo, hi);
}

// Row r (query w.q_start + r / group) of a finished item: output dims [dim0, dim0 + 8 * N) from
// C fragment elements o[n][2h], o[n][2h + 1] (row g + 8h of the thread's quad), divided by the
// row's whole denominator; written to out and lse, or as split-KV partial states.
template <typename T, int N>
__device__ __forceinline__ void mla_store_row(const MLAParams& p, const WorkItem& w, int r, int h,
                                              const float (&o)[N][4], int dim0, float m,
                                              float denom, bool writes_lse) {
  const bool empty = denom == 0.f;  // no visible key: output 0, lse -inf
  const float inv_d = empty ? 0.f : 1.f / denom;
  const float lse = empty ? NEG_INF : (m + log2f(denom)) * LN2;
  const int group = p.group_size;
  const int query = w.q_start + r / group, head = w.head_block * group + r % group;
  if (p.partial_o != nullptr) {
    const long long state = p.item_state[w.item] + (r / group) * p.item_state_stride[w.item];
    const long long row = state * p.num_heads + head;
#pragma unroll
    for (int n = 0; n < N; ++n)
      store_pair<float>(p.partial_o + row * MLA_CKV_DIM + dim0 + n * 8, o[n][2 * h] * inv_d,
                        o[n][2 * h + 1] * inv_d);
    if (writes_lse) p.partial_lse[row] = lse;
  } else {
    const long long row = static_cast<long long>(w.qo_begin + query) * p.num_heads + head;
    T* out = static_cast<T*>(p.o);
#pragma unroll
    for (int n = 0; n < N; ++n)
      store_pair<T>(out + row * MLA_CKV_DIM + dim0 + n * 8, o[n][2 * h] * inv_d,
                    o[n][2 * h + 1] * inv_d);
    if (writes_lse && p.lse != nullptr) p.lse[row] = lse;
  }
}

}  // namespace cpattn
