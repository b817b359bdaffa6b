"""perturbed_linear: y_t = x_t (W + σ·s·E_m(t))ᵀ + b for rows tagged with their member.

Reference: materializes W + σ·s·E_m per member (the oracle).
CPU path: one shared GEMM, then per member either the low-rank term (x B) Aᵀ/√r
with A, B drawn by the C++ noise fill, or a dense GEMM on W + σ·s·E_m.
Triton path (CUDA, and the interpreter in tests): noise generated inside the kernel.
"""

from __future__ import annotations

import math

import torch

from fastes.noise import NoiseSpec
from fastes.ops import member_noise
from fastes.ops.checks import check_noise_args, check_row_member, check_same, check_tensor, members_present

BACKENDS = ("auto", "reference", "cpu", "triton")


def perturbed_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         row_member: torch.Tensor | None, noise: NoiseSpec | None, sigma: float, scale: float,
                         mode: str, rank: int, name: str) -> torch.Tensor:
    """Oracle: fp32 matmul against the explicitly materialized W + σ·s·E_m of each member."""
    x32 = x.float().cpu()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    args = (noise, sigma, scale, mode, rank, name)
    for rows, w in member_noise.reference_weights(weight, row_member, x.shape[0], *args):
        out[rows] = x32[rows] @ w.T
    if bias is not None:
        out += bias.float().cpu()
    return out.to(device=x.device, dtype=x.dtype)


def _member_segments(row_member: torch.Tensor) -> list[tuple[int, slice | torch.Tensor]]:
    """(member, rows) per member present; rows sorted by member (the engine's order) come as slices."""
    out: list[tuple[int, slice | torch.Tensor]] = []
    for m in members_present(row_member):
        rows = (row_member == m).nonzero().squeeze(1)
        first, last = int(rows[0]), int(rows[-1])
        out.append((m, slice(first, last + 1) if last - first + 1 == rows.numel() else rows))
    return out


def _perturbed_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          row_member: torch.Tensor | None, noise: NoiseSpec | None, sigma: float, scale: float,
                          mode: str, rank: int, name: str) -> torch.Tensor:
    """Shared base GEMM, then each member's term on its own rows (the C++ fill draws the noise).

    lowrank: (X_m B_m) A_mᵀ·σ·s/√r, 2·rows·(in + out)·r FLOPs per member; full: X_m E_mᵀ·σ·s.
    """
    out = torch.nn.functional.linear(x, weight, bias)
    if noise is None or sigma == 0 or row_member is None:
        return out
    for m, rows in _member_segments(row_member):
        xs = x[rows].float()
        if mode == "lowrank":
            a, b, sign = member_noise.lowrank_factors(noise, name, m, weight.shape[0], weight.shape[1], rank, x.device)
            delta = (xs @ b) @ (a.T * (sign * sigma * scale / math.sqrt(rank)))
        else:
            delta = (xs @ member_noise.dense(noise, name, m, tuple(weight.shape), x.device).T) * (sigma * scale)
        out[rows] += delta.to(out.dtype)
    return out


def perturbed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     row_member: torch.Tensor | None = None, noise: NoiseSpec | None = None, sigma: float = 0.0,
                     scale: float = 1.0, mode: str = "lowrank", rank: int = 1, name: str = "weight",
                     num_members: int | None = None, backend: str = "auto") -> torch.Tensor:
    """x [T, in] · (W [out, in] + σ·s·E_m)ᵀ + b; row_member [T] holds each row's member (−1: unperturbed).

    ``mode`` is ``lowrank`` or ``full`` (LoRA adapters have their own op). ``num_members``,
    when given, bounds the member ids. ``backend``: auto (Triton on CUDA, torch+C++ on CPU),
    reference, cpu or triton.
    """
    check_tensor(x, "x", 2)
    check_tensor(weight, "weight", 2)
    check_same(x, weight, "x", "weight")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but weight expects {weight.shape[1]}")
    if bias is not None:
        check_tensor(bias, "bias", 1)
        check_same(bias, weight, "bias", "weight")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries for {weight.shape[0]} outputs")
    check_row_member(row_member, x.shape[0], x.device, num_members)
    check_noise_args(noise, sigma, mode, rank, weight.shape[0], weight.shape[1])
    if mode not in ("lowrank", "full"):
        raise ValueError(f"mode must be 'lowrank' or 'full' for perturbed_linear, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    args = (x, weight, bias, row_member, noise, sigma, scale, mode, rank, name)
    if backend == "reference":
        return perturbed_linear_ref(*args)
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        from fastes.ops.perturbed_linear_triton import perturbed_linear_triton

        return perturbed_linear_triton(*args)
    return _perturbed_linear_cpu(*args)
