"""The CPU noise materializers of fastes.ops.member_noise against the reference noise of fastes.noise."""

from __future__ import annotations

import math

import pytest
import torch

from fastes.noise import NoiseSpec, member_noise_tensor
from fastes.ops import member_noise


@pytest.mark.parametrize("antithetic", [True, False])
def test_stacked_lowrank_is_each_members_factors(antithetic):
    """Stacked transposed factors: bitwise the per-member A, B (some rows already cached, some filled
    together), and A_m Bᵀ_m·scale·sign equal to the reference E_m·√r·scale."""
    spec = NoiseSpec(seed=11, step=7, kind="gaussian", antithetic=antithetic)
    out_f, in_f, rank, scale, name = 6, 10, 3, 0.37, "model.layers.0.mlp.up_proj.weight"
    members = (4, 0, 5, 1, 2)
    member_noise.clear_cache()
    member_noise.lowrank_factors(spec, name, 0, out_f, in_f, rank)  # one stream cached before the stack
    a_t, b_t = member_noise.stacked_lowrank(spec, name, members, out_f, in_f, rank, "cpu", scale)
    assert a_t.shape == (5, rank, out_f) and b_t.shape == (5, rank, in_f)
    for i, m in enumerate(members):
        a, b, sign = member_noise.lowrank_factors(spec, name, m, out_f, in_f, rank)
        assert torch.equal(b_t[i], b.t())
        assert torch.equal(a_t[i], a.t() * (sign * scale))
        want = member_noise_tensor(spec, name, m, (out_f, in_f), "lowrank", rank) * (math.sqrt(rank) * scale)
        torch.testing.assert_close(a_t[i].t() @ b_t[i], want, rtol=1e-5, atol=1e-6)
