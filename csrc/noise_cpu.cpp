// CPU (OpenMP) noise kernels. Work is cut into tiles of whole Philox blocks; each tile is
// generated structure-of-arrays so the compiler vectorizes Philox and Box-Muller, and every
// element is a pure function of its index, so the result never depends on the thread count.
//
// Cost per value (one core): Gaussian ~ 1/4 Philox call + log, sqrt, sincos of half a pair;
// Rademacher ~ 1/128 Philox call + one compare and store, so it runs at store bandwidth.
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "cpu_tiles.h"
#include "noise.h"
#include "philox.h"

// FASTES_CLONES / FASTES_X86_SIMD (runtime ISA dispatch): see cpu_tiles.h.

namespace fastes_cpu {

constexpr int64_t kMaxTileValues = 2048;

namespace {

// Words of `count` consecutive blocks from first_block, one array per word. Portable version,
// also the tail of the SIMD ones: compilers vectorize it, though poorly on AVX2.
void philox_tile_generic(const Stream& s, uint32_t first_block, int64_t count, uint32_t* w0, uint32_t* w1,
                         uint32_t* w2, uint32_t* w3) {
  const uint32_t k0 = (uint32_t)s.seed, k1 = (uint32_t)(s.seed >> 32);
  const uint32_t tid = s.tensor_id, idx = s.noise_index, step = s.step;
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const fastes_u32x4 w = fastes_philox4x32_10(first_block + (uint32_t)i, tid, idx, step, k0, k1);
    w0[i] = w.x[0];
    w1[i] = w.x[1];
    w2[i] = w.x[2];
    w3[i] = w.x[3];
  }
}

#if FASTES_X86_SIMD
// GCC 12 flags its own _mm512_undefined_* helpers as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// x86 has no 32-bit vector mulhi: multiply even and odd lanes to 64 bits (pmuludq) and blend the
// halves back. Auto-vectorized widening multiplies shuffle so much that AVX2 ran slower than scalar.
#define FASTES_PHILOX_SIMD_BODY(VEC, LANES, SET1, ADD, XOR, STORE, MULHILO)                         \
  const uint32_t key0 = (uint32_t)s.seed, key1 = (uint32_t)(s.seed >> 32);                          \
  const VEC m0 = SET1((int)FASTES_PHILOX_M0), m1 = SET1((int)FASTES_PHILOX_M1);                     \
  int64_t i = 0;                                                                                    \
  for (; i + LANES <= count; i += LANES) {                                                          \
    VEC c0 = ADD(SET1((int)(first_block + (uint32_t)i)), lane), c1 = SET1((int)s.tensor_id);        \
    VEC c2 = SET1((int)s.noise_index), c3 = SET1((int)s.step);                                      \
    uint32_t k0 = key0, k1 = key1;                                                                  \
    for (int r = 0; r < FASTES_PHILOX_ROUNDS; ++r) {                                                \
      VEC hi0, lo0, hi1, lo1;                                                                       \
      MULHILO(c0, m0, &hi0, &lo0);                                                                  \
      MULHILO(c2, m1, &hi1, &lo1);                                                                  \
      c0 = XOR(XOR(hi1, c1), SET1((int)k0));                                                        \
      c2 = XOR(XOR(hi0, c3), SET1((int)k1));                                                        \
      c1 = lo1;                                                                                     \
      c3 = lo0;                                                                                     \
      k0 += FASTES_PHILOX_W0;                                                                       \
      k1 += FASTES_PHILOX_W1;                                                                       \
    }                                                                                               \
    STORE((VEC*)(w0 + i), c0);                                                                      \
    STORE((VEC*)(w1 + i), c1);                                                                      \
    STORE((VEC*)(w2 + i), c2);                                                                      \
    STORE((VEC*)(w3 + i), c3);                                                                      \
  }                                                                                                 \
  philox_tile_generic(s, first_block + (uint32_t)i, count - i, w0 + i, w1 + i, w2 + i, w3 + i);

__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) void philox_tile_avx2(const Stream& s, uint32_t first_block, int64_t count,
                                                      uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  FASTES_PHILOX_SIMD_BODY(__m256i, 8, _mm256_set1_epi32, _mm256_add_epi32, _mm256_xor_si256, _mm256_storeu_si256,
                          mulhilo_avx2)
}

__attribute__((target("avx512f"))) inline void mulhilo_avx512(__m512i a, __m512i m, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target("avx512f"))) void philox_tile_avx512(const Stream& s, uint32_t first_block, int64_t count,
                                                           uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  FASTES_PHILOX_SIMD_BODY(__m512i, 16, _mm512_set1_epi32, _mm512_add_epi32, _mm512_xor_si512, _mm512_storeu_si512,
                          mulhilo_avx512)
}
#pragma GCC diagnostic pop
#endif  // FASTES_X86_SIMD

using PhiloxTileFn = void (*)(const Stream&, uint32_t, int64_t, uint32_t*, uint32_t*, uint32_t*, uint32_t*);

// Picked once per process from the CPU's features; all versions produce the same words.
PhiloxTileFn pick_philox_tile() {
#if FASTES_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return philox_tile_avx512;
  if (__builtin_cpu_supports("avx2")) return philox_tile_avx2;
#endif
  return philox_tile_generic;
}

}  // namespace

void philox_tile(const Stream& s, uint32_t first_block, int64_t count, uint32_t* w0, uint32_t* w1, uint32_t* w2,
                 uint32_t* w3) {
  static const PhiloxTileFn fn = pick_philox_tile();
  fn(s, first_block, count, w0, w1, w2, w3);
}

// 4 * count Gaussians of blocks first_block.. into dst.
FASTES_CLONES void gaussian_tile(const Stream& s, uint32_t first_block, int64_t count, float* dst) {
  alignas(64) uint32_t w0[kGaussTile], w1[kGaussTile], w2[kGaussTile], w3[kGaussTile];
  philox_tile(s, first_block, count, w0, w1, w2, w3);
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    float a, b, c, d;
    fastes_box_muller(w0[i], w1[i], &a, &b);
    fastes_box_muller(w2[i], w3[i], &c, &d);
    dst[4 * i] = a;
    dst[4 * i + 1] = b;
    dst[4 * i + 2] = c;
    dst[4 * i + 3] = d;
  }
}

alignas(64) constexpr uint32_t kBit[32] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,  1u << 8,  1u << 9,  1u << 10,
    1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15, 1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21,
    1u << 22, 1u << 23, 1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

// 128 * count signs of blocks first_block.. into dst, written as float bit patterns.
FASTES_CLONES void rademacher_tile(const Stream& s, uint32_t first_block, int64_t count, float* dst) {
  alignas(64) uint32_t w[4][kRadeTile];
  philox_tile(s, first_block, count, w[0], w[1], w[2], w[3]);
  for (int64_t i = 0; i < count; ++i) {
    for (int k = 0; k < 4; ++k) {
      const uint32_t word = w[k][i];
      uint32_t bits[32];
#pragma omp simd
      for (int b = 0; b < 32; ++b) bits[b] = (word & kBit[b]) ? 0x3F800000u : 0xBF800000u;  // +1.0f : -1.0f
      std::memcpy(dst + 128 * i + 32 * k, bits, sizeof(bits));
    }
  }
}

namespace {

// The layout of one fill: elements [offset, end) of a stream cut into tiles of whole blocks.
struct FillPlan {
  bool gauss;
  uint64_t per, offset, end, first_block, last_block;
  int64_t tile_blocks, num_tiles;
};

const char* plan_fill(int64_t n, uint64_t offset, int kind, FillPlan* plan) {
  if (kind != FASTES_KIND_GAUSSIAN && kind != FASTES_KIND_RADEMACHER) return "kind must be 0 (gaussian) or 1 (rademacher)";
  if (n < 0) return "n must be non-negative";
  plan->gauss = kind == FASTES_KIND_GAUSSIAN;
  plan->per = plan->gauss ? FASTES_GAUSSIAN_PER_BLOCK : FASTES_RADEMACHER_PER_BLOCK;
  plan->tile_blocks = plan->gauss ? kGaussTile : kRadeTile;
  plan->offset = offset;
  plan->end = offset + (uint64_t)n;  // one past the last element
  if (n == 0) {
    plan->num_tiles = 0;
    return nullptr;
  }
  if (plan->end < offset || (plan->end - 1) / plan->per >= kMaxBlocks) return "noise stream exceeds 2**32 blocks";
  plan->first_block = offset / plan->per;
  plan->last_block = (plan->end - 1) / plan->per;
  const int64_t num_blocks = (int64_t)(plan->last_block - plan->first_block + 1);
  plan->num_tiles = (num_blocks + plan->tile_blocks - 1) / plan->tile_blocks;
  return nullptr;
}

// Tile t of a fill into out (element offset.. of the stream at out[0]).
void fill_tile(const FillPlan& p, const Stream& s, int64_t t, float* out) {
  alignas(64) float buf[kMaxTileValues];
  const uint64_t b0 = p.first_block + (uint64_t)(t * p.tile_blocks);
  const int64_t count = std::min<int64_t>(p.tile_blocks, (int64_t)(p.last_block + 1 - b0));
  const uint64_t tile_lo = b0 * p.per, tile_hi = tile_lo + (uint64_t)count * p.per;
  const uint64_t lo = std::max(tile_lo, p.offset), hi = std::min(tile_hi, p.end);
  // Tiles that lie wholly inside [offset, end) are written in place; edge tiles go through buf.
  const bool whole = lo == tile_lo && hi == tile_hi;
  float* dst = whole ? out + (tile_lo - p.offset) : buf;
  if (p.gauss) {
    gaussian_tile(s, (uint32_t)b0, count, dst);
  } else {
    rademacher_tile(s, (uint32_t)b0, count, dst);
  }
  if (!whole) std::memcpy(out + (lo - p.offset), buf + (lo - tile_lo), (hi - lo) * sizeof(float));
}

}  // namespace

int team_size(int64_t work, int64_t items, int num_threads) {
  return work < kSerialBelow ? 1 : (int)std::max<int64_t>(1, std::min<int64_t>(num_threads, items));
}

}  // namespace fastes_cpu

using namespace fastes_cpu;

extern "C" const char* fastes_noise_fill_cpu(float* out, int64_t n, uint64_t seed, uint32_t tensor_id,
                                             uint32_t noise_index, uint32_t step, uint64_t offset, int kind,
                                             int num_threads) {
  FillPlan plan;
  if (const char* err = plan_fill(n, offset, kind, &plan)) return err;
  const Stream s{seed, tensor_id, noise_index, step};
#pragma omp parallel for num_threads(team_size(n, plan.num_tiles, num_threads)) schedule(static)
  for (int64_t t = 0; t < plan.num_tiles; ++t) fill_tile(plan, s, t, out);
  return nullptr;
}

extern "C" const char* fastes_noise_fill_many_cpu(float* out, int64_t rows, int64_t n, uint64_t seed,
                                                  uint32_t tensor_id, const uint32_t* noise_indices, uint32_t step,
                                                  uint64_t offset, int kind, int num_threads) {
  if (rows < 0) return "rows must be non-negative";
  FillPlan plan;
  if (const char* err = plan_fill(n, offset, kind, &plan)) return err;
  // One team over (row, tile) pairs: several small rows still use every thread.
  const int64_t items = rows * plan.num_tiles;
#pragma omp parallel for num_threads(team_size(rows * n, items, num_threads)) schedule(static)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t row = i / plan.num_tiles;
    const Stream s{seed, tensor_id, noise_indices[row], step};
    fill_tile(plan, s, i % plan.num_tiles, out + row * n);
  }
  return nullptr;
}

extern "C" const char* fastes_philox_blocks_cpu(int64_t* out, uint64_t seed, uint32_t tensor_id, uint32_t noise_index,
                                                uint32_t step, uint64_t start_block, int64_t num_blocks,
                                                int num_threads) {
  if (num_blocks < 0) return "num_blocks must be non-negative";
  if (num_blocks == 0) return nullptr;
  if (start_block >= kMaxBlocks || (uint64_t)num_blocks > kMaxBlocks - start_block)
    return "noise stream exceeds 2**32 blocks";
  const int64_t tile = kGaussTile;
  const int64_t num_tiles = (num_blocks + tile - 1) / tile;
  const int threads =
      num_blocks * 4 < kSerialBelow ? 1 : (int)std::max<int64_t>(1, std::min<int64_t>(num_threads, num_tiles));
  const Stream s{seed, tensor_id, noise_index, step};

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < num_tiles; ++t) {
    alignas(64) uint32_t w[4][kGaussTile];
    const int64_t i0 = t * tile;
    const int64_t count = std::min<int64_t>(tile, num_blocks - i0);
    philox_tile(s, (uint32_t)(start_block + (uint64_t)i0), count, w[0], w[1], w[2], w[3]);
    for (int64_t i = 0; i < count; ++i)
      for (int k = 0; k < 4; ++k) out[4 * (i0 + i) + k] = (int64_t)w[k][i];
  }
  return nullptr;
}

extern "C" const char* fastes_gaussian_from_words_cpu(const int64_t* words, int64_t num_blocks, float* out,
                                                      int num_threads) {
  if (num_blocks < 0) return "num_blocks must be non-negative";
  const int threads = num_blocks * 4 < kSerialBelow ? 1 : std::max(1, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < num_blocks; ++i) {
    const int64_t* w = words + 4 * i;
    fastes_box_muller((uint32_t)w[0], (uint32_t)w[1], &out[4 * i], &out[4 * i + 1]);
    fastes_box_muller((uint32_t)w[2], (uint32_t)w[3], &out[4 * i + 2], &out[4 * i + 3]);
  }
  return nullptr;
}
