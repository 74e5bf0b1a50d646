// batch_attention_sm90: batch_attention (same work items, masks, outputs and split-KV partial
// states) with both matrix products on Hopper's warpgroup MMA (wgmma, sm_90a only), warp
// specialised.
//
// Persistent: a grid of at most one CTA per SM, each looping over works (item, kv head).
// Block: 1 + WARPGROUPS warpgroups. Warpgroup 0 is the producer (common/kv_producer.cuh), with
// few registers: it copies each work's Q rows (two buffers, the next work's while this one's are
// read) and its K / V tiles (TMA for whole tiles, cp.async otherwise, in wgmma's swizzled layout)
// into shared memory, STAGES tiles ahead across works. Warpgroups 1.. are consumers, each with
// 64 of the CTA's ROWS = 64 * WARPGROUPS packed (query, head) rows (as in batch_attention: row
// r is query q_start + r / group, head kv_head * group + r % group); warp i of them holds rows
// [16 i, 16 i + 16), so each thread's S and O registers are mma.sync C fragments and
// tile_softmax.cuh serves both kernels.
// Per tile of TILE keys, each consumer warpgroup on its own (no CTA-wide barrier: one warpgroup's
// softmax overlaps the other's matrix products):
//   wait "full"; S [64 x TILE] = Q K^T: HEAD_DIM / 16 wgmma, Q and K from shared memory;
//   mask + online softmax in registers (P stays where S was);
//   O [64 x HEAD_DIM] += P V: TILE / 16 steps, P from registers, V read transposed;
//   each warp arrives on the stage's "empty" barrier, which the producer waits for to refill it.
// Keys past the item's range are zero-filled and masked.
#include "common/dtypes.cuh"
#include "common/grid_dependency.cuh"
#include "common/mma.cuh"
#include "common/wgmma.cuh"
#include "common/mbarrier.cuh"
#include "common/tma.cuh"
#include "common/attention_params.cuh"
#include "common/work_item.cuh"
#include "common/kv_tiles.cuh"
#include "common/kv_producer.cuh"
#include "common/tile_softmax.cuh"

using namespace cpattn;

// Rows g and g + 8 of the 16 from row0 (a thread's two rows), normalised, into `staged`
// (SwizzledBlocks<ROWS>, 16-bit T); their lse to p.lse. Rows past w.valid_rows are skipped.
template <typename T, int HEAD_DIM, int ROWS>
__device__ __forceinline__ void stage_rows(uint4* staged, const AttentionParams& p,
                                           const WorkItem& w, int row0,
                                           const RowsState<HEAD_DIM>& st) {
  const int lane = threadIdx.x % 32;
  const RowDivider div(p.group_size);
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
    if (lane % 4 == 0 && p.lse != nullptr)
      p.lse[output_row(p, w, packed_row(r, div))] =
          empty ? NEG_INF : (st.m[h] + log2f(st.d[h])) * LN2;
  }
}

// Rows [first, first + 64) of `staged` to the output by 128 threads (this one is `thread`),
// 16 bytes a store: row r is query w.q_start + r / group, head w.head_block * group + r % group,
// so the rows of a query are adjacent in the output.
template <typename T, int HEAD_DIM, int ROWS>
__device__ __forceinline__ void write_staged_rows(const AttentionParams& p, const WorkItem& w,
                                                  const uint4* staged, int first, int thread) {
  constexpr int CHUNKS = HEAD_DIM / 8, ROW_STEP = 128 / CHUNKS;
  const int chunk = thread % CHUNKS;
  const RowDivider div(p.group_size);
  uint4* out = static_cast<uint4*>(p.o);
#pragma unroll
  for (int k = 0; k < 64 / ROW_STEP; ++k) {
    const int r = first + thread / CHUNKS + k * ROW_STEP;
    if (r >= w.valid_rows) break;
    const long long row = output_row(p, w, packed_row(r, div));
    out[row * CHUNKS + chunk] = staged[SwizzledBlocks<ROWS>::at(r, chunk)];
  }
}

template <typename T, int HEAD_DIM, int WARPGROUPS, int TILE, int STAGES, int CTAS>
__global__ void __launch_bounds__(128 * (WARPGROUPS + 1), CTAS)
batch_attention_sm90_kernel(const AttentionParams p, const __grid_constant__ KVTensorMaps maps) {
  allow_dependent_grids();  // common/grid_dependency.cuh; the producer waits in produce_works
  constexpr int ROWS = 64 * WARPGROUPS;
  constexpr int CHUNKS = HEAD_DIM / 8;        // 16-byte chunks per row of q, k, v
  constexpr int PV_N = HEAD_DIM >= 128 ? 128 : 64;  // output dims of one P V wgmma
  static_assert(HEAD_DIM % 64 == 0, "head_dim must be a multiple of 64 (128-byte swizzle blocks)");
  static_assert(TILE == 64 || TILE == 128, "S = Q K^T is one wgmma wide (n 64 or 128)");
  static_assert(STAGES >= 2, "the producer runs a tile ahead at least");

  extern __shared__ __align__(1024) uint4 smem[];
  const Pipeline<ROWS, TILE, STAGES, CHUNKS> pipe(smem);  // kv_producer.cuh
  if (threadIdx.x == 0) pipe.init(4 * WARPGROUPS);  // every consumer warp arrives on "empty"
  __syncthreads();

  // Each warpgroup reads the work count after its register change (not held across it).
  const int head_blocks = p.num_qo_heads / p.group_size;
  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // producer
    warpgroup_registers_dec<PRODUCER_REGISTERS>();
    // A tile's copies from all four producer warps (p16 B8 S2048 causal 382 -> 422 TFLOP/s).
    produce_works<T, HEAD_DIM, ROWS, TILE, STAGES, 4>(p, maps, pipe, num_works(p, head_blocks),
                                                      true);  // head-major
    return;
  }
  warpgroup_registers_inc<consumer_registers<WARPGROUPS, PRODUCER_REGISTERS>()>();
  const int works = num_works(p, head_blocks);
  wait_for_prior_grids();  // before any output is written

  const int warp = threadIdx.x / 32 - 4;  // among the consumers
  const int row0 = warp * 16;             // = 64 * (warpgroup - 1) + 16 * (warp % 4)
  const float logits_scale = p.soft_cap_log2 > 0.f ? 1.f : p.logits_scale;
  const bool lead = threadIdx.x % 32 == 0;  // arrives on "empty" barriers for its warp

  // S = Q K^T of the tile in `stage` into s, Q from q_rows.
  auto scores = [&](const uint4* q_rows, int stage, float (&s)[TILE / 8][4]) {
    kmajor_scores<T, TILE, HEAD_DIM, ROWS, TILE>(s, smem_desc(q_rows, 16, 1024),
                                                 smem_desc(pipe.k_stage(stage), 16, 1024));
  };
  // O += P V of the tile in `stage`, P in s: keys [16 kt, 16 kt + 16) are 16 rows (2048 bytes)
  // into V's blocks; one wgmma covers PV_N output dims, PV_N / 64 blocks of TILE * 128 bytes.
  auto values = [&](int stage, const float (&s)[TILE / 8][4], RowsState<HEAD_DIM>& st) {
    const unsigned long long v_desc = smem_desc(pipe.v_stage(stage), TILE * 128, 1024);
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
    const Work<ROWS, TILE> work = pipe.wait_work(n);
    const WorkItem& w = work.w;
    const KeyTiles<TILE>& tiles = work.tiles;
    // This warpgroup's 64 rows of each 64-dim block of Q (8 rows of 128 bytes = 1024 apart).
    const uint4* q_rows = pipe.q_buffer(qb) + (warpgroup - 1) * 64 * 8;
    RowsState<HEAD_DIM> st;
    init_rows(st);
    const bool tiles_by_tma = work_by_tma(maps, p, tiles);
    const WarpQueries queries = warp_queries(p, w, row0);  // once a work
    for (int t = 0; t < tiles.num_tiles; ++t, ++tile) {
      const int stage = pipe.wait_tile(tile);
      fence_proxy_async();  // the producer's cp.async writes, next read by wgmma (async proxy)
      const int mask_class = tiles.mask_class(p, t);
      const int first = tiles.kv_begin + t * TILE;
      if (mask_class != 0) {
        if (first + TILE > w.kv_end && tiles_by_tma) {
          // The copy brought rows past the keys (another request's, or a page's unused slots):
          // V's are zeroed (0 * NaN would reach the output), K's scores masked below.
          zero_rows<TILE, CHUNKS, 128 * WARPGROUPS>(pipe.v_stage(stage),
                                                    w.kv_end - first, threadIdx.x - 128);
          fence_proxy_async();  // the zeros, next read by wgmma
          named_barrier_sync(1, 128 * WARPGROUPS);
        }
        float s[TILE / 8][4];
        scores(q_rows, stage, s);
        softmax_block<HEAD_DIM, TILE>(s, st, p, w, queries, row0, first, mask_class, logits_scale);
        values(stage, s, st);
      }
      if (lead) mbarrier_arrive(&pipe.empty[stage]);
    }
    sum_row_denominators(st);
    if (p.partial_o == nullptr) {
      // The rows go out through this warpgroup's rows of the work's Q buffer (its Q K^T are
      // done; the producer refills the buffer only after every warp's q_empty arrival), as
      // whole 16-byte chunks instead of 4-byte pieces.
      uint4* staged = pipe.q_buffer(qb);
      stage_rows<T, HEAD_DIM, ROWS>(staged, p, w, row0, st);
      named_barrier_sync(1 + warpgroup, 128);  // this warpgroup's rows are staged (ids 2, 3)
      write_staged_rows<T, HEAD_DIM, ROWS>(p, w, staged, (warpgroup - 1) * 64, threadIdx.x % 128);
      __syncwarp();
      if (lead) mbarrier_arrive(&pipe.q_empty[qb]);
    } else {
      if (lead) mbarrier_arrive(&pipe.q_empty[qb]);
      store_rows<T, HEAD_DIM>(p, w, row0, st);  // fp32 partial states of a split-KV work
    }
  }
}
