"""perturbed_linear_group: several weights on the same x (q/k/v, gate/up) equal one perturbed_linear each.

On the torch and reference backends the group is one call per weight (bitwise). On Triton lowrank one
shrink launch writes every name's H: it must be bitwise the per-weight launches (same tiles and K splits,
each name's own stream and σ·s), within tolerance of the reference, and generate each name's B once.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastes.noise import NoiseSpec
from fastes.ops import work_count
from fastes.ops._triton import TRITON_ERROR
from fastes.ops.perturbed_linear import perturbed_linear, perturbed_linear_group, perturbed_linear_ref

NAMES = [f"model.layers.1.self_attn.{p}_proj.weight" for p in ("q", "k", "v")] + ["model.layers.1.mlp.up_proj.weight"]
TOL = 1e-5  # fp32, as tests/test_perturbed_linear.py
needs_triton = pytest.mark.skipif(TRITON_ERROR is not None, reason=f"triton unusable: {TRITON_ERROR}")


def _group(rng: torch.Generator, rows: int, in_f: int, outs: list[int], members: int, ordered: bool = True,
           per_member: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
    """x, weights, biases (every other one None), row_member with -1 rows (``per_member``: sorted equal runs)."""
    x = torch.randn(rows, in_f, generator=rng)
    ws = [torch.randn(o, in_f, generator=rng) / math.sqrt(in_f) for o in outs]
    bs = [torch.randn(o, generator=rng) if i % 2 == 0 else None for i, o in enumerate(outs)]
    if per_member:
        rm = torch.arange(members).repeat_interleave(per_member)[:rows]
        rm = torch.cat([rm, torch.full((rows - rm.numel(),), -1)])
    else:
        rm = torch.randint(-1, members, (rows,), generator=rng)
        rm = rm.sort().values if ordered else rm
    return x, ws, bs, rm


def _spec(rng: torch.Generator, kind: str, anti: bool) -> NoiseSpec:
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3 + 1
    return NoiseSpec(seed=seed, step=int(torch.randint(0, 2**32, (1,), generator=rng)), kind=kind, antithetic=anti)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mode,anti,ordered", [("lowrank", True, True), ("lowrank", False, False),
                                               ("full", True, True)])
def test_torch_backends_are_the_per_weight_calls_bitwise(rng, backend, mode, anti, ordered):
    x, ws, bs, rm = _group(rng, 29, 33, [17, 9, 9], 5, ordered)
    noise, scales = _spec(rng, "gaussian", anti), [0.7, 1.3, 2.1]
    got = perturbed_linear_group(x, ws, bs, NAMES[:3], rm, noise, 0.3, scales, mode, 2, backend=backend)
    for g, (w, b, s, n) in enumerate(zip(ws, bs, scales, NAMES, strict=False)):
        want = perturbed_linear(x, w, b, rm, noise, 0.3, s, mode, 2, n, backend=backend)
        assert torch.equal(got[g], want), g


# kind, rank, antithetic, ordered, rows, in, outs, members, per_member (0: random rows)
TRITON_CASES = [
    ("gaussian", 1, True, True, 37, 65, [33, 17, 17], 6, 0),        # odd shapes: element-wise noise
    ("rademacher", 4, False, False, 23, 65, [40, 24], 8, 0),        # unsorted rows, gate/up-like pair
    ("gaussian", 3, True, True, 40, 128, [33, 17, 17, 9], 9, 4),    # 4 weights: shrinks of 3 + 1; 8 members a tile
    ("rademacher", 1, True, True, 37, 64, [48, 16, 16], 3, 0),      # per-block noise (in % 32 == 0)
]


@needs_triton
@pytest.mark.parametrize("kind,rank,anti,ordered,rows,in_f,outs,members,per_member", TRITON_CASES)
def test_triton_group_is_the_per_weight_launches(rng, kind, rank, anti, ordered, rows, in_f, outs, members,
                                                 per_member):
    x, ws, bs, rm = _group(rng, rows, in_f, outs, members, ordered, per_member)
    noise = _spec(rng, kind, anti)
    scales = [0.5 + 0.4 * g for g in range(len(ws))]  # a name's σ·s must reach its own H
    names = NAMES[: len(ws)]
    got = perturbed_linear_group(x, ws, bs, names, rm, noise, 0.3, scales, "lowrank", rank, backend="triton")
    for g, (w, b, s, n) in enumerate(zip(ws, bs, scales, names, strict=True)):
        want = perturbed_linear(x, w, b, rm, noise, 0.3, s, "lowrank", rank, n, backend="triton")
        assert torch.equal(got[g], want), g
        ref = perturbed_linear_ref(x, w, b, rm, noise, 0.3, s, "lowrank", rank, n)
        torch.testing.assert_close(got[g], ref, rtol=TOL, atol=TOL * max(ref.abs().max().item(), 1.0))
        plain = torch.nn.functional.linear(x, w, b)
        assert (got[g][rm >= 0] - plain[rm >= 0]).abs().max() > 1e-3  # the noise is there


@needs_triton
@pytest.mark.parametrize("mode,sigma", [("full", 0.3), ("lowrank", 0.0)])
def test_triton_other_modes_and_unperturbed_are_the_per_weight_launches(rng, mode, sigma):
    x, ws, bs, rm = _group(rng, 21, 64, [33, 17], 3)
    noise = _spec(rng, "gaussian", True)
    got = perturbed_linear_group(x, ws, bs, NAMES[:2], rm, noise, sigma, [1.0, 2.0], mode, 1, backend="triton")
    for g in range(2):
        want = perturbed_linear(x, ws[g], bs[g], rm, noise, sigma, [1.0, 2.0][g], mode, 1, NAMES[g], backend="triton")
        assert torch.equal(got[g], want)


@needs_triton
@pytest.mark.parametrize("antithetic", [False, True])
def test_grouped_shrink_generates_each_names_factor_once(antithetic):
    """One shrink launch per 3 names, each name's B (in × r) once per noise index: names × indices × in × r;
    each GEMM its own A (out × r) once per index, as the per-weight launches do (tests/test_work_counts.py)."""
    out_f, in_f, rank, members = 64, 256, 2, 8
    rm = torch.arange(members).repeat_interleave(4)
    x = torch.randn(rm.numel(), in_f)
    ws = [torch.randn(out_f, in_f) for _ in range(4)]
    noise = NoiseSpec(seed=7, step=3, kind="gaussian", antithetic=antithetic)
    with work_count.counting() as counts:
        perturbed_linear_group(x, ws, [None] * 4, NAMES, rm, noise, 0.1, [1.0] * 4, "lowrank", rank,
                               backend="triton")
    indices = members // 2 if antithetic else members
    assert counts.kernels().count("_shrink_kernel") == 2  # 3 names + 1
    assert counts.values("_shrink_kernel") == 4 * indices * in_f * rank
    assert counts.values("_gemm_kernel") == 4 * indices * out_f * rank


def test_mismatched_lists_are_one_line_errors(rng):
    x, ws, bs, rm = _group(rng, 8, 16, [4, 4], 2)
    with pytest.raises(ValueError, match="one bias, name and scale per weight"):
        perturbed_linear_group(x, ws, bs[:1], NAMES[:2], rm)
    with pytest.raises(ValueError, match="one bias, name and scale per weight"):
        perturbed_linear_group(x, [], [], [], rm)
    with pytest.raises(ValueError, match="features"):
        perturbed_linear_group(x, [ws[0], torch.randn(4, 15)], bs, NAMES[:2], rm, backend="triton")
