// CPU paged attention (see attention.h): each (sequence, query row) reads its K/V rows straight out of the
// block pool, so nothing is gathered or padded. Work per row: 2 * context * head_dim * q_heads flops and one
// read of its context's K and V (shared by the GQA group through L1); a decode step of the demo (2048
// sequences of ~12 tokens) reads 16 MB, ~2 ms at DRAM speed, where the gather-and-einsum torch path takes
// ~15 ms.
#include "attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

}  // namespace

extern "C" const char* fastes_paged_attention_cpu(const float* q, const float* k_cache, const float* v_cache,
                                                  const int32_t* cu_seqlens, const int32_t* seq_lens,
                                                  const int32_t* block_tables, int64_t num_seqs,
                                                  int64_t table_stride, int64_t num_blocks, int64_t q_heads,
                                                  int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                                  int64_t q_row_stride, int64_t q_head_stride, float scale,
                                                  int64_t window, float* out, int num_threads) {
  if (num_seqs < 0 || q_heads < 1 || kv_heads < 1 || head_dim < 1 || block_size < 1 || q_heads % kv_heads)
    return "bad attention shapes";
  const int64_t group = q_heads / kv_heads;
  const int64_t kv_row = kv_heads * head_dim;  // floats per cached token
  const char* error = nullptr;
  const int threads = std::max(1, num_threads);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 4)
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t first = cu_seqlens[s], q_len = cu_seqlens[s + 1] - cu_seqlens[s];
      const int64_t len = seq_lens[s];
      if (q_len <= 0) continue;
      if (len == 0) {  // padded row of a captured batch: defined output, no reads
        std::fill(out + first * q_heads * head_dim, out + (first + q_len) * q_heads * head_dim, 0.0f);
        continue;
      }
      if (q_len > len || len > table_stride * block_size) {
#pragma omp critical
        error = "a sequence's q_len exceeds its length, or its length exceeds its block table";
        continue;
      }
      const int32_t* table = block_tables + s * table_stride;
      bool table_ok = true;
      for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b)
        table_ok &= table[b] >= 0 && table[b] < num_blocks;
      if (!table_ok) {
#pragma omp critical
        error = "a block table entry is outside the KV pool";
        continue;
      }
      scores.resize(len);
      for (int64_t i = 0; i < q_len; ++i) {
        const int64_t p = len - q_len + i;
        const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
        for (int64_t h = 0; h < q_heads; ++h) {
          const float* qh = q + (first + i) * q_row_stride + h * q_head_stride;
          const int64_t kv_off = (h / group) * head_dim;
          float best = -INFINITY;
          for (int64_t j = lo; j <= p; ++j) {
            const int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
            const float sc = dot(qh, k_cache + slot * kv_row + kv_off, head_dim) * scale;
            scores[j] = sc;
            best = std::max(best, sc);
          }
          float* o = out + ((first + i) * q_heads + h) * head_dim;
          std::fill(o, o + head_dim, 0.0f);
          float total = 0.0f;
          for (int64_t j = lo; j <= p; ++j) {
            const float w = std::exp(scores[j] - best);
            total += w;
            const int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
            axpy(w, v_cache + slot * kv_row + kv_off, o, head_dim);
          }
          const float inv = 1.0f / total;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) o[d] *= inv;
        }
      }
    }
  }
  return error;
}
