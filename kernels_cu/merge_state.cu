// merge_state: combine attention states (v, lse) computed over disjoint sets of keys into the
// state over their union (split-KV partials, cascade levels).
//
// Grid / block mapping:
//   one row = one (token, head) pair; block = (head_dim / VEC, rows_per_block) threads, each
//   thread owning VEC consecutive elements of its row's head_dim; grid.x = ceil(rows / rows_per_block).
// The states of a row are those of view a (num_states_a of them, stride_state apart) followed by
// those of view b: merge_state(a, b) passes one state in each, merge_states(v, s) all in view a.
// A view with an indptr is variable-length: row token's states are indptr[token]..indptr[token+1]
// (split-KV partials, where each request was cut into its own number of chunks).
#include "common/dtypes.cuh"
#include "common/state.cuh"

using namespace cpattn;

// Where the states of one input view live, in elements.
struct StateView {
  long long v_token, v_state, v_head;  // strides of v: [token, state, head, head_dim]
  long long s_token, s_state, s_head;  // strides of s: [token, state, head]
  const int* indptr;  // [num_tokens + 1] or nullptr: variable-length states, v_token unused
};

template <typename T>
__device__ __forceinline__ void merge_view(SoftmaxState<Vec16<T>::N>& st, const T* v, const float* s,
                                           const StateView& view, int num_states, int token,
                                           int head, int dim) {
  long long first = token;  // index of the row's first state along the token axis
  if (view.indptr != nullptr) {
    first = view.indptr[token];
    num_states = view.indptr[token + 1] - view.indptr[token];
  }
  for (int i = 0; i < num_states; ++i) {
    const long long state = view.indptr != nullptr ? first + i : i;
    const long long row = view.indptr != nullptr ? 0 : first;
    const float lse = s[row * view.s_token + state * view.s_state + head * view.s_head];
    if (lse == NEG_INF) continue;  // empty: its v is never read
    float vec[Vec16<T>::N];
    load_vec(v + row * view.v_token + state * view.v_state + head * view.v_head + dim, vec);
    st.merge(vec, lse);
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
