"""LoRA adapters for ``mode="lora"`` populations: created here, perturbed by ``lora_linear``.

Layout follows PEFT so adapters can be exported as a PEFT checkpoint: for a target
weight ``X.weight`` [out, in] the adapters are ``X.lora_A.weight`` [r, in] and
``X.lora_B.weight`` [out, r], and the layer computes x Wᵀ + scaling · x Aᵀ Bᵀ with
scaling = alpha / r (alpha defaults to r, i.e. scaling 1).

Initialisation: B = 0, so the adapted model starts exactly at the base model; A is
Gaussian with std 1/√in, drawn from fastes' own generator (``fastes.noise``, key
``seed``, tensor id of ``"lora-init/" + A's name``) so every device and version makes
the same A. A must be non-zero: with B = 0, noise on B only moves the output through A.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from fastes.noise import materialize

LORA_INIT_PREFIX = "lora-init/"


def adapter_names(base: str) -> tuple[str, str]:
    """(A name, B name) of the adapters of base weight ``...X.weight``."""
    if not base.endswith(".weight"):
        raise ValueError(f"LoRA targets a weight, got {base!r}")
    stem = base[: -len(".weight")]
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


def target_weights(shapes: Mapping[str, tuple[tuple[int, ...], str]], targets: Iterable[str]) -> list[str]:
    """Base matrix names whose module short name (e.g. ``q_proj``) is in ``targets``."""
    targets = set(targets)
    out = [n for n, (shape, role) in shapes.items()
           if role == "matrix" and len(shape) == 2 and n.rsplit(".", 2)[-2] in targets]
    if not out:
        raise ValueError(f"no weight matches the LoRA targets {sorted(targets)}")
    return out


def init_adapters(base_names: list[str], shapes: Mapping[str, tuple[tuple[int, ...], str]], rank: int,
                  seed: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Fresh adapters (A Gaussian std 1/√in from ``seed``, B = 0) for each base weight."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    out: dict[str, torch.Tensor] = {}
    for base in base_names:
        out_f, in_f = shapes[base][0]
        if rank > min(out_f, in_f):
            raise ValueError(f"LoRA rank {rank} exceeds min(out, in) = {min(out_f, in_f)} of {base}")
        name_a, name_b = adapter_names(base)
        a = materialize(seed, LORA_INIT_PREFIX + name_a, 0, (rank, in_f)) / math.sqrt(in_f)
        out[name_a] = a.to(device=device, dtype=dtype)
        out[name_b] = torch.zeros(out_f, rank, device=device, dtype=dtype)
    return out


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling · B A in fp32, cast back: the plain weight an HF model needs."""
    return (weight.float() + scaling * (lora_b.float() @ lora_a.float())).to(weight.dtype)


__all__ = ["adapter_names", "target_weights", "init_adapters", "merged_weight", "LORA_INIT_PREFIX"]
