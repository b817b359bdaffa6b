"""lora_linear: frozen W plus per-member perturbed adapters, batched like multi-LoRA.

y = x Wᵀ + b + scaling · x (A + σ·E_A,m)ᵀ (B + σ·E_B,m)ᵀ with A [r, in], B [out, r]
(the PEFT layout, so adapters save and load like PEFT's lora_A / lora_B).

Triton path (``lora_linear_triton``): the shared base GEMM, a shrink H = x A_mᵀ and an expand
y += scaling · H B_mᵀ with the adapters' noise generated in registers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastes.noise import NoiseSpec, member_noise_tensor
from fastes.ops import member_noise
from fastes.ops.checks import (
    check_noise_args,
    check_row_member,
    check_same,
    check_tensor,
    members_present,
    values_checkable,
)
from fastes.ops.dispatch import backends, choose
from fastes.ops.lora_linear_triton import (
    lora_expand_triton,
    lora_linear_triton,
    lora_shrink_group,
    lora_shrink_triton,
)

BACKENDS = backends("reference", "cpu", "triton")
__all__ = ["BACKENDS", "lora_expand_triton", "lora_linear", "lora_linear_group", "lora_linear_ref",
           "lora_linear_triton", "lora_shrink_group", "lora_shrink_triton", "members_present"]


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: float, row_member: torch.Tensor | None,
                    noise: NoiseSpec | None, sigma: float, name_a: str, name_b: str) -> torch.Tensor:
    """Oracle: materialize each member's adapters and apply them in fp32."""
    x32 = x.float().cpu()
    a32, b32 = lora_a.float().cpu(), lora_b.float().cpu()
    out = x32 @ weight.float().cpu().T
    if bias is not None:
        out += bias.float().cpu()
    members = row_member.cpu() if row_member is not None else torch.full((x.shape[0],), -1)
    for m in torch.unique(members).tolist():
        rows = members == m
        a, b = a32, b32
        if m >= 0 and noise is not None:
            a = a32 + sigma * member_noise_tensor(noise, name_a, m, tuple(lora_a.shape), "full")
            b = b32 + sigma * member_noise_tensor(noise, name_b, m, tuple(lora_b.shape), "full")
        out[rows] += scaling * (x32[rows] @ a.T) @ b.T
    return out.to(device=x.device, dtype=x.dtype)


def _lora_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scaling: float, row_member: torch.Tensor | None,
                     noise: NoiseSpec | None, sigma: float, name_a: str, name_b: str) -> torch.Tensor:
    out = torch.nn.functional.linear(x, weight, bias)
    if row_member is None or noise is None or sigma == 0:  # every member's adapters are the plain ones
        members = [-1]
        row_sets = {-1: torch.arange(x.shape[0], device=x.device)}
    else:
        members = [int(m) for m in torch.unique(row_member).tolist()]
        row_sets = {m: (row_member == m).nonzero().squeeze(1) for m in members}
    for m in members:
        rows = row_sets[m]
        a, b = lora_a.float(), lora_b.float()
        if m >= 0 and sigma != 0:
            a = a + sigma * member_noise.dense(noise, name_a, m, tuple(lora_a.shape), x.device)
            b = b + sigma * member_noise.dense(noise, name_b, m, tuple(lora_b.shape), x.device)
        delta = (x.index_select(0, rows).float() @ a.T) @ b.T * scaling
        out.index_add_(0, rows, delta.to(out.dtype))
    return out


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float = 1.0, row_member: torch.Tensor | None = None,
                noise: NoiseSpec | None = None, sigma: float = 0.0, name_a: str = "lora_A.weight",
                name_b: str = "lora_B.weight", num_members: int | None = None,
                backend: str = "auto") -> torch.Tensor:
    """x [T, in] through frozen W [out, in] and member-perturbed adapters A [r, in], B [out, r]."""
    _check_args(x, weight, bias, lora_a, lora_b, scaling, row_member, noise, sigma, num_members)
    chosen = choose(backend, BACKENDS, x)
    args = (x, weight, bias, lora_a, lora_b, scaling, row_member, noise, sigma, name_a, name_b)
    if chosen == "reference":
        return lora_linear_ref(*args)
    if chosen == "triton":
        return lora_linear_triton(*args)
    return _lora_linear_cpu(*args)


def lora_linear_group(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                      loras_a: Sequence[torch.Tensor], loras_b: Sequence[torch.Tensor], scaling: float = 1.0,
                      row_member: torch.Tensor | None = None, noise: NoiseSpec | None = None, sigma: float = 0.0,
                      names_a: Sequence[str] = (), names_b: Sequence[str] = (), num_members: int | None = None,
                      backend: str = "auto") -> list[torch.Tensor]:
    """``lora_linear`` of several weights that read the same x (q/k/v, gate/up): one output per weight.

    Triton: one shrink launch serves up to 3 adapters of one rank (docs/design.md, "Kernels on an H100,
    before any GPU"), then each weight's base GEMM and expand as ``lora_linear``. Results are those of
    ``lora_linear`` per weight: bitwise on the torch and reference backends (one call each) and under the
    Triton interpreter; on a GPU the group's H may sum fewer K splits (fp32 rounding order only).
    """
    n = len(weights)
    if not n or not len(biases) == len(loras_a) == len(loras_b) == len(names_a) == len(names_b) == n:
        raise ValueError(f"lora_linear_group needs one bias, A, B and A/B name per weight, got {n} weights, "
                         f"{len(biases)} biases, {len(loras_a)} A, {len(loras_b)} B, {len(names_a)} A names, "
                         f"{len(names_b)} B names")
    chosen = choose(backend, BACKENDS, x)
    if chosen != "triton" or len({a.shape[0] for a in loras_a}) != 1:  # lora_linear checks each weight
        return [lora_linear(x, w, b, a, bb, scaling, row_member, noise, sigma, na, nb, num_members, chosen)
                for w, b, a, bb, na, nb in zip(weights, biases, loras_a, loras_b, names_a, names_b, strict=True)]
    for w, b, a, bb in zip(weights, biases, loras_a, loras_b, strict=True):
        _check_args(x, w, b, a, bb, scaling, row_member, noise, sigma, num_members)
    outs = []
    for c in range(0, n, 3):  # the shrink kernel takes up to 3 adapters
        part = range(c, min(c + 3, n))
        parts = lora_shrink_group(x, [loras_a[i] for i in part], row_member, noise, sigma, [names_a[i] for i in part])
        outs += [lora_linear_triton(x, weights[i], biases[i], loras_a[i], loras_b[i], scaling, row_member, noise,
                                    sigma, names_a[i], names_b[i], parts=parts[g]) for g, i in enumerate(part)]
    return outs


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, row_member: torch.Tensor | None, noise: NoiseSpec | None,
                sigma: float, num_members: int | None) -> None:
    """One-line errors for bad inputs of ``lora_linear`` (one weight)."""
    check_tensor(x, "x", 2)
    check_tensor(weight, "weight", 2)
    check_tensor(lora_a, "lora_a", 2)
    check_tensor(lora_b, "lora_b", 2)
    check_same(x, weight, "x", "weight")
    for t, arg in ((lora_a, "lora_a"), (lora_b, "lora_b")):
        if t.device != x.device:
            raise ValueError(f"{arg} is on {t.device} but x is on {x.device}")
    out_f, in_f = weight.shape
    if x.shape[1] != in_f:
        raise ValueError(f"x has {x.shape[1]} features but weight expects {in_f}")
    if lora_a.shape[1] != in_f or lora_b.shape[0] != out_f or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(
            f"lora_a {tuple(lora_a.shape)} / lora_b {tuple(lora_b.shape)} do not fit weight {(out_f, in_f)}"
        )
    if not 1 <= lora_a.shape[0] <= min(out_f, in_f):
        raise ValueError(f"lora_a rank (rows) must be in [1, {min(out_f, in_f)}], got {lora_a.shape[0]}")
    if bias is not None:
        check_tensor(bias, "bias", 1)
        check_same(bias, weight, "bias", "weight")
        if bias.shape[0] != out_f:
            raise ValueError(f"bias has {bias.shape[0]} entries for {out_f} output features")
    check_row_member(row_member, x.shape[0], x.device, num_members)
    if row_member is not None and row_member.numel() and values_checkable(row_member) \
            and int(row_member.max()) >= 1 << 32:
        raise ValueError(f"row_member entries must be < 2**32, got {int(row_member.max())}")
    check_noise_args(noise, sigma, "full", 1, out_f, in_f)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"scaling must be a number, got {scaling!r}")
