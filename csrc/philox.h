// The fastes noise contract (DESIGN.md section 2) for C++ and CUDA: Philox4x32-10 and the
// values derived from it. fastes/noise.py is the spec; this header must match it bit for bit
// on the uint32 stream and to a few ulp on the Gaussian floats.
//
//   key     = (seed & 0xFFFFFFFF, seed >> 32)
//   counter = (block, tensor_id, noise_index, step)
//   gaussian:   element e = lane e % 4 of block e / 4 (Box-Muller on (x0, x1) and (x2, x3))
//   rademacher: element e = bit e % 32 of word (e / 32) % 4 of block e / 128
//
// No torch headers: the same code compiles into the CPU kernels, the CUDA kernels, and any
// later op (update kernel, scratch materialization) that regenerates noise in registers.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FASTES_HD __host__ __device__ __forceinline__
#else
#define FASTES_HD inline
#endif

#define FASTES_PHILOX_M0 0xD2511F53u
#define FASTES_PHILOX_M1 0xCD9E8D57u
#define FASTES_PHILOX_W0 0x9E3779B9u
#define FASTES_PHILOX_W1 0xBB67AE85u
#define FASTES_PHILOX_ROUNDS 10

// Values produced by one Philox call, per kind.
#define FASTES_GAUSSIAN_PER_BLOCK 4
#define FASTES_RADEMACHER_PER_BLOCK 128

// Kind codes shared by every launcher (bindings map strings to these).
#define FASTES_KIND_GAUSSIAN 0
#define FASTES_KIND_RADEMACHER 1

// Noise index used by the stochastic-rounding id space (fastes.noise.SR_NOISE_INDEX).
#define FASTES_SR_NOISE_INDEX 0xFFFFFFFFu

// float32(2*pi), the constant the torch reference multiplies u2 by.
#define FASTES_TWO_PI_F 6.28318530717958647692f
// 2**-24: turns the top 24 bits of a word into a float in [0, 1) exactly.
#define FASTES_TWO_POW_M24_F 5.9604644775390625e-08f

struct fastes_u32x4 {
  uint32_t x[4];
};

// (hi, lo) halves of the 64-bit product a * b.
FASTES_HD void fastes_mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  *lo = (uint32_t)p;
#endif
}

// One Philox4x32 round on counter c with key (k0, k1).
FASTES_HD void fastes_philox_round(uint32_t c[4], uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  fastes_mulhilo32(FASTES_PHILOX_M0, c[0], &hi0, &lo0);
  fastes_mulhilo32(FASTES_PHILOX_M1, c[2], &hi1, &lo1);
  const uint32_t n0 = hi1 ^ c[1] ^ k0;
  const uint32_t n2 = hi0 ^ c[3] ^ k1;
  c[0] = n0;
  c[1] = lo1;
  c[2] = n2;
  c[3] = lo0;
}

// Philox4x32-10 on an arbitrary counter and key (exposed for known-answer tests).
FASTES_HD fastes_u32x4 fastes_philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                            uint32_t k1) {
  uint32_t c[4] = {c0, c1, c2, c3};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < FASTES_PHILOX_ROUNDS; ++r) {
    fastes_philox_round(c, k0, k1);
    k0 += FASTES_PHILOX_W0;
    k1 += FASTES_PHILOX_W1;
  }
  fastes_u32x4 out;
  out.x[0] = c[0];
  out.x[1] = c[1];
  out.x[2] = c[2];
  out.x[3] = c[3];
  return out;
}

// Block `block` of the stream identified by (seed, tensor_id, noise_index, step).
FASTES_HD fastes_u32x4 fastes_philox_block(uint64_t seed, uint32_t tensor_id, uint32_t noise_index, uint32_t step,
                                           uint32_t block) {
  return fastes_philox4x32_10(block, tensor_id, noise_index, step, (uint32_t)seed, (uint32_t)(seed >> 32));
}

// u1 = ((x >> 8) + 1) * 2**-24 in (0, 1]: never 0, so log(u1) is finite.
FASTES_HD float fastes_u01_open_low(uint32_t x) { return (float)(int32_t)((x >> 8) + 1u) * FASTES_TWO_POW_M24_F; }

// u2 = (x >> 8) * 2**-24 in [0, 1).
FASTES_HD float fastes_u01(uint32_t x) { return (float)(int32_t)(x >> 8) * FASTES_TWO_POW_M24_F; }

// ---------------------------------------------------------------------------------------------
// float32 log and sincos for Box-Muller on the host. glibc's logf/sinf/cosf are scalar calls that
// the compiler cannot vectorize portably (libmvec needs -ffast-math), which made the CPU fill ~5x
// slower. These branch-free versions vectorize under plain -O3, give the same bits on every
// ISA (no FMA: setup.py compiles with -ffp-contract=off) and every thread count, and were checked
// exhaustively against double precision on every input Box-Muller can produce (2**24 values of
// u1, 2**24 of theta): log < 0.81 ulp, sin and cos < 0.91 ulp. Coefficients are least-squares fits
// made for fastes; the Cody-Waite split of pi/2 is C1 + C2 + C3.

FASTES_HD uint32_t fastes_float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FASTES_HD float fastes_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// log(u) for a positive normal float u (Box-Muller's u1 lies in [2**-24, 1]).
FASTES_HD float fastes_log_pos(float u) {
  const uint32_t bits = fastes_float_bits(u);
  const uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;  // u = m * 2**e, m in [1, 2)
  // Keep m in [sqrt(1/2), sqrt(2)): halve it (exponent - 1) past sqrt(2). Selects are written as
  // integer arithmetic so that SSE/AVX2 vectorize them (ternaries stay branches there).
  const uint32_t fold = (uint32_t)(fastes_bits_float(mbits) > 1.414213538e+00f);
  const float m = fastes_bits_float(mbits - (fold << 23));
  const int32_t e = (int32_t)(bits >> 23) - 127 + (int32_t)fold;
  const float f = m - 1.0f;  // exact
  float p = 6.675271690e-02f;
  p = p * f - 1.164643466e-01f;
  p = p * f + 1.190471202e-01f;
  p = p * f - 1.241126880e-01f;
  p = p * f + 1.421789080e-01f;
  p = p * f - 1.666764319e-01f;
  p = p * f + 2.000220418e-01f;
  p = p * f - 2.500001490e-01f;
  p = p * f + 3.333331048e-01f;
  const float z = f * f;
  const float ef = (float)e;
  // log(m) = f - f^2/2 + f^3 p(f); ln 2 split so that e * hi is exact.
  const float y = f * z * p + ef * 3.194618330e-05f - 0.5f * z;
  return (f + y) + ef * 6.931152344e-01f;
}

// sin and cos of t for 0 <= t < 8 (Box-Muller's theta lies in [0, 2*pi)).
FASTES_HD void fastes_sincos_small(float t, float* s, float* c) {
  const float kf = (float)(int32_t)(t * 6.366197467e-01f + 0.5f);  // nearest multiple of pi/2 (t >= 0)
  const int32_t q = (int32_t)kf & 3;
  // r = t - k*pi/2 as hi + lo (TwoSum), so that results stay accurate next to the zeros of sin/cos.
  const float a = t - kf * 1.570312500e+00f;  // exact
  const float b = -(kf * 4.838267341e-04f);   // exact
  const float hi = a + b;
  const float bb = hi - a;
  const float lo = ((a - (hi - bb)) + (b - bb)) - kf * 6.077094383e-11f;
  const float z = hi * hi;
  float ps = 2.717912139e-06f;
  ps = ps * z - 1.983928814e-04f;
  ps = ps * z + 8.333329111e-03f;
  ps = ps * z - 1.666666716e-01f;
  float pc = -2.720281032e-07f;
  pc = pc * z + 2.479942123e-05f;
  pc = pc * z - 1.388888340e-03f;
  pc = pc * z + 4.166666791e-02f;
  const float sr = hi + (lo + hi * z * ps);
  const float hz = 0.5f * z;
  const float w = 1.0f - hz;
  const float cr = w + (((1.0f - w) - hz) + (z * z * pc - hi * lo));
  // Quadrant q: odd q swaps sin and cos; sin is negated for q = 2, 3 and cos for q = 1, 2.
  const uint32_t swap = 0u - (uint32_t)(q & 1);
  const uint32_t sb = fastes_float_bits(sr), cb = fastes_float_bits(cr);
  const uint32_t ss = (cb & swap) | (sb & ~swap);
  const uint32_t cs = (sb & swap) | (cb & ~swap);
  *s = fastes_bits_float(ss ^ ((uint32_t)(q & 2) << 30));
  *c = fastes_bits_float(cs ^ ((uint32_t)((q + 1) & 2) << 30));
}

// Box-Muller on one pair of words, in float32 in the torch reference's order of operations.
// CUDA uses its own accurate logf/sincosf (1-2 ulp); the host uses the functions above unless
// built with -DFASTES_HOST_LIBM.
FASTES_HD void fastes_box_muller(uint32_t xa, uint32_t xb, float* z0, float* z1) {
  const float u1 = fastes_u01_open_low(xa);
  const float u2 = fastes_u01(xb);
  const float theta = FASTES_TWO_PI_F * u2;
  float s, c;
#if defined(__CUDA_ARCH__)
  const float radius = sqrtf(-2.0f * logf(u1));
  sincosf(theta, &s, &c);
#elif defined(FASTES_HOST_LIBM)  // scalar libm on the host: ~5x slower fill, for comparisons
  const float radius = sqrtf(-2.0f * logf(u1));
  s = sinf(theta);
  c = cosf(theta);
#else
  const float radius = sqrtf(-2.0f * fastes_log_pos(u1));
  fastes_sincos_small(theta, &s, &c);
#endif
  *z0 = radius * c;
  *z1 = radius * s;
}

// The four Gaussians of one block: lanes 0, 1 from (x0, x1), lanes 2, 3 from (x2, x3).
FASTES_HD void fastes_gaussian4(fastes_u32x4 w, float out[4]) {
  fastes_box_muller(w.x[0], w.x[1], &out[0], &out[1]);
  fastes_box_muller(w.x[2], w.x[3], &out[2], &out[3]);
}

// Sign j (0..127) of one block: +1 if bit j % 32 of word j / 32 is set, else -1.
FASTES_HD float fastes_rademacher_at(fastes_u32x4 w, uint32_t j) {
  const uint32_t bit = (w.x[(j >> 5) & 3u] >> (j & 31u)) & 1u;
  return bit ? 1.0f : -1.0f;
}

// Element e of a Gaussian stream, computed alone (a whole Philox call for one value: use
// fastes_gaussian4 in loops that need consecutive elements).
FASTES_HD float fastes_gaussian_elem(uint64_t seed, uint32_t tensor_id, uint32_t noise_index, uint32_t step,
                                     uint64_t e) {
  float v[4];
  fastes_gaussian4(fastes_philox_block(seed, tensor_id, noise_index, step, (uint32_t)(e >> 2)), v);
  return v[e & 3u];
}

// Element e of a Rademacher stream, computed alone.
FASTES_HD float fastes_rademacher_elem(uint64_t seed, uint32_t tensor_id, uint32_t noise_index, uint32_t step,
                                       uint64_t e) {
  return fastes_rademacher_at(fastes_philox_block(seed, tensor_id, noise_index, step, (uint32_t)(e >> 7)),
                              (uint32_t)(e & 127u));
}

// Stochastic-rounding word of element e: word e % 4 of block e / 4 in the SR id space.
FASTES_HD uint32_t fastes_sr_word(uint64_t seed, uint32_t sr_tensor_id, uint32_t step, uint64_t e) {
  return fastes_philox_block(seed, sr_tensor_id, FASTES_SR_NOISE_INDEX, step, (uint32_t)(e >> 2)).x[e & 3u];
}
