// batch_attention_sm90: batch_attention (same work items, masks, outputs and split-KV partial
// states) with both matrix products on Hopper's warpgroup MMA (wgmma, sm_90a only), warp
// specialised.
//
// Persistent: a grid of at most one CTA per SM, each looping over works (item, kv head).
// Block: 1 + WARPGROUPS warpgroups. Warpgroup 0 is the producer, with few registers: it copies
// each work's Q rows (cp.async; two buffers, the next work's while this one's are read) and its
// K / V tiles (TMA for whole tiles, cp.async otherwise, in wgmma's swizzled layout) into shared
// memory, STAGES tiles ahead across works, and each buffer's "full" barrier (mbarrier.cuh)
// completes as its copies land. Warpgroups 1.. are consumers, each with 64 of the CTA's ROWS =
// 64 * WARPGROUPS packed (query, head) rows (as in batch_attention: row r is query q_start + r /
// group, head kv_head * group + r % group); warp i of them holds rows [16 i, 16 i + 16), so each
// thread's S and O registers are mma.sync C fragments and tile_softmax.cuh serves both kernels.
// Per tile of TILE keys, each consumer warpgroup on its own (no CTA-wide barrier: one warpgroup's
// softmax overlaps the other's matrix products):
//   wait "full"; S [64 x TILE] = Q K^T: HEAD_DIM / 16 wgmma, Q and K from shared memory;
//   mask + online softmax in registers (P stays where S was);
//   O [64 x HEAD_DIM] += P V: TILE / 16 steps, P from registers, V read transposed;
//   each warp arrives on the stage's "empty" barrier, which the producer waits for to refill it.
// Keys past the item's range are zero-filled and masked.
#include "common/dtypes.cuh"
#include "common/mma.cuh"
#include "common/wgmma.cuh"
#include "common/mbarrier.cuh"
#include "common/tma.cuh"
#include "common/attention_params.cuh"
#include "common/work_item.cuh"
#include "common/kv_tiles.cuh"
#include "common/tile_softmax.cuh"

using namespace cpattn;

// A CTA's work x (item and head block, work_item.cuh) and its key tiles. The producer reads it
// from the plan and hands it to the consumers in shared memory beside its Q buffer.
template <int ROWS, int TILE>
struct Work {
  WorkItem w;
  KeyTiles<TILE> tiles;
  __device__ __forceinline__ Work(const AttentionParams& p, int x)
      : w(work_item_at<ROWS>(p, x)), tiles(p, w) {}
};
constexpr int WORK_SLOT_BYTES = 64;  // _tiles.HopperTileConfig.smem_bytes counts two

// Whether the tile of keys from `first` comes by TMA: the maps are on and, paged, it starts a page.
__device__ __forceinline__ bool by_tma_tile(const KVTensorMaps& maps, bool paged, int first,
                                            int page_mask) {
  return maps.enabled && (!paged || (first & page_mask) == 0);
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

// Rows g and g + 8 of the 16 from row0 (a thread's two rows), normalised, into `staged`
// (SwizzledBlocks<ROWS>, 16-bit T); their lse to p.lse. Rows past w.valid_rows are skipped.
template <typename T, int HEAD_DIM, int ROWS>
__device__ __forceinline__ void stage_rows(uint4* staged, const AttentionParams& p,
                                           const WorkItem& w, int row0,
                                           const RowsState<HEAD_DIM>& st) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + lane / 4 + 8 * h;
    if (r >= w.valid_rows) continue;
    const bool empty = st.d[h] == 0.f;  // no visible key: output 0, lse -inf
    const float inv_d = empty ? 0.f : 1.f / st.d[h];
#pragma unroll
    for (int n = 0; n < HEAD_DIM / 8; ++n)  // dims n * 8 + 2c, + 1: word c of chunk n
      reinterpret_cast<unsigned*>(staged + SwizzledBlocks<ROWS>::at(r, n))[lane % 4] =
          pack_pair<T>(st.o[n][2 * h] * inv_d, st.o[n][2 * h + 1] * inv_d);
    if (lane % 4 == 0 && p.lse != nullptr) {
      const int group = p.group_size;
      const long long row = static_cast<long long>(w.qo_begin + w.q_start + r / group) *
                                p.num_qo_heads + w.head_block * group + r % group;
      p.lse[row] = empty ? NEG_INF : (st.m[h] + log2f(st.d[h])) * LN2;
    }
  }
}

// Rows [first, first + 64) of `staged` to the output by 128 threads (this one is `thread`),
// 16 bytes a store: row r is query w.q_start + r / group, head w.head_block * group + r % group,
// so the rows of a query are adjacent in the output.
template <typename T, int HEAD_DIM, int ROWS>
__device__ __forceinline__ void write_staged_rows(const AttentionParams& p, const WorkItem& w,
                                                  const uint4* staged, int first, int thread) {
  constexpr int CHUNKS = HEAD_DIM / 8, ROW_STEP = 128 / CHUNKS;
  const int chunk = thread % CHUNKS, group = p.group_size;
  uint4* out = static_cast<uint4*>(p.o);
#pragma unroll
  for (int k = 0; k < 64 / ROW_STEP; ++k) {
    const int r = first + thread / CHUNKS + k * ROW_STEP;
    if (r >= w.valid_rows) break;
    const long long row = static_cast<long long>(w.qo_begin + w.q_start + r / group) *
                              p.num_qo_heads + w.head_block * group + r % group;
    out[row * CHUNKS + chunk] = staged[SwizzledBlocks<ROWS>::at(r, chunk)];
  }
}

// The producer keeps enough registers for the page ids of its key rows (mbarrier.cuh).
constexpr int PRODUCER_REGISTERS = 104;

template <typename T, int HEAD_DIM, int WARPGROUPS, int TILE, int STAGES, int CTAS>
__global__ void __launch_bounds__(128 * (WARPGROUPS + 1), CTAS)
batch_attention_sm90_kernel(const AttentionParams p, const __grid_constant__ KVTensorMaps maps) {
  constexpr int ROWS = 64 * WARPGROUPS;
  constexpr int CHUNKS = HEAD_DIM / 8;        // 16-byte chunks per row of q, k, v
  constexpr int PV_N = HEAD_DIM >= 128 ? 128 : 64;  // output dims of one P V wgmma
  static_assert(HEAD_DIM % 64 == 0, "head_dim must be a multiple of 64 (128-byte swizzle blocks)");
  static_assert(TILE == 64 || TILE == 128, "S = Q K^T is one wgmma wide (n 64 or 128)");
  static_assert(STAGES >= 2, "the producer runs a tile ahead at least");
  static_assert(sizeof(Work<ROWS, TILE>) <= WORK_SLOT_BYTES, "a work slot holds a Work");

  extern __shared__ __align__(1024) uint4 smem[];
  uint4* q_tiles = smem;                              // [2] ROWS x CHUNKS, SwizzledBlocks<ROWS>
  uint4* k_tiles = q_tiles + 2 * ROWS * CHUNKS;       // [STAGES] TILE x CHUNKS, SwizzledBlocks<TILE>
  uint4* v_tiles = k_tiles + STAGES * TILE * CHUNKS;  // [STAGES] TILE x CHUNKS
  unsigned long long* full = reinterpret_cast<unsigned long long*>(v_tiles + STAGES * TILE * CHUNKS);
  unsigned long long* empty = full + STAGES;          // [STAGES]
  unsigned long long* q_full = empty + STAGES;        // [2]
  unsigned long long* q_empty = q_full + 2;           // [2]
  Work<ROWS, TILE>* work_slots = reinterpret_cast<Work<ROWS, TILE>*>(q_empty + 2);  // [2], as Q
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbarrier_init(&full[s], 128);              // every producer thread's copies
      mbarrier_init(&empty[s], 4 * WARPGROUPS);  // every consumer warp
    }
    for (int b = 0; b < 2; ++b) {
      mbarrier_init(&q_full[b], 128 + 1);  // every producer thread's copies, and the work's slot
      mbarrier_init(&q_empty[b], 4 * WARPGROUPS);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  // Works x = blockIdx.x + n * gridDim.x; work n uses Q buffer and work slot n % 2, and the tiles
  // of all works go round the stages in one sequence (`tile`: tile count so far), so the producer
  // reads the next work, loads its Q and first tiles while the consumers finish this one.
  const int head_blocks = p.num_qo_heads / p.group_size, works = num_works(p, head_blocks);
  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // producer
    warpgroup_registers_dec<PRODUCER_REGISTERS>();
    int tile = 0;
    for (int x = blockIdx.x, n = 0; x < works; x += gridDim.x, ++n) {
      const Work<ROWS, TILE> work(p, x);
      const WorkItem& w = work.w;
      const KeyTiles<TILE>& tiles = work.tiles;
      const int qb = n % 2;
      mbarrier_wait(&q_empty[qb], ((n / 2) & 1) ^ 1);
      issue_q_rows<SwizzledBlocks<ROWS>, T, ROWS, CHUNKS, 128>(p, w, q_tiles + qb * ROWS * CHUNKS);
      cp_async_arrive(&q_full[qb]);
      if (threadIdx.x == 0) {  // the consumers read the work here rather than from the plan
        work_slots[qb] = work;
        mbarrier_arrive(&q_full[qb]);
      }
      KVTiles<SwizzledBlocks<TILE>, T, CHUNKS, 128, TILE, STAGES> kv(
          p, k_tiles, v_tiles, w.request, w.head_block, tiles.kv_begin, w.kv_end, tiles.num_tiles);
      kv.fetch_pages(0);
      const int page_mask = p.page_size - 1;
      auto by_tma = [&](int t) {  // uniform: the consumers zero V past the keys of these
        return by_tma_tile(maps, kv.paged, tiles.kv_begin + t * TILE, page_mask);
      };
      // Paged TMA tiles: lane j of warp 0 copies page j of each tile.
      const int lane = threadIdx.x % 32;
      TilePages<TILE> pages(kv.paged && threadIdx.x < 32, kv.page_table, p.page_size,
                            tiles.kv_begin, w.kv_end, lane);
      for (int t = 0; t < tiles.num_tiles; ++t, ++tile) {
        const int stage = tile % STAGES, first = tiles.kv_begin + t * TILE;
        mbarrier_wait(&empty[stage], ((tile / STAGES) & 1) ^ 1);
        // Tiles come by TMA (ragged rows, or whole power-of-two pages that divide the tile),
        // rows past the keys included (the consumers zero V's and mask K's); by cp.async,
        // zero-filled past the keys, when the maps are off or a tile starts within a page.
        if (by_tma(t)) {
          if (threadIdx.x == 0) mbarrier_arrive_expect_tx(&full[stage], 2 * TILE * HEAD_DIM * 2);
          if (threadIdx.x < 32) __syncwarp();  // the bytes are expected before any copy lands
          // Rows [row, row + box) of the maps into the stage's key rows from r.
          auto load_box = [&](int r, int row) {
            fence_proxy_async();  // after the stage's earlier cp.async writes
#pragma unroll
            for (int b = 0; b < HEAD_DIM / 64; ++b) {
              const int at = (stage * CHUNKS + b * 8) * TILE + r * 8;
              tma_load_rows(k_tiles + at, maps.k, b * 64, w.head_block, row, &full[stage]);
              tma_load_rows(v_tiles + at, maps.v, b * 64, w.head_block, row, &full[stage]);
            }
          };
          if (pages.active) {
            load_box(lane * p.page_size, pages.page * p.page_size);
          } else if (!kv.paged && threadIdx.x == 0) {
            load_box(0, static_cast<int>(kv.ragged_row) + first);
          }
          if (threadIdx.x != 0) mbarrier_arrive(&full[stage]);
          // Every thread's page ids when the next tile comes by cp.async.
          if (kv.paged && !by_tma(t + 1)) kv.fetch_pages(t + 1);
        } else {  // zero-filled past the keys: cp.async
          kv.produce(t, stage, &full[stage]);
        }
        pages.advance(t);
      }
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    return;
  }
  warpgroup_registers_inc<consumer_registers<WARPGROUPS, PRODUCER_REGISTERS>()>();

  const int warp = threadIdx.x / 32 - 4;  // among the consumers
  const int row0 = warp * 16;             // = 64 * (warpgroup - 1) + 16 * (warp % 4)
  const float logits_scale = p.soft_cap_log2 > 0.f ? 1.f : p.logits_scale;
  const bool lead = threadIdx.x % 32 == 0;  // arrives on "empty" barriers for its warp

  // S = Q K^T of the tile in `stage` into s, Q from q_rows.
  auto scores = [&](const uint4* q_rows, int stage, float (&s)[TILE / 8][4]) {
    kmajor_scores<T, TILE, HEAD_DIM, ROWS, TILE>(s, smem_desc(q_rows, 16, 1024),
                                                 smem_desc(k_tiles + stage * TILE * CHUNKS, 16, 1024));
  };
  // O += P V of the tile in `stage`, P in s: keys [16 kt, 16 kt + 16) are 16 rows (2048 bytes)
  // into V's blocks; one wgmma covers PV_N output dims, PV_N / 64 blocks of TILE * 128 bytes.
  auto values = [&](int stage, const float (&s)[TILE / 8][4], RowsState<HEAD_DIM>& st) {
    const unsigned long long v_desc = smem_desc(v_tiles + stage * TILE * CHUNKS, TILE * 128, 1024);
    wgmma_fence();
#pragma unroll
    for (int kt = 0; kt < TILE / 16; ++kt) {
      unsigned a[4];
      c_to_a<T>(s, kt, a);
#pragma unroll
      for (int n = 0; n < HEAD_DIM / PV_N; ++n) {
        float(&o)[PV_N / 8][4] = *reinterpret_cast<float(*)[PV_N / 8][4]>(&st.o[n * PV_N / 8]);
        Wgmma<T, PV_N>::template rs<1>(o, a, v_desc + (n * PV_N / 64) * TILE * 8 + kt * 16 * 8, true);
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(st.o);
  };

  int tile = 0;
  for (int x = blockIdx.x, n = 0; x < works; x += gridDim.x, ++n) {
    const int qb = n % 2;
    mbarrier_wait(&q_full[qb], (n / 2) & 1);
    const Work<ROWS, TILE> work = work_slots[qb];  // a copy: the slot is refilled two works on
    const WorkItem& w = work.w;
    const KeyTiles<TILE>& tiles = work.tiles;
    // This warpgroup's 64 rows of each 64-dim block of Q (8 rows of 128 bytes = 1024 apart).
    const uint4* q_rows = q_tiles + qb * ROWS * CHUNKS + (warpgroup - 1) * 64 * 8;
    RowsState<HEAD_DIM> st;
    init_rows(st);
    // Whether the work's tiles come by TMA (each starts where the first does within a page).
    const bool tiles_by_tma = by_tma_tile(maps, p.kv_indices != nullptr, tiles.kv_begin,
                                          p.page_size - 1);
    for (int t = 0; t < tiles.num_tiles; ++t, ++tile) {
      const int stage = tile % STAGES;
      mbarrier_wait(&full[stage], (tile / STAGES) & 1);
      fence_proxy_async();  // the producer's cp.async writes, next read by wgmma (async proxy)
      const int mask_class = tiles.mask_class(p, t);
      const int first = tiles.kv_begin + t * TILE;
      if (mask_class != 0) {
        if (first + TILE > w.kv_end && tiles_by_tma) {
          // The copy brought rows past the keys (another request's, or a page's unused slots):
          // V's are zeroed (0 * NaN would reach the output), K's scores masked below.
          zero_rows<TILE, CHUNKS, 128 * WARPGROUPS>(v_tiles + stage * TILE * CHUNKS,
                                                    w.kv_end - first, threadIdx.x - 128);
          fence_proxy_async();  // the zeros, next read by wgmma
          named_barrier_sync(1, 128 * WARPGROUPS);
        }
        float s[TILE / 8][4];
        scores(q_rows, stage, s);
        softmax_block<HEAD_DIM, TILE>(s, st, p, w, row0, first, mask_class, logits_scale);
        values(stage, s, st);
      }
      if (lead) mbarrier_arrive(&empty[stage]);
    }
    sum_row_denominators(st);
    if (p.partial_o == nullptr) {
      // The rows go out through this warpgroup's rows of the work's Q buffer (its Q K^T are
      // done; the producer refills the buffer only after every warp's q_empty arrival), as
      // whole 16-byte chunks instead of 4-byte pieces.
      uint4* staged = q_tiles + qb * ROWS * CHUNKS;
      stage_rows<T, HEAD_DIM, ROWS>(staged, p, w, row0, st);
      named_barrier_sync(1 + warpgroup, 128);  // this warpgroup's rows are staged (ids 2, 3)
      write_staged_rows<T, HEAD_DIM, ROWS>(p, w, staged, (warpgroup - 1) * 64, threadIdx.x % 128);
      __syncwarp();
      if (lead) mbarrier_arrive(&q_empty[qb]);
    } else {
      if (lead) mbarrier_arrive(&q_empty[qb]);
      store_rows<T, HEAD_DIM>(p, w, row0, st);  // fp32 partial states of a split-KV work
    }
  }
}
