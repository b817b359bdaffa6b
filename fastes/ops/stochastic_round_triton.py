"""Triton side of ``stochastic_round``: the rounding device functions and a small rounding kernel.

``_round`` is shared with the fused ES update (``es_update_triton``), which rounds its fp32 sums
in the same pass; the kernel here rounds a buffer already summed (CUDA, or the interpreter).
Bits: block e // 4 of ``sr_tensor_id(name)`` at index ``SR_NOISE_INDEX``, word e % 4
(``fastes.noise.stochastic_rounding_bits``).
"""

from __future__ import annotations

import torch

from fastes import _backend
from fastes.noise import SR_NOISE_INDEX, sr_tensor_id
from fastes.ops._triton import TRITON_ERROR, key_args, philox, tl, triton

OUT_FP32, OUT_BF16, OUT_FP16 = 0, 1, 2
OUT_CODES = {torch.float32: OUT_FP32, torch.bfloat16: OUT_BF16, torch.float16: OUT_FP16}

if triton is not None:

    @triton.jit
    def _flat4(x0, x1, x2, x3):
        """Interleave four [..., B] lane tensors into [..., 4B] in stream order (block-major, lane-minor)."""
        return tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))

    @triton.jit
    def _sr_words_at(e, k0, k1, sr_tid, sr_idx, step):
        """Rounding word of element indices ``e`` (one Philox call each: only for unaligned rows)."""
        x0, x1, x2, x3 = philox.philox4x32_10((e >> 2).to(tl.uint32), sr_tid, sr_idx, step, k0, k1)
        lane = e & 3
        return tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))

    @triton.jit
    def _round(v, words, OUT: tl.constexpr):
        """fp32 ``v`` → output dtype with the contract's stochastic rounding (fp32: unchanged)."""
        if OUT == 0:
            return v
        elif OUT == 1:
            # bf16: add the low 16 random bits to the fp32 pattern, keep the high half.
            raw = v.to(tl.uint32, bitcast=True)
            finite = (raw & 0x7F800000) != 0x7F800000
            hi = ((raw + (words & 0xFFFF)) >> 16).to(tl.uint16)
            return tl.where(finite, hi.to(tl.bfloat16, bitcast=True), v.to(tl.bfloat16))
        else:
            # fp16: round up with probability (v - down) / (up - down), u = (words >> 8) * 2**-24.
            near16 = v.to(tl.float16)
            near = near16.to(tl.float32)
            above = near > v
            h = near16.to(tl.uint16, bitcast=True).to(tl.int32)
            neg = (h & 0x8000) != 0
            step_dir = tl.where(neg != above, -1, 1)  # the next fp16 bit pattern away from `near` toward v
            other_h = tl.where((h & 0x7FFF) == 0, tl.where(above, 0x8001, 0x0001), h + step_dir)
            other = other_h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            down = tl.where(above, other, near)
            up = tl.where(above, near, other)
            gap = up - down
            p = tl.where(gap > 0, tl.math.div_rn(v - down, tl.where(gap > 0, gap, 1.0)), 0.0)
            u = (words >> 8).to(tl.float32) * philox.U24_SCALE
            raw = v.to(tl.uint32, bitcast=True)
            keep = ((raw & 0x7F800000) == 0x7F800000) | (near == v)
            return tl.where(keep, near, tl.where(u < p, up, down)).to(tl.float16)

    @triton.jit(do_not_specialize=["n", "k0", "k1", "tid", "idx", "step"])
    def _round_kernel(v_ptr, out_ptr, n, k0, k1, tid, idx, step, BLOCK: tl.constexpr, OUT: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK  # BLOCK % 4 == 0: each program owns whole blocks
        e = start + tl.arange(0, BLOCK)
        mask = e < n
        v = tl.load(v_ptr + e, mask=mask, other=0.0)
        blk = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
        x0, x1, x2, x3 = philox.philox4x32_10(blk, tid, idx, step, k0, k1)
        tl.store(out_ptr + e, _round(v, _flat4(x0, x1, x2, x3), OUT), mask=mask)


def _round_triton(value: torch.Tensor, out: torch.Tensor, seed: int, name: str, step: int) -> None:
    """Contiguous fp32 ``value`` → contiguous ``out`` (bf16/fp16) on one device, in one launch."""
    if triton is None:
        raise RuntimeError(f"the Triton backend is unavailable: {TRITON_ERROR}")
    n = out.numel()
    if n >= 1 << 34:
        raise ValueError("out has more than 2**34 elements: beyond one stochastic-rounding counter space")
    block = 4096 if _backend.triton_interpreted() else 1024
    _round_kernel[(triton.cdiv(n, block),)](value, out, n, idx=SR_NOISE_INDEX,
                                            **key_args(seed, sr_tensor_id(name), step),
                                            BLOCK=block, OUT=OUT_CODES[out.dtype], num_warps=4)
