// batch_attention: softmax(q k^T * sm_scale) v for a batch of requests over ragged or paged keys,
// on tensor cores (mma.sync m16n8k16, fp32 accumulate). Prefill, chunked prefill and decode alike.
//
// Grid: (work item of the plan, kv head), one dimension: head-major for prefill tiles, item-major
// for decode tiles (common/work_item.cuh).
// Block: WARPS_Q x WARPS_KV warps. A CTA owns ROWS = 16 * M_TILES * WARPS_Q packed rows: row r is query
// q_start + r / group of its request, for query head kv_head * group + r % group, so each K/V tile
// brought into shared memory serves the whole GQA group (decode: the group's heads are the rows).
// Warp (wq, wk) computes the M_TILES blocks of 16 rows from 16 * M_TILES * wq against keys
// [wk * WARP_KEYS, +WARP_KEYS) of each tile (each K / V fragment read from shared memory serves
// M_TILES products); the WARPS_KV partial states of a row are merged through shared memory.
// Tiles of TILE keys stream through STAGES shared-memory buffers with cp.async; keys past the
// item's range are zero-filled (V included: 0 * NaN would poison the output) and masked.
#include "common/dtypes.cuh"
#include "common/grid_dependency.cuh"
#include "common/mma.cuh"
#include "common/attention_params.cuh"
#include "common/work_item.cuh"
#include "common/kv_tiles.cuh"
#include "common/tile_softmax.cuh"

using namespace cpattn;

// Decode tiles keep three CTAs per SM (registers capped at 170): memory-bound work wants the
// bytes in flight of more resident CTAs more than it wants registers.
template <int WARPS_KV, int HEAD_DIM>
constexpr int min_ctas_per_sm() { return WARPS_KV > 1 && HEAD_DIM <= 128 ? 3 : 1; }

template <typename T, int HEAD_DIM, int M_TILES, int WARPS_Q, int WARPS_KV, int TILE, int STAGES>
__global__ void __launch_bounds__(32 * WARPS_Q * WARPS_KV, min_ctas_per_sm<WARPS_KV, HEAD_DIM>())
batch_attention_kernel(const AttentionParams p) {
  allow_dependent_grids();  // common/grid_dependency.cuh
  constexpr int ROWS = 16 * M_TILES * WARPS_Q;
  constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row of q, k, v
  constexpr int THREADS = 32 * WARPS_Q * WARPS_KV;
  constexpr int WARP_KEYS = TILE / WARPS_KV;
  static_assert(HEAD_DIM % 64 == 0, "head_dim must be a multiple of 64 (swizzled tiles)");
  static_assert(WARP_KEYS % 16 == 0, "each warp takes whole 16-key steps of a tile");
  static_assert(STAGES >= 2, "cp.async pipeline needs two stages at least");
  static_assert(M_TILES == 1 || WARPS_KV == 1, "warps split rows or keys, not both");

  WorkItem w;
  // Prefill tiles (one warp column) head-major, decode tiles item-major.
  if (!load_work_item<ROWS, WARPS_KV == 1>(p, p.num_qo_heads / p.group_size, w)) return;
  wait_for_prior_grids();  // the work item (plan) was read before
  const KeyTiles<TILE> tiles(p, w);
  const int num_tiles = tiles.num_tiles;

  extern __shared__ uint4 smem[];
  uint4* q_tile = smem;                                // [ROWS][CHUNKS]
  uint4* k_tiles = q_tile + ROWS * CHUNKS;             // [STAGES][TILE][CHUNKS]
  uint4* v_tiles = k_tiles + STAGES * TILE * CHUNKS;   // [STAGES][TILE][CHUNKS]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wq = warp % WARPS_Q, wk = warp / WARPS_Q;

  using Layout = SwizzledRows<CHUNKS>;
  issue_q_rows<Layout, T, ROWS, CHUNKS, THREADS>(p, w, q_tile);
  KVTiles<Layout, T, CHUNKS, THREADS, TILE, STAGES> kv(p, k_tiles, v_tiles, w.request, w.head_block,
                                                   tiles.kv_begin, w.kv_end, num_tiles);
  kv.start();  // Q travels in the first group

  RowsState<HEAD_DIM> st[M_TILES];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) init_rows(st[mt]);
  const int warp_row0 = wq * M_TILES * 16;  // first row of this warp
  const float logits_scale = p.soft_cap_log2 > 0.f ? 1.f : p.logits_scale;

  for (int t = 0; t < num_tiles; ++t) {
    // The next tile is issued before waiting for this one: STAGES tiles in flight while waiting
    // (memory-bound decode wants the bytes in flight), at the cost of a second barrier a tile.
    kv.refill(t);
    cp_async_wait<STAGES - 1>();  // tile t (and Q) landed
    __syncthreads();
    const uint4* k_tile = kv.k_stage(t);
    const uint4* v_tile = kv.v_stage(t);
    const int warp_key0 = wk * WARP_KEYS;            // first key of this warp within the tile
    const int first_key = tiles.kv_begin + t * TILE + warp_key0;  // ... within the request
    const int mask_class = tiles.mask_class(p, t);
    if (mask_class == 0) {
      __syncthreads();  // keep the pipeline's barrier count: the stage is refilled next
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
        ldmatrix_x4(a[mt], q_tile + Layout::at(warp_row0 + mt * 16 + lane % 16, kk * 2 + lane / 16));
#pragma unroll
      for (int n = 0; n < WARP_KEYS / 16; ++n) {
        unsigned bk[4];
        const int key_row = warp_key0 + n * 16 + (lane / 16) * 8 + lane % 8;
        ldmatrix_x4(bk, k_tile + Layout::at(key_row, kk * 2 + (lane / 8) % 2));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_16816<T>(s[mt][2 * n], a[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][2 * n + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
      softmax_block<HEAD_DIM, WARP_KEYS>(s[mt], st[mt], p, w,
                                         warp_queries(p, w, warp_row0 + mt * 16),
                                         warp_row0 + mt * 16, first_key, mask_class, logits_scale);

    // O += P V: the probabilities' C fragments are the A fragments of this product.
#pragma unroll
    for (int kt = 0; kt < WARP_KEYS / 16; ++kt) {
      unsigned a[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) c_to_a<T>(s[mt], kt, a[mt]);
#pragma unroll
      for (int dn = 0; dn < HEAD_DIM / 16; ++dn) {
        unsigned bv[4];
        const int key_row = warp_key0 + kt * 16 + ((lane / 8) % 2) * 8 + lane % 8;
        ldmatrix_x4_trans(bv, v_tile + Layout::at(key_row, dn * 2 + lane / 16));
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

#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) sum_row_denominators(st[mt]);
  if constexpr (WARPS_KV > 1) {
    // Warps wk > 0 publish (o, m, d); warp wk = 0 of each row block folds them into its own.
    constexpr int STATE = state_floats<HEAD_DIM>() * 32;  // floats per warp
    float* shared_state = reinterpret_cast<float*>(smem);  // [WARPS_KV][WARPS_Q][STATE]
    __syncthreads();
    if (wk > 0) publish_rows(shared_state + (wk * WARPS_Q + wq) * STATE, st[0]);
    __syncthreads();
    if (wk > 0) return;
    for (int from = 1; from < WARPS_KV; ++from)
      fold_rows(st[0], shared_state + (from * WARPS_Q + wq) * STATE);
  }

#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) store_rows<T, HEAD_DIM>(p, w, warp_row0 + mt * 16, st[mt]);
}
