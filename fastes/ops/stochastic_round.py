"""Stochastic rounding of fp32 values to bf16/fp16 with the contract's own random bits.

Small ES updates (lr·σ-scale steps) are far below a bf16 ulp; round-to-nearest
would drop them. Rounding up with probability equal to the remainder keeps the
update unbiased in expectation. Bits: ``fastes.noise.stochastic_rounding_bits``.
"""

from __future__ import annotations

import math

import torch

from fastes.noise import stochastic_rounding_bits

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def round_bf16(value: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Add the low 16 random bits to the fp32 pattern and truncate: unbiased in magnitude and value."""
    raw = value.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    raw = ((raw + (bits & 0xFFFF)) & 0xFFFF0000) >> 16
    rounded = torch.where(raw >= 0x8000, raw - 0x10000, raw).to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isfinite(value), rounded.float(), value).to(torch.bfloat16)


def round_fp16(value: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Round up with probability (x − down)/(up − down), u = (bits >> 8)·2⁻²⁴."""
    near = value.to(torch.float16)
    above = near.float() > value
    other = torch.nextafter(near, torch.where(above, -math.inf, math.inf).to(torch.float16))
    down = torch.where(above, other, near).float()
    up = torch.where(above, near, other).float()
    gap = up - down
    p = torch.where(gap > 0, (value - down) / torch.where(gap > 0, gap, 1.0), 0.0)
    u = (bits >> 8).float() * 2.0**-24
    out = torch.where(u < p, up, down)
    return torch.where(torch.isfinite(value) & (near.float() != value), out, near.float()).to(torch.float16)


def stochastic_round_ref(value: torch.Tensor, dtype: torch.dtype, seed: int, name: str, step: int) -> torch.Tensor:
    """Round fp32 ``value`` to ``dtype`` (fp32: unchanged) with the bits of (seed, name, step)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype}")
    value = value.float().cpu()
    if dtype == torch.float32:
        return value.clone()
    bits = stochastic_rounding_bits(seed, name, step, value.numel()).reshape(value.shape)
    return round_bf16(value, bits) if dtype == torch.bfloat16 else round_fp16(value, bits)
