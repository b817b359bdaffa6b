"""perturbed_linear: y_t = x_t (W + σ·s·E_m(t))ᵀ + b for rows tagged with their member.

Reference: materializes W + σ·s·E_m per member (the oracle).
CPU path: one shared GEMM, then per member either the low-rank term (x B) Aᵀ/√r
with A, B drawn by the C++ noise fill, or a dense GEMM on W + σ·s·E_m.
Triton path (CUDA, and the interpreter in tests): noise generated inside the kernel.
"""

from __future__ import annotations

import math
import weakref

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


class _Segments:
    """Member segments of one row_member tensor, computed once per forward and reused by every linear.

    The cache holds a weak reference to the tensor and its version counter, so a freed or
    modified tensor never hits.
    """

    def __init__(self) -> None:
        self.ref: weakref.ref[torch.Tensor] | None = None
        self.version = -1
        self.value: tuple[list[int], torch.Tensor, torch.Tensor, bool] | None = None

    def get(self, row_member: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor, bool]:
        """(members present, padded row index [M, C], validity mask [M, C], whether index is arange(T))."""
        if self.ref is not None and self.ref() is row_member and self.version == row_member._version:
            assert self.value is not None
            return self.value
        members = members_present(row_member)
        rows = [(row_member == m).nonzero().squeeze(1) for m in members]
        width = max((r.numel() for r in rows), default=0)
        index = torch.zeros(len(members), width, dtype=torch.long, device=row_member.device)
        valid = torch.zeros(len(members), width, dtype=torch.bool, device=row_member.device)
        for i, r in enumerate(rows):
            index[i, : r.numel()] = r
            valid[i, : r.numel()] = True
        dense_layout = bool(valid.all()) and index.numel() == row_member.numel() and bool(
            (index.reshape(-1) == torch.arange(index.numel(), device=index.device)).all())
        self.ref, self.version = weakref.ref(row_member), row_member._version
        self.value = (members, index, valid, dense_layout)
        return self.value


_segments = _Segments()


def _perturbed_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          row_member: torch.Tensor | None, noise: NoiseSpec | None, sigma: float, scale: float,
                          mode: str, rank: int, name: str) -> torch.Tensor:
    """Shared base GEMM, then every member's term at once on its own rows (the C++ fill draws the noise).

    Rows are gathered per member into a padded [M, C, in] batch; lowrank is two batched
    matmuls with the stacked factors, (X_m B_m) A_mᵀ·σ·s/√r (2·rows·(in + out)·r FLOPs);
    full is one batched matmul with the stacked dense E_m.
    """
    out = torch.nn.functional.linear(x, weight, bias)
    if noise is None or sigma == 0 or row_member is None:
        return out
    members, index, valid, dense_layout = _segments.get(row_member)
    if not members:
        return out
    # Sorted equal segments covering every row (the engine's usual layout) are a free view.
    xs = x.view(index.shape[0], index.shape[1], -1).float() if dense_layout else x[index].float()
    out_f, in_f = weight.shape
    if mode == "lowrank":
        factors = [member_noise.lowrank_factors(noise, name, m, out_f, in_f, rank, x.device) for m in members]
        coef = sigma * scale / math.sqrt(rank)
        b = torch.stack([f[1] for f in factors])  # [M, in, r]
        a = torch.stack([f[0] * (f[2] * coef) for f in factors])  # [M, out, r]
        if dense_layout and out.dtype == torch.float32:  # added in place: one pass over Y instead of three
            out.view(index.shape[0], index.shape[1], out_f).baddbmm_(torch.bmm(xs, b), a.transpose(1, 2))
            return out
        delta = torch.bmm(torch.bmm(xs, b), a.transpose(1, 2))
    else:
        e = torch.stack([member_noise.dense(noise, name, m, (out_f, in_f), x.device) for m in members])
        delta = torch.bmm(xs, e.transpose(1, 2)) * (sigma * scale)
    if dense_layout:
        out.view(delta.shape).add_(delta.to(out.dtype))
    else:
        out.index_put_((index[valid],), delta[valid].to(out.dtype), accumulate=True)
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
