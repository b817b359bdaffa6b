"""perturbed_embedding: rows of (W + σ·s·E_m) looked up per token, E_m never stored.

lowrank: row id of E_m is A_m[id] B_mᵀ/√r; full: row id of the dense E_m, i.e.
stream elements id·H .. id·H + H − 1, so only the looked-up rows are generated.

Triton path: ``perturbed_embedding_triton`` (only the looked-up rows of E_m are generated).
"""

from __future__ import annotations

import math

import torch

from fastes.noise import NoiseSpec
from fastes.ops import member_noise
from fastes.ops.checks import check_noise_args, check_row_member, check_tensor, members_present, values_checkable
from fastes.ops.dispatch import backends, choose
from fastes.ops.perturbed_embedding_triton import perturbed_embedding_triton

BACKENDS = backends("reference", "cpu", "triton")
__all__ = ["BACKENDS", "perturbed_embedding", "perturbed_embedding_ref", "perturbed_embedding_triton"]


def perturbed_embedding_ref(ids: torch.Tensor, weight: torch.Tensor, row_member: torch.Tensor | None,
                            noise: NoiseSpec | None, sigma: float, scale: float, mode: str, rank: int,
                            name: str) -> torch.Tensor:
    """Oracle: index the explicitly materialized W + σ·s·E_m of each member."""
    ids_cpu = ids.cpu().long()
    out = torch.empty(ids.shape[0], weight.shape[1], dtype=torch.float32)
    args = (noise, sigma, scale, mode, rank, name)
    for rows, w in member_noise.reference_weights(weight, row_member, ids.shape[0], *args):
        out[rows] = w[ids_cpu[rows]]
    return out.to(device=weight.device, dtype=weight.dtype)


def _perturbed_embedding_cpu(ids: torch.Tensor, weight: torch.Tensor, row_member: torch.Tensor | None,
                             noise: NoiseSpec | None, sigma: float, scale: float, mode: str, rank: int,
                             name: str) -> torch.Tensor:
    """Gather, then add each member's noise rows in fp32 (one rounding, like the reference)."""
    out = weight.index_select(0, ids)
    if noise is None or sigma == 0 or row_member is None:
        return out
    out = out.float()
    hidden = weight.shape[1]
    for m in members_present(row_member):
        rows = (row_member == m).nonzero().squeeze(1)
        tok = ids.index_select(0, rows).long()
        if mode == "lowrank":
            a, b, sign = member_noise.lowrank_factors(noise, name, m, weight.shape[0], hidden, rank, weight.device)
            delta = a.index_select(0, tok) @ b.T * (sign * sigma * scale / math.sqrt(rank))
        else:
            index, sign = noise.member(m)
            delta = torch.empty(rows.numel(), hidden, dtype=torch.float32, device=weight.device)
            for j, t in enumerate(tok.tolist()):  # only the looked-up rows of E_m are generated
                delta[j] = member_noise.stream_tensor(noise, name, index, hidden, t * hidden, weight.device)
            delta *= sign * sigma * scale
        out.index_add_(0, rows, delta)
    return out.to(weight.dtype)


def perturbed_embedding(ids: torch.Tensor, weight: torch.Tensor, row_member: torch.Tensor | None = None,
                        noise: NoiseSpec | None = None, sigma: float = 0.0, scale: float = 1.0,
                        mode: str = "lowrank", rank: int = 1, name: str = "embed_tokens.weight",
                        num_members: int | None = None, backend: str = "auto") -> torch.Tensor:
    """ids [T] → [T, H] rows of W [V, H] perturbed per row's member (−1: unperturbed)."""
    check_tensor(ids, "ids", 1, (torch.int32, torch.int64))
    check_tensor(weight, "weight", 2)
    if ids.device != weight.device:
        raise ValueError(f"ids is on {ids.device} but weight is on {weight.device}")
    checkable = values_checkable(ids)  # the engine's ids come from the host, checked there
    if checkable and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
        raise ValueError(f"ids must be in [0, {weight.shape[0]}), got range [{int(ids.min())}, {int(ids.max())}]")
    check_row_member(row_member, ids.shape[0], ids.device, num_members)
    if checkable and row_member is not None and row_member.numel() and int(row_member.max()) >= 1 << 32:
        raise ValueError(f"row_member entries must be < 2**32, got {int(row_member.max())}")
    check_noise_args(noise, sigma, mode, rank, weight.shape[0], weight.shape[1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if mode not in ("lowrank", "full"):
        raise ValueError(f"mode must be 'lowrank' or 'full' for perturbed_embedding, got {mode!r}")
    chosen = choose(backend, BACKENDS, weight)
    args = (ids, weight, row_member, noise, sigma, scale, mode, rank, name)
    if chosen == "reference":
        return perturbed_embedding_ref(*args)
    if chosen == "triton":
        return perturbed_embedding_triton(*args)
    return _perturbed_embedding_cpu(*args)
