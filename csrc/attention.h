// Plain C ABI of the CPU paged attention (attention_cpu.cpp), called by bindings.cpp. No torch headers.
// Returns NULL on success or a static error message; results never depend on num_threads.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Causal GQA attention of packed queries over a paged KV cache (layout of fastes/ops/attention.py):
//   q [T, q_heads, head_dim] (rows q_row_stride apart, heads q_head_stride apart, head_dim contiguous),
//   k_cache / v_cache [num_blocks, block_size, kv_heads, head_dim] contiguous,
//   cu_seqlens [num_seqs + 1], seq_lens [num_seqs], block_tables [num_seqs, table_stride] (int32),
//   out [T, q_heads, head_dim] contiguous.
// New token i of sequence s sits at p = seq_lens[s] - q_len + i and attends to positions lo..p, where lo is
// 0, or p - window + 1 when window > 0. Query head h reads kv head h / (q_heads / kv_heads). Softmax in
// fp32 with the max subtracted. A sequence with seq_len 0 (a padded row) gets zeros.
const char* fastes_paged_attention_cpu(const float* q, const float* k_cache, const float* v_cache,
                                       const int32_t* cu_seqlens, const int32_t* seq_lens,
                                       const int32_t* block_tables, int64_t num_seqs, int64_t table_stride,
                                       int64_t num_blocks, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                                       int64_t block_size, int64_t q_row_stride, int64_t q_head_stride,
                                       float scale, int64_t window, float* out, int num_threads);

#ifdef __cplusplus
}
#endif
