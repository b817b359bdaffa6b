"""perturbed_linear: Triton kernels (interpreter on CPU) and the CPU path against the torch reference.

Shapes are small and odd on CPU (the interpreter runs programs serially); 33x65 takes the
element-wise noise paths, 48x64 / 40x128 the per-block ones (in % 32 == 0). GPU tests run the
real Qwen2.5-1.5B shapes and compare a subsample of members against the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastes.noise import NoiseSpec
from fastes.ops.perturbed_linear import perturbed_linear, perturbed_linear_ref
from fastes.ops.perturbed_linear_triton import perturbed_linear_triton

NAME = "model.layers.3.mlp.up_proj.weight"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def make(rng: torch.Generator, rows: int, out_f: int, in_f: int, members: int, dtype: torch.dtype = torch.float32,
         bias: bool = True, ordered: bool = True, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """x, weight, bias, row_member (with -1 rows), sorted by member or shuffled."""
    x = torch.randn(rows, in_f, generator=rng).to(device=device, dtype=dtype)
    w = (torch.randn(out_f, in_f, generator=rng) / math.sqrt(in_f)).to(device=device, dtype=dtype)
    b = torch.randn(out_f, generator=rng).to(device=device, dtype=dtype) if bias else None
    rm = torch.randint(-1, members, (rows,), generator=rng)
    rm = rm.sort().values if ordered else rm
    return x, w, b, rm.to(device)


def spec(kind: str, antithetic: bool, rng: torch.Generator) -> NoiseSpec:
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3 + 1  # uses the high key word too
    step = int(torch.randint(0, 2**32, (1,), generator=rng))
    return NoiseSpec(seed=seed, step=step, kind=kind, antithetic=antithetic)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative to the output's scale (|y| can be ~0 for some entries); NaN never passes."""
    got, want = got.float().cpu(), want.float().cpu()
    assert not got.isnan().any(), "NaN in output (unwritten poisoned entries?)"
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(want.abs().max().item(), 1.0))


# mode, kind, rank, members, antithetic, ordered, bias, rows, out, in, config
CASES = [
    ("lowrank", "gaussian", 1, 3, True, True, True, 40, 33, 65, None),
    ("lowrank", "rademacher", 4, 8, False, False, False, 23, 33, 65, None),
    ("lowrank", "gaussian", 4, 8, True, False, True, 40, 33, 65, {"BM": 32, "BN": 16, "BK": 32}),  # > SEGC runs
    ("lowrank", "rademacher", 1, 1, True, True, True, 7, 33, 65, None),
    ("lowrank", "gaussian", 1, 8, False, True, False, 37, 48, 64, {"BM": 16, "BN": 32, "BK": 32}),
    ("lowrank", "rademacher", 1, 3, True, True, True, 37, 48, 64, {"BM": 16, "BN": 32, "BK": 32}),
    ("lowrank", "rademacher", 4, 3, False, True, True, 20, 40, 128, None),
    ("lowrank", "gaussian", 3, 3, True, True, True, 20, 40, 128, None),  # rank not a power of two
    ("full", "gaussian", 1, 3, True, True, True, 40, 33, 65, None),
    ("full", "rademacher", 1, 8, False, False, False, 23, 33, 65, None),
    ("full", "gaussian", 1, 1, False, True, True, 7, 33, 65, None),
    ("full", "rademacher", 1, 3, True, True, True, 37, 48, 64, {"BM": 16, "BN": 32, "BK": 32}),
    ("full", "gaussian", 1, 8, True, True, False, 37, 48, 64, None),
    ("full", "rademacher", 1, 3, True, False, True, 20, 40, 128, None),
]


@pytest.mark.parametrize("mode,kind,rank,members,anti,ordered,bias,rows,out_f,in_f,config", CASES)
def test_triton_matches_reference(rng, mode, kind, rank, members, anti, ordered, bias, rows, out_f, in_f, config):
    x, w, b, rm = make(rng, rows, out_f, in_f, members, bias=bias, ordered=ordered)
    args = (x, w, b, rm, spec(kind, anti, rng), 0.3, 1.7, mode, rank, NAME)
    out = torch.full((rows, out_f), float("nan"))
    perturbed_linear_triton(*args, out=out, config=config)
    assert_close(out, perturbed_linear_ref(*args), torch.float32)


@pytest.mark.parametrize("mode", ["lowrank", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(rng, mode, dtype):
    x, w, b, rm = make(rng, 21, 33, 65, 3, dtype=dtype)
    args = (x, w, b, rm, spec("gaussian", True, rng), 0.3, 1.0, mode, 2, NAME)
    out = perturbed_linear(*args, backend="triton")
    assert out.dtype == dtype
    assert_close(out, perturbed_linear_ref(*args), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_rademacher_blocks(rng, dtype):
    """in % 128 == 0: the full-rank per-block Rademacher path, signs built as bf16 bits (bf16) or float32 (fp16)."""
    x, w, b, rm = make(rng, 40, 40, 256, 3, dtype=dtype)
    args = (x, w, b, rm, spec("rademacher", True, rng), 0.3, 1.0, "full", 1, NAME)
    out = perturbed_linear(*args, backend="triton")
    assert_close(out, perturbed_linear_ref(*args), dtype)


def test_cublas_base_and_strided_input(rng):
    """base="torch" (cuBLAS GEMM + epilogue kernel) and a non-contiguous x give the same result."""
    x, w, b, rm = make(rng, 30, 33, 130, 3)
    x = x[:, ::2]
    args = (x, w[:, :65], b, rm, spec("rademacher", True, rng), 0.5, 1.0, "lowrank", 2, NAME)
    out = torch.full((30, 33), float("nan"))
    perturbed_linear_triton(*args, out=out, base="torch")
    assert_close(out, perturbed_linear_ref(*args), torch.float32)


@pytest.mark.parametrize("layout", ["shuffled", "sorted", "equal-runs", "unequal-runs", "sparse-runs"])
@pytest.mark.parametrize("mode,kind,dtype", [("lowrank", "gaussian", torch.float32),
                                             ("full", "rademacher", torch.float32),
                                             ("lowrank", "rademacher", torch.bfloat16)])
def test_cpu_path_matches_reference(rng, mode, kind, dtype, layout):
    """The CPU path's layouts: batched matmuls over rows gathered into [M, Cmax] (shuffled rows, sorted runs
    with -1 rows among them, unequal runs covering every row), over a view (equal runs covering every row),
    and member by member when padding would more than double the rows (sparse runs)."""
    x, w, b, rm = make(rng, 30, 33, 65, 5, dtype=dtype, ordered=layout != "shuffled")
    if layout == "equal-runs":
        rm = torch.tensor([3, 0, 4]).repeat_interleave(10)
    if layout == "unequal-runs":
        rm = torch.tensor([3, 0, 4]).repeat_interleave(torch.tensor([12, 9, 9]))
    if layout == "sparse-runs":
        rm = torch.tensor([1, 0, 2]).repeat_interleave(torch.tensor([25, 2, 3]))
    args = (x, w, b, rm, spec(kind, True, rng), 0.3, 1.3, mode, 2, NAME)
    assert_close(perturbed_linear(*args, backend="cpu"), perturbed_linear_ref(*args), dtype)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("mode", ["lowrank", "full"])
def test_antithetic_pairs_cancel(rng, backend, mode):
    """Members 2k and 2k+1 get opposite perturbations: y_2k + y_2k+1 = 2 x Wᵀ."""
    x, w, _, _ = make(rng, 6, 33, 65, 1, bias=False)
    xx = torch.cat([x, x])
    rm = torch.tensor([0, 0, 2, 2, 4, 4] + [1, 1, 3, 3, 5, 5])
    y = perturbed_linear(xx, w, None, rm, spec("gaussian", True, rng), 0.5, 1.0, mode, 2, NAME, backend=backend)
    plain = x @ w.T
    assert (y[:6] - plain).abs().max() > 1e-2  # the perturbation is there
    torch.testing.assert_close(y[:6] + y[6:], 2 * plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_unperturbed_is_plain_linear(rng, backend):
    x, w, b, rm = make(rng, 19, 33, 65, 4)
    want = torch.nn.functional.linear(x, w, b)
    noise = spec("gaussian", True, rng)
    for kwargs in (dict(noise=noise, sigma=0.0), dict(noise=None, sigma=0.3), dict(row_member=None, noise=noise)):
        call = dict(row_member=rm, noise=noise, sigma=0.3, mode="full") | kwargs
        assert_close(perturbed_linear(x, w, b, backend=backend, **call), want, torch.float32)
    minus = torch.full_like(rm, -1)
    assert_close(perturbed_linear(x, w, b, minus, noise, 0.3, backend=backend), want, torch.float32)


def test_empty_batch():
    x, w = torch.empty(0, 65), torch.randn(33, 65)
    out = perturbed_linear(x, w, None, torch.empty(0, dtype=torch.long), NoiseSpec(1), 0.1, backend="triton")
    assert out.shape == (0, 33)


def test_bad_inputs_name_the_argument():
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    rm = torch.tensor([0, 1, 2, -1, 0])
    noise = NoiseSpec(seed=3)
    bad = [
        ("x", dict(x=torch.randn(5, 7))),
        ("weight", dict(weight=torch.randn(6, 8, dtype=torch.bfloat16))),
        ("weight", dict(weight=torch.empty(6, 8, device="meta"))),
        ("bias", dict(bias=torch.randn(5))),
        ("row_member", dict(row_member=torch.tensor([0, 1, 2]))),
        ("row_member", dict(row_member=torch.tensor([0, 1, 2, -2, 0]))),
        ("row_member", dict(row_member=rm.float())),
        ("row_member", dict(num_members=2)),
        ("rank", dict(rank=0)),
        ("rank", dict(rank=7)),
        ("sigma", dict(sigma=-1.0)),
        ("noise", dict(noise="gaussian")),
        ("mode", dict(mode="lora")),
        ("backend", dict(backend="gpu")),
    ]
    for word, change in bad:
        call = dict(x=x, weight=w, bias=b, row_member=rm, noise=noise, sigma=0.1, rank=1) | change
        with pytest.raises(ValueError, match=word):
            perturbed_linear(**call)
    with pytest.raises(ValueError, match="out"):
        perturbed_linear_triton(x, w, b, rm, noise, 0.1, 1.0, "full", 1, NAME, out=torch.empty(5, 5))


# --------------------------------------------------------------------------- GPU, real shapes

SHAPES = [(1536, 1536), (8960, 1536), (1536, 8960)]


def _subsample_reference(args: tuple, keep: torch.Tensor) -> torch.Tensor:
    """Reference on the rows of a few members only (materializing E costs out x in per member)."""
    x, w, b, rm, *rest = args
    return perturbed_linear_ref(x[keep], w, b, rm[keep], *rest)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode,kind", [("lowrank", "gaussian"), ("lowrank", "rademacher"), ("full", "gaussian"),
                                       ("full", "rademacher")])
@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_gpu_real_shapes(rng, out_f, in_f, mode, kind, dtype):
    rows, members = 1024, 32
    x, w, b, rm = make(rng, rows, out_f, in_f, members, dtype=dtype, device="cuda")
    args = (x, w, b, rm, spec(kind, True, rng), 0.02, 1.0, mode, 1, NAME)
    out = torch.full((rows, out_f), float("nan"), dtype=dtype, device="cuda")
    perturbed_linear_triton(*args, out=out)
    keep = (rm == -1) | (rm == 4) | (rm == 5) | (rm == members - 1)
    want = _subsample_reference(args, keep)
    plain = torch.nn.functional.linear(x[keep].float(), w.float(), b.float())
    assert_close(out[keep], want, dtype)
    # the perturbation itself, not only y: (y - plain) against the reference's
    delta, want_delta = (out[keep].float() - plain).cpu(), (want.float().cpu() - plain.cpu())
    rel = (delta - want_delta).norm() / want_delta.norm()
    assert rel < (1e-4 if dtype == torch.float32 else 0.1), rel


@pytest.mark.gpu
def test_gpu_unsorted_equals_sorted_and_graph_capture(rng):
    x, w, b, rm = make(rng, 512, 1536, 1536, 16, dtype=torch.bfloat16, device="cuda", ordered=False)
    args = (spec("gaussian", True, rng), 0.02, 1.0, "lowrank", 1, NAME)
    order = torch.argsort(rm, stable=True)
    y_sorted = perturbed_linear_triton(x[order], w, b, rm[order], *args)
    y = perturbed_linear_triton(x, w, b, rm, *args)
    torch.testing.assert_close(y[order], y_sorted, rtol=0, atol=0)
    cfg = {"BM": 64, "BN": 128, "BK": 64, "num_warps": 4, "num_stages": 3}
    want = perturbed_linear_triton(x, w, b, rm, *args, config=cfg)  # also compiles outside the capture
    assert_close(want, y, torch.bfloat16)
    out = torch.empty_like(y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails on any host sync
        perturbed_linear_triton(x, w, b, rm, *args, out=out, config=cfg)
    out.fill_(float("nan"))
    graph.replay()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_row_member_checked_again_after_an_in_place_change(rng):
    """The value check is skipped for the tensor the previous linear checked, unless it changed since."""
    x, w, b, rm = make(rng, 8, 5, 6, 3)
    rm[-1] = 2
    noise = spec("gaussian", True, rng)
    perturbed_linear(x, w, b, rm, noise, 0.1, num_members=3, backend="cpu")
    rm[0] = -2
    with pytest.raises(ValueError, match="row_member"):
        perturbed_linear(x, w, b, rm, noise, 0.1, num_members=3, backend="cpu")
    rm[0] = 0
    with pytest.raises(ValueError, match="population size 2"):
        perturbed_linear(x, w, b, rm, noise, 0.1, num_members=2, backend="cpu")
