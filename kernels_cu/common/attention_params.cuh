// attention_params.cuh: what one launch of batch_attention reads and writes. Mirrored field by field by cpattn/_core.py (PARAMS_DTYPE): change both together.
#pragma once

namespace cpattn {

struct AttentionParams {
  const void* q;            // [total_q, num_qo_heads, head_dim]
  const void* k;            // ragged [total_kv, num_kv_heads, head_dim] or a page pool
  const void* v;            // same shape and layout as k
  void* o;                  // [total_q, num_qo_heads, head_dim], contiguous, q's dtype
  float* lse;               // [total_q, num_qo_heads] natural log, or nullptr
  float* partial_o;         // split-KV: [num_states, num_qo_heads, head_dim] fp32
  float* partial_lse;       // split-KV: [num_states, num_qo_heads]; nullptr if unsplit
  const int* qo_indptr;     // [batch + 1]
  const int* kv_indptr;     // [batch + 1] in pages (paged) or in tokens (ragged)
  const int* kv_indices;    // [kv_indptr[batch]] page ids; nullptr for ragged KV
  const int* kv_lens;       // [batch] keys of each request
  const unsigned char* mask;  // packed custom mask (little-endian bits), or nullptr
  const int* mask_indptr;   // [batch + 1] byte offset of each request's mask
  const int* num_items;     // [1] items of the work list (the grid may be larger)
  const int* item_request;  // [num_items] request of each item
  const int* item_q_start;  // [num_items] first query of the item within its request
  const int* item_kv_start; // [num_items] key range [start, end) of the item
  const int* item_kv_end;   // [num_items]
  const int* tile_class;        // custom mask: class of each (item, key tile): 0 empty, 1 full,
                                // 2 partial (only partial tiles read mask bits); or nullptr
  const int* item_class_offset; // [num_items] where an item's classes start in tile_class
  const int* item_state;        // split-KV: [num_items] partial state of the item's first query
  const int* item_state_stride; // [num_items] states between its consecutive queries
  const int* merge_indptr;      // fused merge: [batch + 1] the states of request b (its items)
  int* merge_counters;          // fused merge: [batch * head_blocks] chunks done (0 between
                                // launches), or nullptr: the states are merged by merge_state
  long long q_stride_token, q_stride_head;                   // in elements
  long long k_stride_page, k_stride_slot, k_stride_head;     // ragged: page stride 0, slot = token
  long long v_stride_page, v_stride_slot, v_stride_head;
  int num_qo_heads;
  int group_size;           // num_qo_heads / num_kv_heads
  int page_size;            // tokens per page (unused for ragged KV)
  int causal;               // bottom-right aligned
  int window_left;          // -1: no window
  float logits_scale;       // sm_scale * log2(e), or sm_scale / soft_cap with a soft cap
  float soft_cap_log2;      // soft_cap * log2(e); 0: no soft cap
};

}  // namespace cpattn
