// work_item.cuh: what one CTA of an attention kernel is given to do, read from the plan.
//
// The grid is one-dimensional (no 65535 limit on items), one work per CTA in one of two orders
// (or persistent: each CTA loops over works, see work_item_at):
//   item-major: CTA x runs head block x % head_blocks of item x / head_blocks; the head blocks
//     of an item run side by side (decode: an NHD token's heads are adjacent in memory);
//   head-major: CTA x runs item x % items of head block x / items, items = gridDim.x /
//     head_blocks; the CTAs running at once share a few heads' keys, which then stay in L2
//     (prefill: every query tile of a head reads all of that head's keys).
// An item is (request, first query, key range); its CTA packs ROWS (query, head) rows: row r is
// query q_start + r / group_size of the request, for head head_block * group_size + r %
// group_size.
#pragma once

namespace cpattn {

struct WorkItem {
  int item, head_block;
  int request, q_start;     // the request, and the item's first query within it
  int qo_begin, qo_len;     // the request's query rows [qo_begin, qo_begin + qo_len)
  int kv_len;               // the request's keys
  int q_count, valid_rows;  // the item's queries, and their packed (query, head) rows
  int diag;                 // kv_len - qo_len: query i sees key j iff j <= i + diag (causal)
  int kv_begin, kv_end;     // the item's key range, its end clipped to the last query's causal bound
};

// Packed row r of an item as (query offset r / group, head offset r % group), dividing by a
// multiply: r / group is the high word of r * ceil(2^32 / group), exact while r * group < 2^32
// (the product exceeds r / group by less than r / 2^32 < 1 / group, and r / group is at least
// 1 / group below the next integer; tests/test_tiles.py checks r < 2^16, group <= 256). Per-row
// integer divisions made the Hopper producer's Q loop a sixth of the prefill's warp samples,
// and a float reciprocal's conversions share the pipe of the softmax's exponentials.
struct RowDivider {
  int group;
  unsigned magic;  // ceil(2^32 / group), 0 for a group of 1
  __device__ __forceinline__ explicit RowDivider(int g)
      : group(g), magic(g > 1 ? 0xffffffffu / g + 1 : 0) {}
};

struct PackedRow {
  int query, head;
};

__device__ __forceinline__ PackedRow packed_row(int r, const RowDivider& div) {
  const int query = div.magic ? static_cast<int>(__umulhi(r, div.magic)) : r;
  return {query, r - query * div.group};
}

// The row of out [total_q, num_qo_heads, ...] and lse [total_q, num_qo_heads] that packed row
// `pr` of w is written to. Params: AttentionParams or MLAParams.
template <typename Params>
__device__ __forceinline__ long long output_row(const Params& p, const WorkItem& w,
                                                const PackedRow& pr) {
  return static_cast<long long>(w.qo_begin + w.q_start + pr.query) * p.num_qo_heads +
         w.head_block * p.group_size + pr.head;
}

// The rest of w, once w.item and w.head_block are set. Params: AttentionParams or MLAParams
// (the fields read here are named alike).
template <int ROWS, typename Params>
__device__ __forceinline__ void read_work_item(const Params& p, WorkItem& w) {
  w.request = p.item_request[w.item];
  w.q_start = p.item_q_start[w.item];
  w.qo_begin = p.qo_indptr[w.request];
  w.qo_len = p.qo_indptr[w.request + 1] - w.qo_begin;
  w.kv_len = p.kv_lens[w.request];
  w.q_count = min(ROWS / p.group_size, w.qo_len - w.q_start);
  w.valid_rows = w.q_count * p.group_size;
  w.diag = w.kv_len - w.qo_len;
  w.kv_begin = p.item_kv_start[w.item];
  w.kv_end = p.item_kv_end[w.item];
  if (p.causal) w.kv_end = min(w.kv_end, w.q_start + w.q_count + w.diag);
}

// The work of this CTA, in item- or head-major order over the grid. False for a spare CTA of a
// fixed grid (CUDA graphs): the plan has fewer items than the grid.
template <int ROWS, bool HEAD_MAJOR = false, typename Params>
__device__ __forceinline__ bool load_work_item(const Params& p, int head_blocks, WorkItem& w) {
  if (HEAD_MAJOR) {
    const int items = gridDim.x / head_blocks;
    w.item = blockIdx.x % items;
    w.head_block = blockIdx.x / items;
  } else {
    w.item = blockIdx.x / head_blocks;
    w.head_block = blockIdx.x % head_blocks;
  }
  if (w.item >= *p.num_items) return false;
  read_work_item<ROWS>(p, w);
  return true;
}

// Persistent grids: a CTA runs works x = blockIdx.x, blockIdx.x + gridDim.x, ... below
// num_works = items * head_blocks (the plan's items, read on the device), in either order:
// head-major (work x is item x % items of head block x / items: the CTAs running at once share
// a few heads' keys, which prefill query tiles read again and again) or item-major (item
// x / head_blocks, head block x % head_blocks: decode reads each key once, and an NHD page's
// heads, adjacent in memory, are then read at about the same time).
template <typename Params>
__device__ __forceinline__ int num_works(const Params& p, int head_blocks) {
  return *p.num_items * head_blocks;
}
template <int ROWS, typename Params>
__device__ __forceinline__ WorkItem work_item_at(const Params& p, int x, bool head_major = true) {
  WorkItem w;
  if (head_major) {
    const int items = *p.num_items;
    w.item = x % items;
    w.head_block = x / items;
  } else {
    const int head_blocks = p.num_qo_heads / p.group_size;
    w.item = x / head_blocks;
    w.head_block = x % head_blocks;
  }
  read_work_item<ROWS>(p, w);
  return w;
}

}  // namespace cpattn
