"""Stochastic rounding of fp32 values to bf16/fp16 with the contract's own random bits.

Small ES updates (lr·σ-scale steps) are far below a bf16 ulp; round-to-nearest
would drop them. Rounding up with probability equal to the remainder keeps the
update unbiased in expectation. Bits: ``fastes.noise.stochastic_rounding_bits``.

``stochastic_round_ref`` is the oracle. ``stochastic_round`` writes into a weight with the
fastest backend: the C++ kernel (``fastes._C.stochastic_round``) on CPU, a small Triton
kernel on CUDA (``stochastic_round_triton``: the same ``_round`` as the fused Triton es_update),
the reference otherwise.
"""

from __future__ import annotations

import math

import torch

from fastes import _backend
from fastes.noise import sr_tensor_id, stochastic_rounding_bits
from fastes.ops.dispatch import backends, choose
from fastes.ops.stochastic_round_triton import _round_triton, triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = backends("reference", "cpp", "triton")


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


def _resolve(backend: str, out: torch.Tensor) -> str:
    return choose(backend, BACKENDS, out, cpp=getattr(_backend.extension(), "stochastic_round", None) is not None)


def stochastic_round(value: torch.Tensor, out: torch.Tensor, seed: int, name: str, step: int,
                     backend: str = "auto") -> torch.Tensor:
    """out ← ``value`` (fp32) rounded to out's dtype with the bits of (seed, name, step); returns ``out``.

    Bit-identical to ``stochastic_round_ref`` on every backend (element order: row-major over the
    shape). fp32 ``out`` is a plain copy. ``auto``: C++ on CPU (torch reference when the extension
    is not built), Triton on CUDA; an explicit backend that is unavailable raises RuntimeError.
    """
    if not isinstance(out, torch.Tensor) or out.dtype not in DTYPES:
        raise ValueError(f"out must be a tensor of dtype {DTYPES}")
    if not isinstance(value, torch.Tensor) or value.shape != out.shape:
        raise ValueError(f"value must be a tensor of out's shape {tuple(out.shape)}")
    chosen = _resolve(backend, out)
    if out.dtype == torch.float32:
        return out.copy_(value)
    if out.numel() == 0:
        return out
    if chosen == "reference":
        return out.copy_(stochastic_round_ref(value, out.dtype, seed, name, step))
    if chosen == "cpp":
        fn = getattr(_backend.extension(), "stochastic_round", None)
        if fn is None:
            raise RuntimeError("backend 'cpp' needs fastes._C built with stochastic_round")
        if out.device.type != "cpu":
            raise ValueError(f"out must be a CPU tensor for backend 'cpp', got device {out.device}")
    elif triton is None:
        raise RuntimeError("the Triton backend is unavailable")
    elif not out.is_cuda and not _backend.triton_interpreted():
        raise ValueError("out must be a CUDA tensor for backend 'triton' (or set TRITON_INTERPRET=1)")
    src = value.detach().to(device=out.device, dtype=torch.float32).contiguous()
    dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    if chosen == "cpp":
        fn(src, dst, seed, sr_tensor_id(name), step)
    else:
        _round_triton(src, dst, seed, name, step)
    if dst is not out:
        out.copy_(dst)
    return out
