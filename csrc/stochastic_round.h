// Stochastic rounding of float32 to bf16 / fp16 with one random word per element, bit for bit the
// rule of fastes/ops/stochastic_round.py (round_bf16, round_fp16); the word of element e is
// fastes_sr_word (philox.h): word e % 4 of block e / 4 in the stochastic-rounding id space.
//
//   bf16: add the low 16 bits of the word to the fp32 pattern and truncate (finite values).
//   fp16: round up with probability p = (v - down) / (up - down), u = (word >> 8) * 2**-24,
//         up if u < p; values already representable (and non-finite ones) round to nearest.
//
// Plain IEEE float ops in the reference's order (no FMA: setup.py passes -ffp-contract=off), and
// selects the compiler can turn into vector blends, so the CPU loops calling these vectorize.
// No torch headers: usable from CUDA as well.
#pragma once

#include "philox.h"

// Output dtype codes shared by the update and rounding launchers.
#define FASTES_DTYPE_FLOAT32 0
#define FASTES_DTYPE_BFLOAT16 1
#define FASTES_DTYPE_FLOAT16 2

// 0.5f: adding it to |x| < 2**-14 rounds x to a multiple of 2**-24 (the fp16 subnormal step).
#define FASTES_HALF_F 0.5f

FASTES_HD float fastes_bf16_to_f32(uint16_t h) { return fastes_bits_float((uint32_t)h << 16); }

// c ? a : b as mask arithmetic. A ternary lets the compiler sink a float op that only one side
// uses into a branch, where it may not be speculated (it could trap), and that branch blocks
// vectorization of the whole loop.
FASTES_HD uint32_t fastes_sel(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - (uint32_t)c;
  return (a & m) | (b & ~m);
}

FASTES_HD float fastes_self(bool c, float a, float b) {
  return fastes_bits_float(fastes_sel(c, fastes_float_bits(a), fastes_float_bits(b)));
}

// Exact fp16 -> float32.
FASTES_HD float fastes_f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  const uint32_t normal = sign | ((e + 112u) << 23) | (m << 13);  // rebias 15 -> 127
  const uint32_t special = sign | 0x7F800000u | (m << 13);        // inf, NaN
  const uint32_t sub = sign | fastes_float_bits((float)(int32_t)m * FASTES_TWO_POW_M24_F);  // exact
  return fastes_bits_float(fastes_sel(e == 0x1Fu, special, fastes_sel(e == 0u, sub, normal)));
}

// float32 -> fp16, round to nearest even (IEEE conversion; NaN -> sign | 0x7E00, like c10::Half).
FASTES_HD uint16_t fastes_f32_to_f16(float f) {
  const uint32_t x = fastes_float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
  // Normal range: rebias the exponent (-112 << 23) and round the 13 dropped bits to nearest even;
  // a carry out of the mantissa bumps the exponent, as it should.
  const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
  // Below 2**-14: one float add rounds |f| to a multiple of 2**-24; its low bits count the units.
  const uint32_t sub = fastes_float_bits(fastes_bits_float(a) + FASTES_HALF_F) - fastes_float_bits(FASTES_HALF_F);
  uint32_t mag = fastes_sel(a < 0x38800000u, sub, normal);
  mag = fastes_sel(a >= 0x477FF000u, 0x7C00u, mag);  // |f| >= 65520 (incl. inf) rounds to inf
  mag = fastes_sel(a > 0x7F800000u, 0x7E00u, mag);   // NaN
  return (uint16_t)(sign | mag);
}

// bf16 bits of fp32 v rounded with random word w.
FASTES_HD uint16_t fastes_sr_bf16(float v, uint32_t w) {
  const uint32_t raw = fastes_float_bits(v);
  const bool finite = (raw & 0x7F800000u) != 0x7F800000u;
  const uint32_t special = fastes_sel((raw & 0x007FFFFFu) != 0, 0x7FC0u, raw >> 16);  // NaN -> canonical
  // Finite patterns stay below 2**32 after the add (max 0xFF7FFFFF + 0xFFFF): no wrap.
  return (uint16_t)fastes_sel(finite, (raw + (w & 0xFFFFu)) >> 16, special);
}

// fp16 bits of fp32 v rounded with random word w.
FASTES_HD uint16_t fastes_sr_fp16(float v, uint32_t w) {
  const uint32_t h = fastes_f32_to_f16(v);
  const float near = fastes_f16_to_f32((uint16_t)h);
  const bool finite = (fastes_float_bits(v) & 0x7F800000u) != 0x7F800000u;
  const bool above = near > v;
  // The other neighbour: the next fp16 pattern from `near` towards v (torch.nextafter in fp16).
  const bool neg = (h & 0x8000u) != 0;
  const uint32_t step_h = fastes_sel(neg != above, h - 1u, h + 1u);
  const uint32_t oh = fastes_sel((h & 0x7FFFu) == 0, fastes_sel(above, 0x8001u, 0x0001u), step_h);
  const float other = fastes_f16_to_f32((uint16_t)oh);
  const float down = fastes_self(above, other, near), up = fastes_self(above, near, other);
  const uint32_t dh = fastes_sel(above, oh, h), uh = fastes_sel(above, h, oh);
  const float gap = up - down;
  const float q = (v - down) / fastes_self(gap > 0.0f, gap, 1.0f);  // the reference's safe division
  const float p = fastes_self(gap > 0.0f, q, 0.0f);  // NaN when down = -inf: never rounds up
  const float u = (float)(int32_t)(w >> 8) * FASTES_TWO_POW_M24_F;
  const uint32_t r = fastes_sel(u < p, uh, dh);
  return (uint16_t)fastes_sel((!finite) | (near == v), h, r);
}

// fp32 v written as dtype `dtype` at element i of `out` (fp32: unchanged).
FASTES_HD void fastes_store_rounded(void* out, int dtype, int64_t i, float v, uint32_t w) {
  if (dtype == FASTES_DTYPE_BFLOAT16) {
    ((uint16_t*)out)[i] = fastes_sr_bf16(v, w);
  } else if (dtype == FASTES_DTYPE_FLOAT16) {
    ((uint16_t*)out)[i] = fastes_sr_fp16(v, w);
  } else {
    ((float*)out)[i] = v;
  }
}

// Element i of `src` of dtype `dtype` as fp32 (exact).
FASTES_HD float fastes_load_f32(const void* src, int dtype, int64_t i) {
  if (dtype == FASTES_DTYPE_BFLOAT16) return fastes_bf16_to_f32(((const uint16_t*)src)[i]);
  if (dtype == FASTES_DTYPE_FLOAT16) return fastes_f16_to_f32(((const uint16_t*)src)[i]);
  return ((const float*)src)[i];
}
