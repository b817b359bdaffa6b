"""The noise contract (DESIGN.md section 2), as a readable torch reference.

Every backend (this file, the Triton kernels in ``fastes.ops``, the C++ and CUDA
kernels in ``csrc/``) must produce the same uint32 stream bit for bit, and the
same floats to a few ulp. A member's perturbation is a pure function of
(seed, step, parameter name, member): nothing is ever stored.

Generator: Philox4x32-10 (Salmon et al. 2011, Random123).

* key     = (seed & 0xFFFFFFFF, seed >> 32)            -- 64-bit run seed
* counter = (block, tensor_id, noise_index, step)      -- four uint32
* one call -> four uint32 words x0..x3

Element ``e`` of a flattened noise tensor reads:

* ``gaussian``:   block = e // 4, lane = e % 4. Box-Muller on (x0, x1) gives
  lanes 0, 1 and on (x2, x3) lanes 2, 3, in float32::

      u1 = ((xa >> 8) + 1) * 2**-24          in (0, 1]
      u2 = (xb >> 8) * 2**-24                in [0, 1)
      r  = sqrt(-2 * log(u1)),  t = 2*pi*u2
      lane 2k = r * cos(t),  lane 2k+1 = r * sin(t)

* ``rademacher``: block = e // 128, word = (e // 32) % 4, bit = e % 32;
  value = +1 if bit ``bit`` of word ``word`` is set, else -1.

Tensor id: FNV-1a 32-bit hash of the UTF-8 parameter name. Stochastic-rounding
bits use their own id space: ``tensor_id("stochastic-rounding/" + name)`` with
noise index ``SR_NOISE_INDEX``; element e takes word e % 4 of block e // 4.

Antithetic sampling: member m uses noise index m // 2 with sign +1 (even m) or
-1 (odd m); without it, index m with sign +1.

Dense (``full``) noise of a weight (out x in) is the stream reshaped row-major.
Low-rank (EGGROLL) noise of rank r: one stream, B (in x r) first, then
A (out x r), both row-major; E = A @ B.T / sqrt(r).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

KINDS = ("gaussian", "rademacher")
MODES = ("full", "lowrank", "lora")

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

MASK32 = 0xFFFFFFFF
U32_LIMIT = 1 << 32
SEED_LIMIT = 1 << 64
SR_NOISE_INDEX = 0xFFFFFFFF
SR_PREFIX = "stochastic-rounding/"
VALUES_PER_BLOCK = {"gaussian": 4, "rademacher": 128}
KIND_INT = {"gaussian": 0, "rademacher": 1}  # the kind ids of the Triton kernels and of the C++ kind_int
TWO_PI = 6.283185307179586


# --------------------------------------------------------------------------- validation


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_uint(value: object, arg: str, limit: int) -> int:
    """Return ``value`` as a non-negative int below ``limit``, or raise a ValueError naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{arg} must be a non-negative integer, got {value!r}")
    if not 0 <= value < limit:
        raise ValueError(f"{arg} must be in [0, {limit}), got {value}")
    return value


def check_seed(seed: object) -> int:
    return check_uint(seed, "seed", SEED_LIMIT)


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive integers, got {shape!r}")
    return shape


# --------------------------------------------------------------------------- naming


@lru_cache(maxsize=65536)
def tensor_id(name: str) -> int:
    """FNV-1a 32-bit hash of a parameter name: stable across runs, processes and machines."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & MASK32
    return h


def sr_tensor_id(name: str) -> int:
    """Tensor id of the stochastic-rounding bits of parameter ``name``."""
    return tensor_id(SR_PREFIX + name)


def member_noise(member: int, antithetic: bool) -> tuple[int, int]:
    """(noise index, sign) of population member ``member``."""
    check_uint(member, "member", U32_LIMIT)
    if antithetic:
        return member // 2, (1 if member % 2 == 0 else -1)
    return member, 1


def split_seed(seed: int) -> tuple[int, int]:
    seed = check_seed(seed)
    return seed & MASK32, seed >> 32


def as_i32(value: int) -> int:
    """uint32 → the int32 with the same bits: kernels take counter words as int32, so that one compiled
    kernel serves every seed, tensor id and step."""
    return value - (1 << 32) if value >= (1 << 31) else value


@dataclass(frozen=True)
class NoiseSpec:
    """Everything a kernel needs to regenerate a member's noise, besides the tensor."""

    seed: int
    step: int = 0
    kind: str = "gaussian"
    antithetic: bool = True

    def __post_init__(self) -> None:
        check_seed(self.seed)
        check_uint(self.step, "step", U32_LIMIT)
        check_kind(self.kind)

    def member(self, member: int) -> tuple[int, int]:
        return member_noise(member, self.antithetic)


# --------------------------------------------------------------------------- Philox4x32-10


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for uint32 values held in int64, without overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    m_hi, m_lo = m >> 16, m & 0xFFFF
    mid = a_hi * m_lo + a_lo * m_hi  # < 2**33
    low_part = (mid << 16) + a_lo * m_lo  # < 2**50
    hi = a_hi * m_hi + (low_part >> 32)
    return hi & MASK32, low_part & MASK32


def philox4x32(
    c0: torch.Tensor | int,
    c1: torch.Tensor | int,
    c2: torch.Tensor | int,
    c3: torch.Tensor | int,
    k0: int,
    k1: int,
    rounds: int = PHILOX_ROUNDS,
) -> torch.Tensor:
    """Philox4x32 on broadcastable int64 counters; returns int64 [..., 4] in [0, 2**32)."""
    c = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.int64) for v in (c0, c1, c2, c3)))
    c0, c1, c2, c3 = (v & MASK32 for v in c)
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=-1)


def uint32_blocks(
    seed: int, tid: int, noise_index: int, step: int, start_block: int, num_blocks: int
) -> torch.Tensor:
    """Raw stream: int64 [num_blocks, 4] of uint32 words for blocks start_block.. of one counter space."""
    k0, k1 = split_seed(seed)
    blocks = torch.arange(start_block, start_block + num_blocks, dtype=torch.int64)
    if num_blocks and blocks[-1] >= U32_LIMIT:
        raise ValueError("noise stream exceeds 2**32 blocks; tensor too large for one counter space")
    return philox4x32(blocks, tid, noise_index, step, k0, k1)


def gaussian_from_words(words: torch.Tensor) -> torch.Tensor:
    """Box-Muller (float32) on uint32 words [..., 4] -> Gaussians [..., 4]."""
    scale = 2.0**-24
    u1 = ((words[..., 0::2] >> 8) + 1).to(torch.float32) * scale
    u2 = (words[..., 1::2] >> 8).to(torch.float32) * scale
    radius = torch.sqrt(-2.0 * torch.log(u1))
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    out = torch.stack((radius * torch.cos(theta), radius * torch.sin(theta)), dim=-1)
    return out.reshape(*words.shape[:-1], 4)


def rademacher_from_words(words: torch.Tensor) -> torch.Tensor:
    """Bits of uint32 words [..., 4] -> signs [..., 128] (word-major, bit 0 first)."""
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1
    return (bits.to(torch.float32) * 2.0 - 1.0).reshape(*words.shape[:-1], 128)


def stream(
    seed: int, tid: int, noise_index: int, step: int, offset: int, count: int, kind: str = "gaussian"
) -> torch.Tensor:
    """Elements offset .. offset+count-1 of one noise stream, float32 [count]."""
    check_kind(kind)
    per_block = VALUES_PER_BLOCK[kind]
    first, last = offset // per_block, (offset + count - 1) // per_block
    words = uint32_blocks(seed, tid, noise_index, step, first, last - first + 1)
    values = gaussian_from_words(words) if kind == "gaussian" else rademacher_from_words(words)
    start = offset - first * per_block
    return values.reshape(-1)[start : start + count]


# --------------------------------------------------------------------------- public reference API


def materialize(
    seed: int,
    name: str,
    noise_index: int,
    shape: Sequence[int] | int,
    kind: str = "gaussian",
    step: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """Dense reference noise (float32, CPU) of parameter ``name`` for one noise index.

    ``offset`` starts the read further along the stream (used for the A factor of
    low-rank noise). The sign of antithetic members is not applied here.
    """
    shape = check_shape(shape)
    check_seed(seed)
    check_uint(noise_index, "noise_index", U32_LIMIT)
    check_uint(step, "step", U32_LIMIT)
    numel = math.prod(shape)
    return stream(seed, tensor_id(name), noise_index, step, offset, numel, kind).reshape(shape)


def materialize_lowrank(
    seed: int,
    name: str,
    noise_index: int,
    out_features: int,
    in_features: int,
    rank: int,
    kind: str = "gaussian",
    step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors (A [out, r], B [in, r]) drawn from one stream, B first."""
    check_rank(rank, out_features, in_features)
    b = materialize(seed, name, noise_index, (in_features, rank), kind, step)
    a = materialize(seed, name, noise_index, (out_features, rank), kind, step, offset=in_features * rank)
    return a, b


def check_rank(rank: object, out_features: int, in_features: int) -> int:
    rank = check_uint(rank, "rank", U32_LIMIT)
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, min(out, in) = {min(out_features, in_features)}], got {rank}")
    return rank


def member_noise_tensor(
    spec: NoiseSpec, name: str, member: int, shape: Sequence[int], mode: str = "full", rank: int = 1
) -> torch.Tensor:
    """E_m for one member, signed, unscaled (no sigma, no per-tensor scale), float32 CPU.

    ``full`` (and any 1-D shape): the dense stream. ``lowrank``: A @ B.T / sqrt(r).
    ``lora`` perturbs adapter entries densely, so it is ``full`` on the adapter's shape.
    """
    check_mode(mode)
    shape = check_shape(shape)
    index, sign = spec.member(member)
    if mode == "lowrank" and len(shape) == 2:
        a, b = materialize_lowrank(spec.seed, name, index, shape[0], shape[1], rank, spec.kind, spec.step)
        return sign * (a @ b.T) / math.sqrt(rank)
    return sign * materialize(spec.seed, name, index, shape, spec.kind, spec.step)


def stochastic_rounding_bits(seed: int, name: str, step: int, numel: int, offset: int = 0) -> torch.Tensor:
    """uint32 words (int64) used to stochastically round element offset.. of parameter ``name``."""
    first, last = offset // 4, (offset + numel - 1) // 4
    words = uint32_blocks(seed, sr_tensor_id(name), SR_NOISE_INDEX, step, first, last - first + 1)
    start = offset - first * 4
    return words.reshape(-1)[start : start + numel]
