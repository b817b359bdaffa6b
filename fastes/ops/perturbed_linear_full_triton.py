"""Triton kernel of ``perturbed_linear``'s full mode: Y_t = x_t (W + σ·s·sign_t·E_q(t))ᵀ, E generated in the K loop.

A program owns BM rows x BN output columns and finds the runs of equal noise index among its rows
on device (``_runs``: any row order, no host sync). Its first K loop gives every row the base dot
x Wᵀ and, in a second accumulator, the noise dot x E_0ᵀ that run 0's rows keep; each further run q
of the tile takes one more K loop of its own rows against E_q (W is not read again). Every K loop is therefore a plain
loop over K tiles, loads one iteration ahead of the math (software pipelined), and each noise
tile [BN, BK] is generated once per (W tile, run) — once per (W tile, noise index) when each index's
rows sit in one row tile, as a decode step's do (16 rows per member, 32 per antithetic pair;
BM = 16 or 32). Before (one program per 64-row tile, a per-run loop inside the K loop), the loop
could not be pipelined: each K iteration waited on its W tile, 48-280 of them per program.

E's tile is generated in registers and goes to the dot in X's dtype (±1 is exact in bf16; a Gaussian
rounds to bf16 as X does); each row's σ·s·sign scales its noise accumulator once, in fp32, after the
loop, so nothing is multiplied per K tile and the sum is x Wᵀ + σ·s·sign·x Eᵀ = x (W + σ·s·sign·E)ᵀ,
the product the torch reference forms in fp32 (tests/test_perturbed_linear.py). Noise per tile:
* Rademacher, IN and BK multiples of 128: one Philox call per 128 signs, its four words kept in
  the thread that made them and, for bf16, turned into signs two per 32-bit word
  (``philox.rademacher_blocks_2d``); IN % 32 == 0: one call per 32-bit word; otherwise one per value.
* Gaussian: one call per 4 values (IN % 4 == 0) plus Box-Muller per value.

Cost, Qwen2.5-1.5B up_proj (8960 x 1536) at an N = 32 decode step (512 rows, 16 per member, bf16; counted
as N·numel, i.e. without the antithetic halving), H100 at 3.35 TB/s:
* noise: N·out·in = 440 M values per launch (220 M with antithetic pairs in 32-row tiles);
* bytes: W once from HBM (27.5 MB; the row tiles of a column tile run next to each other and share it
  in L2) + X + Y = 38.3 MB, 11 us;
* tensor-core FLOPs: 2·T·in·out·(1 + members per row tile) = 28.2 GFLOP (mma.sync, m16n8k16), ~36 us;
* CUDA-core instructions in the K loop's sm_90 SASS (``bench.compile.sass``; Triton 3.9, 16 x 64 x 128, 4 warps):
  396 per thread per K step = 6.2 per noise value (Philox ~1, one shift and one and/xor per two bf16
  signs, a register move of the mask constant, then operand staging through shared memory, the two
  mma and address arithmetic; 555 = 8.7 when the signs went through float32 and a bf16 pack):
  2.7e9 per launch, ~92 us at the full issue rate; 168 registers give 3 CTAs (12 warps) per SM, which
  hide 3/4 of the latency in bench/gpu_model.py.
Predicted 125-160 us per launch (unperturbed GEMM ~20 us): CUDA-core bound; a step ratio of 0.35-0.42
at 1.5B and 0.53-0.58 at 0.5B for Rademacher, 0.047 / 0.09 for Gaussian (Box-Muller bound). Predictions
(``python -m bench.gpu_model``), not measurements.
"""

from __future__ import annotations

from typing import Any

import torch

from fastes.ops._triton import KEY_ARGS, philox, tl, triton  # None without Triton

_SCALARS = [*KEY_ARGS, "coef"]

if triton is not None:
    from fastes.ops.member_runs_triton import _noise_sign, _runs

    @triton.jit
    def _noise_tile(cols, kb, IN, k0, k1, tid, idx, step, BN: tl.constexpr, BK: tl.constexpr, KIND: tl.constexpr,
                    LAYOUT: tl.constexpr, BF16: tl.constexpr):
        """E[cols, kb:kb+BK] ([BN, BK], fp32; bf16 signs on the LAYOUT 2 path with BF16) of a dense [OUT, IN]
        stream; LAYOUT 2: one Philox call per 128-sign block (IN and BK multiples of 128), 1: per 32-bit word
        (Rademacher) or per 4 Gaussians, 0: per value."""
        if LAYOUT == 2 and KIND == philox.RADEMACHER:
            b = (cols.to(tl.int64) * IN + kb)[:, None] // 128 + tl.arange(0, BK // 128)[None, :]
            return philox.rademacher_blocks_2d(b, k0, k1, tid, idx, step, BF16)
        elif LAYOUT != 0 and KIND == philox.RADEMACHER:  # IN, BK multiples of 32
            w = (cols.to(tl.int64) * IN + kb)[:, None] // 32 + tl.arange(0, BK // 32)[None, :]
            w = tl.reshape(w, (BN * (BK // 32),))
            return tl.reshape(philox.rademacher_words_flat(w, k0, k1, tid, idx, step), (BN, BK))
        elif LAYOUT != 0:  # Gaussian, IN and BK multiples of 4
            b = (cols.to(tl.int64) * IN + kb)[:, None] // 4 + tl.arange(0, BK // 4)[None, :]
            return philox.gaussian_blocks_flat(b, k0, k1, tid, idx, step)
        else:
            e = cols.to(tl.int64)[:, None] * IN + (kb + tl.arange(0, BK))[None, :]
            return philox.noise_at(e, k0, k1, tid, idx, step, KIND)

    @triton.jit(do_not_specialize=_SCALARS)
    def _full_gemm_kernel(x_ptr, w_ptr, bias_ptr, rm_ptr, out_ptr, T, OUT, IN, T_BUCKET,
                          sxt, sxk, swn, swk, sot, son, k0, k1, tid, step, coef,
                          KIND: tl.constexpr, ANTI: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                          PREC: tl.constexpr, IN_ALIGN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BK: tl.constexpr):
        """out = x Wᵀ + Σ_runs σ·s·sign_t (x_run E_runᵀ) + bias; one K loop per run of the row tile.

        IN_ALIGN: the largest of 128, 32, 4, 1 dividing IN (with BK it picks the noise path)."""
        PER: tl.constexpr = 32 if KIND == philox.RADEMACHER else 4  # values per word (per 4 Gaussians)
        LAYOUT: tl.constexpr = (2 if KIND == philox.RADEMACHER and IN_ALIGN % 128 == 0 and BK % 128 == 0
                                else 1 if IN_ALIGN % PER == 0 and BK % PER == 0 else 0)
        BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16  # signs built as bf16 bits directly
        pid = tl.program_id(0)
        grid_m = tl.cdiv(T, BM)
        pid_m = pid % grid_m  # consecutive programs: the row tiles of one column tile, sharing W in L2
        pid_n = pid // grid_m
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        rmask = rows < T
        cmask = cols < OUT
        m, key, seg, nruns = _runs(rm_ptr, rows, T, BM, ANTI)
        rcoef = tl.where(seg >= 0, coef * _noise_sign(m, ANTI), 0.0)
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * sxt
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * swn
        acc = tl.zeros([BM, BN], tl.float32)
        if nruns == 0:  # no perturbed row: the plain GEMM
            for kb in range(0, IN, BK):
                ks = kb + tl.arange(0, BK)
                x = tl.load(x_rows + ks[None, :] * sxk, mask=rmask[:, None] & (ks < IN)[None, :], other=0.0)
                w = tl.load(w_rows + ks[None, :] * swk, mask=cmask[:, None] & (ks < IN)[None, :], other=0.0)
                if UPCAST:  # the interpreter's bf16 dot is wrong
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        else:  # base for every row + run 0's noise, in one loop
            idx = tl.max(tl.where(seg == 0, key, -1), axis=0)
            noise = tl.zeros([BM, BN], tl.float32)
            for kb in range(0, IN, BK):
                ks = kb + tl.arange(0, BK)
                x = tl.load(x_rows + ks[None, :] * sxk, mask=rmask[:, None] & (ks < IN)[None, :], other=0.0)
                w = tl.load(w_rows + ks[None, :] * swk, mask=cmask[:, None] & (ks < IN)[None, :], other=0.0)
                e = _noise_tile(cols, kb, IN, k0, k1, tid, idx, step, BN, BK, KIND, LAYOUT, BF16)
                if UPCAST:
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
                noise = tl.dot(x, tl.trans(e.to(x.dtype)), noise, input_precision=PREC)
            acc += noise * tl.where(seg == 0, rcoef, 0.0)[:, None]  # σ·s·sign per row, once per tile
        for q in range(1, nruns):  # the tile's other runs: their rows against their own E, W not read again
            idx = tl.max(tl.where(seg == q, key, -1), axis=0)
            inq = rmask & (seg == q)
            noise = tl.zeros([BM, BN], tl.float32)
            for kb in range(0, IN, BK):
                ks = kb + tl.arange(0, BK)
                x = tl.load(x_rows + ks[None, :] * sxk, mask=inq[:, None] & (ks < IN)[None, :], other=0.0)
                e = _noise_tile(cols, kb, IN, k0, k1, tid, idx, step, BN, BK, KIND, LAYOUT, BF16)
                if UPCAST:
                    x = x.to(tl.float32)
                noise = tl.dot(x, tl.trans(e.to(x.dtype)), noise, input_precision=PREC)
            acc += noise * tl.where(seg == q, rcoef, 0.0)[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * sot + cols[None, :] * son
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# (BM, BN, BK, warps, stages), compiled for sm_90 without a GPU (bench.compile), never timed on one.
# BM = 32 holds an antithetic pair's 32 decode rows (16 per member), BM = 16 one member's; BK = 128
# gives Rademacher one Philox call per 128 signs.
_CONFIGS = {
    # spilling on Triton 3.9: (32, 128, 128), (32, 32, 128), (16, 64, 128) at 2 stages or at maxnreg = 128
    "rademacher": [(16, 64, 128, 4, 3), (16, 32, 128, 4, 3), (16, 128, 128, 8, 3), (32, 64, 128, 4, 3)],
    "gaussian": [(32, 64, 64, 4, 3), (16, 128, 64, 8, 3), (32, 128, 64, 8, 3)],  # (16, 64, 64) spills
    "fp32": [(32, 32, 16, 4, 2), (16, 32, 32, 8, 3)],  # ieee dots run on the CUDA cores; wider tiles spill
}
INTERPRET_CONFIG = {"BM": 16, "BN": 64}  # BK: 128 where IN allows it (the per-block Rademacher path), else 64


def _tuned(which: str) -> Any:
    """Autotuned wrapper of the kernel for ``which`` configs (CUDA only), built once."""
    if which not in _TUNED:
        configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
                   for bm, bn, bk, w, s in _CONFIGS[which]]
        _TUNED[which] = triton.autotune(configs, key=["T_BUCKET", "OUT", "IN", "KIND"])(_full_gemm_kernel)
    return _TUNED[which]


_TUNED: dict[str, Any] = {}


def full_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_member: torch.Tensor,
                       out: torch.Tensor, scalars: dict[str, int], coef: float, kind: int, anti: bool, prec: str,
                       interp: bool, config: dict[str, int] | None) -> None:
    """Launch the full-mode kernel into ``out`` (arguments checked by ``perturbed_linear_triton``)."""
    T, IN = x.shape
    OUT = weight.shape[0]
    t_bucket = 1 << max(0, (T - 1).bit_length())
    args = (x, weight, bias if bias is not None else out, row_member, out, T, OUT, IN, t_bucket,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1))
    meta = dict(**scalars, coef=coef, KIND=kind, ANTI=anti, HAS_BIAS=bias is not None,
                UPCAST=interp and x.dtype != torch.float32, PREC=prec,
                IN_ALIGN=next(a for a in (128, 32, 4, 1) if IN % a == 0))
    grid = lambda cfg: (triton.cdiv(T, cfg["BM"]) * triton.cdiv(OUT, cfg["BN"]),)
    if interp or config is not None:
        cfg = dict(INTERPRET_CONFIG | {"BK": 128 if IN % 128 == 0 else 64} if config is None else config)
        _full_gemm_kernel[grid(cfg)](*args, **meta, **cfg)
        return
    _tuned("fp32" if x.dtype == torch.float32 else "rademacher" if kind == 1 else "gaussian")[grid](*args, **meta)
