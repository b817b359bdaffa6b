// CUDA noise fill: same contract and output as fastes_noise_fill_cpu (noise_cpu.cpp).
// No torch headers and a plain C launcher, so it builds alone (nvcc -arch=sm_90 -c) and any
// caller (the extension, a Triton-free benchmark) can queue it on its own stream.
//
// Cost per value: Gaussian ~ 1/4 Philox call + logf, sqrtf, sincosf of half a pair, ~25
// instructions, so it is compute-bound near 1e12 values/s on an H100 against 8e11 values/s of
// float32 store bandwidth; Rademacher is one shuffle, shift and store per value: store-bound.
#include <cuda_runtime.h>

#include "noise.h"
#include "philox.h"

namespace {

constexpr int kThreads = 256;
constexpr uint64_t kMaxGrid = 1u << 20;  // CTAs; larger problems loop (grid stride)
constexpr uint64_t kMaxBlocks = 1ull << 32;

// One thread per Philox block: its four Gaussians. kVec: the output is 16-byte aligned at every
// block start (offset % 4 == 0 and out aligned), so whole blocks go out as one float4.
template <bool kVec>
__global__ void gaussian_kernel(float* __restrict__ out, uint64_t offset, uint64_t end, uint64_t first_block,
                                uint64_t num_blocks, uint64_t seed, uint32_t tensor_id, uint32_t noise_index,
                                uint32_t step) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < num_blocks; i += stride) {
    const uint64_t b = first_block + i;
    float v[4];
    fastes_gaussian4(fastes_philox_block(seed, tensor_id, noise_index, step, (uint32_t)b), v);
    const uint64_t e0 = b * FASTES_GAUSSIAN_PER_BLOCK;
    if (kVec && e0 >= offset && e0 + 4 <= end) {
      *reinterpret_cast<float4*>(out + (e0 - offset)) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint64_t e = e0 + j;
        if (e >= offset && e < end) out[e - offset] = v[j];
      }
    }
  }
}

// One warp per 32 Philox blocks (4096 signs): lane l makes block l's words, then the warp writes
// the tile 32 consecutive floats at a time (coalesced), taking each word from its owner by shuffle.
__global__ void rademacher_kernel(float* __restrict__ out, uint64_t offset, uint64_t end, uint64_t first_block,
                                  uint64_t num_blocks, uint64_t seed, uint32_t tensor_id, uint32_t noise_index,
                                  uint32_t step) {
  const uint32_t lane = threadIdx.x & 31u;
  const uint64_t warp = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const uint64_t num_warps = ((uint64_t)gridDim.x * blockDim.x) >> 5;
  for (uint64_t t = warp; t * 32 < num_blocks; t += num_warps) {  // warp-uniform loop
    const uint64_t tile_block = first_block + t * 32;
    // Lanes past the last block wrap the counter; their words are never written out.
    const fastes_u32x4 w = fastes_philox_block(seed, tensor_id, noise_index, step, (uint32_t)(tile_block + lane));
    const uint64_t base = tile_block * FASTES_RADEMACHER_PER_BLOCK;
    for (uint32_t src = 0; src < 32; ++src) {
      const uint64_t block_start = base + (uint64_t)src * FASTES_RADEMACHER_PER_BLOCK;
      if (block_start >= end) break;  // same for the whole warp
#pragma unroll
      for (uint32_t k = 0; k < 4; ++k) {
        const uint32_t word = __shfl_sync(0xFFFFFFFFu, w.x[k], (int)src);
        const uint64_t e = block_start + k * 32 + lane;
        if (e >= offset && e < end) out[e - offset] = ((word >> lane) & 1u) ? 1.0f : -1.0f;
      }
    }
  }
}

unsigned grid_for(uint64_t threads) {
  const uint64_t ctas = (threads + kThreads - 1) / kThreads;
  return (unsigned)(ctas < kMaxGrid ? (ctas ? ctas : 1) : kMaxGrid);
}

}  // namespace

extern "C" const char* fastes_noise_fill_cuda(float* out, int64_t n, uint64_t seed, uint32_t tensor_id,
                                              uint32_t noise_index, uint32_t step, uint64_t offset, int kind,
                                              cudaStream_t stream) {
  if (kind != FASTES_KIND_GAUSSIAN && kind != FASTES_KIND_RADEMACHER) return "kind must be 0 (gaussian) or 1 (rademacher)";
  if (n < 0) return "n must be non-negative";
  if (n == 0) return nullptr;
  const bool gauss = kind == FASTES_KIND_GAUSSIAN;
  const uint64_t per = gauss ? FASTES_GAUSSIAN_PER_BLOCK : FASTES_RADEMACHER_PER_BLOCK;
  const uint64_t end = offset + (uint64_t)n;
  if (end < offset || (end - 1) / per >= kMaxBlocks) return "noise stream exceeds 2**32 blocks";
  const uint64_t first_block = offset / per;
  const uint64_t num_blocks = (end - 1) / per - first_block + 1;
  if (gauss) {
    const bool vec = offset % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
    if (vec) {
      gaussian_kernel<true><<<grid_for(num_blocks), kThreads, 0, stream>>>(out, offset, end, first_block, num_blocks,
                                                                           seed, tensor_id, noise_index, step);
    } else {
      gaussian_kernel<false><<<grid_for(num_blocks), kThreads, 0, stream>>>(out, offset, end, first_block, num_blocks,
                                                                            seed, tensor_id, noise_index, step);
    }
  } else {
    const uint64_t warps = (num_blocks + 31) / 32;
    rademacher_kernel<<<grid_for(warps * 32), kThreads, 0, stream>>>(out, offset, end, first_block, num_blocks, seed,
                                                                     tensor_id, noise_index, step);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
