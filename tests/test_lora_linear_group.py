"""lora_linear_group: several LoRA weights on the same x (q/k/v, gate/up) equal one lora_linear each.

On the torch and reference backends the group is one call per weight (bitwise). On Triton one shrink launch
writes every adapter's partials: the outputs must be bitwise the per-weight launches (same tiles and K splits
under the interpreter, each name's own A and stream), within tests/test_lora_linear.py's tolerance of the
reference, and generate each name's E_A once per noise index.
"""

from __future__ import annotations

import pytest
import torch

from fastes.noise import NoiseSpec
from fastes.ops import work_count
from fastes.ops._triton import TRITON_ERROR
from fastes.ops.lora_linear import lora_linear, lora_linear_group, lora_shrink_group

PROJ = ("q", "k", "v", "o")
NAMES_A = [f"model.layers.1.self_attn.{p}_proj.lora_A.weight" for p in PROJ]
NAMES_B = [f"model.layers.1.self_attn.{p}_proj.lora_B.weight" for p in PROJ]
needs_triton = pytest.mark.skipif(TRITON_ERROR is not None, reason=f"triton unusable: {TRITON_ERROR}")


def _group(rng: torch.Generator, rows: int, in_f: int, outs: list[int], rank: int, members: int,
           per_member: int = 0, ordered: bool = True):
    """x, weights, biases (every other one None), A's, B's, row_member with -1 rows (``per_member``: sorted runs)."""
    x = torch.randn(rows, in_f, generator=rng)
    ws = [torch.randn(o, in_f, generator=rng) / in_f**0.5 for o in outs]
    bs = [torch.randn(o, generator=rng) if i % 2 == 0 else None for i, o in enumerate(outs)]
    a_s = [torch.randn(rank, in_f, generator=rng) / in_f**0.5 for _ in outs]
    b_s = [torch.randn(o, rank, generator=rng) * 0.5 for o in outs]
    if per_member:
        rm = torch.arange(members).repeat_interleave(per_member)[:rows]
        rm = torch.cat([rm, torch.full((rows - rm.numel(),), -1)])
    else:
        rm = torch.randint(-1, members, (rows,), generator=rng)
        rm = rm.sort().values if ordered else rm
    return x, ws, bs, a_s, b_s, rm


def _spec(rng: torch.Generator, kind: str, anti: bool) -> NoiseSpec:
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3 + 1
    return NoiseSpec(seed=seed, step=int(torch.randint(0, 2**32, (1,), generator=rng)), kind=kind, antithetic=anti)


def _per_weight(x, ws, bs, a_s, b_s, rm, noise, sigma, backend):
    return [lora_linear(x, w, b, a, bb, 1.7, rm, noise, sigma, na, nb, backend=backend)
            for w, b, a, bb, na, nb in zip(ws, bs, a_s, b_s, NAMES_A, NAMES_B, strict=False)]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("anti,ordered", [(True, True), (False, False)])
def test_torch_backends_are_the_per_weight_calls_bitwise(rng, backend, anti, ordered):
    x, ws, bs, a_s, b_s, rm = _group(rng, 29, 33, [17, 9, 9], 4, 5, ordered=ordered)
    noise = _spec(rng, "gaussian", anti)
    got = lora_linear_group(x, ws, bs, a_s, b_s, 1.7, rm, noise, 0.3, NAMES_A[:3], NAMES_B[:3], backend=backend)
    for g, want in enumerate(_per_weight(x, ws, bs, a_s, b_s, rm, noise, 0.3, backend)):
        assert torch.equal(got[g], want), g


# kind, rank, antithetic, ordered, rows, in, outs, members, per_member (0: random rows)
TRITON_CASES = [
    ("gaussian", 8, True, True, 37, 65, [33, 17, 17], 6, 0),        # odd shapes, q/k/v-like, -1 rows
    ("rademacher", 4, False, False, 23, 65, [40, 24], 8, 0),        # unsorted rows, gate/up-like pair
    ("gaussian", 3, True, True, 40, 128, [33, 17, 17, 9], 9, 4),    # 4 weights: shrinks of 3 + 1; 8 members a tile
    ("rademacher", 8, True, True, 37, 64, [48, 16, 16], 3, 0),      # per-block noise (in % 32 == 0)
]


@needs_triton
@pytest.mark.parametrize("kind,rank,anti,ordered,rows,in_f,outs,members,per_member", TRITON_CASES)
def test_triton_group_is_the_per_weight_launches(rng, kind, rank, anti, ordered, rows, in_f, outs, members,
                                                 per_member):
    x, ws, bs, a_s, b_s, rm = _group(rng, rows, in_f, outs, rank, members, per_member, ordered)
    noise = _spec(rng, kind, anti)
    n = len(ws)
    got = lora_linear_group(x, ws, bs, a_s, b_s, 1.7, rm, noise, 0.3, NAMES_A[:n], NAMES_B[:n], backend="triton")
    wants = _per_weight(x, ws, bs, a_s, b_s, rm, noise, 0.3, "triton")
    refs = _per_weight(x, ws, bs, a_s, b_s, rm, noise, 0.3, "reference")
    plains = _per_weight(x, ws, bs, a_s, b_s, rm, None, 0.0, "reference")
    for g in range(n):
        assert torch.equal(got[g], wants[g]), g
        # tests/test_lora_linear.py's fp32 tolerance: 1e-5 relative to the output's magnitude
        torch.testing.assert_close(got[g], refs[g], rtol=1e-5, atol=1e-5 * float(refs[g].abs().max()))
        assert (got[g][rm >= 0] - plains[g][rm >= 0]).abs().max() > 1e-3  # the noise is there


@needs_triton
def test_triton_unperturbed_group_is_the_per_weight_launches(rng):
    x, ws, bs, a_s, b_s, rm = _group(rng, 21, 64, [33, 17], 8, 3)
    for noise, sigma in ((_spec(rng, "gaussian", True), 0.0), (None, 0.3)):
        got = lora_linear_group(x, ws, bs, a_s, b_s, 1.7, rm, noise, sigma, NAMES_A[:2], NAMES_B[:2],
                                backend="triton")
        for g, want in enumerate(_per_weight(x, ws, bs, a_s, b_s, rm, noise, sigma, "triton")):
            assert torch.equal(got[g], want), g


@needs_triton
def test_grouped_shrink_partials_are_each_names_own(rng):
    """The name axis picks each program's A and stream: partial g equals the single-name launch of name g."""
    x, _, _, a_s, _, rm = _group(rng, 40, 160, [8, 8, 8], 8, 4, per_member=8)  # in spans 2 K tiles
    noise = _spec(rng, "gaussian", False)
    parts = lora_shrink_group(x, a_s[:3], rm, noise, 0.3, NAMES_A[:3])
    assert parts.shape == (3, 2, 40, 8) and not parts.isnan().any()
    for g in range(3):
        assert torch.equal(parts[g], lora_shrink_group(x, [a_s[g]], rm, noise, 0.3, [NAMES_A[g]])[0]), g
    assert not torch.equal(parts[1], parts[2])


@needs_triton
@pytest.mark.parametrize("antithetic", [False, True])
def test_grouped_shrink_generates_each_names_noise_once(antithetic):
    """One shrink launch per 3 adapters, each name's E_A (r × in) once per noise index: names × indices × in × r;
    each expand its own E_B (out × r) once per index (tests/test_work_counts.py)."""
    out_f, in_f, rank, members = 64, 256, 4, 8
    rm = torch.arange(members).repeat_interleave(4)
    x = torch.randn(rm.numel(), in_f)
    ws, a_s = [torch.randn(out_f, in_f) for _ in range(4)], [torch.randn(rank, in_f) for _ in range(4)]
    b_s = [torch.randn(out_f, rank) for _ in range(4)]
    noise = NoiseSpec(seed=7, step=3, kind="gaussian", antithetic=antithetic)
    with work_count.counting() as counts:
        lora_linear_group(x, ws, [None] * 4, a_s, b_s, 2.0, rm, noise, 0.1, NAMES_A, NAMES_B, backend="triton")
    indices = members // 2 if antithetic else members
    assert counts.kernels().count("_shrink_kernel") == 2  # 3 names + 1
    assert counts.kernels().count("_expand_kernel") == 4
    assert counts.values("_shrink_kernel") == 4 * indices * in_f * rank
    assert counts.values("_expand_kernel") == 4 * indices * out_f * rank


def test_mismatched_lists_are_one_line_errors(rng):
    x, ws, bs, a_s, b_s, rm = _group(rng, 8, 16, [4, 4], 2, 2)
    with pytest.raises(ValueError, match="one bias, A, B and A/B name per weight"):
        lora_linear_group(x, ws, bs[:1], a_s, b_s, 1.0, rm, None, 0.0, NAMES_A[:2], NAMES_B[:2])
    with pytest.raises(ValueError, match="one bias, A, B and A/B name per weight"):
        lora_linear_group(x, [], [], [], [], 1.0, rm)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear_group(x, ws, bs, [a_s[0], torch.randn(2, 15)], b_s, 1.0, rm, None, 0.0, NAMES_A[:2],
                          NAMES_B[:2], backend="cpu")


@pytest.mark.gpu
def test_qwen_sized_group_on_gpu():
    """1.5B q/k/v (1536 → 1536, 256, 256), rank 8, bf16, 32 members × 16 sorted rows: the grouped launch (fewer K
    splits per adapter than alone) within bf16 rounding of the per-weight launches and of the reference."""
    gen = torch.Generator().manual_seed(5)
    hidden, rows, n, rank = 1536, 512, 32, 8
    x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16).cuda()
    outs = [1536, 256, 256]
    ws = [(torch.randn(o, hidden, generator=gen) / hidden**0.5).to(torch.bfloat16).cuda() for o in outs]
    bs = [torch.randn(o, generator=gen).to(torch.bfloat16).cuda() for o in outs]
    a_s = [(torch.randn(rank, hidden, generator=gen) / hidden**0.5).to(torch.bfloat16).cuda() for _ in outs]
    b_s = [(torch.randn(o, rank, generator=gen) * 0.1).to(torch.bfloat16).cuda() for o in outs]
    rm = torch.arange(n).repeat_interleave(rows // n).cuda()
    rm[::37] = -1
    noise = NoiseSpec(seed=2**45 + 3, step=9, kind="gaussian", antithetic=True)
    got = lora_linear_group(x, ws, bs, a_s, b_s, 2.0, rm, noise, 0.1, NAMES_A[:3], NAMES_B[:3], backend="triton")
    sub = torch.randperm(rows, generator=gen)[:128].cuda()
    for g in range(3):
        want = lora_linear(x, ws[g], bs[g], a_s[g], b_s[g], 2.0, rm, noise, 0.1, NAMES_A[g], NAMES_B[g],
                           backend="triton")
        ref = lora_linear(x[sub], ws[g], bs[g], a_s[g], b_s[g], 2.0, rm[sub], noise, 0.1, NAMES_A[g], NAMES_B[g],
                          backend="reference")
        atol = float(ref.float().abs().max()) * 2**-6
        torch.testing.assert_close(got[g].float(), want.float(), rtol=0, atol=atol)
        torch.testing.assert_close(got[g][sub].float(), ref.float(), rtol=0, atol=atol)
