// CPU (OpenMP) stochastic rounding of an fp32 buffer into bf16 / fp16 (stochastic_round.h has the
// rule). Used after the CPU lowrank update's torch GEMM and by the momentum / Adam optimizers.
//
// Cost per element: 1/4 Philox call for the rounding word, a few integer ops (bf16) or a
// conversion, a division and selects (fp16); 4 B read + 2 B written. Work is cut into tiles of
// kSrTile stream elements aligned to the stream, so any thread count gives the same bits.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "cpu_tiles.h"
#include "stochastic_round.h"
#include "update.h"

namespace fastes_cpu {

void sr_words_tile(const Stream& sr, uint64_t first, int64_t count, uint32_t* words) {
  alignas(64) uint32_t w[4][kSrTile / 4];
  const int64_t blocks = (count + 3) / 4;
  philox_tile(sr, (uint32_t)(first / 4), blocks, w[0], w[1], w[2], w[3]);
  // Interleave to element order: element 4j + k takes word k of block j.
  for (int64_t j = 0; j < blocks; ++j)
    for (int k = 0; k < 4; ++k) words[4 * j + k] = w[k][j];
}

namespace {

FASTES_CLONES void round_bf16_span(const float* value, const uint32_t* w, uint16_t* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = fastes_sr_bf16(value[i], w[i]);
}

FASTES_CLONES void round_fp16_span(const float* value, const uint32_t* w, uint16_t* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = fastes_sr_fp16(value[i], w[i]);
}

}  // namespace

void round_span(const float* value, const uint32_t* w, void* out, int dtype, int64_t n) {
  if (dtype == FASTES_DTYPE_BFLOAT16) {
    round_bf16_span(value, w, (uint16_t*)out, n);
  } else if (dtype == FASTES_DTYPE_FLOAT16) {
    round_fp16_span(value, w, (uint16_t*)out, n);
  } else if ((const void*)value != out) {
    std::memmove(out, value, (size_t)n * sizeof(float));
  }
}

}  // namespace fastes_cpu

using namespace fastes_cpu;

extern "C" const char* fastes_stochastic_round_cpu(const float* value, void* out, int dtype, int64_t n, uint64_t seed,
                                                   uint32_t sr_tensor_id, uint32_t step, uint64_t offset,
                                                   int num_threads) {
  if (dtype != FASTES_DTYPE_FLOAT32 && dtype != FASTES_DTYPE_BFLOAT16 && dtype != FASTES_DTYPE_FLOAT16)
    return "dtype must be 0 (float32), 1 (bfloat16) or 2 (float16)";
  if (n < 0) return "n must be non-negative";
  if (n == 0) return nullptr;
  const uint64_t end = offset + (uint64_t)n;
  if (end < offset || (end - 1) / 4 >= kMaxBlocks) return "stochastic-rounding stream exceeds 2**32 blocks";
  if (dtype == FASTES_DTYPE_FLOAT32) {
    round_span(value, nullptr, out, dtype, n);
    return nullptr;
  }
  const Stream sr{seed, sr_tensor_id, FASTES_SR_NOISE_INDEX, step};
  const uint64_t first_tile = offset / kSrTile, last_tile = (end - 1) / kSrTile;
  const int64_t num_tiles = (int64_t)(last_tile - first_tile + 1);
  const size_t elem = 2;  // bytes of a bf16 / fp16 output

#pragma omp parallel for num_threads(team_size(n, num_tiles, num_threads)) schedule(static)
  for (int64_t t = 0; t < num_tiles; ++t) {
    alignas(64) uint32_t words[kSrTile];
    const uint64_t tile_lo = (first_tile + (uint64_t)t) * kSrTile;
    const uint64_t lo = std::max(tile_lo, offset), hi = std::min(tile_lo + kSrTile, end);
    const uint64_t first = lo & ~3ull;  // whole blocks: the words start at a block boundary
    sr_words_tile(sr, first, (int64_t)(hi - first), words);
    const int64_t i0 = (int64_t)(lo - offset);
    round_span(value + i0, words + (lo - first), (char*)out + (size_t)i0 * elem, dtype, (int64_t)(hi - lo));
  }
  return nullptr;
}
