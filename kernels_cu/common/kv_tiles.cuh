// kv_tiles.cuh: cp.async of a work item's Q rows and of its K / V key tiles into shared memory,
// from ragged rows or from pages, in the tile layout its kernel's matrix products read.
//
// Layout: a struct with `static int at(int row, int chunk)`, the 16-byte-chunk offset of chunk
// `chunk` of row `row` within one tile (SwizzledRows for mma.sync, SwizzledBlocks for wgmma).
// THREADS threads copy a tile of TILE rows of CHUNKS chunks: thread t copies chunk column
// t % CHUNKS of rows t / CHUNKS + i * ROW_STEP. Keys at or past kv_end are zero-filled, V included
// (0 * NaN would poison the output); their addresses are never dereferenced.
#pragma once
#include "common/mma.cuh"
#include "common/attention_params.cuh"
#include "common/work_item.cuh"
#include "common/paged.cuh"
#include "common/mbarrier.cuh"

namespace cpattn {

// The key tiles of an item: its range narrowed to the sliding window and, with a classified
// custom mask, started at a tile of the plan ([TILE * i, TILE * (i + 1)) has class i).
template <int TILE>
struct KeyTiles {
  int kv_begin, num_tiles;
  const int* tile_class;  // the item's tile classes, or nullptr

  __device__ __forceinline__ KeyTiles(const AttentionParams& p, const WorkItem& w) {
    kv_begin = w.kv_begin;
    if (p.window_left >= 0) kv_begin = max(kv_begin, w.q_start + w.diag - p.window_left);
    tile_class = p.tile_class != nullptr ? p.tile_class + p.item_class_offset[w.item] : nullptr;
    if (tile_class != nullptr) kv_begin -= kv_begin % TILE;
    num_tiles = w.kv_end > kv_begin ? (w.kv_end - kv_begin + TILE - 1) / TILE : 0;
  }

  // Custom mask class of tile t: 0 empty (no math), 1 full (no bits read), 2 partial.
  __device__ __forceinline__ int mask_class(const AttentionParams& p, int t) const {
    return tile_class != nullptr ? tile_class[(kv_begin + t * TILE) / TILE]
                                 : (p.mask != nullptr ? 2 : 1);
  }
};

// The item's packed (query, head) rows: row r is query w.q_start + r / group, head
// w.head_block * group + r % group (packed_row); rows past w.valid_rows are zero-filled.
template <typename Layout, typename T, int ROWS, int CHUNKS, int THREADS>
__device__ __forceinline__ void issue_q_rows(const AttentionParams& p, const WorkItem& w,
                                             uint4* q_tile) {
  const T* q = static_cast<const T*>(p.q);
  const int group = p.group_size;
  const RowDivider div(group);
  for (int c = threadIdx.x; c < ROWS * CHUNKS; c += THREADS) {
    const int r = c / CHUNKS, chunk = c % CHUNKS;
    const bool valid = r < w.valid_rows;
    const PackedRow row = packed_row(r, div);
    const long long offset = valid ? (w.qo_begin + w.q_start + row.query) * p.q_stride_token +
                                         (w.head_block * group + row.head) * p.q_stride_head
                                   : 0;
    cp_async_16(q_tile + Layout::at(r, chunk), q + offset + chunk * 8, valid);
  }
}

// K and V tiles of keys [kv_begin + TILE * t, + TILE) of one kv head, through STAGES buffers
// (tile t in stage t % STAGES), one commit group a tile: start() issues tiles 0 .. STAGES - 2,
// refill(t) tile t + STAGES - 1 (an empty group past the last, so that group counting stays
// uniform). The page ids of the tile to issue next are fetched one tile early, so the wait for
// them overlaps a tile of compute instead of stalling the copy.
template <typename Layout, typename T, int CHUNKS, int THREADS, int TILE, int STAGES>
struct KVTiles {
  static constexpr int ROW_STEP = THREADS / CHUNKS;
  static constexpr int KEYS_PER_THREAD = TILE / ROW_STEP;
  static_assert(THREADS % CHUNKS == 0 && TILE % ROW_STEP == 0, "copy layout must tile the tile");

  const AttentionParams& p;
  uint4* k_tiles;          // [STAGES] tiles of TILE rows in Layout
  uint4* v_tiles;
  int num_tiles;
  const int* page_table;   // the request's page ids (paged)
  const T* k_head;         // the kv head's elements of K and V (+ this thread's chunk)
  const T* v_head;
  long long ragged_row;    // the request's first key row (ragged)
  int kv_begin, kv_end, copy_row;
  PageSplit split;
  bool paged;
  int pages[KEYS_PER_THREAD];

  __device__ __forceinline__ KVTiles(const AttentionParams& params, uint4* k_stages,
                                     uint4* v_stages, int request, int head, int begin, int end,
                                     int tiles)
      : p(params), k_tiles(k_stages), v_tiles(v_stages), num_tiles(tiles), kv_begin(begin),
        kv_end(end), split(params.page_size) {
    paged = p.kv_indices != nullptr;
    page_table = p.kv_indices + (paged ? p.kv_indptr[request] : 0);
    ragged_row = paged ? 0 : p.kv_indptr[request];
    const int chunk = threadIdx.x % CHUNKS;
    copy_row = threadIdx.x / CHUNKS;
    k_head = static_cast<const T*>(p.k) + head * p.k_stride_head + chunk * 8;
    v_head = static_cast<const T*>(p.v) + head * p.v_stride_head + chunk * 8;
  }

  template <bool POW2>
  __device__ __forceinline__ void fetch_pages_of(int tile) {
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
      const int key = kv_begin + tile * TILE + copy_row + i * ROW_STEP;
      pages[i] = key < kv_end ? __ldg(page_table + split.index_as<POW2>(key)) : 0;
    }
  }

  __device__ __forceinline__ void fetch_pages(int tile) {
    if (!paged) return;  // ragged rows need no ids
    if (split.shift >= 0) {
      fetch_pages_of<true>(tile);
    } else {
      fetch_pages_of<false>(tile);
    }
  }

  // Paged K and V rows of `tile` (copy()): each row's page (fetched before) and slot.
  template <bool POW2>
  __device__ __forceinline__ void copy_pages(int tile, uint4* k_tile, uint4* v_tile) {
    const int chunk = threadIdx.x % CHUNKS;
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
      const int r = copy_row + i * ROW_STEP, key = kv_begin + tile * TILE + r;
      const bool valid = key < kv_end;
      // NOTE: 64-bit offsets: page * stride_page passes 2^31 elements in pools over 4 GB.
      const long long slot = split.slot_as<POW2>(key);
      const long long page = pages[i];
      const long long k_off = page * p.k_stride_page + slot * p.k_stride_slot;
      const long long v_off = page * p.v_stride_page + slot * p.v_stride_slot;
      const int at = Layout::at(r, chunk);
      cp_async_16(k_tile + at, k_head + (valid ? k_off : 0), valid);
      cp_async_16(v_tile + at, v_head + (valid ? v_off : 0), valid);
    }
  }

  // K of `tile` into k_tile and V into v_tile (its pages fetched before), uncommitted.
  __device__ __forceinline__ void copy(int tile, uint4* k_tile, uint4* v_tile) {
    const int chunk = threadIdx.x % CHUNKS;
    if (!paged) {  // uniform: ragged rows are evenly strided, so a row's address is an addition
      const int key0 = kv_begin + tile * TILE + copy_row;
      const T* k = k_head + (ragged_row + key0) * p.k_stride_slot;
      const T* v = v_head + (ragged_row + key0) * p.v_stride_slot;
      const long long k_step = ROW_STEP * p.k_stride_slot, v_step = ROW_STEP * p.v_stride_slot;
#pragma unroll
      for (int i = 0; i < KEYS_PER_THREAD; ++i, k += k_step, v += v_step) {
        const bool valid = key0 + i * ROW_STEP < kv_end;
        const int at = Layout::at(copy_row + i * ROW_STEP, chunk);
        cp_async_16(k_tile + at, valid ? k : k_head, valid);
        cp_async_16(v_tile + at, valid ? v : v_head, valid);
      }
      return;
    }
    if (split.shift >= 0) {  // uniform: one branch a tile, not one a row
      copy_pages<true>(tile, k_tile, v_tile);
    } else {
      copy_pages<false>(tile, k_tile, v_tile);
    }
  }

  // One commit group: copy(), committed.
  __device__ __forceinline__ void issue(int tile, uint4* k_tile, uint4* v_tile) {
    copy(tile, k_tile, v_tile);
    cp_async_commit();
  }

  // Producer / consumer pipelines (mbarrier.cuh): tile t into stage `stage`, then one arrival
  // on `full` when this thread's copies have landed; the page ids of tile t + 1 are fetched
  // while the producer waits for its next stage.
  __device__ __forceinline__ void produce(int t, int stage, unsigned long long* full) {
    copy(t, k_tiles + stage * TILE * CHUNKS, v_tiles + stage * TILE * CHUNKS);
    cp_async_arrive(full);
    fetch_pages(t + 1);
  }

  __device__ __forceinline__ const uint4* k_stage(int t) const {
    return k_tiles + (t % STAGES) * TILE * CHUNKS;
  }
  __device__ __forceinline__ const uint4* v_stage(int t) const {
    return v_tiles + (t % STAGES) * TILE * CHUNKS;
  }

  __device__ __forceinline__ void start() {
#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) {
      if (t < num_tiles) {
        fetch_pages(t);
        issue(t, k_tiles + t * TILE * CHUNKS, v_tiles + t * TILE * CHUNKS);
      } else {
        cp_async_commit();
      }
    }
    fetch_pages(STAGES - 1);
  }

  // Tile t + STAGES - 1 into the stage of tile t - 1, which every thread must be done with.
  __device__ __forceinline__ void refill(int t) {
    if (t + STAGES - 1 < num_tiles) {
      const int stage = (t + STAGES - 1) % STAGES;
      issue(t + STAGES - 1, k_tiles + stage * TILE * CHUNKS, v_tiles + stage * TILE * CHUNKS);
      fetch_pages(t + STAGES);
    } else {
      cp_async_commit();
    }
  }
};

}  // namespace cpattn
