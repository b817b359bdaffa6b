"""Triton kernels of ``lora_linear`` (Punica SGMV-style, three launches).

The shared base GEMM ``F.linear`` (one read of W for every member), a shrink ``H = x A_mᵀ`` (fp32 [T, r]) and an expand
``y += scaling · H B_mᵀ``. A_m and B_m are the loaded adapter tiles plus noise generated
in registers. A program owns BLOCK_M rows and loops over the distinct members among them
(min member, then the next larger one, ...), masking the other rows: rows sorted by member
give one or two iterations per program, unsorted rows stay correct at up to BLOCK_M.

Cost at a decode step, T = 2048 rows, in = out = 1536, r = 8, N = 32 sorted, bf16, H100:

* base GEMM: 2·T·in·out = 9.7 GFLOP ≈ 12 µs; W 4.7 MB + x 6.3 MB + y 6.3 MB.
* shrink: 2·T·in·16 (r padded to 16 for tl.dot) = 0.1 GFLOP; reads x once more (6.3 MB).
* expand: 0.1 GFLOP; reads and writes y in place (12.6 MB) ≈ 4 µs.
* noise: each (row tile, member) pair regenerates its member's A_m (16 × in) and B_m
  (out × 16) tiles: with BLOCK_M = 64 there are T/64 + N ≈ 64 pairs, i.e. 64 · 2 · 16 · 1536
  ≈ 3.1 M values, one Philox call per 4 (Gaussian, in % 4 == 0 resp. r % 4 == 0) ≈ 0.8 M
  calls ≈ 0.1 G int ops ≈ 5 µs of CUDA-core time spread over two memory-bound kernels.
  Ranks 1–3 (and Rademacher) generate element-wise: 4× that for the B side.
"""

from __future__ import annotations

import torch

from fastes import _backend
from fastes.noise import KIND_INT, VALUES_PER_BLOCK, NoiseSpec, tensor_id
from fastes.ops._triton import TRITON_ERROR as _TRITON_ERROR
from fastes.ops._triton import key_args, philox, tl, triton

if triton is not None:
    NO_MEMBER = tl.constexpr(1 << 40)  # larger than any member id: "no rows left" in the member loop

    @triton.jit
    def _first_member(member_ptr, rows, rmask, HAS_MEMBER: tl.constexpr):
        """Members of rows (NO_MEMBER past the end; −1 everywhere without members) and the smallest."""
        if HAS_MEMBER:
            mem = tl.where(rmask, tl.load(member_ptr + rows, mask=rmask, other=0).to(tl.int64), NO_MEMBER)
        else:
            mem = tl.where(rmask, -1, NO_MEMBER).to(tl.int64)
        return mem, tl.min(mem, axis=0)

    @triton.jit
    def _member_coef(cur, sigma, ANTITHETIC: tl.constexpr):
        """(noise index, σ·sign) of member ``cur`` (≥ 0)."""
        if ANTITHETIC:
            return cur >> 1, sigma * (1 - 2 * (cur & 1)).to(tl.float32)
        else:
            return cur, sigma

    @triton.jit(do_not_specialize=["num_rows", "sigma", "k0", "k1", "tid", "step"])
    def _shrink_kernel(h_ptr, x_ptr, a_ptr, member_ptr, num_rows, in_f, rank, sigma, k0, k1, tid, step,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                       HAS_MEMBER: tl.constexpr, HAS_NOISE: tl.constexpr, ANTITHETIC: tl.constexpr,
                       KIND: tl.constexpr, BLOCKED: tl.constexpr, PREC: tl.constexpr):
        """H[rows] = x[rows] A_mᵀ, fp32 [T, r]; A_m = A + σ·sign·E_A (stream element j·in + k)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < num_rows
        rows64 = rows.to(tl.int64)
        jj = tl.arange(0, R_PAD)
        jmask = jj < rank
        mem, cur = _first_member(member_ptr, rows, rmask, HAS_MEMBER)
        while cur < NO_MEMBER:
            sel = rmask & (mem == cur)
            idx, c = _member_coef(tl.maximum(cur, 0), sigma, ANTITHETIC)
            acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
            for kb in range(0, in_f, BLOCK_K):
                kk = kb + tl.arange(0, BLOCK_K)
                kmask = kk < in_f
                x = tl.load(x_ptr + rows64[:, None] * in_f + kk[None, :], mask=sel[:, None] & kmask[None, :],
                            other=0.0).to(tl.float32)
                a = tl.load(a_ptr + jj[:, None] * in_f + kk[None, :], mask=jmask[:, None] & kmask[None, :],
                            other=0.0).to(tl.float32)
                if HAS_NOISE:
                    if cur >= 0:  # padded rows/columns get finite noise that meets zeros of x or is not stored
                        e_row = jj[:, None].to(tl.int64) * in_f + kb
                        a += c * philox.noise_rows(e_row, BLOCK_K, k0, k1, tid, idx, step, KIND, BLOCKED)
                acc += tl.dot(x, tl.trans(a), input_precision=PREC)
            tl.store(h_ptr + rows64[:, None] * rank + jj[None, :], acc, mask=sel[:, None] & jmask[None, :])
            cur = tl.min(tl.where(mem > cur, mem, NO_MEMBER), axis=0)

    @triton.jit(do_not_specialize=["num_rows", "sigma", "scaling", "k0", "k1", "tid", "step"])
    def _expand_kernel(out_ptr, base_ptr, h_ptr, b_ptr, member_ptr, num_rows, out_f, rank, sigma, scaling,
                       k0, k1, tid, step, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
                       HAS_MEMBER: tl.constexpr, HAS_NOISE: tl.constexpr, ANTITHETIC: tl.constexpr,
                       KIND: tl.constexpr, BLOCKED: tl.constexpr, PREC: tl.constexpr):
        """out = base + scaling · H B_mᵀ; B_m = B + σ·sign·E_B (stream element n·r + j)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < num_rows
        rows64 = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < out_f
        jj = tl.arange(0, R_PAD)
        jmask = jj < rank
        b = tl.load(b_ptr + cols[:, None] * rank + jj[None, :], mask=cmask[:, None] & jmask[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        mem, cur = _first_member(member_ptr, rows, rmask, HAS_MEMBER)
        while cur < NO_MEMBER:
            sel = rmask & (mem == cur)
            h = tl.load(h_ptr + rows64[:, None] * rank + jj[None, :], mask=sel[:, None] & jmask[None, :], other=0.0)
            bm = b
            if HAS_NOISE:
                if cur >= 0:  # padded columns get finite noise that meets zero columns of h
                    idx, c = _member_coef(cur, sigma, ANTITHETIC)
                    e_row = cols[:, None].to(tl.int64) * rank
                    bm = b + c * philox.noise_rows(e_row, R_PAD, k0, k1, tid, idx, step, KIND, BLOCKED)
            acc += tl.dot(h, tl.trans(bm), input_precision=PREC)
            cur = tl.min(tl.where(mem > cur, mem, NO_MEMBER), axis=0)
        offs = rows64[:, None] * out_f + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        y = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32) + scaling * acc
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int, override: int | None, gpu: int) -> int:
    """Tile size: ``gpu`` on a GPU; the interpreter pays per program and per op, not per element, so it takes more.

    GPU sizes (``_gpu_blocks``) compile for sm_90 without spills for bf16 at ranks up to 64.
    """
    if override is not None:
        return override
    return max(16, min(triton.next_power_of_2(n), 128)) if _backend.triton_interpreted() else gpu


def _gpu_blocks(r_pad: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N): BLOCK_M 64 (one decode segment of 2048 rows / 32 members) at r ≤ 16,
    shrinking as the rank grows so that the [BLOCK_M, r] accumulator and the r-row noise tile fit registers."""
    block_m = max(16, min(64, 64 * 16 // r_pad))
    return block_m, 32 if r_pad == 16 and dtype != torch.float32 else 16, 32


def _noise_launch_args(noise: NoiseSpec | None, row_member: torch.Tensor | None, sigma: float, name: str,
                       fallback: torch.Tensor) -> tuple[bool, torch.Tensor, list[int], dict[str, object]]:
    """(has_noise, member pointer, Philox scalars as int32 bit patterns, shared constexprs)."""
    has_noise = noise is not None and row_member is not None and sigma != 0
    kind = noise.kind if noise is not None else "gaussian"
    scalars = [0, 0, 0, 0]
    if has_noise:
        scalars = list(key_args(noise.seed, tensor_id(name), noise.step).values())
    members = row_member.contiguous() if has_noise else fallback  # not read without noise
    const = dict(HAS_MEMBER=has_noise, HAS_NOISE=has_noise, ANTITHETIC=has_noise and noise.antithetic,
                 KIND=KIND_INT[kind], num_warps=4)
    return has_noise, members, scalars, const


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots; bf16/fp16 inputs are exact in tf32 and their outputs coarser than it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, row_member: torch.Tensor | None,
                       noise: NoiseSpec | None, sigma: float, name_a: str, block_m: int | None = None,
                       block_k: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """H = x A_mᵀ per row's member, fp32 [T, r] (``out`` if given)."""
    _backend.require_triton(x, "x", _TRITON_ERROR)
    (num_rows, in_f), rank = x.shape, lora_a.shape[0]
    if out is None:
        out = torch.empty(num_rows, rank, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return out
    has_noise, members, (k0, k1, tid, step), const = _noise_launch_args(noise, row_member, sigma, name_a, x)
    r_pad = max(16, triton.next_power_of_2(rank))
    gpu_m, gpu_k, _ = _gpu_blocks(r_pad, x.dtype)
    block_m, block_k = _block(num_rows, block_m, gpu_m), _block(in_f, block_k, gpu_k)
    per = VALUES_PER_BLOCK[noise.kind if noise is not None else "gaussian"]
    _shrink_kernel[(triton.cdiv(num_rows, block_m),)](
        out, x.contiguous(), lora_a.contiguous(), members, num_rows, in_f, rank, float(sigma), k0, k1, tid, step,
        BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=r_pad,
        BLOCKED=in_f % per == 0 and block_k % per == 0, PREC=_precision(x.dtype), **const,
    )
    return out


def lora_expand_triton(base: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                       row_member: torch.Tensor | None, noise: NoiseSpec | None, sigma: float, name_b: str,
                       block_m: int | None = None, block_n: int | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """out = base + scaling · H B_mᵀ (base's dtype, H fp32 [T, r]); in place into base unless ``out`` is given."""
    _backend.require_triton(base, "base", _TRITON_ERROR)
    (num_rows, out_f), rank = base.shape, lora_b.shape[1]
    base = base.contiguous()
    out = base if out is None else out
    if num_rows == 0:
        return out
    has_noise, members, (k0, k1, tid, step), const = _noise_launch_args(noise, row_member, sigma, name_b, base)
    r_pad = max(16, triton.next_power_of_2(rank))
    gpu_m, _, gpu_n = _gpu_blocks(r_pad, base.dtype)
    block_m, block_n = _block(num_rows, block_m, gpu_m), _block(out_f, block_n, gpu_n)
    per = VALUES_PER_BLOCK[noise.kind if noise is not None else "gaussian"]
    _expand_kernel[(triton.cdiv(num_rows, block_m), triton.cdiv(out_f, block_n))](
        out, base, h.contiguous(), lora_b.contiguous(), members, num_rows, out_f, rank, float(sigma),
        float(scaling), k0, k1, tid, step, BLOCK_M=block_m, BLOCK_N=block_n, R_PAD=r_pad,
        BLOCKED=rank % per == 0, PREC=_precision(base.dtype), **const,
    )
    return out


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: float, row_member: torch.Tensor | None,
                       noise: NoiseSpec | None, sigma: float, name_a: str, name_b: str,
                       out: torch.Tensor | None = None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Shared base GEMM, then shrink and expand; y is written in place over the base GEMM unless ``out`` is given.

    ``blocks`` = (BLOCK_M, BLOCK_K, BLOCK_N), powers of two ≥ 16, overrides the tiling; results do not
    depend on it.
    """
    _backend.require_triton(x, "x", _TRITON_ERROR)
    block_m, block_k, block_n = blocks if blocks is not None else (None, None, None)
    if out is not None and (out.shape != (x.shape[0], weight.shape[0]) or out.dtype != x.dtype
                            or out.device != x.device or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous [{x.shape[0]}, {weight.shape[0]}] of {x.dtype} on {x.device}")
    base = torch.nn.functional.linear(x, weight, bias)
    # poisoned under the interpreter (tests): a row the shrink misses turns the output NaN
    h = torch.empty(x.shape[0], lora_a.shape[0], dtype=torch.float32, device=x.device)
    if _backend.triton_interpreted():
        h.fill_(float("nan"))
    lora_shrink_triton(x, lora_a, row_member, noise, sigma, name_a, block_m, block_k, out=h)
    return lora_expand_triton(base, h, lora_b, scaling, row_member, noise, sigma, name_b, block_m, block_n, out=out)
