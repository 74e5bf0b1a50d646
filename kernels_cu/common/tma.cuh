// tma.cuh: Hopper's bulk tensor copy (TMA): one thread moves a box of a strided global array into
// shared memory, completing on an mbarrier by bytes (mbarrier.cuh), with no registers and no
// per-element addressing. The tensor maps are encoded on the host (cpattn/_tma.py) and passed
// as __grid_constant__ kernel parameters.
#pragma once
#include "common/mma.cuh"
#include "common/mbarrier.cuh"

namespace cpattn {

struct alignas(128) TensorMap {
  unsigned long long opaque[16];
};

// K and V rows of a ragged batch, [rows, kv_heads, head_dim], in boxes of TILE rows x 64 dims of
// one head (cpattn/_tma.py): 128-byte rows written with the 128-byte swizzle, which is the
// layout of SwizzledBlocks (wgmma.cuh); MLA passes its ckv rows as k and its kpe rows as v.
// enabled = 0: no maps (the kernel copies by cp.async).
struct KVTensorMaps {
  TensorMap k, v;
  int enabled;
};

// The barrier expects `bytes` more (the copies issued next), and this thread arrives.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n"
               :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
}

// Box (rows [row, row + box rows), dims [col, col + 64) of head `head`) of `map` into `smem`
// (1024-byte aligned), counted on `bar` when it lands.
__device__ __forceinline__ void tma_load_rows(void* smem, const TensorMap& map, int col, int head,
                                              int row, unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3, %4}], [%5];\n"
      :: "r"(smem_addr(smem)), "l"(reinterpret_cast<unsigned long long>(&map)), "r"(col),
         "r"(head), "r"(row), "r"(smem_addr(bar)) : "memory");
}

// A tile's copies by kind (a tensor's 64-dim block), spread over the first WARPS warps of a
// producer warpgroup: warp w < WARPS issues kinds w, w + WARPS, ... The copies of one thread
// issue one after the other, and so do those of a warp's lanes (taking turns: a copy's operands
// are uniform registers), so a tile's several copies go out sooner from several warps.
//
// Warps are counted within the warpgroup (threadIdx.x / 32 % 4): the producer is warpgroup 0.
// Every thread of the warpgroup arrives on `bar` once, lane 0 of each copying warp expecting the
// bytes of its warp's kinds (`kind_bytes` each), before any copy of its warp can land.
template <int KINDS, int WARPS>
__device__ __forceinline__ int warp_kinds(int warp) {
  return warp < WARPS ? (KINDS - warp + WARPS - 1) / WARPS : 0;
}
template <int KINDS, int WARPS>
__device__ __forceinline__ void arrive_expecting_warp_kinds(unsigned long long* bar,
                                                            unsigned kind_bytes) {
  const int kinds = warp_kinds<KINDS, WARPS>(threadIdx.x / 32 % 4);
  if (threadIdx.x % 32 == 0 && kinds > 0) {
    mbarrier_arrive_expect_tx(bar, kinds * kind_bytes);
  } else {
    mbarrier_arrive(bar);
  }
  __syncwarp();
}
// issue(k) for each kind k of this warp.
template <int KINDS, int WARPS, typename Issue>
__device__ __forceinline__ void for_warp_kinds(Issue&& issue) {
  const int warp = threadIdx.x / 32 % 4;
#pragma unroll
  for (int i = 0; i < (KINDS + WARPS - 1) / WARPS; ++i) {
    const int k = warp + WARPS * i;
    if (warp < WARPS && k < KINDS) issue(k);
  }
}

}  // namespace cpattn
