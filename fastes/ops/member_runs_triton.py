"""Device helpers shared by the perturbed-linear kernels: a row tile's members, noise indices and runs.

Rows arrive sorted by member (docs/design.md, "Engine"), so a tile holds a few runs of equal noise
index; the lowrank shrink/GEMM (perturbed_linear_triton.py) and the full-rank GEMM
(perturbed_linear_full_triton.py) both find them on device, with no host sync.
"""

from __future__ import annotations

from fastes.ops._triton import tl, triton  # None without Triton

if triton is not None:

    @triton.jit
    def _noise_index(m, ANTI: tl.constexpr):
        """Noise index of member ids ``m`` (fastes.noise.member_noise)."""
        if ANTI:
            return m >> 1
        else:
            return m

    @triton.jit
    def _noise_sign(m, ANTI: tl.constexpr):
        """Float sign of member ids ``m``: -1 for odd members under antithetic sampling."""
        if ANTI:
            return 1.0 - 2.0 * (m & 1).to(tl.float32)
        else:
            return 1.0 + 0.0 * m.to(tl.float32)

    @triton.jit
    def _runs(rm_ptr, rows, T, BM: tl.constexpr, ANTI: tl.constexpr):
        """(member [BM] int64, noise index [BM], run id [BM] (-1 = unperturbed), run count) of this tile's rows.

        A run is a stretch of rows sharing one noise index: under antithetic sampling a pair of
        members (2i, 2i + 1) forms one run, its noise generated once and applied with ±.
        """
        valid = rows < T
        m = tl.load(rm_ptr + rows, mask=valid, other=-1).to(tl.int64)
        prev = tl.load(rm_ptr + rows - 1, mask=valid & (tl.arange(0, BM) > 0), other=-2).to(tl.int64)
        idx = tl.where(m >= 0, _noise_index(m, ANTI), -1)
        prev_idx = tl.where(prev >= 0, _noise_index(prev, ANTI), -2)
        start = (m >= 0) & ((tl.arange(0, BM) == 0) | (idx != prev_idx))
        seg = tl.where(m >= 0, tl.cumsum(start.to(tl.int32), axis=0) - 1, -1)
        return m, idx, seg, tl.sum(start.to(tl.int32), axis=0)


__all__ = ["_noise_index", "_noise_sign", "_runs"]
