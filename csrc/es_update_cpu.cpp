// Fused full-rank ES update on the CPU (OpenMP): W <- W + sum_k c_k * E_k, no noise tensor.
//
// Each thread takes tiles of kTile elements. Per tile it zeroes an fp32 accumulator, and for every
// noise index k (in the given order) regenerates that index's noise for the tile into an L1
// buffer (gaussian: one Philox call per 4 values; rademacher: one per 128) and adds c_k times it;
// then it adds W and writes the tile once, stochastically rounded for bf16 / fp16 with the
// contract's bits. Every element's sum is a fixed sequence of fp32 ops, so tiles may go to any
// thread: the result does not depend on the thread count.
//
// Cost per element (one core): K Gaussians (1/4 Philox + half a Box-Muller pair each, ~30 vector
// ops) + K multiply-adds from L1, then 1/4 Philox + rounding for bf16 / fp16; memory traffic is
// W read and written once (the unfused path also writes and reads K noise tensors and an fp32
// copy of W). Rademacher noise is ~30x cheaper to generate, so there the multiply-adds dominate.
#include <omp.h>

#include <algorithm>

#include "cpu_tiles.h"
#include "noise.h"
#include "philox.h"
#include "stochastic_round.h"
#include "update.h"

namespace {

using namespace fastes_cpu;

constexpr int64_t kTile = 1024;  // elements: 256 Gaussian blocks, 8 Rademacher blocks, 256 rounding blocks
static_assert(kTile <= 4 * kGaussTile && kTile / 128 <= kRadeTile && kTile <= kSrTile, "tile too large");

FASTES_CLONES void axpy(float* acc, const float* x, float c, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + c * x[i];
}

// acc[i] <- W[lo + i] + acc[i], W read in its own dtype (bf16 / fp16 upcasts are exact).
FASTES_CLONES void add_weight(const void* weight, int dtype, int64_t lo, float* acc, int64_t n) {
  if (dtype == FASTES_DTYPE_BFLOAT16) {
    const uint16_t* w = (const uint16_t*)weight + lo;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] = fastes_bf16_to_f32(w[i]) + acc[i];
  } else if (dtype == FASTES_DTYPE_FLOAT16) {
    const uint16_t* w = (const uint16_t*)weight + lo;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] = fastes_f16_to_f32(w[i]) + acc[i];
  } else {
    const float* w = (const float*)weight + lo;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] = w[i] + acc[i];
  }
}

}  // namespace

extern "C" const char* fastes_es_update_full_cpu(void* weight, int dtype, int64_t n, uint64_t seed,
                                                 uint32_t tensor_id, const uint32_t* noise_indices,
                                                 const float* coeffs, int64_t num_indices, uint32_t step, int kind,
                                                 uint32_t sr_tensor_id, int num_threads) {
  if (dtype != FASTES_DTYPE_FLOAT32 && dtype != FASTES_DTYPE_BFLOAT16 && dtype != FASTES_DTYPE_FLOAT16)
    return "dtype must be 0 (float32), 1 (bfloat16) or 2 (float16)";
  if (kind != FASTES_KIND_GAUSSIAN && kind != FASTES_KIND_RADEMACHER)
    return "kind must be 0 (gaussian) or 1 (rademacher)";
  if (n < 0 || num_indices < 0) return "n and num_indices must be non-negative";
  // Nothing to add: W + 0 rounds back to W exactly (its value is representable), so skip the pass.
  if (n == 0 || num_indices == 0) return nullptr;
  if ((uint64_t)(n - 1) / 4 >= kMaxBlocks) return "weight exceeds the 2**32-block counter space (2**34 elements)";
  const bool gauss = kind == FASTES_KIND_GAUSSIAN;
  const Stream sr{seed, sr_tensor_id, FASTES_SR_NOISE_INDEX, step};
  const int64_t num_tiles = (n + kTile - 1) / kTile;
  const int threads = team_size(n * num_indices, num_tiles, num_threads);

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < num_tiles; ++t) {
    alignas(64) float acc[kTile];
    alignas(64) float buf[kTile];
    const int64_t lo = t * kTile, count = std::min<int64_t>(kTile, n - lo);
    std::fill(acc, acc + count, 0.0f);
    for (int64_t k = 0; k < num_indices; ++k) {
      const Stream s{seed, tensor_id, noise_indices[k], step};
      if (gauss) {
        gaussian_tile(s, (uint32_t)(lo / FASTES_GAUSSIAN_PER_BLOCK), (count + 3) / 4, buf);
      } else {
        rademacher_tile(s, (uint32_t)(lo / FASTES_RADEMACHER_PER_BLOCK), (count + 127) / 128, buf);
      }
      axpy(acc, buf, coeffs[k], count);
    }
    add_weight(weight, dtype, lo, acc, count);
    if (dtype == FASTES_DTYPE_FLOAT32) {
      std::copy(acc, acc + count, (float*)weight + lo);
    } else {
      alignas(64) uint32_t words[kSrTile];
      sr_words_tile(sr, (uint64_t)lo, count, words);
      round_span(acc, words, (uint16_t*)weight + lo, dtype, count);
    }
  }
  return nullptr;
}
