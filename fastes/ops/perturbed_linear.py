"""perturbed_linear: y_t = x_t (W + σ·s·E_m(t))ᵀ + b for rows tagged with their member.

Reference: materializes W + σ·s·E_m per member (the oracle).
CPU path: one shared GEMM, then per member either the low-rank term (x B) Aᵀ/√r
with A, B drawn by the C++ noise fill, or a dense GEMM on W + σ·s·E_m.
Triton path (CUDA, and the interpreter in tests): noise generated inside the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastes.noise import NoiseSpec
from fastes.ops import member_noise
from fastes.ops.checks import (
    TensorMemo,
    check_noise_args,
    check_row_member,
    check_same,
    check_tensor,
    members_present,
)
from fastes.ops.dispatch import backends, choose

BACKENDS = backends("reference", "cpu", "triton")


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


@dataclass
class _Layout:
    """Where each member's rows are in one row_member tensor.

    ``rows`` holds, per member, a (start, end) slice when every member's rows form one contiguous
    run (the engine sorts rows by member), else a tensor of row indices. ``equal``: contiguous
    runs of one length covering every row, so x is a free [M, C, in] view. ``padded``: for unequal
    runs, (gather [M·Cmax] row of each padded slot, where [R] slot of each member row, rows [R] or
    None when they are all rows in order), set when padding to the longest run at most doubles the rows.
    """

    members: list[int]
    rows: list[tuple[int, int] | torch.Tensor]
    equal: bool = False
    padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None


def _padding(rows: list[tuple[int, int] | torch.Tensor], total: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Indices that lay the members' rows out as [M, Cmax] (pad slots read row 0), or None if too sparse."""
    idx = [torch.arange(r[0], r[1]) if isinstance(r, tuple) else r.cpu() for r in rows]
    longest = max(i.numel() for i in idx)
    count = sum(i.numel() for i in idx)
    if longest * len(idx) > 2 * count:
        return None
    gather = torch.zeros(len(idx), longest, dtype=torch.long)
    where = []
    for j, i in enumerate(idx):
        gather[j, : i.numel()] = i
        where.append(torch.arange(i.numel()) + j * longest)
    member_rows = torch.cat(idx)
    covering = count == total and bool((member_rows == torch.arange(total)).all())
    return (gather.view(-1).to(device), torch.cat(where).to(device),
            None if covering else member_rows.to(device))


def _layout(row_member: torch.Tensor) -> _Layout:
    total = row_member.numel()
    if total == 0:
        return _Layout([], [])
    bounds = (torch.nonzero(row_member[1:] != row_member[:-1]).squeeze(1) + 1).tolist()
    starts, ends = [0, *bounds], [*bounds, total]
    run_members = row_member[torch.tensor(starts, dtype=torch.long, device=row_member.device)].tolist()
    runs = [(int(m), s, e) for m, s, e in zip(run_members, starts, ends, strict=True) if m >= 0]
    if len({m for m, _, _ in runs}) == len(runs):
        equal = len(runs) == len(starts) and len({e - s for _, s, e in runs}) == 1
        rows: list[tuple[int, int] | torch.Tensor] = [(s, e) for _, s, e in runs]
        padded = None if equal or not runs else _padding(rows, total, row_member.device)
        return _Layout([m for m, _, _ in runs], rows, equal, padded)
    members = members_present(row_member)
    rows = [(row_member == m).nonzero().squeeze(1) for m in members]
    return _Layout(members, rows, False, _padding(rows, total, row_member.device) if rows else None)


_layouts = TensorMemo()  # of the forward's row_member: every linear shares it


def _member_term(x: torch.Tensor, out: torch.Tensor, noise: NoiseSpec, sigma: float, scale: float, name: str,
                 member: int) -> None:
    """out += x (σ·s·E_m)ᵀ for rows x of one member in full mode, in place (fp32 math).

    The cached E with the sign folded into alpha: no copy of an [out, in] matrix per call.
    """
    e, sign = member_noise.dense_unsigned(noise, name, member, (out.shape[1], x.shape[1]), x.device)
    if out.dtype == torch.float32:
        out.addmm_(x.float(), e.t(), alpha=sign * sigma * scale)
    else:
        out.add_((torch.mm(x.float(), e.t()) * (sign * sigma * scale)).to(out.dtype))


def _perturbed_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          row_member: torch.Tensor | None, noise: NoiseSpec | None, sigma: float, scale: float,
                          mode: str, rank: int, name: str) -> torch.Tensor:
    """Shared base GEMM, then every member's term on its own rows (the C++ fill draws the noise).

    Lowrank adds (X_m B_m) A_mᵀ·σ·s/√r (2·rows·(in + out)·r FLOPs) from the step's stacked factors
    (``_lowrank_terms``); full adds X_m E_mᵀ·σ·s one member at a time, on a row slice (sorted rows:
    mixed prefill and decode) or gathered rows (unsorted).
    """
    out = torch.nn.functional.linear(x, weight, bias)
    if noise is None or sigma == 0 or row_member is None:
        return out
    layout = _layouts.get(row_member)
    if layout is None:
        layout = _layout(row_member)
        _layouts.put(row_member, layout)
    assert isinstance(layout, _Layout)
    if mode == "lowrank" and layout.members:
        _lowrank_terms(x, out, layout, noise, sigma * scale / math.sqrt(rank), rank, name)
        return out
    for m, rows in zip(layout.members, layout.rows, strict=True):
        if isinstance(rows, tuple):
            _member_term(x[rows[0] : rows[1]], out[rows[0] : rows[1]], noise, sigma, scale, name, m)
        else:
            part = torch.zeros(rows.numel(), out.shape[1], dtype=out.dtype, device=out.device)
            _member_term(x[rows], part, noise, sigma, scale, name, m)
            out.index_add_(0, rows, part)
    return out


def _lowrank_terms(x: torch.Tensor, out: torch.Tensor, layout: _Layout, noise: NoiseSpec, coeff: float, rank: int,
                   name: str) -> None:
    """out += (X_m B_m)(coeff·sign_m·A_m)ᵀ for every member, with the step's stacked (transposed) factors.

    Equal runs (the engine's decode steps) go as two batched matmuls over a free [M, C, in] view;
    unequal ones as the same two over rows gathered into [M, Cmax, in] (padding at most doubling them);
    other layouts member by member, on a row slice (sorted rows) or gathered rows (unsorted).
    """
    num, out_f, in_f = len(layout.members), out.shape[1], x.shape[1]
    a_t, b_t = member_noise.stacked_lowrank(noise, name, tuple(layout.members), out_f, in_f, rank, x.device,
                                            coeff)  # [M, r, out] signed and scaled, [M, r, in]
    if layout.equal:
        xs = x.view(num, -1, in_f).float()
        if out.dtype == torch.float32:  # added in place: one pass over Y instead of three
            out.view(num, -1, out_f).baddbmm_(torch.bmm(xs, b_t.transpose(1, 2)), a_t)
        else:
            out.view(num, -1, out_f).add_(torch.bmm(torch.bmm(xs, b_t.transpose(1, 2)), a_t).to(out.dtype))
        return
    if layout.padded is not None:  # unequal runs (decode after some sequences ended): 5 ops, not 3 per member
        gather, where, member_rows = layout.padded
        xs = x.index_select(0, gather).view(num, -1, in_f).float()
        term = torch.bmm(torch.bmm(xs, b_t.transpose(1, 2)), a_t).view(-1, out_f).index_select(0, where)
        term = term.to(out.dtype)
        if member_rows is None:
            out.add_(term)
        else:
            out.index_add_(0, member_rows, term)
        return
    for i, rows in enumerate(layout.rows):
        part = out[rows[0] : rows[1]] if isinstance(rows, tuple) else \
            torch.zeros(rows.numel(), out_f, dtype=out.dtype, device=out.device)
        xm = x[rows[0] : rows[1]] if isinstance(rows, tuple) else x[rows]
        h = torch.mm(xm.float(), b_t[i].t())
        if out.dtype == torch.float32:
            part.addmm_(h, a_t[i])
        else:
            part.add_(torch.mm(h, a_t[i]).to(out.dtype))
        if not isinstance(rows, tuple):
            out.index_add_(0, rows, part)


def perturbed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     row_member: torch.Tensor | None = None, noise: NoiseSpec | None = None, sigma: float = 0.0,
                     scale: float = 1.0, mode: str = "lowrank", rank: int = 1, name: str = "weight",
                     num_members: int | None = None, backend: str = "auto") -> torch.Tensor:
    """x [T, in] · (W [out, in] + σ·s·E_m)ᵀ + b; row_member [T] holds each row's member (−1: unperturbed).

    ``mode`` is ``lowrank`` or ``full`` (LoRA adapters have their own op). ``num_members``,
    when given, bounds the member ids. ``backend``: auto (Triton on CUDA, torch+C++ on CPU),
    reference, cpu or triton.
    """
    _check_args(x, weight, bias, row_member, noise, sigma, mode, rank, num_members)
    chosen = choose(backend, BACKENDS, x)
    args = (x, weight, bias, row_member, noise, sigma, scale, mode, rank, name)
    if chosen == "reference":
        return perturbed_linear_ref(*args)
    if chosen == "triton":
        from fastes.ops.perturbed_linear_triton import perturbed_linear_triton

        return perturbed_linear_triton(*args)
    return _perturbed_linear_cpu(*args)


def perturbed_linear_group(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                           names: Sequence[str], row_member: torch.Tensor | None = None,
                           noise: NoiseSpec | None = None, sigma: float = 0.0, scales: Sequence[float] | None = None,
                           mode: str = "lowrank", rank: int = 1, num_members: int | None = None,
                           backend: str = "auto") -> list[torch.Tensor]:
    """``perturbed_linear`` of several weights that read the same x (q/k/v, gate/up): one output per weight.

    Triton lowrank: one shrink launch H = x·B_m serves up to 3 weights (docs/design.md, "Kernels on an H100,
    before any GPU"), then each weight's GEMM with its H; every other case is one call per weight, so
    results are those of ``perturbed_linear``: bitwise on the torch and reference backends and under the
    Triton interpreter; on a GPU the group's H may sum fewer K splits (fp32 rounding order only).
    ``scales``: s of each weight (default 1).
    """
    scales = [1.0] * len(weights) if scales is None else list(scales)
    if not len(weights) == len(biases) == len(names) == len(scales) or not weights:
        raise ValueError(f"perturbed_linear_group needs one bias, name and scale per weight, got {len(weights)} "
                         f"weights, {len(biases)} biases, {len(names)} names, {len(scales)} scales")
    chosen = choose(backend, BACKENDS, x)
    if chosen != "triton" or mode != "lowrank":
        return [perturbed_linear(x, w, b, row_member, noise, sigma, s, mode, rank, n, num_members, chosen)
                for w, b, s, n in zip(weights, biases, scales, names, strict=True)]
    for w, b in zip(weights, biases, strict=True):
        _check_args(x, w, b, row_member, noise, sigma, mode, rank, num_members)
    from fastes.ops.perturbed_linear_triton import lowrank_shrink, perturbed_linear_triton

    if noise is None or row_member is None or sigma == 0 or x.shape[0] == 0:
        return [perturbed_linear_triton(x, w, b, row_member, noise, sigma, s, mode, rank, n)
                for w, b, s, n in zip(weights, biases, scales, names, strict=True)]
    outs = []
    for c in range(0, len(weights), 3):  # the shrink kernel takes up to 3 names
        part = range(c, min(c + 3, len(weights)))
        h, splits = lowrank_shrink(x, row_member, noise, [names[i] for i in part],
                                   [float(sigma * scales[i] / math.sqrt(rank)) for i in part], rank)
        outs += [perturbed_linear_triton(x, weights[i], biases[i], row_member, noise, sigma, scales[i], mode, rank,
                                         names[i], shrunk=(h[g], splits)) for g, i in enumerate(part)]
    return outs


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_member: torch.Tensor | None,
                noise: NoiseSpec | None, sigma: float, mode: str, rank: int, num_members: int | None) -> None:
    """One-line errors for bad inputs of ``perturbed_linear`` (one weight)."""
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
