"""Fitness: member aggregation, pass@k against brute force, shaping against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastes.es import fitness as F


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert F.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
            assert F.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_stable_for_large_n_and_bad_args():
    value = F.pass_at_k(2000, 3, 100)
    assert 0 < value < 1 and math.isfinite(value)
    assert F.pass_at_k(2000, 3, 100) == pytest.approx(1 - math.comb(1997, 100) / math.comb(2000, 100), rel=1e-9)
    for bad in [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)]:
        with pytest.raises(ValueError):
            F.pass_at_k(*bad)


def test_member_fitness_mean_and_pass_at_k():
    rewards = [[[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]]
    mean = F.member_fitness(rewards)
    assert mean.tolist() == pytest.approx([0.25, 5 / 8])
    p2 = F.member_fitness(rewards, "pass@2")
    assert p2.tolist() == pytest.approx([(5 / 6 + 0) / 2, (1 + 0.5) / 2])
    assert F.member_fitness(rewards, "pass@k", k=2).tolist() == p2.tolist()
    # success threshold: countdown's 0.1 format score is not a success
    assert F.member_fitness([[[0.1, 1.0]]], "pass@1").tolist() == pytest.approx([0.5])
    assert F.member_fitness([[0.5, 1.5], [2.0]]).tolist() == pytest.approx([1.0, 2.0])
    with pytest.raises(ValueError):
        F.member_fitness(rewards, "pass@")
    with pytest.raises(ValueError):
        F.member_fitness(rewards, "median")
    with pytest.raises(ValueError):
        F.member_fitness([[]])


def test_zscore_population_std():
    out = F.shape(torch.tensor([1.0, 2.0, 3.0, 4.0]), "zscore")
    std = math.sqrt(1.25)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], rel=1e-6)


def test_centered_rank_with_ties():
    out = F.shape([10.0, 3.0, 3.0, 7.0, 0.0], "centered_rank")
    # ranks: 0.0->0, 3.0 tie at ranks 1,2 -> 1.5, 7.0->3, 10.0->4 ; /4 - 0.5
    assert out.tolist() == pytest.approx([0.5, -0.125, -0.125, 0.25, -0.5])
    assert F.shape([5.0, 1.0], "centered_rank").tolist() == [0.5, -0.5]


def test_group_global_antithetic_and_group_size():
    f = [1.0, 3.0, 2.0, 2.0, 0.0, 4.0]
    std = torch.tensor(f, dtype=torch.float64).std(unbiased=False).item()  # global std of raw fitness
    out = F.shape(f, "group_global", antithetic=True)
    assert out.tolist() == pytest.approx([-1 / std, 1 / std, 0.0, 0.0, -2 / std, 2 / std], rel=1e-6)
    out3 = F.shape(f, "group_global", group_size=3)
    assert out3.tolist() == pytest.approx([-1 / std, 1 / std, 0.0, 0.0, -2 / std, 2 / std], rel=1e-6)
    # groups [1,3,2] mean 2, [2,0,4] mean 2 -> same numbers here; a case where groups differ:
    out_b = F.shape([0.0, 2.0, 10.0, 14.0], "group_global", antithetic=True)
    std_b = math.sqrt(((0 - 6.5) ** 2 + (2 - 6.5) ** 2 + (10 - 6.5) ** 2 + (14 - 6.5) ** 2) / 4)
    assert out_b.tolist() == pytest.approx([-1 / std_b, 1 / std_b, -2 / std_b, 2 / std_b], rel=1e-6)


def test_sign_and_raw():
    assert F.shape([1.0, 3.0, 5.0, 5.0], "sign", antithetic=True).tolist() == [-1.0, 1.0, 0.0, 0.0]
    assert F.shape([1.0, 3.0, 5.0, 7.0], "sign").tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert F.shape([1.0, 0.5], "raw").tolist() == [1.0, 0.5]


@pytest.mark.parametrize("method", F.SHAPING_METHODS)
def test_zero_spread_returns_none(method):
    assert F.shape([0.3, 0.3, 0.3, 0.3], method, antithetic=True) is None
    assert F.shape([0.0] * 6, method) is None
    assert F.shape([1.0], method) is None


@pytest.mark.parametrize("method", ["group_global", "sign"])
def test_all_pairs_tied_returns_none(method):
    assert F.shape([1.0, 1.0, 2.0, 2.0], method, antithetic=True) is None


def test_shape_rejects_bad_input():
    with pytest.raises(ValueError):
        F.shape([1.0, 2.0, 3.0], "zscore", antithetic=True)
    with pytest.raises(ValueError):
        F.shape([1.0, float("nan")], "zscore")
    with pytest.raises(ValueError):
        F.shape([1.0, 2.0], "softmax")
    with pytest.raises(ValueError):
        F.shape([1.0, 2.0, 3.0, 4.0], "group_global", group_size=3)


def test_coefficients_convention():
    shaped = torch.tensor([1.0, -1.0, 0.5, -0.5])
    c = F.coefficients(shaped, sigma=1e-3)
    assert c.tolist() == pytest.approx([250.0, -250.0, 125.0, -125.0])
    assert F.coefficients(shaped, sigma=0.5, population_size=8).tolist() == pytest.approx([0.25, -0.25, 0.125, -0.125])
    with pytest.raises(ValueError):
        F.coefficients(shaped, sigma=0.0)
    # Qiu et al.: theta += alpha/N * sum z eps  ==  lr * sum c_m eps with c = z/(N sigma), lr = alpha*sigma
    alpha, sigma = 5e-4, 1e-3
    z = torch.tensor([0.3, -1.2, 0.9])
    eps = torch.randn(3, 7, dtype=torch.float64)
    qiu = alpha / 3 * (z.double()[:, None] * eps).sum(0)
    ours = F.lr_from_alpha(alpha, sigma) * (F.coefficients(z, sigma).double()[:, None] * eps).sum(0)
    assert torch.allclose(qiu, ours, rtol=1e-6, atol=0)


def test_member_level_plugins():
    rollouts_a = F.make_rollouts(
        ["p1", "p2"], [["<answer>1</answer>", "<answer>2</answer>"], ["x", "y"]], [[1, 0], [0, 1]]
    )
    assert len(rollouts_a) == 4 and rollouts_a[2]["prompt"] == "p2" and rollouts_a[3]["sample_index"] == 1
    assert F.mean_reward(rollouts_a) == 0.5
    kl = F.answer_kl_fitness({"1": 0.5, "2": 0.5}, eps=1e-9)
    uniform = F.make_rollouts(["p"], [["<answer>1</answer>", "<answer>2</answer>"] * 5])
    skewed = F.make_rollouts(["p"], [["<answer>1</answer>"] * 9 + ["<answer>2</answer>"]])
    assert kl(uniform) == pytest.approx(0.0, abs=1e-6)
    expected = -(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert kl(skewed) == pytest.approx(expected, rel=1e-6)
    assert kl(skewed) < kl(uniform)
    reverse = F.answer_kl_fitness({"1": 0.5, "2": 0.5}, eps=1e-9, direction="reverse")
    assert reverse(skewed) == pytest.approx(-(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)), rel=1e-6)

    def broken(rollouts):
        if rollouts[0]["prompt"] == "bad":
            raise RuntimeError("boom")
        return float("nan") if rollouts[0]["prompt"] == "nan" else 2.0

    members = [F.make_rollouts([p], [["a"]]) for p in ["ok", "bad", "nan"]]
    values, stats = F.evaluate_member_fitness(broken, members, on_error=-1.0)
    assert values.tolist() == [2.0, -1.0, -1.0] and stats["fitness/errors"] == 2


def test_weight_decay():
    w = torch.ones(3)
    assert F.apply_weight_decay([w], lr=0.1, weight_decay=0.5) == pytest.approx(0.95)
    assert w.tolist() == pytest.approx([0.95] * 3)
