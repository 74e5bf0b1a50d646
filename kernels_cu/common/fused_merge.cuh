// fused_merge.cuh: the merge of a split-KV row's partial states inside the attention kernel (no
// second launch), in one of two ways:
// - by the last of its chunks to finish: decode (a warp of each request's chunks counts) and MLA
//   (a whole CTA of each query tile's chunks counts). Each (request or query tile, head block)
//   has a counter (0 between launches). A chunk that wrote its partial rows counts itself in;
//   the one that completes the count merges the states into out and lse, and sets the counter
//   back to 0.
// - by every chunk, a slice each (merge_slice): the chunks of a query tile wait for each other
//   (two counters: arrived, done), then each merges its share of the tile's rows x dims. Every
//   chunk must be resident at once: the launch is cooperative (the driver refuses a grid that
//   does not fit). One CTA's merge of many states was the tail of a long single request.
// A wrapper's runs must therefore be ordered (one stream), as they already must for the partial
// states they share.
// Ordering: writers fence their partial rows before counting; a reader fences after it has seen
// the count, and reads the partial states from L2 (ld.global.cg: they were written by other SMs).
#pragma once
#include "common/dtypes.cuh"
#include "common/state.cuh"
#include "common/attention_params.cuh"
#include "common/work_item.cuh"

namespace cpattn {

// By the one thread that counts for its group of threads, after a barrier behind which every
// thread of the group fenced its partial rows: whether its chunk is the last of `chunks`.
// Cumulative: the group's rows, ordered before this thread by the barrier, are released with
// its own fence (a fence by every thread alone would not cover them in the model).
// The last one also fences after its count, before it tells the group (acquire: the other
// chunks' rows, counted before, are read after).
__device__ __forceinline__ bool count_chunk(int* counter, int chunks) {
  __threadfence();
  const bool last = atomicAdd(counter, 1) == chunks - 1;
  if (last) {
    atomicExch(counter, 0);  // every chunk has counted: ready for the next launch
    __threadfence();
  }
  return last;
}

// By every lane of the warp that wrote the work's partial rows: whether this work's chunk
// completed its request's count (warp-uniform).
__device__ __forceinline__ bool last_chunk_done(const AttentionParams& p, const WorkItem& w,
                                                int head_blocks) {
  __threadfence();  // this lane's partial rows, visible to the GPU before the count
  __syncwarp();
  int last = 0;
  if (threadIdx.x % 32 == 0) {
    const int chunks = p.merge_indptr[w.request + 1] - p.merge_indptr[w.request];
    last = count_chunk(p.merge_counters + w.request * head_blocks + w.head_block, chunks);
  }
  last = __shfl_sync(0xffffffff, last, 0);
  if (last) __threadfence();  // the other chunks' rows, counted before, are read after
  return last;
}

// The same by every thread of a CTA that wrote partial rows (CTA-uniform); `flag` is a shared
// int no thread reads or writes around the call.
__device__ __forceinline__ bool cta_last_chunk_done(int* counter, int chunks, int* flag) {
  __threadfence();  // this thread's partial rows, visible to the GPU before the count
  __syncthreads();
  if (threadIdx.x == 0) *flag = count_chunk(counter, chunks);
  __syncthreads();
  const bool last = *flag;
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

// Where row r of a merge finds its states and goes: partial rows state * num_heads + head for
// state in [first, end), and row out_row of out and lse.
struct MergeRow {
  int first, end, head;
  long long out_row;
};

// `rows` rows merged by WARPS warps (this one is `warp`): a row a warp, dims [N lane, N lane +
// N) a lane; `row_at(r)` gives each row's MergeRow. partial_o [states, num_heads, DIM] fp32.
template <typename T, int DIM, int WARPS, typename RowAt>
__device__ __forceinline__ void merge_state_rows(const float* partial_o, const float* partial_lse,
                                                 int num_heads, T* out, float* out_lse, int rows,
                                                 const RowAt& row_at, int warp) {
  constexpr int N = DIM / 32;
  constexpr int AHEAD = N >= 32 ? 1 : 32 / N;  // states loaded before their merge (32 floats a
                                               // lane): round trips to L2 overlap
  const int lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += WARPS) {
    const MergeRow at = row_at(r);
    SoftmaxState<N> st;
    st.init();
    for (int s0 = at.first; s0 < at.end; s0 += AHEAD) {
      float v[AHEAD][N], lse[AHEAD];
#pragma unroll
      for (int i = 0; i < AHEAD; ++i) {
        const long long row = static_cast<long long>(min(s0 + i, at.end - 1)) * num_heads + at.head;
        load_l2(partial_o + row * DIM + N * lane, v[i]);
        lse[i] = s0 + i < at.end ? __ldcg(partial_lse + row) : NEG_INF;  // past the end: nothing
      }
#pragma unroll
      for (int i = 0; i < AHEAD; ++i) st.merge(v[i], lse[i]);
    }
    float v[N];
    const float lse = st.normalize(v);
    store_vec(out + at.out_row * DIM + N * lane, v);
    if (lane == 0 && out_lse != nullptr) out_lse[at.out_row] = lse;
  }
}

// The work's rows (the request's group heads, one query), merged over the request's states.
template <typename T, int HEAD_DIM, int WARPS>
__device__ __forceinline__ void merge_request_rows(const AttentionParams& p, const WorkItem& w,
                                                   int warp) {
  const int group = p.group_size;
  const int first = p.merge_indptr[w.request], end = p.merge_indptr[w.request + 1];
  const long long token = w.qo_begin + w.q_start;
  merge_state_rows<T, HEAD_DIM, WARPS>(
      p.partial_o, p.partial_lse, p.num_qo_heads, static_cast<T*>(p.o), p.lse, w.valid_rows,
      [&](int r) {
        const int head = w.head_block * group + r % group;
        return MergeRow{first, end, head, (token + r / group) * p.num_qo_heads + head};
      },
      warp);
}

// ---- every chunk merges a slice ----------------------------------------------------------------

__device__ __forceinline__ int load_acquire(const int* ptr) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// By every thread of a CTA that wrote its partial rows: returns once all `chunks` chunks of its
// query tile have written theirs. counter[0] counts the arrivals. Unlike count_chunk, thread 0
// does not fence again behind the barrier: every reader fences (sequentially consistent) after
// it has seen the full count, and each writer's own fence precedes its CTA's count, so each
// writer's rows are ordered before every reader's loads.
__device__ __forceinline__ void cta_wait_all_chunks(int* counter, int chunks) {
  __threadfence();  // this thread's partial rows, visible to the GPU before the count
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(counter, 1);
    while (load_acquire(counter) < chunks) __nanosleep(100);
  }
  __syncthreads();
  __threadfence();  // the other chunks' rows, counted before, are read after
}

// By every thread of a CTA, after its slice: the last chunk done (counter[1]) sets both counters
// back to 0 for the next launch; every chunk has then left the wait above.
__device__ __forceinline__ void cta_leave_chunks(int* counter, int chunks) {
  if (threadIdx.x == 0 && atomicAdd(counter + 1, 1) == chunks - 1) counter[0] = counter[1] = 0;
}

// Chunk `chunk` of `chunks` merges its slice of the query tile's `rows` rows x DIM values: quads
// (4 consecutive dims of a row) [chunk * per, +per) of rows * DIM / 4, per = ceil(that /
// chunks). A quad's states are split among TPQ neighbouring lanes (a power of two, as many as
// THREADS allow for `per` quads at once), each folding states sub, sub + TPQ, ... (AHEAD loads
// in flight); the lanes' states then meet by shuffles. `row_at(r)` gives each row's MergeRow;
// its states number `chunks`. partial_o [states, num_heads, DIM] fp32.
template <typename T, int DIM, int THREADS, typename RowAt>
__device__ __forceinline__ void merge_slice(const float* partial_o, const float* partial_lse,
                                            int num_heads, T* out, float* out_lse, int rows,
                                            int chunks, int chunk, const RowAt& row_at) {
  static_assert(DIM % 4 == 0 && THREADS % 32 == 0, "whole quads, whole warps");
  constexpr int QUADS = DIM / 4, AHEAD = 8;
  const int total = rows * QUADS;
  const int per = (total + chunks - 1) / chunks;
  const int begin = min(chunk * per, total), end = min(begin + per, total);
  int tpq = 32;  // uniform over the CTA
  while (tpq > 1 && (tpq * per > THREADS || tpq / 2 >= chunks)) tpq /= 2;
  const int sub = threadIdx.x % tpq;
  // Every thread runs every round (the shuffles need whole warps); lanes past `end` idle.
  for (int base = begin; base < end; base += THREADS / tpq) {
    const int quad = base + static_cast<int>(threadIdx.x) / tpq;
    const bool active = quad < end;
    const MergeRow at = row_at(active ? quad / QUADS : 0);
    const int dim0 = (quad % QUADS) * 4;
    SoftmaxState<4> st;
    st.init();
    for (int k0 = sub; k0 < chunks; k0 += tpq * AHEAD) {
      float v[AHEAD][4], lse[AHEAD];
#pragma unroll
      for (int i = 0; i < AHEAD; ++i) {
        const int k = k0 + i * tpq;
        const bool valid = active && k < at.end - at.first;
        const long long state = valid ? at.first + k : at.first;
        const long long row = state * num_heads + at.head;
        load_l2(partial_o + row * DIM + dim0, v[i]);
        lse[i] = valid ? __ldcg(partial_lse + row) : NEG_INF;  // nothing to add
      }
#pragma unroll
      for (int i = 0; i < AHEAD; ++i) st.merge(v[i], lse[i]);
    }
    for (int lanes = 1; lanes < tpq; lanes *= 2) {
      float o2[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) o2[i] = __shfl_xor_sync(0xffffffff, st.o[i], lanes);
      const float m2 = __shfl_xor_sync(0xffffffff, st.m, lanes);
      const float d2 = __shfl_xor_sync(0xffffffff, st.d, lanes);
      st.combine(o2, m2, d2);
    }
    if (active && sub == 0) {
      float v[4];
      const float lse = st.normalize(v);
      store_vec(out + at.out_row * DIM + dim0, v);
      if (dim0 == 0 && out_lse != nullptr) out_lse[at.out_row] = lse;
    }
  }
}

}  // namespace cpattn
