"""Rotary position embeddings: inverse frequencies per rope type, and their application.

Frequencies are computed in float64 and stored as float32 once per model; cos/sin are
built per forward from the packed positions, so any mix of prefill and decode rows works.
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
    """(cos, sin), float32 [T, D/2], for integer positions [T]."""
    angles = positions.to(torch.float32).unsqueeze(1) * freq.to(positions.device).unsqueeze(0)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] by the per-row angles; computed in fp32, returned in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


__all__ = ["inv_freq", "rope_cos_sin", "apply_rope"]
