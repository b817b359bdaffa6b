"""Sampling fast paths (fastes.engine.sampling.sample) equal the general filtered path bit for bit.

The general path is filter_probs (sort, top-k / top-p / min-p masks, scatter back) followed by the
inverse CDF; with no filter set it must give the very same tokens without sorting anything.
"""

from __future__ import annotations

import pytest
import torch

import fastes.engine.sampling as sampling
from fastes.engine.sampling import SamplingParams, filter_probs, row_uniforms, sample, sample_from_probs


def _coords(rows: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (torch.randint(1, 500, (rows,), generator=gen), torch.randint(-1, 8, (rows,), generator=gen),
            torch.randint(0, 2**32, (rows,), generator=gen), torch.randint(0, 4, (rows,), generator=gen))


def _general(logits: torch.Tensor, params: SamplingParams, seed: int,
             coords: tuple[torch.Tensor, ...]) -> torch.Tensor:
    rows = logits.shape[0]
    probs = filter_probs(logits, torch.full((rows,), float(params.temperature)),
                         torch.full((rows,), max(params.top_k, 0)), torch.full((rows,), float(params.top_p)),
                         torch.full((rows,), float(params.min_p)))
    return sample_from_probs(probs, row_uniforms(seed, *coords))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_temperature_alone_needs_no_sort_and_equals_the_filtered_path(monkeypatch, temperature):
    gen = torch.Generator().manual_seed(int(temperature * 10))
    logits = torch.randn(257, 97, generator=gen) * 3
    coords = _coords(257, gen)
    params = SamplingParams(temperature=temperature)
    want = _general(logits, params, 11, coords)

    def no_filter(*args, **kwargs):
        raise AssertionError("temperature-only sampling must not sort the vocabulary")

    monkeypatch.setattr(sampling, "filter_probs", no_filter)
    assert torch.equal(sample(logits, params, 11, *coords), want)


@pytest.mark.parametrize("kwargs", [dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1), dict(top_k=3, top_p=0.5)])
def test_filters_take_the_filtered_path(kwargs):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 50, generator=gen) * 2
    coords = _coords(64, gen)
    params = SamplingParams(temperature=0.9, **kwargs)
    got = sample(logits, params, 5, *coords)
    assert torch.equal(got, _general(logits, params, 5, coords))
    if "top_k" in kwargs:  # every drawn token is among the row's top k
        top = logits.topk(kwargs["top_k"], dim=-1).indices
        assert (top == got.unsqueeze(1)).any(dim=1).all()


def test_greedy_is_the_argmax():
    logits = torch.randn(33, 40, generator=torch.Generator().manual_seed(0))
    empty = torch.empty(0, dtype=torch.long)
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0), 0, empty, empty, empty, empty),
                       logits.argmax(dim=-1))


def test_common_random_numbers_drop_only_the_member():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(16, 30, generator=gen).repeat(2, 1)
    positions, _, prompts, samples = (c.repeat(2) for c in _coords(16, gen))
    members = torch.cat([torch.full((16,), 2), torch.full((16,), 5)])
    crn = sample(logits, SamplingParams(common_random_numbers=True), 4, positions, members, prompts, samples)
    assert torch.equal(crn[:16], crn[16:])
    own = sample(logits, SamplingParams(), 4, positions, members, prompts, samples)
    assert not torch.equal(own[:16], own[16:])
    unperturbed = sample(logits[:16], SamplingParams(), 4, positions[:16], torch.full((16,), -1), prompts[:16],
                         samples[:16])
    assert torch.equal(crn[:16], unperturbed)
