// batch_attention_sm90: batch_attention (same work items, masks, outputs and split-KV partial
// states) with both matrix products on Hopper's warpgroup MMA (wgmma, sm_90a only).
//
// Block: WARPGROUPS x 4 warps. A CTA owns ROWS = 64 * WARPGROUPS packed (query, head) rows (as in
// batch_attention: row r is query q_start + r / group, head kv_head * group + r % group);
// warpgroup g computes rows [64 g, 64 g + 64), warp i of it 16 of them, so each thread's S and O
// registers are mma.sync C fragments and tile_softmax.cuh serves both kernels.
// Per tile of TILE keys:
//   S [64 x TILE] = Q K^T: HEAD_DIM / 16 wgmma, K read from shared memory, Q from registers
//   (A fragments loaded once) up to head_dim 128, from shared memory beyond;
//   mask + online softmax in registers (P stays where S was);
//   O [64 x HEAD_DIM] += P V: TILE / 16 steps, P from registers, V read transposed.
// Q, K and V arrive by cp.async in wgmma's swizzled layout (SwizzledBlocks) through STAGES
// buffers, refilled right after the barrier that opens a tile; keys past the item's range are
// zero-filled and masked. (Issuing S of tile t + 1 before the softmax of tile t, with two S
// register sets, measured no faster: the loop is bound by instruction issue, not by waiting on
// the tensor cores.)
#include "common/dtypes.cuh"
#include "common/mma.cuh"
#include "common/wgmma.cuh"
#include "common/attention_params.cuh"
#include "common/work_item.cuh"
#include "common/kv_tiles.cuh"
#include "common/tile_softmax.cuh"

using namespace cpattn;

template <typename T, int HEAD_DIM, int WARPGROUPS, int TILE, int STAGES, int CTAS>
__global__ void __launch_bounds__(128 * WARPGROUPS, CTAS)
batch_attention_sm90_kernel(const AttentionParams p) {
  constexpr int ROWS = 64 * WARPGROUPS;
  constexpr int THREADS = 128 * WARPGROUPS;
  constexpr int CHUNKS = HEAD_DIM / 8;        // 16-byte chunks per row of q, k, v
  constexpr int PV_N = HEAD_DIM >= 128 ? 128 : 64;  // output dims of one P V wgmma
  static_assert(HEAD_DIM % 64 == 0, "head_dim must be a multiple of 64 (128-byte swizzle blocks)");
  static_assert(TILE == 64 || TILE == 128, "S = Q K^T is one wgmma wide (n 64 or 128)");
  static_assert(STAGES >= 2, "cp.async pipeline needs two stages at least");

  WorkItem w;
  if (!load_work_item<ROWS, true>(p, p.num_qo_heads / p.group_size, w)) return;
  const KeyTiles<TILE> tiles(p, w);
  const int num_tiles = tiles.num_tiles;

  extern __shared__ __align__(1024) uint4 smem[];
  uint4* q_tile = smem;                               // ROWS x CHUNKS, SwizzledBlocks<ROWS>
  uint4* k_tiles = q_tile + ROWS * CHUNKS;            // [STAGES] TILE x CHUNKS, SwizzledBlocks<TILE>
  uint4* v_tiles = k_tiles + STAGES * TILE * CHUNKS;  // [STAGES] TILE x CHUNKS
  const int warp = threadIdx.x / 32, group_of_warp = warp / 4;

  issue_q_rows<SwizzledBlocks<ROWS>, T, ROWS, CHUNKS, THREADS>(p, w, q_tile);
  KVTiles<SwizzledBlocks<TILE>, T, CHUNKS, THREADS, TILE, STAGES> kv(
      p, k_tiles, v_tiles, w.request, w.head_block, tiles.kv_begin, w.kv_end, num_tiles);
  kv.start();  // Q travels in the first group

  RowsState<HEAD_DIM> st;
  init_rows(st);
  const int row0 = warp * 16;  // = 64 * group_of_warp + 16 * (warp % 4)
  const float logits_scale = p.soft_cap_log2 > 0.f ? 1.f : p.logits_scale;
  // Q of this warpgroup: its 64 rows of each 64-dim block (8 rows of 128 bytes = 1024 apart),
  // read by each Q K^T from shared memory, or once into registers (A fragments of the warp's 16
  // rows) where they fit: shared memory then serves K alone.
  const uint4* q_rows = q_tile + group_of_warp * 64 * 8;
  constexpr bool Q_IN_REGISTERS = HEAD_DIM <= 128 && TILE == 64;
  unsigned q_frag[Q_IN_REGISTERS ? HEAD_DIM / 16 : 1][4];
  const int lane = threadIdx.x % 32;

  // S = Q K^T of tile t into s: k-step kk reads dims [16 kk, 16 kk + 16), block kk / 4, 32
  // bytes into its rows (descriptor addresses count 16 bytes).
  auto scores = [&](int t, float (&s)[TILE / 8][4]) {
    const unsigned long long k_desc = smem_desc(kv.k_stage(t), 16, 1024);
    const unsigned long long q_desc = smem_desc(q_rows, 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
      const int block = kk / 4, chunk = (kk % 4) * 2;
      if constexpr (Q_IN_REGISTERS)
        Wgmma<T, TILE>::template rs<0>(s, q_frag[kk], k_desc + block * TILE * 8 + chunk, kk > 0);
      else
        Wgmma<T, TILE>::ss(s, q_desc + block * ROWS * 8 + chunk, k_desc + block * TILE * 8 + chunk,
                           kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(s);
  };
  // O += P V of tile t, P in s: keys [16 kt, 16 kt + 16) are 16 rows (2048 bytes) into V's
  // blocks; one wgmma covers PV_N output dims, PV_N / 64 blocks of TILE * 128 bytes each.
  auto values = [&](int t, const float (&s)[TILE / 8][4]) {
    const unsigned long long v_desc = smem_desc(kv.v_stage(t), TILE * 128, 1024);
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

  cp_async_wait<STAGES - 2>();  // Q (and tile 0) landed
  fence_proxy_async();
  __syncthreads();
  if constexpr (Q_IN_REGISTERS) {
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
      ldmatrix_x4(q_frag[kk], q_tile + SwizzledBlocks<ROWS>::at(row0 + lane % 16, kk * 2 + lane / 16));
  }
  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<STAGES - 2>();  // tile t landed: later groups are t + 1 .. t + STAGES - 2
    fence_proxy_async();
    __syncthreads();  // ... for every thread, and every thread is done with tile t - 1: its
    // stage takes tile t + STAGES - 1.
    kv.refill(t);
    const int mask_class = tiles.mask_class(p, t);
    if (mask_class == 0) continue;
    float s[TILE / 8][4];
    scores(t, s);
    softmax_block<HEAD_DIM, TILE>(s, st, p, w, row0, tiles.kv_begin + t * TILE, mask_class,
                                  logits_scale);
    values(t, s);
  }
  cp_async_wait<0>();

  sum_row_denominators(st);
  store_rows<T, HEAD_DIM>(p, w, row0, st);
}
