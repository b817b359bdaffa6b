"""Counted work (DESIGN.md §3): the noise each Triton launch generates is the design minimum, nothing per row tile.

Counted under the interpreter by ``fastes.ops.work_count``; the expected numbers are computed here
from the shapes alone (members or noise indices present × the values of one member's noise).
Shapes are multiples of the interpreter's tiles, so no padding lane is generated, and each noise index's
rows sit inside one row tile, as a decode step's do (16 rows per member, 64- or 128-row tiles); row
tiles grow in number across each test's layouts while the count must not.
"""

from __future__ import annotations

import pytest
import torch

from fastes.noise import NoiseSpec
from fastes.ops import work_count
from fastes.ops._triton import TRITON_ERROR
from fastes.ops.lora_linear import lora_linear_triton
from fastes.ops.noise import noise_fill
from fastes.ops.perturbed_linear_triton import perturbed_linear_triton

pytestmark = pytest.mark.skipif(TRITON_ERROR is not None, reason=f"triton unusable: {TRITON_ERROR}")

OUT, IN = 64, 256  # one column tile of the interpreter's BN = 64; IN spans several K tiles


def _spec(kind: str = "gaussian", antithetic: bool = False) -> NoiseSpec:
    return NoiseSpec(seed=7, step=3, kind=kind, antithetic=antithetic)


def _rows(members: int, per_member: int) -> torch.Tensor:
    return torch.arange(members).repeat_interleave(per_member)


def _count(fn) -> work_count.WorkCount:
    with work_count.counting() as counts:
        fn()
    return counts


def test_counting_counts_a_fill_and_refuses_without_the_interpreter(monkeypatch):
    out = torch.empty(8192 * 2)
    counts = _count(lambda: noise_fill(out, 1, 2, 3, 0, 0, "gaussian", backend="triton"))
    assert counts.kernels() == ["_noise_fill_kernel"] and counts.values() == out.numel()
    assert counts.philox_calls() == out.numel() // 4
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"), work_count.counting():
        pass


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_full_rank_decode_generates_each_noise_index_once(kind, antithetic):
    """members present × numel per launch (halved with antithetic pairs), whatever the row tiling."""
    x, w = torch.randn(16, IN), torch.randn(OUT, IN)
    for members, per in ((8, 2), (4, 4), (4, 8)):  # 1, 1 and 2 row tiles of 16
        rm = _rows(members, per)
        xs = x.repeat(members * per // 16 + 1, 1)[: members * per]
        counts = _count(lambda rm=rm, xs=xs: perturbed_linear_triton(xs, w, None, rm, _spec(kind, antithetic), 0.1,
                                                                    1.0, "full", 1, "w"))
        indices = members // 2 if antithetic else members
        assert counts.values("_full_gemm_kernel") == indices * OUT * IN, (members, per)
        # IN % 128 == 0 and BK = 128: one Philox call per 4 Gaussians, per 128 signs (not per 32-bit word)
        per_call = 4 if kind == "gaussian" else 128
        assert counts.philox_calls("_full_gemm_kernel") == indices * OUT * IN // per_call, (members, per)


def test_full_rank_unperturbed_rows_generate_nothing():
    rm = torch.full((16,), -1)
    counts = _count(lambda: perturbed_linear_triton(torch.randn(16, IN), torch.randn(OUT, IN), None, rm, _spec(),
                                                    0.1, 1.0, "full", 1, "w"))
    assert counts.values() == 0


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize(("rank", "kind"), [(1, "gaussian"), (4, "gaussian"), (1, "rademacher")])
def test_lowrank_generates_members_times_in_plus_out_times_rank(antithetic, rank, kind):
    """The shrink generates B (in × r) and the GEMM epilogue A (out × r) once per noise index present:
    not once per member slot of the epilogue, not once per row tile or K split."""
    w = torch.randn(OUT, IN)
    for members, per in ((4, 4), (4, 8), (8, 4)):  # 1, 2 and 2 row tiles of the GEMM
        rm = _rows(members, per)
        x = torch.randn(members * per, IN)
        counts = _count(lambda rm=rm, x=x: perturbed_linear_triton(x, w, None, rm, _spec(kind, antithetic),
                                                                   0.1, 1.0, "lowrank", rank, "w"))
        indices = members // 2 if antithetic else members
        assert counts.values("_shrink_kernel") == indices * IN * rank, (members, per)
        assert counts.values("_gemm_kernel") == indices * OUT * rank, (members, per)


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("rank", [16, 4])
def test_lora_generates_each_adapter_noise_once_per_noise_index(antithetic, rank):
    """E_A (r × in) in the shrink, E_B (out × r) in the expand; at rank 4 only the rank's 4 rows, not the
    16 the tensor-core dot is padded to."""
    for members, per in ((4, 4), (2, 16)):
        rm = _rows(members, per)
        x = torch.randn(members * per, IN)
        counts = _count(lambda rm=rm, x=x: lora_linear_triton(
            x, torch.randn(OUT, IN), None, torch.randn(rank, IN), torch.randn(OUT, rank), 2.0, rm,
            _spec("gaussian", antithetic), 0.1, "a", "b"))
        indices = members // 2 if antithetic else members
        assert counts.values("_shrink_kernel") == indices * IN * rank, (members, per)
        assert counts.values("_expand_kernel") == indices * OUT * rank, (members, per)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rank", "kind", "antithetic"), [(1, "gaussian", True), (4, "gaussian", False),
                                                          (1, "rademacher", True)])
def test_lowrank_update_generates_each_factor_once(rank, kind, antithetic, dtype):
    """K·r·(out + in) values per update, all in the factor launch, whatever the W tiling (12, 24 and 48 tiles);
    the update launch generates only the rounding bits, one Philox call per 4 elements (bf16), none for fp32."""
    from fastes.ops.es_update_triton import es_update_triton

    out_f, in_f, members = 64, 192, 8  # (out + in)·r a power of two: no padding lane in the factor programs
    for bm, bn in ((32, 32), (16, 32), (16, 16)):
        w = torch.randn(out_f, in_f).to(dtype)
        counts = _count(lambda w=w, bm=bm, bn=bn: es_update_triton(
            w, _spec(kind, antithetic), torch.linspace(-1, 1, members, dtype=torch.float64), 0.1, 1.0, "lowrank",
            rank, "w", block_m=bm, block_n=bn))
        k = members // 2 if antithetic else members
        assert counts.values("_lowrank_factors_kernel") == k * rank * (out_f + in_f), (bm, bn)
        assert counts.values("_lowrank_kernel") == 0, (bm, bn)
        per_call = 4 if kind == "gaussian" else 32  # a Gaussian block; a Rademacher word
        assert counts.philox_calls("_lowrank_factors_kernel") == k * rank * (out_f + in_f) // per_call
        assert counts.philox_calls("_lowrank_kernel") == (out_f * in_f // 4 if dtype == torch.bfloat16 else 0)


@pytest.mark.parametrize("plain_first", [True, False])
def test_lora_unperturbed_rows_generate_no_noise(plain_first):
    """Unperturbed rows (−1) beside members in a row tile take the adapter alone: the count stays members × r ×
    (in, out), whether they come before or after the members' rows."""
    rank, members = 4, _rows(4, 4)
    plain = torch.full((16,), -1)
    rm = torch.cat([plain, members] if plain_first else [members, plain])
    x = torch.randn(32, IN)
    counts = _count(lambda: lora_linear_triton(x, torch.randn(OUT, IN), None, torch.randn(rank, IN),
                                               torch.randn(OUT, rank), 2.0, rm, _spec(), 0.1, "a", "b"))
    assert counts.values("_shrink_kernel") == 4 * IN * rank
    assert counts.values("_expand_kernel") == 4 * OUT * rank
