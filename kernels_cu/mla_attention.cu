// mla_attention: multi-head latent attention (DeepSeek-V2/V3 MLA with absorbed weights) over a
// paged latent cache, on tensor cores (mma.sync m16n8k16, fp32 accumulate).
//
// Every head attends the same keys: key j is [ckv_j | kpe_j] (512 + 64 dims) and its value is
// ckv_j. Scores are (q_nope . ckv + q_pe . kpe) * sm_scale.
//
// Grid: one dimension, item * head_blocks + head block, for each work item of the plan (request,
// first query, key range) and block of `group` heads (one dimension: no 65535 limit on items;
// the head blocks of one item run side by side and can share each key tile through L2).
// Block: WARPS warps. A CTA owns ROWS = 16 * M_TILES packed (query, head) rows: row r is query
// q_start + r / group of its request, for head head_block * group + r % group. Heads are the M
// dimension of both products, so each key tile is read from memory once for all of them.
// Tiles of TILE keys (rows of 72 16-byte chunks: 64 of ckv, 8 of kpe) stream through STAGES
// shared-memory buffers with cp.async; keys past the item's range are zero-filled (the ckv chunk
// is V: 0 * NaN would poison the output) and masked. Per tile, with KEY_WARPS = WARPS / KSPLIT:
//   S = Q K^T   warp w computes all ROWS rows against keys [k * WARP_KEYS, +WARP_KEYS), k = w %
//               KEY_WARPS, over part w / KEY_WARPS of the 576 dims (all of them when KSPLIT is
//               1); the other parts' sums reach part 0's warp through shared memory
//   softmax     part 0's warps: row maxima meet in shared memory; P goes there too, as T
//   O += P V    warp w accumulates output dims [w * WARP_DIMS, +WARP_DIMS) over all TILE keys
// Splitting the 576 dims of S (KSPLIT 2) lets 8 warps share a 64-key tile at 16 rows: twice the
// warps a scheduler can switch between while a product or a shared-memory load is in flight.
// Every warp follows the same running maxima, so each keeps its own part of the denominators
// (over its keys; 0 for parts past 0) and of O (over its dims); they are summed at the end.
#include "common/dtypes.cuh"
#include "common/grid_dependency.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/mla_params.cuh"
#include "common/work_item.cuh"
#include "common/mla_tiles.cuh"
#include "common/fused_merge.cuh"

using namespace cpattn;

constexpr int CKV_DIM = MLA_CKV_DIM;
constexpr int ROW_CHUNKS = MLA_ROW_CHUNKS;  // 16-byte chunks of a [ckv | kpe] key or q row: 72

template <typename T, int M_TILES, int WARPS, int TILE, int STAGES, int KSPLIT>
__global__ void __launch_bounds__(32 * WARPS, 1) mla_attention_kernel(const MLAParams p) {
  allow_dependent_grids();  // common/grid_dependency.cuh
  constexpr int ROWS = 16 * M_TILES;
  constexpr int THREADS = 32 * WARPS;
  constexpr int KEY_WARPS = WARPS / KSPLIT;      // warps across a tile's keys in S
  constexpr int WARP_KEYS = TILE / KEY_WARPS;    // keys of S per warp
  constexpr int STEPS = ROW_CHUNKS / 2 / KSPLIT; // 16-dim steps of S per warp (36 / KSPLIT)
  constexpr int WARP_DIMS = CKV_DIM / WARPS;     // output dims per warp
  constexpr int S_FRAG = M_TILES * (WARP_KEYS / 8) * 4;  // a thread's elements of a warp's S
  // P rows padded by 16 bytes: eight rows read by one ldmatrix fall in eight bank groups.
  constexpr int P_STRIDE = TILE + 8;
  static_assert(WARPS % KSPLIT == 0 && (ROW_CHUNKS / 2) % KSPLIT == 0, "parts split evenly");
  static_assert(KSPLIT == 1 || KEY_WARPS <= 15, "a named barrier (1 .. 15) per key warp");
  static_assert(WARP_KEYS % 16 == 0 && WARP_DIMS % 16 == 0, "warps take whole 16-wide steps");
  static_assert(STAGES >= 2, "cp.async pipeline needs two stages at least");
  // Independent accumulator sets of S (see below): as many as the registers allow.
  constexpr int ACC = M_TILES == 1 && STEPS % 4 == 0 ? 4 : STEPS % 2 == 0 ? 2 : 3;
  static_assert(STEPS % ACC == 0, "the steps of S split evenly");

  WorkItem w;
  if (!load_work_item<ROWS>(p, p.num_heads / p.group_size, w)) return;
  wait_for_prior_grids();  // the work item (plan) was read before
  const int kv_begin = w.kv_begin, kv_end = w.kv_end;
  const int num_tiles = kv_end > kv_begin ? (kv_end - kv_begin + TILE - 1) / TILE : 0;

  extern __shared__ uint4 smem[];
  uint4* q_tile = smem;                                         // [ROWS][ROW_CHUNKS]
  uint4* kv_tiles = q_tile + ROWS * ROW_CHUNKS;                 // [STAGES][TILE][ROW_CHUNKS]
  T* p_tile = reinterpret_cast<T*>(kv_tiles + STAGES * TILE * ROW_CHUNKS);  // [ROWS][P_STRIDE]
  float* row_red = reinterpret_cast<float*>(p_tile + ROWS * P_STRIDE);     // [WARPS][ROWS]
  float* s_parts = row_red + WARPS * ROWS;  // [KSPLIT - 1][KEY_WARPS][S_FRAG][32]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int key_warp = warp % KEY_WARPS, part = warp / KEY_WARPS;
  using Layout = SwizzledRows<ROW_CHUNKS>;
  issue_mla_q_rows<Layout, T, ROWS, THREADS>(p, w, q_tile);
  MLATiles<Layout, T, THREADS, TILE, STAGES> tiles(p, kv_tiles, w, num_tiles);
  tiles.start();  // Q travels in the first group

  float o[M_TILES][WARP_DIMS / 8][4];  // C fragments of this warp's dims of O
  float m[M_TILES][2], d[M_TILES][2];  // rows g, g + 8 of each 16: running max (log2), denominator
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
    for (int n = 0; n < WARP_DIMS / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    m[mt][0] = m[mt][1] = NEG_INF;
    d[mt][0] = d[mt][1] = 0.f;
  }
  const int warp_key0 = key_warp * WARP_KEYS, warp_chunk0 = warp * WARP_DIMS / 8;
  const int step0 = part * STEPS;  // this warp's first 16-dim step of S
  const float scale = p.logits_scale;

  // With the dims of S split, a warp's share of Q fits in its registers (STEPS A fragments):
  // read from shared memory once, not every tile (a third of a tile's shared-memory reads).
  constexpr bool Q_IN_REGS = KSPLIT > 1 && M_TILES == 1;
  constexpr int S_UNROLL = Q_IN_REGS ? STEPS / ACC : 2;  // whole: q_frag indexed by constants
  unsigned q_frag[Q_IN_REGS ? STEPS : 1][4];
  if constexpr (Q_IN_REGS) {
    cp_async_wait<STAGES - 2>();  // Q came in the first group
    __syncthreads();
#pragma unroll
    for (int k = 0; k < STEPS; ++k)
      ldmatrix_x4(q_frag[k], q_tile + Layout::at(lane % 16, (step0 + k) * 2 + lane / 16));
  }

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    // Tile t has landed; every warp is done with tile t - 1 (its stage, P and maxima are free).
    __syncthreads();
    tiles.refill(t);
    const uint4* kv = tiles.stage(t);
    const int first_key = kv_begin + t * TILE + warp_key0;  // within the request

    // S = Q K^T: all rows x this warp's keys, over its part of the 576 dims of [ckv | kpe].
    // The steps of 16 dims go round-robin into ACC sets of accumulators, summed at the end: a
    // single set would chain dependent MMAs, and a few warps per SM cannot hide that latency.
    float acc[ACC][M_TILES][WARP_KEYS / 8][4];
#pragma unroll
    for (int a = 0; a < ACC; ++a)
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int n = 0; n < WARP_KEYS / 8; ++n)
          acc[a][mt][n][0] = acc[a][mt][n][1] = acc[a][mt][n][2] = acc[a][mt][n][3] = 0.f;
#pragma unroll S_UNROLL
    for (int k0 = 0; k0 < STEPS; k0 += ACC) {
#pragma unroll
      for (int a = 0; a < ACC; ++a) {
        const int kk = step0 + k0 + a;
        unsigned qa[M_TILES][4];
        if constexpr (Q_IN_REGS) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[0][e] = q_frag[k0 + a][e];
        } else {
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt)
            ldmatrix_x4(qa[mt], q_tile + Layout::at(mt * 16 + lane % 16, kk * 2 + lane / 16));
        }
#pragma unroll
        for (int n = 0; n < WARP_KEYS / 16; ++n) {
          unsigned bk[4];
          const int key_row = warp_key0 + n * 16 + (lane / 16) * 8 + lane % 8;
          ldmatrix_x4(bk, kv + Layout::at(key_row, kk * 2 + (lane / 8) % 2));
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt) {
            mma_16816<T>(acc[a][mt][2 * n], qa[mt], bk[0], bk[1]);
            mma_16816<T>(acc[a][mt][2 * n + 1], qa[mt], bk[2], bk[3]);
          }
        }
      }
    }
    float (&s)[M_TILES][WARP_KEYS / 8][4] = acc[0];
#pragma unroll
    for (int a = 1; a < ACC; ++a)
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int n = 0; n < WARP_KEYS / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][n][e] += acc[a][mt][n][e];

    if constexpr (KSPLIT > 1) {  // the other parts' sums of S into part 0's warp
      float* mine = &s[0][0][0];
      // Element e of this lane's S in part q's slots (q >= 1), lane-interleaved: no conflicts.
      auto slot = [&](int q, int e) -> float& {
        return s_parts[(((q - 1) * KEY_WARPS + key_warp) * S_FRAG + e) * 32 + lane];
      };
      if (part > 0) {
#pragma unroll
        for (int e = 0; e < S_FRAG; ++e) slot(part, e) = mine[e];
      }
      named_barrier_sync(1 + key_warp, 32 * KSPLIT);  // the warps of these keys only
      if (part == 0) {
#pragma unroll
        for (int q = 1; q < KSPLIT; ++q)
#pragma unroll
          for (int e = 0; e < S_FRAG; ++e) mine[e] += slot(q, e);
      }
    }

    // Part 0: row maxima of this warp's keys, then of the whole tile (through shared memory).
    if (part == 0) {
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) mla_mask_block<WARP_KEYS>(s[mt], p, w, mt * 16, first_key);
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float mx = quad_row_max(s[mt], h);
          if (lane % 4 == 0) row_red[key_warp * ROWS + mt * 16 + lane / 4 + 8 * h] = mx;
        }
    }
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = mt * 16 + lane / 4 + 8 * h;
        float tile_max = NEG_INF;
#pragma unroll
        for (int k = 0; k < KEY_WARPS; ++k) tile_max = fmaxf(tile_max, row_red[k * ROWS + row]);
        const float m_new = fmaxf(m[mt][h], tile_max * scale);  // scale > 0: max commutes with it
        // A row with no visible key yet keeps m = -inf: subtract 0, never -inf - -inf = NaN.
        const float m_ref = m_new == NEG_INF ? 0.f : m_new;
        const float rescale = exp2f(m[mt][h] - m_ref);
        m[mt][h] = m_new;
        d[mt][h] *= rescale;
        if (__any_sync(0xffffffff, rescale != 1.f)) {  // warp-uniform: no row moved, no multiply
#pragma unroll
          for (int n = 0; n < WARP_DIMS / 8; ++n) {
            o[mt][n][2 * h] *= rescale;
            o[mt][n][2 * h + 1] *= rescale;
          }
        }
        if (part > 0) continue;  // P and the denominators are part 0's
#pragma unroll
        for (int n = 0; n < WARP_KEYS / 8; ++n) {
          const float p0 = exp2f(fmaf(s[mt][n][2 * h], scale, -m_ref));
          const float p1 = exp2f(fmaf(s[mt][n][2 * h + 1], scale, -m_ref));
          d[mt][h] += p0 + p1;
          *reinterpret_cast<unsigned*>(p_tile + row * P_STRIDE + warp_key0 + n * 8 + 2 * (lane % 4)) =
              pack_pair<T>(p0, p1);
        }
      }
    __syncthreads();  // P of the whole tile is in shared memory

    // O[:, this warp's dims] += P V over all keys of the tile.
#pragma unroll
    for (int kt = 0; kt < TILE / 16; ++kt) {
      unsigned a[M_TILES][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
        ldmatrix_x4(a[mt], p_tile + (mt * 16 + lane % 16) * P_STRIDE + kt * 16 + (lane / 16) * 8);
#pragma unroll
      for (int dn = 0; dn < WARP_DIMS / 16; ++dn) {
        unsigned bv[4];
        const int key_row = kt * 16 + ((lane / 8) % 2) * 8 + lane % 8;
        ldmatrix_x4_trans(bv, kv + Layout::at(key_row, warp_chunk0 + dn * 2 + lane / 16));
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
          mma_16816<T>(o[mt][2 * dn], a[mt], bv[0], bv[1]);
          mma_16816<T>(o[mt][2 * dn + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Whole-row denominators: over the quad's keys, then over the warps' keys. (Every warp has
  // passed the last tile's second barrier: nobody reads the maxima any more.)
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      d[mt][h] += __shfl_xor_sync(0xffffffff, d[mt][h], 1);
      d[mt][h] += __shfl_xor_sync(0xffffffff, d[mt][h], 2);
      if (lane % 4 == 0) row_red[warp * ROWS + mt * 16 + lane / 4 + 8 * h] = d[mt][h];
    }
  __syncthreads();

  // Normalise and write this warp's dims: rows past valid_rows are padding.
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = mt * 16 + lane / 4 + 8 * h;
      if (r >= w.valid_rows) continue;
      float denom = 0.f;
#pragma unroll
      for (int from = 0; from < WARPS; ++from) denom += row_red[from * ROWS + r];
      mla_store_row<T, WARP_DIMS / 8>(p, w, r, h, o[mt], warp * WARP_DIMS + 2 * (lane % 4),
                                      m[mt][h], denom, warp == 0 && lane % 4 == 0);
    }

  // Split with p.merge_counters: every chunk of this query tile merges a slice of it, or the
  // last one to finish merges it all (common/fused_merge.cuh); row_red is free again once every
  // warp has passed the barrier in cta_last_chunk_done, and holds its flag.
  if (p.merge_counters != nullptr) {
    const int group = p.group_size;
    const long long token0 = w.qo_begin + w.q_start;
    const int chunks = p.item_state_stride[w.item];
    const auto row_at = [&](int r) {
      const long long token = token0 + r / group;
      const int head = w.head_block * group + r % group;
      return MergeRow{p.merge_indptr[token], p.merge_indptr[token + 1], head,
                      token * p.num_heads + head};
    };
    const long long tile_index = token0 * (p.num_heads / group) + w.head_block;
    T* out = static_cast<T*>(p.o);
    if (p.merge_slices) {
      int* counters = p.merge_counters + 2 * tile_index;
      cta_wait_all_chunks(counters, chunks);
      merge_slice<T, CKV_DIM, THREADS>(p.partial_o, p.partial_lse, p.num_heads, out, p.lse,
                                       w.valid_rows, chunks,
                                       p.item_state[w.item] - p.merge_indptr[token0], row_at);
      cta_leave_chunks(counters, chunks);
    } else if (cta_last_chunk_done(p.merge_counters + tile_index, chunks,
                                   reinterpret_cast<int*>(row_red))) {
      merge_state_rows<T, CKV_DIM, WARPS>(p.partial_o, p.partial_lse, p.num_heads, out, p.lse,
                                          w.valid_rows, row_at, warp);
    }
  }
}
