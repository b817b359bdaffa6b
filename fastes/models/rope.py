"""Rotary position embeddings: inverse frequencies per rope type, and their application.

Frequencies are computed in float64 and stored as float32 once per model; cos/sin tables are
built once per forward (shared by every layer) from the packed positions, so any mix of prefill and decode rows works.
The "half-split" layout is used: dims [0, D/2) pair with [D/2, D).
A model may have two ropes: Gemma 3's sliding-window (local) layers use their own base
(``ModelConfig.local_rope_*``), its global layers the main one with its scaling.
"""

from __future__ import annotations

import math

import torch

from fastes.models.config import ModelConfig


def inv_freq(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """float32 [head_dim / 2] inverse frequencies: the main rope, or the local one (when the config has it)."""
    if local and config.local_rope_theta > 0:
        return _inv_freq(config.head_dim, config.local_rope_theta, config.local_rope_type, config.local_rope_scaling)
    return _inv_freq(config.head_dim, config.rope_theta, config.rope_type, config.rope_scaling)


def _inv_freq(dim: int, theta: float, rope_type: str, params: dict) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    freq = 1.0 / (theta**exponents)
    if rope_type == "linear":
        freq = freq / float(params["factor"])
    elif rope_type == "llama3":
        freq = _llama3(freq, float(params["factor"]), float(params["low_freq_factor"]),
                       float(params["high_freq_factor"]), float(params["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ValueError(f"unsupported rope type {rope_type!r}")
    return freq.to(torch.float32)


def _llama3(freq: torch.Tensor, factor: float, low: float, high: float, original: float) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short kept, a linear blend between.

    Wavelengths above original/low are "low frequency" (scaled), below original/high are kept;
    in between the two are mixed with weight (original/wavelength − low)/(high − low).
    """
    wavelength = 2 * math.pi / freq
    blend = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    mixed = (1.0 - blend) * freq / factor + blend * freq
    return torch.where(wavelength > original / low, freq / factor,
                       torch.where(wavelength < original / high, freq, mixed))


def rope_cos_sin(positions: torch.Tensor, freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width tables (cos, signed sin), float32 [T, 1, D], for integer positions [T]: built once per forward.

    cos is [cos θ, cos θ] and sin [−sin θ, sin θ] over the two halves, so that ``apply_rope`` is
    x·cos + swap_halves(x)·sin: two products and one sum instead of four, a subtraction and a concat
    (x1·c + x2·(−s) is bitwise x1·c − x2·s).
    """
    angles = positions.to(torch.float32).unsqueeze(1) * freq.to(positions.device).unsqueeze(0)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by the per-row angles (tables of ``rope_cos_sin``); fp32 math, x's dtype out."""
    half = x.shape[-1] // 2
    xf = x.float()
    swapped = torch.cat((xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos).add_(swapped.mul_(sin)).to(x.dtype)


__all__ = ["inv_freq", "rope_cos_sin", "apply_rope"]
