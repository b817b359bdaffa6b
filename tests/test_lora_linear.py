"""lora_linear: Triton shrink/expand (interpreter on CPU) and the CPU path against the torch reference.

W is 33×65 (odd, so every tile is ragged), x has 7..40 rows, LoRA ranks 1, 4 and 8, row
members unsorted with unperturbed (−1) rows. Triton outputs are poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch

from fastes.noise import NoiseSpec
from fastes.ops.lora_linear import lora_expand_triton, lora_linear, lora_linear_triton, lora_shrink_triton

IN, OUT = 65, 33
NAME_A, NAME_B = "layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"


def _spec(rng: torch.Generator, kind: str, antithetic: bool) -> NoiseSpec:
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3 + 1  # spans both key words
    return NoiseSpec(seed=seed, step=int(torch.randint(0, 1000, (1,), generator=rng)), kind=kind,
                     antithetic=antithetic)


def _layer(rng: torch.Generator, rows: int, rank: int, bias: bool, dtype: torch.dtype = torch.float32):
    x = torch.randn(rows, IN, generator=rng).to(dtype)
    weight = (torch.randn(OUT, IN, generator=rng) / IN**0.5).to(dtype)
    b = torch.randn(OUT, generator=rng).to(dtype) if bias else None
    lora_a = torch.randn(rank, IN, generator=rng) / IN**0.5
    lora_b = torch.randn(OUT, rank, generator=rng) * 0.5
    return x, weight, b, lora_a, lora_b


def _triton(*args, **kw) -> torch.Tensor:
    x, weight = args[0], args[1]
    out = torch.full((x.shape[0], weight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    lora_linear_triton(*args, out=out, **kw)
    assert not out.isnan().any(), "a row or column was not written"
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32: 1e-5 relative to the output's magnitude (values near zero carry the same absolute error)."""
    assert not actual.isnan().any()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol,
                               atol=rtol * float(expected.float().abs().max()))


CASES = [  # rank, kind, antithetic, population size, bias, rows
    (1, "gaussian", True, 8, True, 40),
    (4, "rademacher", False, 3, False, 7),
    (8, "gaussian", False, 1, True, 23),
    (8, "rademacher", True, 3, False, 31),
    (4, "gaussian", True, 3, True, 16),
]


@pytest.mark.parametrize("rank,kind,antithetic,n,bias,rows", CASES)
def test_matches_reference(rng, rank, kind, antithetic, n, bias, rows):
    row_member = torch.randint(-1, n, (rows,), generator=rng)  # unsorted, with unperturbed rows
    args = (*_layer(rng, rows, rank, bias), 1.7, row_member, _spec(rng, kind, antithetic), 0.2, NAME_A, NAME_B)
    ref = lora_linear(*args, backend="reference")
    _close(_triton(*args), ref)
    _close(lora_linear(*args, backend="cpu"), ref)
    plain = lora_linear(*args[:6], None, None, 0.0, NAME_A, NAME_B, backend="reference")
    assert not torch.allclose(ref[row_member >= 0], plain[row_member >= 0])  # the noise is really there


@pytest.mark.parametrize("sorted_rows", [True, False])
def test_small_tiles(rng, sorted_rows):
    """Several row, K and N tiles, each row tile holding several members (the GPU-like tiling)."""
    row_member = torch.randint(-1, 3, (24,), generator=rng, dtype=torch.int32)
    if sorted_rows:
        row_member = row_member.sort().values
    args = (*_layer(rng, 24, 8, True), 0.5, row_member, _spec(rng, "gaussian", True), 0.3, NAME_A, NAME_B)
    _close(_triton(*args, blocks=(16, 32, 16)), lora_linear(*args, backend="reference"))


def test_antithetic_adapter_noise_is_exactly_opposite(rng):
    """Members 2k, 2k+1 on identical rows: ±σ·E in the shrink (A = 0) and in the expand (B = 0, base = 0)."""
    spec = _spec(rng, "gaussian", True)
    x = torch.randn(4, IN, generator=rng).repeat_interleave(2, 0)
    row_member = torch.arange(8)
    h = lora_shrink_triton(x, torch.zeros(4, IN), row_member, spec, 0.3, NAME_A, out=torch.full((8, 4), torch.nan))
    assert torch.equal(h[0::2], -h[1::2]) and h.abs().min() > 0
    h = torch.randn(4, 4, generator=rng).repeat_interleave(2, 0)
    y = lora_expand_triton(torch.zeros(8, OUT), h, torch.zeros(OUT, 4), 1.3, row_member, spec, 0.3, NAME_B,
                           out=torch.full((8, OUT), torch.nan))
    assert torch.equal(y[0::2], -y[1::2]) and y.abs().min() > 0


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_antithetic_second_order_term_is_even(rng, backend):
    """With A = B = 0 the output is σ²·x E_Aᵀ E_Bᵀ: the same for both members of a pair."""
    x = torch.randn(4, IN, generator=rng).repeat_interleave(2, 0)
    args = (x, torch.zeros(OUT, IN), None, torch.zeros(4, IN), torch.zeros(OUT, 4), 2.0, torch.arange(8),
            _spec(rng, "rademacher", True), 0.5, NAME_A, NAME_B)
    y = _triton(*args) if backend == "triton" else lora_linear(*args, backend="cpu")
    assert torch.equal(y[0::2], y[1::2]) and y.abs().max() > 0
    _close(y, lora_linear(*args, backend="reference"))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_sigma_zero_and_no_noise_equal_the_plain_lora_layer(rng, backend):
    x, weight, bias, lora_a, lora_b = _layer(rng, 19, 4, True)
    plain = torch.nn.functional.linear(x, weight, bias) + 0.7 * (x @ lora_a.T) @ lora_b.T
    row_member = torch.randint(-1, 5, (19,), generator=rng)
    spec = _spec(rng, "gaussian", True)
    outs = []
    for member, noise, sigma in ((row_member, spec, 0.0), (row_member, None, 0.1), (None, spec, 0.1)):
        args = (x, weight, bias, lora_a, lora_b, 0.7, member, noise, sigma, NAME_A, NAME_B)
        outs.append(_triton(*args) if backend == "triton" else lora_linear(*args, backend="cpu"))
        _close(outs[-1], plain)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(rng, dtype):
    row_member = torch.randint(-1, 3, (21,), generator=rng)
    args = (*_layer(rng, 21, 8, True, dtype), 1.0, row_member, _spec(rng, "gaussian", False), 0.1, NAME_A, NAME_B)
    ref = lora_linear(*args, backend="reference").float()
    for out in (_triton(*args), lora_linear(*args, backend="cpu")):
        assert out.dtype == dtype
        # both paths round the base GEMM to dtype, then the sum: 2 roundings of 2**-8 (bf16) relative
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=float(ref.abs().max()) * 2**-6)


def test_empty_batch():
    x, weight, bias, lora_a, lora_b = _layer(torch.Generator().manual_seed(0), 0, 4, True)
    y = lora_linear_triton(x, weight, bias, lora_a, lora_b, 1.0, None, None, 0.0, NAME_A, NAME_B)
    assert y.shape == (0, OUT)


def _bad_inputs() -> list[tuple[str, dict]]:
    return [
        ("x must be 2-D", dict(x=torch.randn(IN))),
        ("x dtype", dict(x=torch.zeros(5, IN, dtype=torch.int64))),
        ("x dtype .* differs from weight", dict(x=torch.randn(5, IN, dtype=torch.bfloat16))),
        ("x has 64 features", dict(x=torch.randn(5, IN - 1))),
        ("lora_a .* do not fit", dict(lora_a=torch.randn(4, IN - 1))),
        ("lora_a .* do not fit", dict(lora_b=torch.randn(OUT, 3))),
        ("lora_a rank", dict(lora_a=torch.randn(0, IN), lora_b=torch.randn(OUT, 0))),
        ("lora_a rank", dict(lora_a=torch.randn(OUT + 1, IN), lora_b=torch.randn(OUT, OUT + 1))),
        ("lora_b is on", dict(lora_b=torch.randn(OUT, 4, device="meta"))),
        ("bias has 32 entries", dict(bias=torch.randn(OUT - 1))),
        ("bias dtype", dict(bias=torch.randn(OUT, dtype=torch.float16))),
        ("row_member has 4 entries", dict(row_member=torch.tensor([0, 1, 2, 3]))),
        ("row_member entries must be < population size", dict(row_member=torch.tensor([0, 1, 2, 3, 4]))),
        ("row_member entries must be >= -1", dict(row_member=torch.tensor([0, 1, -3, 3, 0]))),
        ("sigma must be", dict(sigma=-1.0)),
        ("noise must be", dict(noise="gaussian")),
        ("scaling must be", dict(scaling="1")),
        ("backend must be", dict(backend="gpu")),
    ]


@pytest.mark.parametrize("match,override", _bad_inputs())
def test_bad_inputs_raise_value_error_naming_the_argument(match, override):
    kwargs = dict(x=torch.randn(5, IN), weight=torch.randn(OUT, IN), bias=torch.randn(OUT),
                  lora_a=torch.randn(4, IN), lora_b=torch.randn(OUT, 4), scaling=1.0,
                  row_member=torch.tensor([0, 1, -1, 3, 0]), noise=NoiseSpec(seed=3), sigma=0.1,
                  num_members=4, backend="cpu")
    kwargs.update(override)
    with pytest.raises(ValueError, match=match):
        lora_linear(**kwargs)


# --------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, "gaussian"), (torch.float32, "rademacher")])
def test_qwen_sized_layer_on_gpu(dtype, kind):
    """1536×1536, LoRA rank 8, 32 members × 64 rows (sorted, as the engine sends them), subsampled rows."""
    gen = torch.Generator().manual_seed(11)
    hidden, rows, n, rank = 1536, 2048, 32, 8
    x = torch.randn(rows, hidden, generator=gen).to(dtype).cuda()
    weight = (torch.randn(hidden, hidden, generator=gen) / hidden**0.5).to(dtype).cuda()
    bias = torch.randn(hidden, generator=gen).to(dtype).cuda()
    lora_a = (torch.randn(rank, hidden, generator=gen) / hidden**0.5).to(dtype).cuda()
    lora_b = (torch.randn(hidden, rank, generator=gen) * 0.1).to(dtype).cuda()
    row_member = torch.arange(n).repeat_interleave(rows // n).cuda()
    row_member[::97] = -1
    spec = NoiseSpec(seed=2**45 + 3, step=9, kind=kind, antithetic=True)
    args = (x, weight, bias, lora_a, lora_b, 2.0, row_member, spec, 0.1, NAME_A, NAME_B)
    y = _triton(*args)
    sub = torch.randperm(rows, generator=gen)[:256].cuda()
    ref = lora_linear(x[sub], weight, bias, lora_a, lora_b, 2.0, row_member[sub], spec, 0.1, NAME_A, NAME_B,
                      backend="reference")
    rtol = 1e-4 if dtype == torch.float32 else 2**-6  # fp32 base GEMM may run in tf32 per torch settings
    torch.testing.assert_close(y[sub].float(), ref.float(), rtol=0, atol=float(ref.float().abs().max()) * rtol)


def test_expand_sums_partials_over_several_loads(rng):
    """Seven K-split partials at 64-row tiles and rank 8 take two loads of up to four (the second ragged): the
    expand must equal base + scaling · (Σ_s H_s) Bᵀ, with noise as with the partials summed beforehand."""
    rows, rank = 40, 8
    parts = torch.randn(7, rows, rank, generator=rng)
    base, lora_b = torch.randn(rows, OUT, generator=rng), torch.randn(OUT, rank, generator=rng)
    y = lora_expand_triton(base.clone(), parts, lora_b, 1.3, None, None, 0.0, NAME_B, block_m=64)
    _close(y, base + 1.3 * parts.sum(0) @ lora_b.T)
    row_member, spec = torch.randint(-1, 4, (rows,), generator=rng), _spec(rng, "gaussian", True)
    noisy = [lora_expand_triton(base.clone(), h, lora_b, 1.3, row_member, spec, 0.2, NAME_B, block_m=64)
             for h in (parts, parts.sum(0))]
    _close(noisy[0], noisy[1])
    assert not torch.allclose(noisy[0], y)
