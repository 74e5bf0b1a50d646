// mla_params.cuh: what one launch of mla_attention reads and writes. Mirrored field by field by
// cpattn/mla.py (MLA_PARAMS_DTYPE): change both together.
#pragma once

namespace cpattn {

struct MLAParams {
  const void* q_nope;       // [total_q, num_heads, 512]
  const void* q_pe;         // [total_q, num_heads, 64]
  const void* ckv;          // [num_pages, page_size, 512] (strided: may be a view of [.., 576])
  const void* kpe;          // [num_pages, page_size, 64]
  void* o;                  // [total_q, num_heads, 512], contiguous, q's dtype
  float* lse;               // [total_q, num_heads] natural log, or nullptr
  float* partial_o;         // split-KV: [num_states, num_heads, 512] fp32; nullptr if unsplit
  float* partial_lse;       // split-KV: [num_states, num_heads]
  const int* qo_indptr;     // [batch + 1]
  const int* kv_indptr;     // [batch + 1] in pages
  const int* kv_indices;    // [kv_indptr[batch]] page ids
  const int* kv_lens;       // [batch] tokens of each request
  const int* num_items;     // [1] items of the work list (the grid may be larger)
  const int* item_request;  // [num_items] request of each item
  const int* item_q_start;  // [num_items] first query of the item within its request
  const int* item_kv_start; // [num_items] token range [start, end) of the item
  const int* item_kv_end;   // [num_items]
  const int* item_state;    // split-KV: [num_items] partial state of the item's first query;
  const int* item_state_stride;  // [num_items] states between its consecutive queries
                                 // (the chunks of its query tile)
  const int* merge_indptr;  // split-KV: [total_q + 1] partial states of each query row
  int* merge_counters;      // fused merge (mla_attention): [total_q * head blocks] chunks of
                            // each query tile done, indexed by its first row (two each with
                            // merge_slices: arrived, merged); 0 between launches; nullptr:
                            // merge_state merges
  long long q_nope_stride_token, q_nope_stride_head;  // in elements
  long long q_pe_stride_token, q_pe_stride_head;
  long long ckv_stride_page, ckv_stride_slot;
  long long kpe_stride_page, kpe_stride_slot;
  int num_heads;
  int group_size;           // heads of one CTA (blockIdx.y selects which)
  int page_size;
  int causal;               // bottom-right aligned
  int merge_slices;         // fused merge: 1, every chunk merges a slice (cooperative launch);
                            // 0, the last chunk of a query tile merges it
  float logits_scale;       // sm_scale * log2(e)
};

}  // namespace cpattn
