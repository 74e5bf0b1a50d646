// batch_decode_sm90: batch_attention's decode tiles on Hopper (sm_90a), warp specialised and
// persistent. Same work items, masks, outputs and split-KV partial states as batch_attention.
//
// A CTA holds ROWS = 16 packed (query, head) rows of a work (a GQA group's heads, of one query or
// a few: row r is query q_start + r / group, head kv_head * group + r % group) and loops over
// works as batch_attention_sm90 does; CTAS of them share an SM (registers capped to fit).
// Warpgroup 0 is the producer of common/kv_producer.cuh: it hands each work over in shared
// memory, loads its Q rows and streams its key tiles (TMA, a box a page, or cp.async) STAGES
// deep and across the ends of works, so that the SM's copies never drain between works: what a
// memory-bound decode needs, and what one CTA a work with its own short pipeline
// (batch_attention's decode tiles) cannot keep up at the ends.
// Warpgroup 1 computes with mma.sync m16n8k16, its 4 warps splitting each tile's keys (warp i:
// keys [i * WARP_KEYS, +WARP_KEYS)), so each byte of a tile is read from shared memory once:
//   at a work's start: Q's A fragments into registers; the Q buffer handed back at once;
//   per tile: wait "full"; zero V's rows past the keys (TMA tiles); S = Q K^T [16 x WARP_KEYS];
//     mask + online softmax; O [16 x HEAD_DIM] += P V; arrive on "empty";
//   at a work's end: warps 1..3 publish their states in shared memory, warp 0 folds them in and
//     writes the rows (or the split-KV partial states) while the others start the next work;
//     with p.merge_counters, the last chunk of a split request to finish merges its states
//     (common/fused_merge.cuh), all four warps, and no merge kernel runs.
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
#include "common/fused_merge.cuh"

using namespace cpattn;

template <typename T, int HEAD_DIM, int TILE, int STAGES, int CTAS>
__global__ void __launch_bounds__(256, CTAS)
batch_decode_sm90_kernel(const AttentionParams p, const __grid_constant__ KVTensorMaps maps) {
  allow_dependent_grids();  // common/grid_dependency.cuh; the producer waits in produce_works
  constexpr int ROWS = 16, WARPS = 4, WARP_KEYS = TILE / WARPS;
  constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row of q, k, v
  constexpr int STATE = state_floats<HEAD_DIM>() * 32;  // floats of a published warp state
  // The fused merge of split requests (_tiles.HopperDecodeTileConfig.fused_merge): at head_dim
  // 256 its registers would spill in the tile loop, so merge_state merges there.
  constexpr bool FUSED_MERGE = HEAD_DIM <= 128;
  static_assert(HEAD_DIM % 64 == 0, "head_dim must be a multiple of 64 (128-byte swizzle blocks)");
  static_assert(WARP_KEYS % 16 == 0, "each warp takes whole 16-key steps of a tile");
  static_assert(STAGES >= 2, "the producer runs a tile ahead at least");

  extern __shared__ __align__(1024) uint4 smem[];
  const Pipeline<ROWS, TILE, STAGES, CHUNKS> pipe(smem);  // kv_producer.cuh
  float* const published = reinterpret_cast<float*>(pipe.end);  // [WARPS - 1][STATE]
  int* const last_chunk = reinterpret_cast<int*>(published + (WARPS - 1) * STATE);  // fused merge
  if (threadIdx.x == 0) pipe.init(WARPS);  // every consumer warp arrives on "empty"
  __syncthreads();

  // Each warpgroup counts the works after its register change (nothing is held across it).
  if (threadIdx.x < 128) {  // producer
    warpgroup_registers_dec<PRODUCER_REGISTERS>();
    const int works = num_works(p, p.num_qo_heads / p.group_size);
    // Item-major when CTAs loop over several works (H200, 32/8 heads: B256 L1024 3687 -> 3817
    // GB/s); head-major when each has one at most (B16 L16384 3946 -> 4117): measured, not
    // explained.
    // A tile's copies from warp 0 alone: from all four, B64 L4096 was 1% slower.
    produce_works<T, HEAD_DIM, ROWS, TILE, STAGES, 1>(p, maps, pipe, works, works <= gridDim.x);
    return;
  }
  warpgroup_registers_inc<consumer_registers<1, PRODUCER_REGISTERS, CTAS>()>();
  wait_for_prior_grids();  // before any output or partial state is written

  using KLayout = SwizzledBlocks<TILE>;
  using QLayout = SwizzledBlocks<ROWS>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32 - 4;  // among the consumers
  const int warp_key0 = warp * WARP_KEYS;  // first key of this warp within a tile
  const bool lead = lane == 0;             // arrives on barriers for its warp
  const float logits_scale = p.soft_cap_log2 > 0.f ? 1.f : p.logits_scale;

  int tile = 0;
  // The work count and head blocks are worked out again where used: at head_dim 256 every
  // register is taken, and one held through the loop would be spilled.
  auto head_blocks = [&] { return p.num_qo_heads / p.group_size; };
  for (int x = blockIdx.x, n = 0; x < num_works(p, head_blocks()); x += gridDim.x, ++n) {
    const int qb = n % 2;
    const Work<ROWS, TILE> work = pipe.wait_work(n);
    const WorkItem& w = work.w;
    const KeyTiles<TILE>& tiles = work.tiles;
    // Q's A fragments for the whole work: the buffer goes back to the producer at once.
    unsigned qa[HEAD_DIM / 16][4];
    const uint4* q_tile = pipe.q_buffer(qb);
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
      ldmatrix_x4(qa[kk], q_tile + QLayout::at(lane % 16, kk * 2 + lane / 16));
    __syncwarp();
    if (lead) mbarrier_arrive(&pipe.q_empty[qb]);

    RowsState<HEAD_DIM> st;
    init_rows(st);
    const bool tiles_by_tma = work_by_tma(maps, p, tiles);
    for (int t = 0; t < tiles.num_tiles; ++t, ++tile) {
      const int first_key = tiles.kv_begin + t * TILE + warp_key0;  // ... within the request
      const int stage = pipe.wait_tile(tile);
      const int mask_class = tiles.mask_class(p, t);
      // Warp-uniform: a warp whose keys are all past the end has nothing to add.
      if (mask_class != 0 && first_key < w.kv_end) {
        const uint4* k_tile = pipe.k_stage(stage);
        uint4* v_tile = pipe.v_stage(stage);
        if (first_key + WARP_KEYS > w.kv_end && tiles_by_tma) {
          // The copy brought rows past the keys (another request's, or a page's unused slots):
          // V's are zeroed (0 * NaN would reach the output), K's scores masked below.
          const int tile_key0 = first_key - warp_key0;  // the tile's first key
          zero_warp_rows<TILE, CHUNKS, WARP_KEYS>(v_tile, warp_key0, w.kv_end - tile_key0);
          __syncwarp();
        }
        // S = Q K^T for the 16 rows x this warp's keys.
        float s[WARP_KEYS / 8][4];
#pragma unroll
        for (int j = 0; j < WARP_KEYS / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
#pragma unroll
          for (int j = 0; j < WARP_KEYS / 16; ++j) {
            unsigned bk[4];
            const int key_row = warp_key0 + j * 16 + (lane / 16) * 8 + lane % 8;
            ldmatrix_x4(bk, k_tile + KLayout::at(key_row, kk * 2 + (lane / 8) % 2));
            mma_16816<T>(s[2 * j], qa[kk], bk[0], bk[1]);
            mma_16816<T>(s[2 * j + 1], qa[kk], bk[2], bk[3]);
          }
        }
        softmax_block<HEAD_DIM, WARP_KEYS>(s, st, p, w, warp_queries(p, w, 0), 0, first_key,
                                           mask_class, logits_scale);
        // O += P V: the probabilities' C fragments are the A fragments of this product.
#pragma unroll
        for (int kt = 0; kt < WARP_KEYS / 16; ++kt) {
          unsigned a[4];
          c_to_a<T>(s, kt, a);
#pragma unroll
          for (int dn = 0; dn < HEAD_DIM / 16; ++dn) {
            unsigned bv[4];
            const int key_row = warp_key0 + kt * 16 + ((lane / 8) % 2) * 8 + lane % 8;
            ldmatrix_x4_trans(bv, v_tile + KLayout::at(key_row, dn * 2 + lane / 16));
            mma_16816<T>(st.o[2 * dn], a, bv[0], bv[1]);
            mma_16816<T>(st.o[2 * dn + 1], a, bv[2], bv[3]);
          }
        }
      }
      __syncwarp();
      if (lead) mbarrier_arrive(&pipe.empty[stage]);
    }

    // The four warps' states of the same rows, over disjoint keys, into warp 0's; it writes.
    sum_row_denominators(st);
    named_barrier_sync(1, 128);  // warp 0 has folded the last work's published states
    if (warp > 0) publish_rows(published + (warp - 1) * STATE, st);
    named_barrier_sync(1, 128);
    if (warp == 0) {
#pragma unroll
      for (int from = 0; from < WARPS - 1; ++from) fold_rows(st, published + from * STATE);
      store_rows<T, HEAD_DIM>(p, w, 0, st);
      if (FUSED_MERGE && p.merge_counters != nullptr) {
        const bool last = last_chunk_done(p, w, head_blocks());
        if (lead) *last_chunk = last;
      }
    }
    // A split request's last chunk merges it. The barrier holds warps 1..3 for warp 0's fold
    // and count at every work; split plans have few works a CTA, so little overlap is lost.
    if (FUSED_MERGE && p.merge_counters != nullptr) {
      named_barrier_sync(1, 128);
      if (*last_chunk) merge_request_rows<T, HEAD_DIM, WARPS>(p, w, warp);
    }
  }
}
