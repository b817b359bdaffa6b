"""Triton device functions of the noise contract (DESIGN.md section 2; spec: ``fastes/noise.py``).

Every Triton kernel that needs noise (the noise fill, the perturbed matmuls, the ES
update) calls these ``@triton.jit`` functions to regenerate it in registers. They are
written from the published algorithm (Salmon et al. 2011), not from ``tl.randn``,
whose stream is not ours and may change between Triton versions.

Philox4x32-10: key = (seed low, seed high), counter = (block, tensor id, noise index,
step), all uint32. Round: ``hi/lo`` halves of ``c0 * M0`` and ``c2 * M1`` (``tl.umulhi``
and the wrapping uint32 product), then ``(hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; the
key is bumped by the Weyl constants before rounds 1..9. Scalar arguments may arrive as
int32 bit patterns (the launchers do that so that one compiled kernel serves every seed):
``.to(tl.uint32)`` keeps the bits.

Element ``e`` (int64, >= 0) of a stream:

* gaussian:   block ``e >> 2``, lane ``e & 3``; Box-Muller on (x0, x1) for lanes 0-1 and
  (x2, x3) for lanes 2-3, float32, with IEEE ``sqrt_rn`` (``tl.sqrt`` is ``sqrt.approx``
  on NVIDIA) and precise libdevice ``log``/``cos``/``sin`` (what ``tl.log``/``tl.cos``/
  ``tl.sin`` lower to); no add follows a multiply, so FMA contraction changes nothing.
* rademacher: block ``e >> 7``, word ``(e >> 5) & 3``, bit ``e & 31``; +1 if set else -1.

Cost per value (a Philox call is 10 rounds x (2 mul.hi + 2 mul.lo + 4 xor) plus key adds,
~100 int ops; Box-Muller is one log, one sqrt_rn and a sin or cos per value, ~40 ops):

* ``gaussian_at`` / ``rademacher_at`` / ``noise_at`` (element-wise): one full Philox call
  per element, i.e. 4x redundant for Gaussians (~100 + ~40 ops/value instead of ~25 + ~40;
  the PTX of the fill kernel shows 18.5 vs 4.6 mul.hi per value) and 128x for Rademacher
  (~100 ops instead of ~1). They exist because a matmul tile over an arbitrary
  (row, col) -> ``e`` map cannot assume that the 4 (or 128) elements of a block land in
  the same thread. Acceptable where each value is reused many times (one tile of E serves
  every row of a member); not for Rademacher in a hot loop, nor for the noise fill.
* ``gaussian_block`` (four lanes as four tensors) and ``gaussian_blocks_flat`` (the same,
  interleaved along the last dimension): one Philox call per block, no redundancy. A
  matmul whose K-tile starts at a multiple of 4 elements of the stream can use them.
* ``rademacher_words_flat`` (and ``rademacher_blocks_flat``, the same on whole blocks; and
  ``rademacher_words_2d``, rows of words): one Philox call per 32-bit word (~3 ops per sign);
  ``rademacher_rows`` and ``rademacher_blocks_2d``: 2-D blocks, one call per 128.
* ``noise_rows``: [R, C] runs of a stream starting at per-row elements, block-wise when aligned,
  else element-wise (the perturbed embedding's rows, the LoRA adapters' tiles).

The noise fill (``fastes.ops.noise``) uses the per-block functions.

Checked beyond the interpreter by compiling for sm_90 without a GPU (``triton.compile`` with a
``GPUTarget``): module constants must be ``tl.constexpr(...)`` instances (the interpreter takes
plain ints, the compiler refuses them), keys fold into i32 constants with no casts, and the
interpreter cannot tell ``sqrt_rn`` from ``sqrt`` (both ``np.sqrt``), so only GPU tests can.
"""

from __future__ import annotations

import triton
import triton.language as tl

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS = tl.constexpr(10)
# float32(2*pi) written exactly, as fastes.noise rounds TWO_PI to float32 before the multiply.
TWO_PI_F32 = tl.constexpr(6.2831854820251465)
U24_SCALE = tl.constexpr(5.9604644775390625e-08)  # 2**-24

# KIND values, shared with the C++/CUDA extension's kind_int.
GAUSSIAN = tl.constexpr(0)
RADEMACHER = tl.constexpr(1)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 counters (tensors or scalars, broadcast); returns four uint32 words."""
    c0 = c0.to(tl.uint32)
    c1 = c1.to(tl.uint32)
    c2 = c2.to(tl.uint32)
    c3 = c3.to(tl.uint32)
    k0 = k0.to(tl.uint32)
    k1 = k1.to(tl.uint32)
    for r in tl.static_range(PHILOX_ROUNDS):
        if r > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def box_muller(xa, xb):
    """(r cos t, r sin t) from two uint32 words, float32, exactly as fastes.noise.gaussian_from_words."""
    u1 = ((xa >> 8) + 1).to(tl.float32) * U24_SCALE  # (0, 1]: log never sees 0
    u2 = (xb >> 8).to(tl.float32) * U24_SCALE  # [0, 1)
    radius = tl.sqrt_rn(-2.0 * tl.log(u1))
    theta = TWO_PI_F32 * u2
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def gaussian_block(b, k0, k1, tid, idx, step):
    """The four Gaussians (lanes 0..3) of Philox blocks ``b``: one Philox call per 4 values."""
    x0, x1, x2, x3 = philox4x32_10(b.to(tl.uint32), tid, idx, step, k0, k1)
    g0, g1 = box_muller(x0, x1)
    g2, g3 = box_muller(x2, x3)
    return g0, g1, g2, g3


@triton.jit
def gaussian_blocks_flat(b, k0, k1, tid, idx, step):
    """Gaussians of blocks ``b`` [..., C] as [..., 4 C], in stream order along the last dimension."""
    g0, g1, g2, g3 = gaussian_block(b, k0, k1, tid, idx, step)
    # interleave(g0, g2) = g0 g2 g0 g2 ..., interleave(g1, g3) = g1 g3 ...; interleaving those gives g0 g1 g2 g3.
    return tl.interleave(tl.interleave(g0, g2), tl.interleave(g1, g3))


@triton.jit
def rademacher_words_flat(w, k0, k1, tid, idx, step):
    """Signs of 1-D 32-bit word indices ``w`` [W] (word w = elements 32w .. 32w+31) as a flat [32 W] float32.

    One Philox call per word (the four words of a block sit in four threads, so 4x redundant,
    ~3 int ops per sign). Keep W >= threads per program: Triton then gives each thread whole
    rows of the [W, 32] bit tile; with fewer rows it spreads a row over threads, each
    recomputing the word (measured in PTX: 18 mul.hi per sign instead of 0.6).
    """
    x0, x1, x2, x3 = philox4x32_10((w >> 2).to(tl.uint32), tid, idx, step, k0, k1)
    j = w & 3
    word = tl.where(j == 0, x0, tl.where(j == 1, x1, tl.where(j == 2, x2, x3)))
    bits = (word[:, None] >> tl.arange(0, 32)[None, :].to(tl.uint32)) & 1
    return tl.reshape(tl.where(bits != 0, 1.0, -1.0), (w.shape[0] * 32,))


@triton.jit
def rademacher_words_2d(w, k0, k1, tid, idx, step):
    """Signs of 2-D 32-bit word indices ``w`` [R, C] (``idx`` broadcasts against it) as [R, 32 C] float32:
    row r holds words w[r, 0..C-1] in order. One Philox call per word, as ``rademacher_words_flat``."""
    x0, x1, x2, x3 = philox4x32_10((w >> 2).to(tl.uint32), tid, idx, step, k0, k1)
    j = w & 3
    word = tl.where(j == 0, x0, tl.where(j == 1, x1, tl.where(j == 2, x2, x3)))
    bits = (word[:, :, None] >> tl.arange(0, 32)[None, None, :].to(tl.uint32)) & 1
    return tl.reshape(tl.where(bits != 0, 1.0, -1.0), (w.shape[0], w.shape[1] * 32))


@triton.jit
def rademacher_blocks_flat(b, k0, k1, tid, idx, step):
    """Signs of 1-D Philox blocks ``b`` [B] as a flat [128 B] float32: ``rademacher_words_flat`` of their 4 B words."""
    w = tl.reshape(b.to(tl.int64)[:, None] * 4 + tl.arange(0, 4)[None, :], (b.shape[0] * 4,))
    return rademacher_words_flat(w, k0, k1, tid, idx, step)


@triton.jit
def rademacher_blocks_2d(b, k0, k1, tid, idx, step, BF16: tl.constexpr = False):
    """Signs of 2-D blocks ``b`` [R, B] as [R, 128 B] float32 (bfloat16 with ``BF16``) in stream order, one Philox
    call per 128 signs.

    Built only with ``tl.join`` (which adds an in-thread dimension), so a thread expands the words it
    made into 32 consecutive values each, with no per-value word select or variable shift
    (``rademacher_rows``). float32: five joins of (v << s, v) put bit j of a word at bit 31, and one
    and/xor turns it into ±1 (0x3F800000 or 0xBF800000). BF16: four joins put bits j and j + 16 at
    bits 15 and 31, and one and/xor makes both bf16 halves of a word at once (0x3F80 or 0xBF80).
    """
    x0, x1, x2, x3 = philox4x32_10(b.to(tl.uint32), tid, idx, step, k0, k1)
    v = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # [R, B, 2, 2]: v[..., a, c] = word 2·a + c (join adds the minor dim)
    if BF16:
        for s in tl.static_range(4):  # bit j = 8·d0 + 4·d1 + 2·d2 + d3 (and j + 16) land at bit 15 (and 31)
            v = tl.join(v << (8 >> s), v)
        h = (v & 0x80008000) ^ 0xBF80BF80  # per half: bit 15 set: 0x3F80 (+1); clear: 0xBF80 (-1)
        halves = tl.join((h & 0xFFFF).to(tl.uint16), (h >> 16).to(tl.uint16))  # [..., j, half]
        e = tl.permute(halves, (0, 1, 2, 3, 8, 4, 5, 6, 7)).to(tl.bfloat16, bitcast=True)  # half before j
    else:
        for s in tl.static_range(5):  # bit j = 16·d0 + 8·d1 + 4·d2 + 2·d3 + d4 lands at bit 31
            v = tl.join(v << (16 >> s), v)
        e = ((v & 0x80000000) ^ 0xBF800000).to(tl.float32, bitcast=True)  # bit 31 set: +1; clear: -1
    return tl.reshape(e, (b.shape[0], b.shape[1] * 128))


@triton.jit
def rademacher_rows(b, k0, k1, tid, idx, step):
    """Signs of 2-D blocks ``b`` [R, B] as [R, 128 B] in stream order (``idx`` broadcasts against ``b``): one
    Philox call per 128 signs."""
    x0, x1, x2, x3 = philox4x32_10(b.to(tl.uint32), tid, idx, step, k0, k1)
    col = tl.arange(0, 128)[None, None, :]
    word = col >> 5
    w = tl.where(word == 0, x0[:, :, None],
                 tl.where(word == 1, x1[:, :, None], tl.where(word == 2, x2[:, :, None], x3[:, :, None])))
    signs = tl.where(((w >> (col & 31).to(tl.uint32)) & 1) != 0, 1.0, -1.0)
    return tl.reshape(signs, (b.shape[0], b.shape[1] * 128))


@triton.jit
def gaussian_at(e, k0, k1, tid, idx, step):
    """Gaussian value of element indices ``e`` (>= 0; any int type, used as int64): one Philox call each."""
    e = e.to(tl.int64)
    lane = e & 3
    x0, x1, x2, x3 = philox4x32_10((e >> 2).to(tl.uint32), tid, idx, step, k0, k1)
    high = lane >= 2
    c, s = box_muller(tl.where(high, x2, x0), tl.where(high, x3, x1))
    return tl.where((lane & 1) == 0, c, s)


@triton.jit
def rademacher_at(e, k0, k1, tid, idx, step):
    """Rademacher sign (float32 +-1) of element indices ``e`` (>= 0, used as int64): one Philox call each."""
    e = e.to(tl.int64)
    word = (e >> 5) & 3
    x0, x1, x2, x3 = philox4x32_10((e >> 7).to(tl.uint32), tid, idx, step, k0, k1)
    w = tl.where(word == 0, x0, tl.where(word == 1, x1, tl.where(word == 2, x2, x3)))
    bits = (w >> (e & 31).to(tl.uint32)) & 1
    return tl.where(bits != 0, 1.0, -1.0)


@triton.jit
def noise_at(e, k0, k1, tid, idx, step, KIND: tl.constexpr):
    """Element-wise noise of kind ``KIND`` (GAUSSIAN = 0, RADEMACHER = 1), float32."""
    if KIND == GAUSSIAN:
        return gaussian_at(e, k0, k1, tid, idx, step)
    else:
        return rademacher_at(e, k0, k1, tid, idx, step)


@triton.jit
def noise_rows(e_row, C: tl.constexpr, k0, k1, tid, idx, step, KIND: tl.constexpr, BLOCKED: tl.constexpr):
    """[R, C] noise at stream elements e_row[R, 1] + 0..C−1 (idx: scalar or [R, 1] noise indices).

    BLOCKED: every e_row and C are multiples of 4 (Gaussian) / 128 (Rademacher), so each
    Philox call serves 4 / 128 values; otherwise one call per value (``noise_at``).
    """
    if BLOCKED:
        if KIND == GAUSSIAN:
            vals = gaussian_blocks_flat((e_row >> 2) + tl.arange(0, C // 4)[None, :], k0, k1, tid, idx, step)
        else:
            vals = rademacher_rows((e_row >> 7) + tl.arange(0, C // 128)[None, :], k0, k1, tid, idx, step)
    else:
        vals = noise_at(e_row + tl.arange(0, C)[None, :], k0, k1, tid, idx, step, KIND)
    return vals
