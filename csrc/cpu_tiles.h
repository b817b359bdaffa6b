// Tile generators of the CPU noise kernels (defined in noise_cpu.cpp), shared by every CPU op that
// regenerates noise in a small buffer instead of materializing it: the noise fill, the fused ES
// update (es_update_cpu.cpp) and stochastic rounding (stochastic_round_cpu.cpp).
// Internal C++ only: the Python-facing C ABI lives in noise.h and update.h.
#pragma once

#include <stdint.h>

// The build stays portable (plain -O3, baseline x86-64): wider ISAs are picked at run time,
// by GCC function multiversioning for the Box-Muller / sign loops (FASTES_CLONES) and by a
// CPUID check for the hand-written Philox (FASTES_X86_SIMD). Every copy gives the same bits
// (IEEE ops only, no FMA fusion: -ffp-contract=off).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTES_NO_TARGET_CLONES)
#define FASTES_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define FASTES_X86_SIMD 1
#include <immintrin.h>
#else
#define FASTES_CLONES
#define FASTES_X86_SIMD 0
#endif

namespace fastes_cpu {

constexpr int64_t kGaussTile = 256;  // max blocks per gaussian_tile call: 1024 floats (4 KiB) stay in L1
constexpr int64_t kRadeTile = 16;    // max blocks per rademacher_tile call: 2048 floats (8 KiB)
constexpr int64_t kSerialBelow = 1 << 15;    // work items: below this a thread team costs more than it saves
constexpr uint64_t kMaxBlocks = 1ull << 32;  // the block index is one uint32 counter word

struct Stream {
  uint64_t seed;
  uint32_t tensor_id, noise_index, step;
};

// Words of `count` consecutive blocks from first_block, one array per word (any count; SIMD
// versions picked at run time from the CPU's features, all giving the same words).
void philox_tile(const Stream& s, uint32_t first_block, int64_t count, uint32_t* w0, uint32_t* w1, uint32_t* w2,
                 uint32_t* w3);

// 4 * count Gaussians of blocks first_block.. into dst (count <= kGaussTile).
void gaussian_tile(const Stream& s, uint32_t first_block, int64_t count, float* dst);

// 128 * count signs (+-1.0f) of blocks first_block.. into dst (count <= kRadeTile).
void rademacher_tile(const Stream& s, uint32_t first_block, int64_t count, float* dst);

// Stochastic-rounding words (stochastic_round_cpu.cpp): words[i] = word of stream element
// first + i of the rounding stream `sr` (first % 4 == 0, count <= kSrTile; words holds kSrTile:
// the last block is written whole).
constexpr int64_t kSrTile = 1024;
void sr_words_tile(const Stream& sr, uint64_t first, int64_t count, uint32_t* words);

// out[i] = value[i] rounded to dtype (FASTES_DTYPE_*) with word w[i], i < n; fp32 copies.
void round_span(const float* value, const uint32_t* w, void* out, int dtype, int64_t n);

// Threads for `items` independent work items totalling `work` values: 1 below kSerialBelow, else
// num_threads capped by items (num_threads <= 0 means 1). Results never depend on it.
int team_size(int64_t work, int64_t items, int num_threads);

}  // namespace fastes_cpu
