"""RoPE application against an independent oracle: each (x_j, x_{j+D/2}) pair rotated as a complex number."""

from __future__ import annotations

import torch

from fastes.models.rope import apply_rope, rope_cos_sin


def test_apply_rope_is_a_complex_rotation(rng):
    positions = torch.tensor([0, 3, 17, 1, 40])
    dim = 16
    freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    x = torch.randn(5, 3, dim, generator=rng)
    z = torch.complex(x[..., : dim // 2].double(), x[..., dim // 2 :].double())
    rotated = z * torch.polar(torch.ones(5, 1, dim // 2, dtype=torch.float64),
                              (positions.double().unsqueeze(1) * freq).unsqueeze(1))
    want = torch.cat((rotated.real, rotated.imag), dim=-1).float()
    cos, sin = rope_cos_sin(positions, freq.float())
    torch.testing.assert_close(apply_rope(x, cos, sin), want, atol=2e-5, rtol=0)
    half = apply_rope(x.to(torch.bfloat16), cos, sin)  # fp32 math, the input's dtype out
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), want, atol=0.05, rtol=0)
