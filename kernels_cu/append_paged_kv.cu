// append_paged_kv: write the K and V of new tokens into their slots of paged K/V pools.
//
// Grid / block mapping:
//   one row = one (new token, kv head) pair, rows = num_new * num_kv_heads;
//   block = (threads_x, rows_per_block) threads: each thread moves 16-byte vectors of its row,
//   those at elements threadIdx.x * VEC, (threadIdx.x + threads_x) * VEC, ... of head_dim, for K
//   then for V; grid.x = ceil(rows / rows_per_block).
// The host resolves every new token to its (page, slot) before the launch and checks them there,
// so the kernel only copies: no page table, no bound to test, and no slot written twice.
#include "common/dtypes.cuh"
#include "common/paged.cuh"

using namespace cpattn;

// Strides (in elements) of the new tokens' K and V: [num_new, num_kv_heads, head_dim].
struct NewStrides {
  long long k_token, k_head;
  long long v_token, v_head;
};

// Copy head_dim elements (a multiple of VEC, 16-byte aligned at both ends) from src to dst.
// Raw 16-byte moves: the bits are copied as they are, NaN payloads included.
template <typename T>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ src,
                                         int head_dim) {
  constexpr int VEC = Vec16<T>::N;
  for (int d = threadIdx.x * VEC; d < head_dim; d += blockDim.x * VEC) {
    *reinterpret_cast<uint4*>(dst + d) = *reinterpret_cast<const uint4*>(src + d);
  }
}

template <typename T>
__global__ void append_paged_kv_kernel(T* __restrict__ k_pages,  // NHD [pages, page_size, H, Dk]
                                                                 // HND [pages, H, page_size, Dk]
                                       T* __restrict__ v_pages,  // same layout, head_dim Dv
                                       const PageStrides k_pool, const PageStrides v_pool,
                                       const T* __restrict__ k_new,  // [num_new, H, Dk]
                                       const T* __restrict__ v_new,  // [num_new, H, Dv]
                                       const NewStrides new_strides,
                                       const int* __restrict__ token_page,  // [num_new] page ids
                                       const int* __restrict__ token_slot,  // [num_new] slots
                                       const int num_new, const int num_kv_heads,
                                       const int head_dim_k, const int head_dim_v) {
  static_assert(sizeof(T) == 2, "paged pools hold float16 or bfloat16");
  const long long row = static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= static_cast<long long>(num_new) * num_kv_heads) return;
  const int token = static_cast<int>(row / num_kv_heads);
  const int head = static_cast<int>(row % num_kv_heads);
  const int page = token_page[token], slot = token_slot[token];

  copy_row(k_pages + k_pool.offset(page, slot, head),
           k_new + token * new_strides.k_token + head * new_strides.k_head, head_dim_k);
  copy_row(v_pages + v_pool.offset(page, slot, head),
           v_new + token * new_strides.v_token + head * new_strides.v_head, head_dim_v);
}
