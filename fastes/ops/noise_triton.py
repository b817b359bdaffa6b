"""Triton kernels of the noise op: the stream fill and raw Philox words (for bit-exactness tests).

One Philox call per block of 4 Gaussians or per 32-bit word of Rademacher signs
(``philox.gaussian_blocks_flat`` / ``philox.rademacher_words_flat``); ``elementwise`` runs the
element-wise device functions instead, which the matmul kernels reuse, so tests check both.
"""

from __future__ import annotations

import torch

from fastes import _backend
from fastes.noise import KIND_INT, U32_LIMIT, as_i32, check_seed, check_uint
from fastes.ops._triton import TRITON_ERROR as _TRITON_ERROR
from fastes.ops._triton import key_args, philox, tl, triton
from fastes.ops.checks import check_noise_out, check_stream_args

_SCALAR_ARGS = ["n", "offset", "k0", "k1", "tid", "idx", "step"]

if triton is not None:

    @triton.jit(do_not_specialize=_SCALAR_ARGS)
    def _noise_fill_kernel(
        out_ptr,
        n,
        offset,
        k0,
        k1,
        tid,
        idx,
        step,
        GROUPS: tl.constexpr,  # groups per program: Philox blocks (gaussian) or 32-bit words (rademacher)
        PER: tl.constexpr,  # values per group: 4 or 32
        KIND: tl.constexpr,
        ELEMENTWISE: tl.constexpr,  # use the element-wise device functions (tests them; 4x/32x slower)
    ):
        n = n.to(tl.int64)
        offset = offset.to(tl.int64)
        g = offset // PER + tl.program_id(0).to(tl.int64) * GROUPS  # first group of this program
        e = g * PER + tl.arange(0, GROUPS * PER)  # stream elements of this program, group-aligned
        i = e - offset
        mask = (i >= 0) & (i < n)
        if ELEMENTWISE:
            vals = philox.noise_at(e, k0, k1, tid, idx, step, KIND)
        elif KIND == philox.GAUSSIAN:
            vals = philox.gaussian_blocks_flat(g + tl.arange(0, GROUPS), k0, k1, tid, idx, step)
        else:
            vals = philox.rademacher_words_flat(g + tl.arange(0, GROUPS), k0, k1, tid, idx, step)
        tl.store(out_ptr + i, vals, mask=mask)

    @triton.jit(do_not_specialize=["num", "start", "k0", "k1", "tid", "idx", "step"])
    def _philox_blocks_kernel(out_ptr, num, start, k0, k1, tid, idx, step, BLOCKS: tl.constexpr):
        j = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        mask = j < num
        b = start.to(tl.int64) + j
        x0, x1, x2, x3 = philox.philox4x32_10(b.to(tl.uint32), tid, idx, step, k0, k1)
        row = out_ptr + 4 * j
        tl.store(row + 0, x0.to(tl.int64), mask=mask)
        tl.store(row + 1, x1.to(tl.int64), mask=mask)
        tl.store(row + 2, x2.to(tl.int64), mask=mask)
        tl.store(row + 3, x3.to(tl.int64), mask=mask)


GROUP = {"gaussian": 4, "rademacher": 32}  # values per group the fill kernel generates at once


def _default_values_per_program(kind: str) -> int:
    """Not autotuned (one config works under the interpreter). Rademacher: 64 words per program at 4 warps
    (two threads per word, each recomputing it: ~2 Philox calls per 32 signs, still far below the 4 B
    written per sign). sm_90 spills with more: 16384 values ~8 KB per thread on Triton 3.6, the H100
    machines' version; 8192 values 672 B (3.6); 4096 values 8 B (3.9); 2048 values none on either, 54 registers."""
    if _backend.triton_interpreted():
        return 8192 if kind == "gaussian" else 32768  # the interpreter pays per program, not per element
    return 2048


def noise_fill_triton(
    out: torch.Tensor,
    seed: int,
    tensor_id: int,
    noise_index: int,
    step: int,
    offset: int,
    kind: str,
    block: int | None = None,
    elementwise: bool = False,
) -> torch.Tensor:
    """Fill ``out`` (float32, contiguous) with stream elements offset .. offset+numel-1 using Triton.

    ``block`` is the number of values per program (a power of two, at least 4 for gaussian and
    128 for rademacher); results do not depend on it. ``elementwise`` switches the kernel to the
    element-wise device functions (``noise_at``), which later kernels reuse; tests check both.
    """
    out = check_noise_out(out)
    n = out.numel()
    seed, tensor_id, noise_index, step, offset = check_stream_args(seed, tensor_id, noise_index, step, offset, n, kind)
    _backend.require_triton(out, "out", _TRITON_ERROR)
    per = GROUP[kind]
    values = _default_values_per_program(kind) if block is None else block
    if elementwise and block is None and not _backend.triton_interpreted():
        values = 1024  # one Philox call per value in registers: 8 values per thread at 4 warps, no spills
    if isinstance(values, bool) or not isinstance(values, int) or values < per or values & (values - 1):
        raise ValueError(f"block must be a power of two >= {per} for {kind} noise, got {block!r}")
    if n == 0:
        return out
    groups = values // per
    grid = (triton.cdiv((offset + n - 1) // per - offset // per + 1, groups),)
    _noise_fill_kernel[grid](
        out,
        n,
        offset,
        idx=as_i32(noise_index),
        **key_args(seed, tensor_id, step),
        GROUPS=groups,
        PER=per,
        KIND=KIND_INT[kind],
        ELEMENTWISE=bool(elementwise),
    )
    return out


def philox_blocks_triton(
    seed: int,
    tensor_id: int,
    noise_index: int,
    step: int,
    start_block: int,
    num_blocks: int,
    device: torch.device | str = "cuda",
) -> torch.Tensor:
    """Raw Philox words, int64 [num_blocks, 4] in [0, 2**32), from Triton (for bit-exactness tests)."""
    seed = check_seed(seed)
    tensor_id = check_uint(tensor_id, "tensor_id", U32_LIMIT)
    noise_index = check_uint(noise_index, "noise_index", U32_LIMIT)
    step = check_uint(step, "step", U32_LIMIT)
    start_block = check_uint(start_block, "start_block", U32_LIMIT)
    num_blocks = check_uint(num_blocks, "num_blocks", U32_LIMIT + 1)
    if start_block + num_blocks > U32_LIMIT:
        raise ValueError("start_block + num_blocks exceeds the 2**32-block counter space")
    out = torch.full((num_blocks, 4), -1, dtype=torch.int64, device=device)  # poisoned
    _backend.require_triton(out, "device", _TRITON_ERROR)
    if num_blocks == 0:
        return out
    blocks = 256
    _philox_blocks_kernel[(triton.cdiv(num_blocks, blocks),)](
        out,
        num_blocks,
        start_block,
        idx=as_i32(noise_index),
        **key_args(seed, tensor_id, step),
        BLOCKS=blocks,
    )
    return out
