// fused_merge.cuh: the merge of a split-KV decode request's partial states by the last of its
// chunks to finish, inside the attention kernel (no second launch).
//
// Each (request, head block) has a counter in p.merge_counters (0 between launches). A CTA that
// wrote its chunk's partial rows counts itself in (last_chunk_done); the one that completes the
// count merges the request's states, items merge_indptr[b] .. merge_indptr[b + 1] (one query
// per request: the item's state is the item; BatchDecode's plans only), into out and lse, and
// sets the counter back to 0. A wrapper's runs must therefore be ordered (one stream), as they
// already must for the partial states they share.
// Ordering: writers fence their partial rows before counting; the last one fences after it, and
// reads the partial states from L2 (ld.global.cg: they were written by other SMs).
#pragma once
#include "common/dtypes.cuh"
#include "common/state.cuh"
#include "common/attention_params.cuh"
#include "common/work_item.cuh"

namespace cpattn {

// By every lane of the warp that wrote the work's partial rows: whether this work's chunk
// completed its request's count (warp-uniform).
__device__ __forceinline__ bool last_chunk_done(const AttentionParams& p, const WorkItem& w,
                                                int head_blocks) {
  __threadfence();  // this lane's partial rows, visible to the GPU before the count
  __syncwarp();
  int last = 0;
  if (threadIdx.x % 32 == 0) {
    // Cumulative: the other lanes' rows, ordered before this lane by the __syncwarp, are
    // released with its own (a fence by every lane alone would not cover them in the model).
    __threadfence();
    int* counter = p.merge_counters + w.request * head_blocks + w.head_block;
    const int chunks = p.merge_indptr[w.request + 1] - p.merge_indptr[w.request];
    last = atomicAdd(counter, 1) == chunks - 1;
    if (last) atomicExch(counter, 0);  // every chunk has counted: ready for the next launch
  }
  last = __shfl_sync(0xffffffff, last, 0);
  if (last) __threadfence();  // the other chunks' rows, counted before, are read after
  return last;
}

// N floats from global memory through L2 only (another SM wrote them in this launch).
template <int N>
__device__ __forceinline__ void load_l2(const float* src, float (&v)[N]) {
  static_assert(N % 2 == 0, "whole float2 / float4 loads");
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 x = __ldcg(reinterpret_cast<const float4*>(src + i));
      v[i] = x.x, v[i + 1] = x.y, v[i + 2] = x.z, v[i + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      const float2 x = __ldcg(reinterpret_cast<const float2*>(src + i));
      v[i] = x.x, v[i + 1] = x.y;
    }
  }
}

// The work's rows (the request's group heads, one query), merged over the request's states by
// WARPS warps (this one is `warp`): a row a warp, dims [N lane, N lane + N) a lane.
template <typename T, int HEAD_DIM, int WARPS>
__device__ __forceinline__ void merge_request_rows(const AttentionParams& p, const WorkItem& w,
                                                   int warp) {
  constexpr int N = HEAD_DIM / 32;
  constexpr int AHEAD = 32 / N;  // states loaded before their merge (32 floats a lane): round
                                 // trips to L2 overlap
  const int lane = threadIdx.x % 32, group = p.group_size;
  const int first = p.merge_indptr[w.request], end = p.merge_indptr[w.request + 1];
  for (int r = warp; r < w.valid_rows; r += WARPS) {
    const int head = w.head_block * group + r % group;
    SoftmaxState<N> st;
    st.init();
    for (int s0 = first; s0 < end; s0 += AHEAD) {
      float v[AHEAD][N], lse[AHEAD];
#pragma unroll
      for (int i = 0; i < AHEAD; ++i) {
        const long long row = static_cast<long long>(min(s0 + i, end - 1)) * p.num_qo_heads + head;
        load_l2(p.partial_o + row * HEAD_DIM + N * lane, v[i]);
        lse[i] = s0 + i < end ? __ldcg(p.partial_lse + row) : NEG_INF;  // past the end: nothing
      }
#pragma unroll
      for (int i = 0; i < AHEAD; ++i) st.merge(v[i], lse[i]);
    }
    float v[N];
    const float lse = st.normalize(v);
    const long long row =
        static_cast<long long>(w.qo_begin + w.q_start + r / group) * p.num_qo_heads + head;
    store_vec(static_cast<T*>(p.o) + row * HEAD_DIM + N * lane, v);
    if (lane == 0 && p.lse != nullptr) p.lse[row] = lse;
  }
}

}  // namespace cpattn
