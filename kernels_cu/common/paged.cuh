// paged.cuh: addressing of paged K/V pools, shared by the kernels that write and read them.
//
// A pool holds num_pages pages of page_size token slots each:
//   NHD: [num_pages, page_size, num_kv_heads, head_dim]
//   HND: [num_pages, num_kv_heads, page_size, head_dim]
// Token t of request b lives in slot t % page_size of its page
// kv_indices[kv_indptr[b] + t / page_size].
// Pools are addressed through element strides (PageStrides), which covers both layouts and views of
// a larger buffer (one layer of a [layers, ...] allocation) alike; head_dim is contiguous.
#pragma once

namespace cpattn {

enum class KVLayout : int { NHD = 0, HND = 1 };

// Elements between consecutive pages, token slots and heads of a pool (the host's
// cpattn.paged.page_strides fills it from the array's strides).
struct PageStrides {
  long long page, slot, head;

  // Offset, in elements, of element 0 of (page, slot, head).
  // NOTE: 64-bit: a pool is routinely larger than 2^31 elements (4 GiB of fp16), so
  // page * stride would overflow int32 on any real cache.
  __host__ __device__ __forceinline__ long long offset(int page_id, int slot_id,
                                                       int head_id) const {
    return page_id * page + slot_id * slot + head_id * head;
  }
};

// Strides of a contiguous pool of the given layout.
template <KVLayout LAYOUT>
__host__ __device__ __forceinline__ PageStrides contiguous_page_strides(int page_size,
                                                                       int num_heads,
                                                                       int head_dim) {
  const long long d = head_dim;
  return LAYOUT == KVLayout::NHD
             ? PageStrides{static_cast<long long>(page_size) * num_heads * d, num_heads * d, d}
             : PageStrides{static_cast<long long>(page_size) * num_heads * d, d, page_size * d};
}

// token -> (index of its page in the request's page table, slot in the page): a shift and a mask
// when page_size is a power of two (the usual 16, 32, 64), a division otherwise. The choice is
// uniform across the grid; an integer division costs tens of instructions, and the loaders of
// memory-bound kernels split every key row they copy.
struct PageSplit {
  int size, shift;  // shift: log2(size) for a power of two, else -1

  __device__ __forceinline__ explicit PageSplit(int page_size)
      : size(page_size), shift((page_size & (page_size - 1)) == 0 ? __ffs(page_size) - 1 : -1) {}
  __device__ __forceinline__ int index(int token) const {
    return shift >= 0 ? index_as<true>(token) : index_as<false>(token);
  }
  __device__ __forceinline__ int slot(int token) const {
    return shift >= 0 ? slot_as<true>(token) : slot_as<false>(token);
  }
  // The same with the test taken out of a loop over rows: POW2 must equal shift >= 0.
  template <bool POW2>
  __device__ __forceinline__ int index_as(int token) const {
    return POW2 ? token >> shift : token / size;
  }
  template <bool POW2>
  __device__ __forceinline__ int slot_as(int token) const {
    return POW2 ? token & (size - 1) : token % size;
  }
};

// Page ids of the bulk (TMA) copies of whole key tiles of whole pages: lane j of a producer warp
// copies (boxes of) page j of each tile, so it holds the ids of page j of tile t and of tile
// t + 1, each loaded two tiles before its copy. Only lanes with a page of the tile are active.
template <int TILE>
struct TilePages {
  const int* table;  // the request's page ids
  PageSplit split;
  int first_key, kv_end;  // this lane's key of tile 0 (kv_begin + lane * page_size), keys' end
  bool active;
  int page, next;         // ids of this lane's page of tiles t and t + 1

  __device__ __forceinline__ TilePages(bool paged, const int* page_table, int page_size,
                                       int kv_begin, int end, int lane)
      : table(page_table), split(page_size), first_key(kv_begin + lane * page_size),
        kv_end(end), active(paged && lane * page_size < TILE), page(0), next(0) {
    if (active) {
      page = id(0);
      next = id(1);
    }
  }
  __device__ __forceinline__ int id(int t) const {
    const int key = first_key + t * TILE;
    return key < kv_end ? __ldg(table + split.index(key)) : 0;
  }
  // After the copies of tile t: tile t + 1's id is current, tile t + 2's is fetched.
  __device__ __forceinline__ void advance(int t) {
    if (active) {
      page = next;
      next = id(t + 2);
    }
  }
};

// Where token `token` of a request lives, given the request's first entry in kv_indices.
struct PageSlot {
  int page;  // page id in [0, num_pages)
  int slot;  // token slot in [0, page_size)
};

__device__ __forceinline__ PageSlot locate_token(const int* __restrict__ kv_indices,  // [nnz_pages]
                                                 int page_begin,  // kv_indptr[request]
                                                 int token, int page_size) {
  return PageSlot{kv_indices[page_begin + token / page_size], token % page_size};
}

}  // namespace cpattn
