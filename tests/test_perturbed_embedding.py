"""perturbed_embedding: Triton (interpreter on CPU) and the CPU path against the torch reference.

Small odd shapes (vocab 37, hidden 65) exercise every mask; hidden 128 exercises the
block-wise noise paths (H % 4, H % 128). Outputs of the Triton launcher are poisoned with
NaN before the kernel writes them.
"""

from __future__ import annotations

import pytest
import torch

from fastes.noise import NoiseSpec, materialize
from fastes.ops.perturbed_embedding import perturbed_embedding, perturbed_embedding_triton

VOCAB, HIDDEN = 37, 65
NAME = "model.embed_tokens.weight"


def _spec(rng: torch.Generator, kind: str, antithetic: bool) -> NoiseSpec:
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3 + 1  # spans both key words
    return NoiseSpec(seed=seed, step=int(torch.randint(0, 1000, (1,), generator=rng)), kind=kind,
                     antithetic=antithetic)


def _triton(ids, weight, row_member, noise, sigma, scale, mode, rank, name, **kw) -> torch.Tensor:
    out = torch.full((ids.shape[0], weight.shape[1]), float("nan"), dtype=weight.dtype, device=weight.device)
    perturbed_embedding_triton(ids, weight, row_member, noise, sigma, scale, mode, rank, name, out=out, **kw)
    assert not out.isnan().any(), "a row or column was not written"
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32: 1e-5 relative to the output's magnitude (values near zero carry the same absolute error)."""
    assert not actual.isnan().any()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


CASES = [  # mode, rank, kind, antithetic, population size
    ("lowrank", 1, "gaussian", True, 8),
    ("lowrank", 3, "rademacher", False, 3),
    ("lowrank", 8, "gaussian", False, 1),
    ("lowrank", 20, "rademacher", True, 8),  # rank > 16: the rank-chunk loop
    ("full", 1, "gaussian", True, 3),
    ("full", 1, "rademacher", False, 8),
]


@pytest.mark.parametrize("hidden", [HIDDEN, 128])
@pytest.mark.parametrize("mode,rank,kind,antithetic,n", CASES)
def test_matches_reference(rng, mode, rank, kind, antithetic, n, hidden):
    tokens = int(torch.randint(7, 41, (1,), generator=rng))
    ids = torch.randint(0, VOCAB, (tokens,), generator=rng)
    weight = torch.randn(VOCAB, hidden, generator=rng)
    row_member = torch.randint(-1, n, (tokens,), generator=rng)  # unsorted, with unperturbed rows
    args = (ids, weight, row_member, _spec(rng, kind, antithetic), 0.05, 0.7, mode, rank, NAME)
    ref = perturbed_embedding(*args, backend="reference")
    _close(_triton(*args), ref)
    _close(perturbed_embedding(*args, backend="cpu"), ref)
    assert not torch.equal(ref[row_member >= 0], weight[ids][row_member >= 0])  # the noise is really there


@pytest.mark.parametrize("mode,rank", [("lowrank", 4), ("full", 1)])
def test_one_token_per_program_and_sorted_rows(rng, mode, rank):
    """The GPU tiling (one program per token and hidden tile) under the interpreter."""
    ids = torch.randint(0, VOCAB, (9,), generator=rng, dtype=torch.int32)
    weight = torch.randn(VOCAB, HIDDEN, generator=rng)
    row_member = torch.tensor([-1, 0, 0, 1, 1, 1, 2, 5, 5], dtype=torch.int32)
    args = (ids, weight, row_member, _spec(rng, "gaussian", True), 0.1, 1.0, mode, rank, NAME)
    _close(_triton(*args, tokens_per_program=1), perturbed_embedding(*args, backend="reference"))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("mode,rank", [("lowrank", 3), ("full", 1)])
def test_antithetic_members_are_exactly_opposite(rng, backend, mode, rank):
    ids = torch.randint(0, VOCAB, (6,), generator=rng).repeat_interleave(2)
    row_member = torch.arange(12)  # members 2k and 2k+1 look up the same token
    zero = torch.zeros(VOCAB, HIDDEN)  # so the output is the perturbation itself, no rounding of a sum
    args = (ids, zero, row_member, _spec(rng, "gaussian", True), 0.3, 1.5, mode, rank, NAME)
    out = _triton(*args) if backend == "triton" else perturbed_embedding(*args, backend="cpu")
    assert torch.equal(out[0::2], -out[1::2])
    assert out.abs().min() > 0


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_sigma_zero_and_no_noise_equal_the_plain_lookup(rng, backend):
    ids = torch.randint(0, VOCAB, (13,), generator=rng)
    weight = torch.randn(VOCAB, HIDDEN, generator=rng)
    row_member = torch.randint(-1, 4, (13,), generator=rng)
    spec = _spec(rng, "gaussian", True)
    for member, noise, sigma in ((row_member, spec, 0.0), (row_member, None, 0.1), (None, spec, 0.1)):
        args = (ids, weight, member, noise, sigma, 1.0, "lowrank", 2, NAME)
        out = _triton(*args) if backend == "triton" else perturbed_embedding(*args, backend="cpu")
        assert torch.equal(out, weight[ids])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tables(rng, dtype):
    ids = torch.randint(0, VOCAB, (17,), generator=rng)
    weight = torch.randn(VOCAB, HIDDEN, generator=rng).to(dtype)
    row_member = torch.randint(-1, 3, (17,), generator=rng)
    args = (ids, weight, row_member, _spec(rng, "gaussian", True), 0.05, 1.0, "lowrank", 4, NAME)
    ref = perturbed_embedding(*args, backend="reference")
    for out in (_triton(*args), perturbed_embedding(*args, backend="cpu")):
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=float(ref.float().abs().max()) * 2**-7)


def test_empty_batch():
    out = perturbed_embedding_triton(torch.zeros(0, dtype=torch.int64), torch.randn(VOCAB, HIDDEN), None, None,
                                     0.0, 1.0, "lowrank", 1, NAME)
    assert out.shape == (0, HIDDEN)


def _bad_inputs() -> list[tuple[str, dict]]:
    ids = torch.tensor([0, 5, 36])
    return [
        ("ids must be in", dict(ids=torch.tensor([0, 37]))),
        ("ids must be in", dict(ids=torch.tensor([-1, 3]))),
        ("ids dtype", dict(ids=ids.float())),
        ("ids must be 1-D", dict(ids=ids[None])),
        ("weight must be 2-D", dict(weight=torch.randn(VOCAB * HIDDEN))),
        ("weight dtype", dict(weight=torch.zeros(VOCAB, HIDDEN, dtype=torch.int32))),
        ("ids is on", dict(ids=ids.to("meta"))),
        ("row_member has 2 entries", dict(row_member=torch.tensor([0, 1]))),
        ("row_member entries must be < population size", dict(row_member=torch.tensor([0, 1, 4]))),
        ("row_member entries must be >= -1", dict(row_member=torch.tensor([0, -2, 1]))),
        ("row_member dtype", dict(row_member=torch.tensor([0.0, 1.0, 2.0]))),
        ("rank must be in", dict(rank=0)),
        ("rank must be in", dict(rank=HIDDEN + 1)),
        ("mode must be", dict(mode="lora")),
        ("sigma must be", dict(sigma=-0.1)),
        ("scale must be", dict(scale=float("nan"))),
        ("noise must be", dict(noise=(0, 1))),
        ("backend must be", dict(backend="cuda")),
    ]


@pytest.mark.parametrize("match,override", _bad_inputs())
def test_bad_inputs_raise_value_error_naming_the_argument(match, override):
    kwargs = dict(ids=torch.tensor([0, 5, 36]), weight=torch.randn(VOCAB, HIDDEN),
                  row_member=torch.tensor([0, -1, 3]), noise=NoiseSpec(seed=1), sigma=0.1, scale=1.0,
                  mode="lowrank", rank=2, num_members=4, backend="cpu")
    kwargs.update(override)
    with pytest.raises(ValueError, match=match):
        perturbed_embedding(**kwargs)


# --------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("mode,rank,kind", [("lowrank", 1, "gaussian"), ("lowrank", 8, "rademacher"),
                                            ("full", 1, "gaussian"), ("full", 1, "rademacher")])
def test_qwen_sized_table_on_gpu(mode, rank, kind):
    """151936×1536 bf16, 2048 tokens of 32 members: subsampled rows against the contract's own streams."""
    gen = torch.Generator().manual_seed(7)
    vocab, hidden, tokens, n = 151936, 1536, 2048, 32
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16).cuda()
    ids = torch.randint(0, vocab, (tokens,), generator=gen).cuda()
    row_member = torch.randint(-1, n, (tokens,), generator=gen).sort().values.cuda()
    spec, sigma, scale = NoiseSpec(seed=2**40 + 11, step=5, kind=kind, antithetic=True), 1e-3, 0.02
    out = _triton(ids, weight, row_member, spec, sigma, scale, mode, rank, NAME).float().cpu()
    ids_c, mem_c, w_c = ids.cpu(), row_member.cpu(), weight.float().cpu()
    for t in torch.randperm(tokens, generator=gen)[:64].tolist():
        tok, m = int(ids_c[t]), int(mem_c[t])
        expected = w_c[tok].clone()
        if m >= 0:
            index, sign = spec.member(m)
            if mode == "full":
                row = materialize(spec.seed, NAME, index, (hidden,), kind, spec.step, offset=tok * hidden)
            else:
                b = materialize(spec.seed, NAME, index, (hidden, rank), kind, spec.step)
                a = materialize(spec.seed, NAME, index, (rank,), kind, spec.step, offset=(hidden + tok) * rank)
                row = b @ a / rank**0.5
            expected += sign * sigma * scale * row
        torch.testing.assert_close(out[t], expected, rtol=0, atol=float(expected.abs().max()) * 2**-8)
