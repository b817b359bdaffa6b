"""es_update: W ← W + lr·s·Σ_m c_m·E_m in place, regenerating every member's noise.

Antithetic pairs share a noise index, so coefficients are first folded per index
(c_idx = Σ sign_m·c_m): half the noise to generate. lowrank is one GEMM
(out × K·r)·(K·r × in); full is a per-element sum over the K indices. fp32
accumulation, bf16/fp16 written with stochastic rounding (``stochastic_round``).
Deterministic: no atomics, a fixed summation order over indices.

Backends: Triton on CUDA (``es_update_triton``: full mode fused; lowrank the K indices' factors
generated once, then one GEMM + rounding pass over W). On CPU, full mode is one
fused C++ pass (``fastes._C.es_update_full``: noise regenerated per tile in L1, fp32 sums in
index order, rounding in the same pass); lowrank is a torch GEMM of the K factor streams
(filled in one ``noise_fill_many`` call) followed by the C++ rounding. Without the extension
the CPU path runs on torch (materialized noise, reference rounding).
"""

from __future__ import annotations

import math

import torch

from fastes import _backend
from fastes.noise import NoiseSpec, check_rank, member_noise_tensor, sr_tensor_id, tensor_id
from fastes.ops import member_noise
from fastes.ops.checks import check_tensor
from fastes.ops.dispatch import backends, choose
from fastes.ops.member_noise import fold_coefficients
from fastes.ops.stochastic_round import stochastic_round, stochastic_round_ref

BACKENDS = backends("reference", "cpu", "triton")
__all__ = ["BACKENDS", "es_direction_ref", "es_update", "es_update_ref", "fold_coefficients"]


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


def _direction_cpu(weight: torch.Tensor, noise: NoiseSpec, folded: list[tuple[int, float]], mode: str, rank: int,
                   name: str) -> torch.Tensor:
    """Σ_k c_k·E_k as a fresh fp32 tensor: one GEMM for lowrank, materialized noise for full (no extension)."""
    shape = tuple(weight.shape)
    if mode == "lowrank" and weight.dim() == 2 and folded:
        out_f, in_f = shape
        k = len(folded)
        flat = member_noise.stream_tensors(noise, name, [i for i, _ in folded], (in_f + out_f) * rank, 0,
                                           weight.device)
        coef = torch.tensor([c / math.sqrt(rank) for _, c in folded], dtype=torch.float32, device=weight.device)
        # columns (k, j) in index order: A_cat [out, K·r] = [c_0 A_0 / √r | c_1 A_1 / √r | ...], B_cat likewise
        a = (flat[:, in_f * rank :].reshape(k, out_f, rank) * coef[:, None, None]).permute(1, 0, 2)
        b = flat[:, : in_f * rank].reshape(k, in_f, rank).permute(1, 0, 2)
        return a.reshape(out_f, k * rank) @ b.reshape(in_f, k * rank).T
    total = torch.zeros(shape, dtype=torch.float32, device=weight.device)
    for index, c in folded:
        total.add_(member_noise.stream_tensor(noise, name, index, weight.numel(), 0, weight.device).view(shape),
                   alpha=c)
    return total


def _es_update_cpu(weight: torch.Tensor, noise: NoiseSpec, coeffs: torch.Tensor, lr: float, scale: float,
                   mode: str, rank: int, name: str) -> None:
    folded = fold_coefficients(noise, coeffs)
    if not folded or weight.numel() == 0:
        return  # nothing to add: W + 0 rounds back to W (as in the Triton path)
    lowrank = mode == "lowrank" and weight.dim() == 2
    fused = None if lowrank or weight.device.type != "cpu" else getattr(_backend.extension(), "es_update_full", None)
    if fused is not None:
        target = weight if weight.is_contiguous() else weight.contiguous()
        mult = lr * scale  # c_k·lr·s in fp64, used as fp32 by the kernel (as the Triton launcher does)
        fused(target, noise.seed, tensor_id(name), [i for i, _ in folded], [c * mult for _, c in folded],
              noise.step, noise.kind, sr_tensor_id(name))
        if target is not weight:
            weight.copy_(target)
        return
    direction = _direction_cpu(weight, noise, folded, mode, rank, name)
    updated = direction.mul_(lr * scale).add_(weight)  # = W + (lr·s)·direction, bit for bit, without a copy
    stochastic_round(updated, weight, noise.seed, name, noise.step)


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
    chosen = choose(backend, BACKENDS, weight)
    tensor_id(name)  # validates the name even when every coefficient folds to zero
    if weight.dim() == 1:
        mode = "full"
    args = (weight, noise, coeffs, lr, scale, mode, rank, name)
    if chosen == "reference":
        weight.copy_(es_update_ref(*args))
    elif chosen == "triton":
        from fastes.ops.es_update_triton import es_update_triton  # imports Triton: only when asked for

        es_update_triton(*args)
    else:
        _es_update_cpu(*args)
    return weight
