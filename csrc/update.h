// Plain C ABI of the CPU update kernels (es_update_cpu.cpp, stochastic_round_cpu.cpp), called by
// bindings.cpp. No torch headers. Every function returns NULL on success or a static error
// message; results never depend on num_threads (<= 0 means 1).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Full-rank ES update in place: W[e] <- round(W[e] + sum_k coeffs[k] * E_k[e]) for e < n, where
// E_k is element e of stream (seed, tensor_id, noise_indices[k], step) of `kind`. The sum is fp32,
// over k in the given order, starting from 0 (W is added last); coeffs already hold lr * s * c_k.
// dtype FASTES_DTYPE_*: bf16 / fp16 are stochastically rounded with the words of stream
// (seed, sr_tensor_id, FASTES_SR_NOISE_INDEX, step), element e = word e % 4 of block e / 4.
// No noise tensor is materialized: each thread regenerates a tile of every index in L1.
const char* fastes_es_update_full_cpu(void* weight, int dtype, int64_t n, uint64_t seed, uint32_t tensor_id,
                                      const uint32_t* noise_indices, const float* coeffs, int64_t num_indices,
                                      uint32_t step, int kind, uint32_t sr_tensor_id, int num_threads);

// out[i] <- value[i] rounded to `dtype` with the stochastic-rounding word of element offset + i of
// (seed, sr_tensor_id, FASTES_SR_NOISE_INDEX, step); fp32 is a copy. value and out may not overlap
// unless dtype is fp32 and they are the same buffer.
const char* fastes_stochastic_round_cpu(const float* value, void* out, int dtype, int64_t n, uint64_t seed,
                                        uint32_t sr_tensor_id, uint32_t step, uint64_t offset, int num_threads);

#ifdef __cplusplus
}
#endif
