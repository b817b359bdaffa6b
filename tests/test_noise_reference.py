"""The noise contract in its torch reference: known answers, layout, statistics, bad input.

Statistical bounds are 5 standard errors of the estimator (computed, not tuned), so a
correct generator fails them with probability < 1e-6 per check.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastes import noise

KAT = [  # Random123 tests/kat_vectors, philox4x32 10: counter, key, expected
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
N = 1 << 20
FIVE_SIGMA_MEAN = 5 / math.sqrt(N)


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = noise.philox4x32(*counter, *key)
    assert [int(v) for v in out] == list(expected)


def test_seed_is_the_key_and_counter_layout():
    seed = (0x299F31D0 << 32) | 0xA4093822
    words = noise.uint32_blocks(seed, 0x85A308D3, 0x13198A2E, 0x03707344, 0x243F6A88, 1)
    assert [int(v) for v in words[0]] == list(KAT[2][2])


def test_tensor_id_is_fnv1a():
    assert noise.tensor_id("a") == 0xE40C292C
    assert noise.tensor_id("foobar") == 0xBF9CF968
    assert noise.tensor_id("model.layers.0.mlp.up_proj.weight") != noise.tensor_id("model.layers.1.mlp.up_proj.weight")
    assert noise.sr_tensor_id("w") == noise.tensor_id("stochastic-rounding/w")


def test_member_mapping():
    assert [noise.member_noise(m, True) for m in range(4)] == [(0, 1), (0, -1), (1, 1), (1, -1)]
    assert [noise.member_noise(m, False) for m in range(3)] == [(0, 1), (1, 1), (2, 1)]


@pytest.mark.parametrize("kind", noise.KINDS)
def test_stream_is_position_independent(kind):
    """Any window of the stream equals the same slice of a longer read: no block-size dependence."""
    full = noise.stream(7, 123, 4, 2, 0, 1000, kind)
    for offset, count in [(0, 1), (3, 5), (129, 300), (997, 3), (250, 1)]:
        torch.testing.assert_close(noise.stream(7, 123, 4, 2, offset, count, kind), full[offset : offset + count],
                                   rtol=0, atol=0)


def test_gaussian_lanes_follow_box_muller():
    words = noise.uint32_blocks(11, 5, 0, 0, 0, 8)
    values = noise.gaussian_from_words(words).double()
    u1 = ((words[:, 0] >> 8) + 1).double() * 2.0**-24
    u2 = (words[:, 1] >> 8).double() * 2.0**-24
    r = torch.sqrt(-2 * torch.log(u1))
    torch.testing.assert_close(values[:, 0], r * torch.cos(2 * math.pi * u2), rtol=0, atol=1e-5)
    torch.testing.assert_close(values[:, 1], r * torch.sin(2 * math.pi * u2), rtol=0, atol=1e-5)


def test_rademacher_bits():
    words = noise.uint32_blocks(11, 5, 0, 0, 0, 2)
    signs = noise.rademacher_from_words(words)
    for e in (0, 1, 31, 32, 77, 127, 128, 255):
        block, word, bit = e // 128, (e // 32) % 4, e % 32
        expected = 1.0 if (int(words[block, word]) >> bit) & 1 else -1.0
        assert signs.reshape(-1)[e].item() == expected


def test_materialize_shape_and_repeatability():
    a = noise.materialize(5, "w", 3, (33, 65))
    assert a.shape == (33, 65) and a.dtype == torch.float32
    assert torch.equal(a, noise.materialize(5, "w", 3, (33, 65)))
    assert torch.equal(a.reshape(-1), noise.materialize(5, "w", 3, 33 * 65))


def test_lowrank_draws_b_then_a_from_one_stream():
    a, b = noise.materialize_lowrank(9, "w", 2, out_features=7, in_features=5, rank=3)
    flat = noise.materialize(9, "w", 2, (5 + 7) * 3)
    assert torch.equal(b.reshape(-1), flat[:15]) and torch.equal(a.reshape(-1), flat[15:])


def test_antithetic_members_are_exact_opposites():
    spec = noise.NoiseSpec(seed=1, step=3, antithetic=True)
    for mode in ("full", "lowrank"):
        e0 = noise.member_noise_tensor(spec, "w", 4, (6, 10), mode, 2)
        e1 = noise.member_noise_tensor(spec, "w", 5, (6, 10), mode, 2)
        assert torch.equal(e0, -e1)
        assert not torch.equal(e0, noise.member_noise_tensor(spec, "w", 6, (6, 10), mode, 2))


def test_gaussian_moments():
    x = noise.materialize(2024, "stats", 0, N).double()
    assert abs(x.mean().item()) < FIVE_SIGMA_MEAN
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / N)
    assert abs((x**3).mean().item()) < 5 * math.sqrt(15 / N)
    assert abs((x**4).mean().item() - 3) < 5 * math.sqrt(96 / N)


def test_gaussian_distribution_ks():
    x = noise.materialize(99, "ks", 1, 1 << 16).double().sort().values
    n = x.numel()
    cdf = torch.special.ndtr(x)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = torch.maximum(grid - cdf, cdf - (grid - 1 / n)).max().item()
    assert d < 1.95 / math.sqrt(n)  # KS critical value at the 0.1% level


def test_rademacher_balance():
    x = noise.materialize(2024, "stats", 0, N, kind="rademacher")
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    plus = int((x > 0).sum())
    assert abs(plus - N / 2) < 5 * math.sqrt(N) / 2


@pytest.mark.parametrize("kind", noise.KINDS)
def test_no_correlation_between_neighbours(kind):
    base = dict(seed=17, name="layer.w", noise_index=4, shape=N, kind=kind, step=6)
    x = noise.materialize(**base).double()
    neighbours = {
        "member": dict(base, noise_index=5),
        "tensor": dict(base, name="layer.v"),
        "step": dict(base, step=7),
        "seed": dict(base, seed=18),
        "seed_high_word": dict(base, seed=17 + (1 << 32)),
    }
    for what, kwargs in neighbours.items():
        y = noise.materialize(**kwargs).double()
        corr = ((x - x.mean()) * (y - y.mean())).mean() / (x.std() * y.std())
        assert abs(corr.item()) < FIVE_SIGMA_MEAN, what
    for lag in (1, 2, 3, 4, 128):  # neighbouring elements, within and across Philox blocks
        corr = torch.corrcoef(torch.stack((x[:-lag], x[lag:])))[0, 1]
        assert abs(corr.item()) < 5 / math.sqrt(N - lag), lag


def test_box_muller_pairs_are_uncorrelated_in_square():
    """cos/sin lanes of one pair are uncorrelated in value and in magnitude."""
    x = noise.materialize(5, "pairs", 0, N).reshape(-1, 2).double()
    corr = torch.corrcoef(x.T**2)[0, 1]
    assert abs(corr.item()) < 5 / math.sqrt(N / 2)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=True), "seed"),
        (dict(seed=1 << 64), "seed"),
        (dict(kind="uniform"), "kind"),
        (dict(shape=()), "shape"),
        (dict(shape=(3, 0)), "shape"),
        (dict(noise_index=-2), "noise_index"),
        (dict(step=1 << 32), "step"),
        (dict(name=""), "name"),
    ],
)
def test_bad_input_names_the_argument(kwargs, arg):
    call = dict(seed=0, name="w", noise_index=0, shape=(4, 4), kind="gaussian", step=0)
    call.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        noise.materialize(**call)


def test_bad_mode_and_rank():
    with pytest.raises(ValueError, match="mode"):
        noise.member_noise_tensor(noise.NoiseSpec(seed=0), "w", 0, (4, 4), mode="dense")
    with pytest.raises(ValueError, match="rank"):
        noise.materialize_lowrank(0, "w", 0, 4, 3, rank=4)
    with pytest.raises(ValueError, match="rank"):
        noise.materialize_lowrank(0, "w", 0, 4, 3, rank=0)
