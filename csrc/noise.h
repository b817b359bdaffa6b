// Plain C ABI of the noise kernels, shared by noise_cpu.cpp, noise_cuda.cu and bindings.cpp.
// No torch and no CUDA headers here, so each side compiles alone (nvcc -c noise_cuda.cu).
// Every function returns NULL on success or a static error message.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Same declaration as cuda_runtime_api.h, so this header needs no CUDA include.
typedef struct CUstream_st* cudaStream_t;

// out[i] = element offset + i of stream (seed, tensor_id, noise_index, step), i < n, as float32.
// kind: FASTES_KIND_GAUSSIAN (0) or FASTES_KIND_RADEMACHER (1). num_threads <= 0 means 1.
// The result does not depend on num_threads.
const char* fastes_noise_fill_cpu(float* out, int64_t n, uint64_t seed, uint32_t tensor_id, uint32_t noise_index,
                                  uint32_t step, uint64_t offset, int kind, int num_threads);

// Row r of out [rows, n] (row-major) = elements offset.. of stream (seed, tensor_id, noise_indices[r], step):
// several members' noise in one call, one thread team over all (row, tile) pairs.
const char* fastes_noise_fill_many_cpu(float* out, int64_t rows, int64_t n, uint64_t seed, uint32_t tensor_id,
                                       const uint32_t* noise_indices, uint32_t step, uint64_t offset, int kind,
                                       int num_threads);

// out[4*i + j] = word j of Philox block start_block + i, for i < num_blocks (uint32 held in int64,
// the layout of fastes.noise.uint32_blocks).
const char* fastes_philox_blocks_cpu(int64_t* out, uint64_t seed, uint32_t tensor_id, uint32_t noise_index,
                                     uint32_t step, uint64_t start_block, int64_t num_blocks, int num_threads);

// Box-Muller of given words: out[4*i + j] = Gaussian lane j of words[4*i .. 4*i + 3] (uint32 held
// in int64), the CPU twin of fastes.noise.gaussian_from_words, so tests can feed every input.
const char* fastes_gaussian_from_words_cpu(const int64_t* words, int64_t num_blocks, float* out, int num_threads);

// CUDA version of fastes_noise_fill_cpu: `out` is device memory, the launch is queued on `stream`.
const char* fastes_noise_fill_cuda(float* out, int64_t n, uint64_t seed, uint32_t tensor_id, uint32_t noise_index,
                                   uint32_t step, uint64_t offset, int kind, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
