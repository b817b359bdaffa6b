"""top-k, top-p (at its boundaries) and min-p of fastes.engine.sampling.filter_probs against the definitions,
computed here in float64 on a distribution with exact binary probabilities.

Definitions: top-k keeps the k most probable tokens; top-p keeps the most probable tokens while the mass
*before* a token is below p (so the smallest set whose mass reaches p); min-p keeps tokens with probability at
least min_p times the largest; the most probable token is always kept; the kept mass is renormalized.
"""

from __future__ import annotations

import pytest
import torch

from fastes.engine.sampling import SamplingParams, filter_probs, needs_filter

PROBS = [0.125, 0.5, 0.0625, 0.25, 0.0625]  # shuffled: the filter must sort, and restore the order


def expected(probs: list[float], top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, before = set(), 0.0
    for rank, i in enumerate(order):
        ok = (top_k == 0 or rank < top_k) and before < top_p and probs[i] >= min_p * probs[order[0]]
        if ok or rank == 0:
            keep.add(i)
        before += probs[i]
    kept = torch.tensor([p if i in keep else 0.0 for i, p in enumerate(probs)], dtype=torch.float64)
    return kept / kept.sum()


def run(top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    logits = torch.tensor(PROBS, dtype=torch.float64).log().float().unsqueeze(0).repeat(2, 1)
    one = torch.ones(2)
    out = filter_probs(logits, one, torch.full((2,), top_k), one * top_p, one * min_p)
    assert torch.equal(out[0], out[1])
    return out[0].double()


@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
def test_top_k(top_k):
    torch.testing.assert_close(run(top_k=top_k), expected(PROBS, top_k=top_k), atol=1e-6, rtol=0)
    assert int((run(top_k=top_k) > 0).sum()) == top_k


@pytest.mark.parametrize("edge", [0.5, 0.75, 0.875])  # the sorted cumulative masses 0.5, 0.75, 0.875, 0.9375
@pytest.mark.parametrize("side", [-1e-4, 0.0, 1e-4])
def test_top_p_at_its_boundaries(edge, side):
    """At or just below a cumulative mass the next token is out; just above, it is in (the masses are exact
    in binary, and so are the softmax outputs here)."""
    p = edge + side
    torch.testing.assert_close(run(top_p=p), expected(PROBS, top_p=p), atol=1e-6, rtol=0)
    kept = int((run(top_p=p) > 0).sum())
    assert kept == {0.5: 1, 0.75: 2, 0.875: 3}[edge] + (side > 0)


@pytest.mark.parametrize("min_p", [0.2, 0.25 + 1e-4, 0.5, 0.9])
def test_min_p(min_p):
    torch.testing.assert_close(run(min_p=min_p), expected(PROBS, min_p=min_p), atol=1e-6, rtol=0)
    assert needs_filter(SamplingParams(temperature=1.0, min_p=min_p))


def test_filters_combine():
    got = run(top_k=3, top_p=0.8, min_p=0.3)
    torch.testing.assert_close(got, expected(PROBS, top_k=3, top_p=0.8, min_p=0.3), atol=1e-6, rtol=0)
