// mla_attention_sm90: mla_attention (same work items, outputs and split-KV partial states) with
// its matrix products on Hopper's warpgroup MMA (wgmma, sm_90a only).
//
// Block: two warpgroups sharing ROWS = 64 packed (query, head) rows (row r is query q_start + r /
// group, head head_block * group + r % group); warp i of each warpgroup holds rows 16 (i % 4)..
// Per tile of TILE keys ([ckv | kpe], 576 dims; V is the ckv part):
//   S = Q K^T    warpgroup g: all 64 rows x keys [g TILE / 2, (g + 1) TILE / 2), 36 wgmma over the
//                576 dims, Q and K from shared memory;
//   softmax      the two warpgroups' row maxima meet in shared memory; P (as T) is written to
//                shared memory in wgmma's swizzled layout;
//   O += P V     warpgroup g: output dims [256 g, 256 g + 256) over all TILE keys, P and V
//                (transposed) from shared memory.
// Both warpgroups follow the same running maxima, each keeps the denominators of its keys and
// O of its dims; the denominators are summed at the end. Q, the key tiles (STAGES buffers) and P
// sit in the 128-byte swizzled layout of common/wgmma.cuh.
#include "common/dtypes.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/wgmma.cuh"
#include "common/mla_params.cuh"
#include "common/work_item.cuh"
#include "common/mla_tiles.cuh"

using namespace cpattn;

template <typename T, int TILE, int STAGES>
__global__ void __launch_bounds__(256, 1) mla_attention_sm90_kernel(const MLAParams p) {
  constexpr int ROWS = 64, THREADS = 256;
  constexpr int WG_KEYS = TILE / 2;            // keys of S per warpgroup
  constexpr int WG_DIMS = MLA_CKV_DIM / 2;     // output dims per warpgroup: 256
  static_assert(TILE == 64, "P is one 64-key swizzle block; S is one wgmma n32 per warpgroup");
  static_assert(STAGES >= 2, "cp.async pipeline needs two stages at least");

  WorkItem w;
  if (!load_work_item<ROWS>(p, p.num_heads / p.group_size, w)) return;
  const int num_tiles = w.kv_end > w.kv_begin ? (w.kv_end - w.kv_begin + TILE - 1) / TILE : 0;

  extern __shared__ __align__(1024) uint4 smem[];
  uint4* q_tile = smem;                                      // ROWS x 72 chunks
  uint4* kv_tiles = q_tile + ROWS * MLA_ROW_CHUNKS;          // [STAGES] TILE x 72 chunks
  uint4* p_tile = kv_tiles + STAGES * TILE * MLA_ROW_CHUNKS; // ROWS x TILE keys of T (8 chunks)
  float* row_red = reinterpret_cast<float*>(p_tile + ROWS * 8);  // [2][ROWS]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wg = warp / 4;
  const int row0 = (warp % 4) * 16;  // this warp's 16 rows (in both warpgroups)
  issue_mla_q_rows<SwizzledBlocks<ROWS>, T, ROWS, THREADS>(p, w, q_tile);
  MLATiles<SwizzledBlocks<TILE>, T, THREADS, TILE, STAGES> tiles(p, kv_tiles, w, num_tiles);
  tiles.start();  // Q travels in the first group

  float o[WG_DIMS / 8][4];  // rows row0 + g, + 8 of this warpgroup's dims
  float m[2] = {NEG_INF, NEG_INF}, d[2] = {0.f, 0.f};  // running max (log2), this WG's denominators
#pragma unroll
  for (int n = 0; n < WG_DIMS / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  const float scale = p.logits_scale;
  const unsigned long long q_desc = smem_desc(q_tile, 16, 1024);
  const unsigned long long p_desc = smem_desc(p_tile, 16, 1024);
  char* p_bytes = reinterpret_cast<char*>(p_tile);

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    fence_proxy_async();
    // Tile t has landed; every thread is done with tile t - 1 (its stage, P and the maxima).
    __syncthreads();
    tiles.refill(t);
    const uint4* kv = tiles.stage(t);
    const int first_key = w.kv_begin + t * TILE + wg * WG_KEYS;  // within the request

    // S = Q K^T over the 576 dims; this warpgroup's keys start WG_KEYS rows (128 bytes each)
    // into every block of the tile.
    float s[WG_KEYS / 8][4];
    kmajor_scores<T, WG_KEYS, MLA_CKV_DIM + MLA_KPE_DIM, ROWS, TILE>(
        s, q_desc, smem_desc(kv + wg * WG_KEYS * 8, 16, 1024));
    mla_mask_block<WG_KEYS>(s, p, w, row0, first_key);

    // Row maxima of this warpgroup's keys, then of the whole tile (through shared memory).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float mx = quad_row_max(s, h);
      if (lane % 4 == 0) row_red[wg * ROWS + row0 + lane / 4 + 8 * h] = mx;
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + lane / 4 + 8 * h;
      const float tile_max = fmaxf(row_red[row], row_red[ROWS + row]);
      const float m_new = fmaxf(m[h], tile_max * scale);  // scale > 0: max commutes with it
      // A row with no visible key yet keeps m = -inf: subtract 0, never -inf - -inf = NaN.
      const float m_ref = m_new == NEG_INF ? 0.f : m_new;
      const float rescale = exp2f(m[h] - m_ref);
      m[h] = m_new;
      d[h] *= rescale;
      if (__any_sync(0xffffffff, rescale != 1.f)) {  // warp-uniform: no row moved, no multiply
#pragma unroll
        for (int n = 0; n < WG_DIMS / 8; ++n) {
          o[n][2 * h] *= rescale;
          o[n][2 * h + 1] *= rescale;
        }
      }
      // P row `row`, keys first_key - kv_begin - t TILE + n 8 + 2c (+1): chunk key / 8 of the
      // row, 2 bytes an element into it.
#pragma unroll
      for (int n = 0; n < WG_KEYS / 8; ++n) {
        const float p0 = exp2f(fmaf(s[n][2 * h], scale, -m_ref));
        const float p1 = exp2f(fmaf(s[n][2 * h + 1], scale, -m_ref));
        d[h] += p0 + p1;
        const int key = wg * WG_KEYS + n * 8 + 2 * (lane % 4);
        *reinterpret_cast<unsigned*>(p_bytes + SwizzledBlocks<ROWS>::at(row, key / 8) * 16 +
                                     (key % 8) * 2) = pack_pair<T>(p0, p1);
      }
    }
    fence_proxy_async();
    __syncthreads();  // P of the whole tile is in shared memory

    // O[:, this warpgroup's dims] += P V: k-step kt is keys [16 kt, 16 kt + 16), 32 bytes into
    // P's rows and 16 rows into V's blocks; the warpgroup's 256 dims are blocks 4 wg .. 4 wg + 3
    // of the tile, TILE * 128 bytes apart.
    const unsigned long long v_desc = smem_desc(kv + 4 * wg * TILE * 8, TILE * 128, 1024);
    wgmma_fence();
#pragma unroll
    for (int kt = 0; kt < TILE / 16; ++kt)
      Wgmma<T, WG_DIMS>::template ss<1>(o, p_desc + kt * 2, v_desc + kt * 16 * 8, true);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
  }
  cp_async_wait<0>();

  // Whole-row denominators: over the quad's keys, then over the two warpgroups' keys. (Every
  // thread has passed the last tile's second barrier: nobody reads the maxima any more.)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    d[h] += __shfl_xor_sync(0xffffffff, d[h], 1);
    d[h] += __shfl_xor_sync(0xffffffff, d[h], 2);
    if (lane % 4 == 0) row_red[wg * ROWS + row0 + lane / 4 + 8 * h] = d[h];
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + lane / 4 + 8 * h;
    if (r >= w.valid_rows) continue;
    mla_store_row<T, WG_DIMS / 8>(p, w, r, h, o, wg * WG_DIMS + 2 * (lane % 4), m[h],
                                  row_red[r] + row_red[ROWS + r], wg == 0 && lane % 4 == 0);
  }
}
