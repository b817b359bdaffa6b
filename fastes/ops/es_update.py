"""es_update: W ← W + lr·s·Σ_m c_m·E_m in place, regenerating every member's noise.

Antithetic pairs share a noise index, so coefficients are first folded per index
(c_idx = Σ sign_m·c_m): half the noise to generate. lowrank is one GEMM
(out × K·r)·(K·r × in); full is a per-element sum over the K indices. fp32
accumulation, bf16/fp16 written with stochastic rounding (``stochastic_round``).
Deterministic: no atomics, a fixed summation order over indices.
"""

from __future__ import annotations

import math

import torch

from fastes.noise import NoiseSpec, check_rank, member_noise_tensor, tensor_id
from fastes.ops import member_noise
from fastes.ops.checks import check_tensor
from fastes.ops.stochastic_round import stochastic_round_ref

BACKENDS = ("auto", "reference", "cpu", "triton")


def es_direction_ref(noise: NoiseSpec, coeffs: torch.Tensor, shape: tuple[int, ...], mode: str, rank: int,
                     name: str) -> torch.Tensor:
    """Σ_m c_m·E_m (fp32, CPU), one member at a time, E_m signed for antithetic members."""
    total = torch.zeros(shape, dtype=torch.float32)
    for m, c in enumerate(coeffs.double().tolist()):
        if c != 0.0:
            total += float(c) * member_noise_tensor(noise, name, m, shape, mode, rank)
    return total


def es_update_ref(weight: torch.Tensor, noise: NoiseSpec, coeffs: torch.Tensor, lr: float, scale: float,
                  mode: str, rank: int, name: str) -> torch.Tensor:
    """Oracle: the updated weight (same dtype and device), fp32 sum then stochastic rounding."""
    direction = es_direction_ref(noise, coeffs, tuple(weight.shape), mode, rank, name)
    updated = weight.float().cpu() + (lr * scale) * direction
    return stochastic_round_ref(updated, weight.dtype, noise.seed, name, noise.step).to(weight.device)


def fold_coefficients(noise: NoiseSpec, coeffs: torch.Tensor) -> list[tuple[int, float]]:
    """(noise index, Σ sign·c) per distinct index, in index order, zeros dropped (fp64 sums)."""
    folded: dict[int, float] = {}
    for m, c in enumerate(coeffs.double().tolist()):
        index, sign = noise.member(m)
        folded[index] = folded.get(index, 0.0) + sign * c
    return [(i, c) for i, c in sorted(folded.items()) if c != 0.0]


def _direction_cpu(weight: torch.Tensor, noise: NoiseSpec, folded: list[tuple[int, float]], mode: str, rank: int,
                   name: str) -> torch.Tensor:
    shape = tuple(weight.shape)
    if mode == "lowrank" and weight.dim() == 2 and folded:
        out_f, in_f = shape
        a_parts, b_parts = [], []
        for index, c in folded:
            flat = member_noise.stream_tensor(noise, name, index, (in_f + out_f) * rank, 0, weight.device)
            b_parts.append(flat[: in_f * rank].reshape(in_f, rank))
            a_parts.append(flat[in_f * rank :].reshape(out_f, rank) * (c / math.sqrt(rank)))
        return torch.cat(a_parts, 1) @ torch.cat(b_parts, 1).T
    total = torch.zeros(shape, dtype=torch.float32, device=weight.device)
    for index, c in folded:
        total.add_(member_noise.stream_tensor(noise, name, index, weight.numel(), 0, weight.device).view(shape),
                   alpha=c)
    return total


def _es_update_cpu(weight: torch.Tensor, noise: NoiseSpec, coeffs: torch.Tensor, lr: float, scale: float,
                   mode: str, rank: int, name: str) -> None:
    folded = fold_coefficients(noise, coeffs)
    direction = _direction_cpu(weight, noise, folded, mode, rank, name)
    updated = weight.float() + (lr * scale) * direction
    if weight.dtype == torch.float32:
        weight.copy_(updated)
    else:
        weight.copy_(stochastic_round_ref(updated, weight.dtype, noise.seed, name, noise.step))


def es_update(weight: torch.Tensor, noise: NoiseSpec, coeffs: torch.Tensor, lr: float, scale: float = 1.0,
              mode: str = "lowrank", rank: int = 1, name: str = "weight", backend: str = "auto") -> torch.Tensor:
    """In place W ← W + lr·s·Σ_m c_m·E_m; returns ``weight``. 1-D weights use dense noise in any mode."""
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
        raise ValueError("weight must be a 1-D or 2-D torch.Tensor")
    check_tensor(weight, "weight", weight.dim())
    if not isinstance(noise, NoiseSpec):
        raise ValueError(f"noise must be a fastes.noise.NoiseSpec, got {type(noise).__name__}")
    check_tensor(coeffs, "coeffs", 1, (torch.float32, torch.float64))
    if not torch.isfinite(coeffs).all():
        raise ValueError("coeffs must be finite")
    if mode not in ("lowrank", "full"):
        raise ValueError(f"mode must be 'lowrank' or 'full', got {mode!r}")
    if mode == "lowrank" and weight.dim() == 2:
        check_rank(rank, *weight.shape)
    for value, arg in ((lr, "lr"), (scale, "scale")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{arg} must be a finite number, got {value!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    tensor_id(name)  # validates the name even when every coefficient folds to zero
    if weight.dim() == 1:
        mode = "full"
    args = (weight, noise, coeffs, lr, scale, mode, rank, name)
    if backend == "reference":
        weight.copy_(es_update_ref(*args))
    elif backend == "triton" or (backend == "auto" and weight.is_cuda):
        from fastes.ops.es_update_triton import es_update_triton

        es_update_triton(*args)
    else:
        _es_update_cpu(*args)
    return weight
