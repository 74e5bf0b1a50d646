// mla_attention_sm90: mla_attention (same work items, outputs and split-KV partial states) with
// its matrix products on Hopper's warpgroup MMA (wgmma, sm_90a only), warp specialised.
//
// Block: a producer warpgroup and two consumer warpgroups sharing ROWS = 64 packed (query, head)
// rows (row r is query q_start + r / group, head head_block * group + r % group); warp i of each
// consumer warpgroup holds rows 16 (i % 4)... The producer copies Q and the [ckv | kpe] key tiles
// (576 dims; V is the ckv part) into shared memory through STAGES stages with full / empty
// mbarriers (mbarrier.cuh): whole tiles of power-of-two pages by TMA (one box a page and 64
// dims, tensor maps of ckv and kpe rows), the rest by cp.async (zero-filled past the keys).
// Per tile of TILE keys, the consumers:
//   S = Q K^T    warpgroup g: all 64 rows x keys [g TILE / 2, (g + 1) TILE / 2), 36 wgmma over the
//                576 dims, Q and K from shared memory;
//   softmax      the two warpgroups' row maxima meet in shared memory; P (as T) is written to
//                shared memory in wgmma's swizzled layout;
//   O += P V     warpgroup g: output dims [256 g, 256 g + 256) over all TILE keys, P and V
//                (transposed) from shared memory;
// with two named barriers of the consumers a tile (maxima, then P), and each warp's arrival on
// the stage's empty barrier once its P V is done.
// Both warpgroups follow the same running maxima, each keeps the denominators of its keys and
// O of its dims; the denominators are summed at the end. Q, the key tiles and P sit in the
// 128-byte swizzled layout of common/wgmma.cuh.
#include "common/dtypes.cuh"
#include "common/grid_dependency.cuh"
#include "common/state.cuh"
#include "common/mma.cuh"
#include "common/wgmma.cuh"
#include "common/mbarrier.cuh"
#include "common/tma.cuh"
#include "common/mla_params.cuh"
#include "common/work_item.cuh"
#include "common/mla_tiles.cuh"

using namespace cpattn;

// The producer's registers: its page ids are few (TILE / 16 a thread).
constexpr int MLA_PRODUCER_REGISTERS = 56;
constexpr int MLA_CONSUMERS = 256;  // threads of the two consumer warpgroups (named barrier 1)

template <typename T, int TILE, int STAGES>
__global__ void __launch_bounds__(384, 1)
mla_attention_sm90_kernel(const MLAParams p, const __grid_constant__ KVTensorMaps maps) {
  allow_dependent_grids();  // common/grid_dependency.cuh
  constexpr int ROWS = 64;
  constexpr int WG_KEYS = TILE / 2;            // keys of S per warpgroup
  constexpr int WG_DIMS = MLA_CKV_DIM / 2;     // output dims per warpgroup: 256
  static_assert(TILE == 64, "P is one 64-key swizzle block; S is one wgmma n32 per warpgroup");
  static_assert(STAGES >= 2, "the producer runs a tile ahead at least");

  WorkItem w;
  if (!load_work_item<ROWS>(p, p.num_heads / p.group_size, w)) return;
  wait_for_prior_grids();  // the work item (plan) was read before
  const int num_tiles = w.kv_end > w.kv_begin ? (w.kv_end - w.kv_begin + TILE - 1) / TILE : 0;

  extern __shared__ __align__(1024) uint4 smem[];
  uint4* q_tile = smem;                                      // ROWS x 72 chunks
  uint4* kv_tiles = q_tile + ROWS * MLA_ROW_CHUNKS;          // [STAGES] TILE x 72 chunks
  uint4* p_tile = kv_tiles + STAGES * TILE * MLA_ROW_CHUNKS; // ROWS x TILE keys of T (8 chunks)
  float* row_red = reinterpret_cast<float*>(p_tile + ROWS * 8);  // [2][ROWS]
  unsigned long long* full = reinterpret_cast<unsigned long long*>(row_red + 2 * ROWS);
  unsigned long long* empty = full + STAGES;                 // [STAGES]
  unsigned long long* q_full = empty + STAGES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbarrier_init(&full[s], 128);  // every producer thread
      mbarrier_init(&empty[s], 8);   // every consumer warp
    }
    mbarrier_init(q_full, 128);
    mbarrier_init_fence();
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer
    warpgroup_registers_dec<MLA_PRODUCER_REGISTERS>();
    issue_mla_q_rows<SwizzledBlocks<ROWS>, T, ROWS, 128>(p, w, q_tile);
    cp_async_arrive(q_full);
    using Tiles = MLATiles<SwizzledBlocks<TILE>, T, 128, TILE, STAGES>;
    Tiles tiles(p, kv_tiles, w, num_tiles);
    tiles.fetch_pages(0);
    const int page_mask = p.page_size - 1;
    // Whole tiles of whole pages come by TMA (the plan enables the maps only for power-of-two
    // pages that divide the tile): each warp copies its kinds (tma.cuh: the 8 blocks of ckv, then
    // kpe) and lane j of each warp page j of each tile.
    auto by_tma = [&](int t) {
      const int first = w.kv_begin + t * TILE;
      return maps.enabled && first + TILE <= w.kv_end && (first & page_mask) == 0;
    };
    constexpr int KINDS = MLA_CKV_DIM / 64 + 1;
    const int lane = threadIdx.x % 32;
    TilePages<TILE> pages(maps.enabled, tiles.page_table, p.page_size, w.kv_begin, w.kv_end,
                          lane);
    for (int t = 0; t < num_tiles; ++t) {
      const int stage = t % STAGES;
      mbarrier_wait(&empty[stage], ((t / STAGES) & 1) ^ 1);
      if (by_tma(t)) {
        arrive_expecting_warp_kinds<KINDS, 4>(&full[stage], TILE * 128);
        if (pages.active) {
          fence_proxy_async();  // after the stage's earlier cp.async writes
          uint4* dst = kv_tiles + stage * TILE * MLA_ROW_CHUNKS;
          const int r = lane * p.page_size, row = pages.page * p.page_size;
          for_warp_kinds<KINDS, 4>([&](int k) {
            const bool kpe = k == KINDS - 1;
            tma_load_rows(dst + (k * TILE + r) * 8, kpe ? maps.v : maps.k, kpe ? 0 : k * 64, 0, row,
                          &full[stage]);
          });
        }
        // Every thread's page ids when the next tile comes by cp.async.
        if (!by_tma(t + 1)) tiles.fetch_pages(t + 1);
      } else {
        tiles.produce(t, stage, &full[stage]);
      }
      pages.advance(t);
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    return;
  }
  warpgroup_registers_inc<consumer_registers<2, MLA_PRODUCER_REGISTERS>()>();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32 - 4, wg = warp / 4;
  const int row0 = (warp % 4) * 16;  // this warp's 16 rows (in both warpgroups)

  float o[WG_DIMS / 8][4];  // rows row0 + g, + 8 of this warpgroup's dims
  float m[2] = {NEG_INF, NEG_INF}, d[2] = {0.f, 0.f};  // running max (log2), this WG's denominators
#pragma unroll
  for (int n = 0; n < WG_DIMS / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  const float scale = p.logits_scale;
  const unsigned long long q_desc = smem_desc(q_tile, 16, 1024);
  const unsigned long long p_desc = smem_desc(p_tile, 16, 1024);
  char* p_bytes = reinterpret_cast<char*>(p_tile);

  mbarrier_wait(q_full, 0);
  for (int t = 0; t < num_tiles; ++t) {
    const int stage = t % STAGES;
    mbarrier_wait(&full[stage], (t / STAGES) & 1);
    fence_proxy_async();  // the producer's cp.async writes, next read by wgmma (async proxy)
    const uint4* kv = kv_tiles + stage * TILE * MLA_ROW_CHUNKS;
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
    // Both warpgroups' maxima are in; (each is done with the last tile's P: it may be rewritten).
    named_barrier_sync(1, MLA_CONSUMERS);
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
    // P of the whole tile is in shared memory (and both warpgroups have read the maxima).
    named_barrier_sync(1, MLA_CONSUMERS);

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
    if (lane == 0) mbarrier_arrive(&empty[stage]);
  }

  // Whole-row denominators: over the quad's keys, then over the two warpgroups' keys. (Every
  // thread has passed the last tile's second barrier: nobody reads the maxima any more.)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    d[h] += __shfl_xor_sync(0xffffffff, d[h], 1);
    d[h] += __shfl_xor_sync(0xffffffff, d[h], 2);
    if (lane % 4 == 0) row_red[wg * ROWS + row0 + lane / 4 + 8 * h] = d[h];
  }
  named_barrier_sync(1, MLA_CONSUMERS);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + lane / 4 + 8 * h;
    if (r >= w.valid_rows) continue;
    mla_store_row<T, WG_DIMS / 8>(p, w, r, h, o, wg * WG_DIMS + 2 * (lane % 4), m[h],
                                  row_red[r] + row_red[ROWS + r], wg == 0 && lane % 4 == 0);
  }
}
