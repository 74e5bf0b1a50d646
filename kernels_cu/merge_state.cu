// merge_state: combine attention states (v, lse) computed over disjoint sets of keys into the
// state over their union (split-KV partials, cascade levels).
//
// Grid / block mapping:
//   one row = one (token, head) pair; block = (threads_x, rows_per_block, state_lanes), each
//   thread owning VEC consecutive elements of its row's head_dim; grid = (ceil(rows /
//   rows_per_block), head_dim / (threads_x VEC)): blockIdx.y is a slice of the dims (few rows,
//   as one long request's split-KV partials, still fill the GPU). With state_lanes > 1, lane z of
//   a row folds states z, z + lanes, ... and the lanes' states meet in shared memory (split-KV
//   rows of a small batch hold a hundred states and more: one thread per element would read them
//   one by one). merge.py's launch_shape picks the mapping from the rows and states a row.
// The states of a row are those of view a (num_states_a of them, stride_state apart) followed by
// those of view b: merge_state(a, b) passes one state in each, merge_states(v, s) all in view a.
// A view with an indptr is variable-length: row token's states are indptr[token]..indptr[token+1]
// (split-KV partials, where each request was cut into its own number of chunks).
#include "common/dtypes.cuh"
#include "common/grid_dependency.cuh"
#include "common/state.cuh"

using namespace cpattn;

// Where the states of one input view live, in elements.
struct StateView {
  long long v_token, v_state, v_head;  // strides of v: [token, state, head, head_dim]
  long long s_token, s_state, s_head;  // strides of s: [token, state, head]
  const int* indptr;  // [num_tokens + 1] or nullptr: variable-length states, v_token unused
};

// Fold the states of one view into st. States are read BATCH at a time, every load of a batch
// issued before the first merge: split-KV rows hold a hundred states and more, and one state at
// a time would pay a full memory round trip each.
template <typename T>
__device__ __forceinline__ void merge_view(SoftmaxState<Vec16<T>::N>& st, const T* v, const float* s,
                                           const StateView& view, int num_states, int token,
                                           int head, int dim, int lane, int lanes) {
  constexpr int BATCH = 8;
  long long first = token;  // index of the row's first state along the token axis
  if (view.indptr != nullptr) {
    first = view.indptr[token];
    num_states = view.indptr[token + 1] - view.indptr[token];
  }
  const long long row = view.indptr != nullptr ? 0 : first;
  const long long state0 = view.indptr != nullptr ? first : 0;
  // States lane, lane + lanes, ...: BATCH of them at a time, every load issued before the first
  // merge, so that a batch costs one memory round trip.
  for (int i0 = lane; i0 < num_states; i0 += BATCH * lanes) {
    float lse[BATCH];
    float vec[BATCH][Vec16<T>::N];
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      const int i = i0 + j * lanes;
      lse[j] = i < num_states
                   ? s[row * view.s_token + (state0 + i) * view.s_state + head * view.s_head]
                   : NEG_INF;
    }
    // v is loaded whatever its lse (an empty state's v is read but never used: merge() skips
    // it), so that the loads of a batch wait for nothing.
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      const int i = i0 + j * lanes;
      if (i < num_states)
        load_vec(v + row * view.v_token + (state0 + i) * view.v_state + head * view.v_head + dim,
                 vec[j]);
    }
#pragma unroll
    for (int j = 0; j < BATCH; ++j) st.merge(vec[j], lse[j]);  // merge() skips lse = -inf
  }
}

template <typename T, typename TOut>
__global__ void merge_state_kernel(const T* __restrict__ v_a,      // view a: v [n, S_a, H, D]
                                   const float* __restrict__ s_a,  //         s [n, S_a, H]
                                   const StateView view_a, const int num_states_a,
                                   const T* __restrict__ v_b,      // view b: v [n, S_b, H, D]
                                   const float* __restrict__ s_b,  //         s [n, S_b, H]
                                   const StateView view_b, const int num_states_b,
                                   TOut* __restrict__ v_out,       // [n, H, D] contiguous
                                   float* __restrict__ s_out,      // [n, H] contiguous
                                   const int num_tokens, const int num_heads, const int head_dim) {
  enter_dependent_grid();  // common/grid_dependency.cuh: before any global access
  constexpr int VEC = Vec16<T>::N;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const bool active = row < num_tokens * num_heads;
  const int token = row / num_heads, head = row % num_heads;
  const int dim = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  const int lane = threadIdx.z, lanes = blockDim.z;

  SoftmaxState<VEC> st;
  st.init();
  if (active) {
    merge_view(st, v_a, s_a, view_a, num_states_a, token, head, dim, lane, lanes);
    merge_view(st, v_b, s_b, view_b, num_states_b, token, head, dim, lane, lanes);
  }
  float v[VEC];
  float lse = st.normalize(v);
  if (lanes > 1) {  // lanes 1.. publish their normalised states; lane 0 folds them in
    extern __shared__ float lane_states[];  // [lanes][blockDim.y][blockDim.x][VEC + 1]
    const int slot = (threadIdx.y * blockDim.x + threadIdx.x) * (VEC + 1);
    const int lane_stride = blockDim.y * blockDim.x * (VEC + 1);
    if (lane > 0) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) lane_states[lane * lane_stride + slot + i] = v[i];
      lane_states[lane * lane_stride + slot + VEC] = lse;
    }
    __syncthreads();
    if (lane > 0) return;
    st.init();
    st.merge(v, lse);
    for (int other = 1; other < lanes; ++other) {
      float w[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) w[i] = lane_states[other * lane_stride + slot + i];
      st.merge(w, lane_states[other * lane_stride + slot + VEC]);
    }
    lse = st.normalize(v);
  }
  if (!active) return;
  store_vec(v_out + static_cast<long long>(row) * head_dim + dim, v);
  if (threadIdx.x == 0 && blockIdx.y == 0) s_out[row] = lse;
}
