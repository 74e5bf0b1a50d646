// kv_producer.cuh: the producer warpgroup of the warp-specialised, persistent attention kernels
// (sm_90a): works, Q rows and K / V key tiles into a shared-memory pipeline that consumer warps
// read, whatever they compute with (batch_attention_sm90: wgmma; batch_decode_sm90: mma.sync).
//
// A CTA runs works x = blockIdx.x, blockIdx.x + gridDim.x, ... (work_item.cuh).
// Work n uses Q buffer and work slot n % 2; the tiles of all works go round the STAGES stages in
// one sequence (`tile`: the CTA's tile count so far), so the producer reads the next work and
// loads its Q and first tiles while the consumers finish this one. Barriers (mbarrier.cuh):
//   full[s]   tile in stage s landed      (128 producer arrivals + the TMA bytes)
//   empty[s]  stage s read                (one arrival per consumer warp)
//   q_full[b] Q buffer b and work slot b  (128 producer arrivals + 1 for the slot)
//   q_empty[b] Q buffer b read            (one arrival per consumer warp)
// Key tiles come by TMA (ragged rows, or whole power-of-two pages that divide the tile, a box a
// page and kind, the kinds spread over the producer's warps), rows past the keys included: the
// consumers zero V's (zero_rows) and mask K's; by cp.async, zero-filled past the keys, when the
// maps are off or a tile starts within a page.
// Tiles are SwizzledBlocks<TILE> (wgmma.cuh): CHUNKS / 8 blocks of TILE rows x 128 bytes.
#pragma once
#include "common/mma.cuh"
#include "common/wgmma.cuh"
#include "common/grid_dependency.cuh"
#include "common/mbarrier.cuh"
#include "common/tma.cuh"
#include "common/attention_params.cuh"
#include "common/work_item.cuh"
#include "common/kv_tiles.cuh"

namespace cpattn {

// A CTA's work x (item and head block, work_item.cuh) and its key tiles. The producer reads it
// from the plan and hands it to the consumers in shared memory beside its Q buffer.
template <int ROWS, int TILE>
struct Work {
  WorkItem w;
  KeyTiles<TILE> tiles;
  __device__ __forceinline__ Work(const AttentionParams& p, int x, bool head_major)
      : w(work_item_at<ROWS>(p, x, head_major)), tiles(p, w) {}
};
constexpr int WORK_SLOT_BYTES = 64;  // _tiles.WORK_SLOT_BYTES: the host counts two

// The producer keeps enough registers for the page ids of its key rows (mbarrier.cuh).
constexpr int PRODUCER_REGISTERS = 104;

// The plan entries of work x and the page ids of its first two tiles, read while the prior grid
// ends (grid_dependency.cuh: the plan alone may be read before the wait), so that produce_works
// finds them in cache after it: the ids TilePages (paged.cuh) reads first. Every producer warp
// reads them, the copying ones or not (the lines are shared).
template <int ROWS, int TILE>
__device__ __forceinline__ void read_plan_ahead(const AttentionParams& p, int x, bool head_major) {
  const Work<ROWS, TILE> work(p, x, head_major);
  const bool paged = p.kv_indices != nullptr;
  const TilePages<TILE> pages(paged, paged ? p.kv_indices + p.kv_indptr[work.w.request] : nullptr,
                              p.page_size, work.tiles.kv_begin, work.w.kv_end, threadIdx.x % 32);
  // The loads are kept for their cache lines.
  asm volatile("" ::"r"(work.tiles.num_tiles), "r"(pages.page), "r"(pages.next));
}

// Whether the tile of keys from `first` comes by TMA: the maps are on and, paged, it starts a page.
__device__ __forceinline__ bool by_tma_tile(const KVTensorMaps& maps, bool paged, int first,
                                            int page_mask) {
  return maps.enabled && (!paged || (first & page_mask) == 0);
}

// Whether a work's tiles come by TMA: each starts where its first does within a page.
template <int TILE>
__device__ __forceinline__ bool work_by_tma(const KVTensorMaps& maps, const AttentionParams& p,
                                            const KeyTiles<TILE>& tiles) {
  return by_tma_tile(maps, p.kv_indices != nullptr, tiles.kv_begin, p.page_size - 1);
}

// Rows [from, TILE) of a tile in SwizzledBlocks (CHUNKS / 8 blocks of TILE rows x 128 bytes)
// set to zero by THREADS threads (this one is `thread`): each chunk of the tile is one thread's
// (a fixed count each), written when its row is past `from`. Whole rows, so the swizzle is moot.
template <int TILE, int CHUNKS, int THREADS>
__device__ __forceinline__ void zero_rows(uint4* tile, int from, int thread) {
  static_assert(TILE * CHUNKS % THREADS == 0, "the threads share the chunks evenly");
#pragma unroll
  for (int k = 0; k < TILE * CHUNKS / THREADS; ++k) {
    const int chunk = k * THREADS + thread;  // block-major: (block * TILE + row) * 8 + column
    if ((chunk / 8) % TILE >= from) tile[chunk] = make_uint4(0u, 0u, 0u, 0u);
  }
}

// The same for the rows [row0, row0 + KEYS) of the tile one warp reads (its lanes write them):
// those past `from` are zeroed. No other warp's rows are touched, so a __syncwarp publishes it.
template <int TILE, int CHUNKS, int KEYS>
__device__ __forceinline__ void zero_warp_rows(uint4* tile, int row0, int from) {
  static_assert(KEYS * 8 % 32 == 0, "the lanes share a block's chunks evenly");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < KEYS * CHUNKS / 32; ++k) {
    // Chunk c: block c / (8 KEYS), row row0 + c / 8 % KEYS, column c % 8.
    const int c = k * 32 + lane;
    const int row = row0 + (c / 8) % KEYS;
    if (row >= from) tile[((c / 8) / KEYS * TILE + row) * 8 + c % 8] = make_uint4(0u, 0u, 0u, 0u);
  }
}

// The pipeline's shared memory, carved from the kernel's dynamic shared memory (1024-byte
// aligned; _tiles.py counts the same bytes):
//   [2] Q buffers of ROWS x CHUNKS, [STAGES] K tiles, [STAGES] V tiles (TILE x CHUNKS each),
//   the barriers (8 bytes each), [2] work slots; `end` is the first byte past them.
template <int ROWS, int TILE, int STAGES, int CHUNKS>
struct Pipeline {
  uint4 *q_tiles, *k_tiles, *v_tiles;
  unsigned long long *full, *empty, *q_full, *q_empty;
  Work<ROWS, TILE>* work_slots;
  unsigned char* end;

  __device__ __forceinline__ explicit Pipeline(uint4* smem) {
    q_tiles = smem;
    k_tiles = q_tiles + 2 * ROWS * CHUNKS;
    v_tiles = k_tiles + STAGES * TILE * CHUNKS;
    full = reinterpret_cast<unsigned long long*>(v_tiles + STAGES * TILE * CHUNKS);
    empty = full + STAGES;
    q_full = empty + STAGES;
    q_empty = q_full + 2;
    work_slots = reinterpret_cast<Work<ROWS, TILE>*>(q_empty + 2);
    end = reinterpret_cast<unsigned char*>(work_slots) + 2 * WORK_SLOT_BYTES;
    static_assert(sizeof(Work<ROWS, TILE>) <= WORK_SLOT_BYTES, "a work slot holds a Work");
  }

  // By thread 0, then a __syncthreads: `consumer_warps` warps arrive on the empty barriers.
  __device__ __forceinline__ void init(int consumer_warps) const {
    for (int s = 0; s < STAGES; ++s) {
      mbarrier_init(&full[s], 128);  // every producer thread's copies
      mbarrier_init(&empty[s], consumer_warps);
    }
    for (int b = 0; b < 2; ++b) {
      mbarrier_init(&q_full[b], 128 + 1);  // every producer thread's copies, and the work's slot
      mbarrier_init(&q_empty[b], consumer_warps);
    }
    mbarrier_init_fence();
  }

  // Consumers: work n of this CTA, once its Q buffer (n % 2) and work slot are filled.
  __device__ __forceinline__ Work<ROWS, TILE> wait_work(int n) const {
    mbarrier_wait(&q_full[n % 2], (n / 2) & 1);
    return work_slots[n % 2];  // a copy: the slot is refilled two works on
  }
  // Consumers: the stage of the CTA's tile-th tile (counted across works), once it landed.
  __device__ __forceinline__ int wait_tile(int tile) const {
    const int stage = tile % STAGES;
    mbarrier_wait(&full[stage], (tile / STAGES) & 1);
    return stage;
  }

  __device__ __forceinline__ uint4* q_buffer(int b) const { return q_tiles + b * ROWS * CHUNKS; }
  __device__ __forceinline__ const uint4* k_stage(int stage) const {
    return k_tiles + stage * TILE * CHUNKS;
  }
  __device__ __forceinline__ uint4* v_stage(int stage) const {
    return v_tiles + stage * TILE * CHUNKS;
  }
};

// The producer warpgroup's loop (threads 0..127, registers already given back): every work of
// this CTA (works in head-major order or item-major, work_item.cuh; uniform), its Q rows and its
// key tiles, in the order the consumers read them. A TMA tile's copies are issued by the first
// COPY_WARPS warps (tma.cuh).
template <typename T, int HEAD_DIM, int ROWS, int TILE, int STAGES, int COPY_WARPS>
__device__ __forceinline__ void produce_works(
    const AttentionParams& p, const KVTensorMaps& maps,
    const Pipeline<ROWS, TILE, STAGES, HEAD_DIM / 8>& pipe, int works, bool head_major) {
  constexpr int CHUNKS = HEAD_DIM / 8;
  uint4* const k_tiles = pipe.k_tiles;
  uint4* const v_tiles = pipe.v_tiles;
  unsigned long long* const full = pipe.full;
  if (blockIdx.x < works) read_plan_ahead<ROWS, TILE>(p, blockIdx.x, head_major);
  wait_for_prior_grids();  // Q, K and V may be the prior grid's outputs
  int tile = 0;
  for (int x = blockIdx.x, n = 0; x < works; x += gridDim.x, ++n) {
    const Work<ROWS, TILE> work(p, x, head_major);
    const WorkItem& w = work.w;
    const KeyTiles<TILE>& tiles = work.tiles;
    const int qb = n % 2;
    mbarrier_wait(&pipe.q_empty[qb], ((n / 2) & 1) ^ 1);
    issue_q_rows<SwizzledBlocks<ROWS>, T, ROWS, CHUNKS, 128>(p, w, pipe.q_buffer(qb));
    cp_async_arrive(&pipe.q_full[qb]);
    if (threadIdx.x == 0) {  // the consumers read the work here rather than from the plan
      pipe.work_slots[qb] = work;
      mbarrier_arrive(&pipe.q_full[qb]);
    }
    KVTiles<SwizzledBlocks<TILE>, T, CHUNKS, 128, TILE, STAGES> kv(
        p, k_tiles, v_tiles, w.request, w.head_block, tiles.kv_begin, w.kv_end, tiles.num_tiles);
    kv.fetch_pages(0);
    const int page_mask = p.page_size - 1;
    auto by_tma = [&](int t) {  // uniform: the consumers zero V past the keys of these
      return by_tma_tile(maps, kv.paged, tiles.kv_begin + t * TILE, page_mask);
    };
    // TMA tiles: each copying warp its kinds (tma.cuh), paged lane j of each warp page j.
    constexpr int KINDS = 2 * HEAD_DIM / 64;
    const int lane = threadIdx.x % 32;
    const bool copies = warp_kinds<KINDS, COPY_WARPS>(threadIdx.x / 32) > 0;
    TilePages<TILE> pages(kv.paged && maps.enabled && copies, kv.page_table, p.page_size,
                          tiles.kv_begin, w.kv_end, lane);
    for (int t = 0; t < tiles.num_tiles; ++t, ++tile) {
      const int stage = tile % STAGES, first = tiles.kv_begin + t * TILE;
      mbarrier_wait(&pipe.empty[stage], ((tile / STAGES) & 1) ^ 1);
      if (by_tma(t)) {
        arrive_expecting_warp_kinds<KINDS, COPY_WARPS>(&full[stage], TILE * 128);  // tma.cuh
        // This warp's kinds (K or V of a 64-dim block: kind 2 b + 0 / 1) of rows [row, row + box)
        // of the maps into the stage's rows from r.
        auto load_box = [&](int r, int row) {
          fence_proxy_async();  // after the stage's earlier cp.async writes
          for_warp_kinds<KINDS, COPY_WARPS>([&](int k) {
            const int at = (stage * CHUNKS + k / 2 * 8) * TILE + r * 8;
            tma_load_rows((k % 2 ? v_tiles : k_tiles) + at, k % 2 ? maps.v : maps.k, k / 2 * 64,
                          w.head_block, row, &full[stage]);
          });
        };
        if (pages.active) {
          load_box(lane * p.page_size, pages.page * p.page_size);
        } else if (!kv.paged && copies && lane == 0) {
          load_box(0, static_cast<int>(kv.ragged_row) + first);
        }
        // Every thread's page ids when the next tile comes by cp.async.
        if (kv.paged && !by_tma(t + 1)) kv.fetch_pages(t + 1);
      } else {  // zero-filled past the keys: cp.async
        kv.produce(t, stage, &full[stage]);
      }
      pages.advance(t);
    }
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

}  // namespace cpattn
