// merge_state: combine attention states (v, lse) computed over disjoint sets of keys into the
// state over their union (split-KV partials, cascade levels).
//
// Grid / block mapping:
//   one row = one (token, head) pair; block = (head_dim / VEC, rows_per_block) threads, each
//   thread owning VEC consecutive elements of its row's head_dim; grid.x = ceil(rows / rows_per_block).
// The states of a row are those of view a (num_states_a of them, stride_state apart) followed by
// those of view b: merge_state(a, b) passes one state in each, merge_states(v, s) all in view a.
#include "common/dtypes.cuh"
#include "common/state.cuh"

using namespace cpattn;

// Where the states of one input view live, in elements.
struct StateView {
  long long v_token, v_state, v_head;  // strides of v: [token, state, head, head_dim]
  long long s_token, s_state, s_head;  // strides of s: [token, state, head]
};

template <typename T>
__device__ __forceinline__ void merge_view(SoftmaxState<Vec16<T>::N>& st, const T* v, const float* s,
                                           const StateView& view, int num_states, int token,
                                           int head, int dim) {
  for (int i = 0; i < num_states; ++i) {
    const float lse = s[token * view.s_token + i * view.s_state + head * view.s_head];
    float vec[Vec16<T>::N];
    load_vec(v + token * view.v_token + i * view.v_state + head * view.v_head + dim, vec);
    st.merge(vec, lse);
  }
}

template <typename T>
__global__ void merge_state_kernel(const T* __restrict__ v_a,      // view a: v [n, S_a, H, D]
                                   const float* __restrict__ s_a,  //         s [n, S_a, H]
                                   const StateView view_a, const int num_states_a,
                                   const T* __restrict__ v_b,      // view b: v [n, S_b, H, D]
                                   const float* __restrict__ s_b,  //         s [n, S_b, H]
                                   const StateView view_b, const int num_states_b,
                                   T* __restrict__ v_out,          // [n, H, D] contiguous
                                   float* __restrict__ s_out,      // [n, H] contiguous
                                   const int num_tokens, const int num_heads, const int head_dim) {
  constexpr int VEC = Vec16<T>::N;
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= num_tokens * num_heads) return;
  const int token = row / num_heads, head = row % num_heads;
  const int dim = threadIdx.x * VEC;

  SoftmaxState<VEC> st;
  st.init();
  merge_view(st, v_a, s_a, view_a, num_states_a, token, head, dim);
  merge_view(st, v_b, s_b, view_b, num_states_b, token, head, dim);

  float v[VEC];
  const float lse = st.normalize(v);
  store_vec(v_out + static_cast<long long>(row) * head_dim + dim, v);
  if (threadIdx.x == 0) s_out[row] = lse;
}
