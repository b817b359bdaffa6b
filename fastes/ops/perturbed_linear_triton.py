"""Triton kernels of ``perturbed_linear``: the noise of every member is regenerated inside the matmul.

Rows are tagged with their member (``row_member``, -1 = unperturbed). A program owns a
(BM rows x BN cols) output tile and finds the *runs* of equal member ids among its rows
on device (``tl.cumsum`` of "member changed" flags): no host sync, CUDA-graph safe, and
correct for any row order; sorted rows (what the engine passes) just give fewer runs.

Runs are keyed by noise index, not member: an antithetic pair (2i, 2i + 1) is one run, its noise
generated once and applied with each row's sign (half the noise of keying by member).

lowrank (EGGROLL, E_m = A_m B_mᵀ/√r), two launches:
  1. ``_shrink_kernel``, grid (row tiles, K splits, names): partial H_s[t] = σ·s·sign/√r · x_t[K_s] B_m(t)[K_s]
     (fp32 [G, S, T, RP]); B generated once per run, K range and name. A decode batch has few row
     tiles (512 rows / 16 = 32 programs on 132 SMs, each a serial 1536-long loop: predicted ~0.15 of
     the shrink's bandwidth); splitting the input dimension into up to 32 ranges fills one wave
     (~1056 programs; sm_90 compile: 55-64 registers, 8-9 CTAs/SM) with the same noise, N·in·r
     values per name (fp32 x: the same K ranges in BK = 32 tiles; BK = 64 spilled 8 B on Triton 3.6).
     ``lowrank_shrink`` serves up to 3 names that read the same x in one launch
     (q/k/v, gate/up: ``perturbed_linear_group``), so a decoder layer launches 4 shrinks, not 7.
  2. ``_gemm_kernel`` MODE=LOWRANK: the shared base GEMM X Wᵀ, then in the epilogue H = Σ_s H_s
     (fixed order: deterministic, no atomics) and, per chunk of SEGC runs of the tile, one
     tensor-core dot Hexp [BM, SEGC·RP] · Astack [SEGC·RP, BN] (SEGC·RP = 16), where Hexp holds
     each row's H in its run's slot and Astack the runs' A tiles, generated for the runs present
     only (before: all SEGC slots, 16 per tile at r = 1 where a decode tile holds 4-8 runs).
     Rank 1 skips the dot: per run, acc += H·a_qᵀ as an outer product on the CUDA cores (BM·BN
     FMAs per run, < 1% of the K loop), which holds no operand tiles: sm_90, 128 × 128 bf16:
     166 -> 115 registers, 1 -> 2 CTAs/SM (Gaussian; Rademacher 165 -> 128).
  Noise per launch when each run sits in one row tile (the decode layout): runs·(in + out)·r,
  tested by tests/test_work_counts.py.
  Counted for a decode step of Qwen2.5-1.5B shapes (out x in = 1536x1536, 8960x1536,
  1536x8960), T = N·R = 2048 rows, r = 1, bf16, H100 at 3.3 TB/s, 800 TFLOP/s and ~22e12
  CUDA-core ops/s (~60 ops per Gaussian, ~6 per sign). Base GEMM: 17.3 / 70.5 / 70.5 MB and
  9.7 / 56 / 56 GFLOP -> 12.1 / 70.5 / 70.5 us (compute-bound at this T).
  * unfused SGMV (base + shrink + expand kernel reading and writing Y again): +2T·in + 4T·out
    bytes = 18.9 / 79.7 / 49.3 MB (+5.7 / 24 / 15 us); predicted ratio 0.67 / 0.74 / 0.82.
  * chosen, expand fused in the epilogue: +2T·in + 8T·r bytes = 6.3 / 6.3 / 36.7 MB (the
    shrink reads X again), +2T·in·r + 32T·out FLOPs (1% of the GEMM): +1.9 / 1.9 / 11 us;
    predicted ratio 0.84 / 0.95 / 0.85 (Gaussian, N = 32; 0.79 / 0.92 / 0.82 at N = 128).
  * noise: N·r·(in+out) values = 0.1-1.3 M at N = 32-128 (0.3-3.7 us Gaussian); at N = 2048,
    R = 1 it is 6-21 M values (17-59 us): ratio 0.39-0.53 Gaussian, 0.76-0.89 Rademacher.
  Done: one shrink for the projections that share X (q/k/v, gate/up). A decode step is then
  launch-bound: 4 shrinks x ~2 us per layer, predicted ratio 0.93-0.94 at 1.5B, 0.92-0.93 at
  0.5B (docs/design.md); 0.95 needs the shrinks fused into the ops that produce their inputs.
  ``base="torch"`` runs the base GEMM in cuBLAS and the epilogue kernel adds the low-rank
  term to Y (one more read + write of Y); the benchmark measures both.

full: ``fastes/ops/perturbed_linear_full_triton.py`` (its own kernel, launched from here).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import torch

from fastes import _backend
from fastes.noise import KIND_INT, NoiseSpec, as_i32, tensor_id
from fastes.ops._triton import KEY_ARGS, key_args, philox, tl, triton  # None without Triton
from fastes.ops._triton import TRITON_ERROR as _TRITON_ERROR

PLAIN, LOWRANK, FULL = 0, 1, 2
_SCALARS = [*KEY_ARGS, "coef"]


if triton is not None:
    from fastes.ops.member_runs_triton import _noise_sign, _runs
    K_PLAIN, K_LOWRANK = tl.constexpr(PLAIN), tl.constexpr(LOWRANK)

    @triton.jit
    def _factor_tile(start, rank, n0, idx, k0, k1, tid, step, NR: tl.constexpr, RP: tl.constexpr,
                     KIND: tl.constexpr, BLOCK: tl.constexpr):
        """Rows n0..n0+NR of an (x r) factor starting at stream element ``start``: fp32 [len(idx), NR, RP].

        ``idx`` [S] holds one noise index per slot; columns j >= rank are zero. BLOCK: RP == rank,
        (start + n0·r) and NR·r multiples of 4 (Gaussian) resp. 32 (Rademacher).
        """
        S: tl.constexpr = idx.shape[0]
        if BLOCK:
            if KIND == philox.GAUSSIAN:
                b = (start + n0 * rank) // 4 + tl.arange(0, NR * RP // 4)[None, :] + 0 * idx[:, None]
                v = philox.gaussian_blocks_flat(b, k0, k1, tid, idx[:, None], step)
            else:
                NW: tl.constexpr = NR * RP // 32
                w = (start + n0 * rank) // 32 + tl.arange(0, NW)[None, :] + 0 * idx[:, None]
                i = tl.reshape(idx[:, None] + 0 * w, (S * NW,))
                v = philox.rademacher_words_flat(tl.reshape(w, (S * NW,)), k0, k1, tid, i, step)
            return tl.reshape(v, (S, NR, RP))
        else:
            n = (n0 + tl.arange(0, NR)).to(tl.int64)[None, :, None]
            j = tl.arange(0, RP)[None, None, :]
            e = start + n * rank + j + 0 * idx[:, None, None]
            v = philox.noise_at(e, k0, k1, tid, idx[:, None, None], step, KIND)
            return tl.where(j < rank, v, 0.0)

    @triton.jit(do_not_specialize=[*_SCALARS, "tid1", "tid2", "coef1", "coef2"])
    def _shrink_kernel(x_ptr, rm_ptr, h_ptr, T, IN, rank, k_split, sxt, sxk, k0, k1, tid, step, coef,
                       tid1, tid2, coef1, coef2,
                       KIND: tl.constexpr, ANTI: tl.constexpr, LAYOUT_OK: tl.constexpr, RP: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr):
        """H[g, s, t, :] = coef_g·sign_t · x_t[K_s] B_g,m(t)[K_s] (fp32, zero for unperturbed rows) for the K range
        K_s = [s·k_split, (s + 1)·k_split) of program (row tile, s, g); B generated once per run and K range.

        g picks one of up to 3 names that read the same x (q/k/v, gate/up: streams ``tid``, ``tid1``, ``tid2``
        and their coefs): one launch for the group, G times the programs of one name, each the same code
        and registers as a single name's (unrolling the names in one program spilled 4-12 B on sm_90); the
        group's programs read x while it sits in L2."""
        PER: tl.constexpr = 4 if KIND == philox.GAUSSIAN else 32
        BLOCK: tl.constexpr = LAYOUT_OK and (BK * RP) % PER == 0
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        split = tl.program_id(1)
        g = tl.program_id(2)
        # arithmetic, not tl.where: Triton 3.6 then keeps no extra value live across the Gaussian's sin/cos calls
        name_tid = tid + (g == 1).to(tl.int32) * (tid1 - tid) + (g == 2).to(tl.int32) * (tid2 - tid)
        m, key, seg, nruns = _runs(rm_ptr, rows, T, BM, ANTI)
        h = tl.zeros([BM, RP], tl.float32)
        k_end = tl.minimum(IN, (split + 1) * k_split)
        for q in range(nruns):
            one = tl.full([1], 0, tl.int64) + tl.max(tl.where(seg == q, key, -1), axis=0)
            inq = seg == q
            for kb in range(split * k_split, k_end, BK):
                ks = kb + tl.arange(0, BK)
                x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sxt + ks[None, :] * sxk,
                            mask=inq[:, None] & (ks < k_end)[None, :], other=0.0).to(tl.float32)
                b = _factor_tile(0, rank, kb, one, k0, k1, name_tid, step, BK, RP, KIND, BLOCK)
                h += tl.sum(x[:, :, None] * tl.reshape(b, (BK, RP))[None, :, :], axis=1)
        name_coef = tl.where(g == 0, coef, tl.where(g == 1, coef1, coef2))
        rcoef = tl.where(seg >= 0, name_coef * _noise_sign(m, ANTI), 0.0)
        j = tl.arange(0, RP)
        h_split = h_ptr + (g * tl.num_programs(1) + split).to(tl.int64) * T * RP
        tl.store(h_split + rows.to(tl.int64)[:, None] * RP + j[None, :], h * rcoef[:, None], mask=(rows < T)[:, None])

    @triton.jit(do_not_specialize=_SCALARS)
    def _gemm_kernel(x_ptr, w_ptr, bias_ptr, rm_ptr, h_ptr, out_ptr, T, OUT, IN, rank, a_start, T_BUCKET,
                     sxt, sxk, swn, swk, sot, son, k0, k1, tid, step, coef,
                     MODE: tl.constexpr, KIND: tl.constexpr, ANTI: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SKIP_BASE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                     LAYOUT_OK: tl.constexpr, RP: tl.constexpr, SEGC: tl.constexpr, SPLITS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        """out = x Wᵀ (+ low-rank epilogue) + bias."""
        pid = tl.program_id(0)
        grid_m = tl.cdiv(T, BM)
        grid_n = tl.cdiv(OUT, BN)
        group = pid // (GROUP_M * grid_n)  # grouped order: programs in flight share W tiles in L2
        first_m = group * GROUP_M
        size_m = min(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
        pid_n = (pid % (GROUP_M * grid_n)) // size_m
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        rmask = rows < T
        cmask = cols < OUT
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * sot + cols[None, :] * son
        omask = rmask[:, None] & cmask[None, :]
        PER: tl.constexpr = 4 if KIND == philox.GAUSSIAN else 32  # stream values per Philox word used
        if MODE != K_PLAIN:
            m, key, seg, nruns = _runs(rm_ptr, rows, T, BM, ANTI)
        if SKIP_BASE:  # base (and bias) already in out, from cuBLAS
            acc = tl.load(out_ptrs, mask=omask, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros([BM, BN], tl.float32)
            for kb in range(0, IN, BK):
                ks = kb + tl.arange(0, BK)
                kmask = ks < IN
                x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sxt + ks[None, :] * sxk,
                            mask=rmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * swn + ks[None, :] * swk,
                            mask=cmask[:, None] & kmask[None, :], other=0.0)
                if UPCAST:  # the interpreter's bf16 dot is wrong
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if MODE == K_LOWRANK:
            j = tl.arange(0, RP)
            h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * RP + j[None, :]
            h = tl.zeros([BM, RP], tl.float32)
            for s in tl.static_range(SPLITS):  # the shrink's K splits, summed in a fixed order
                h += tl.load(h_ptrs + s * T * RP, mask=rmask[:, None], other=0.0)
            if RP == 1:  # rank 1: an outer product per run on the CUDA cores, no operand tiles for a dot
                h1 = tl.sum(h, axis=1)
                for q in range(nruns):
                    one = tl.full([1], 0, tl.int64) + tl.max(tl.where(seg == q, key, -1), axis=0)
                    a = _factor_tile(a_start, rank, pid_n * BN, one, k0, k1, tid, step, BN, RP, KIND,
                                     LAYOUT_OK and (BN * RP) % PER == 0)  # [1, BN, 1]
                    acc += tl.where(seg == q, h1, 0.0)[:, None] * tl.reshape(a, (BN,))[None, :]
            slot = tl.arange(0, SEGC)
            for c in range(tl.cdiv(nruns, SEGC) if RP > 1 else 0):
                # A tiles of the runs present only (one noise index each), stacked [SEGC·RP, BN] for one dot
                astack = tl.zeros([SEGC, RP, BN], tl.float32)
                for q in range(c * SEGC, tl.minimum(nruns, c * SEGC + SEGC)):
                    one = tl.full([1], 0, tl.int64) + tl.max(tl.where(seg == q, key, -1), axis=0)
                    a = _factor_tile(a_start, rank, pid_n * BN, one, k0, k1, tid, step, BN, RP, KIND,
                                     LAYOUT_OK and (BN * RP) % PER == 0)  # [1, BN, RP]
                    astack = tl.where((slot == q - c * SEGC)[:, None, None], tl.permute(a, (0, 2, 1)), astack)
                hexp = tl.where(seg[:, None, None] == (c * SEGC + slot)[None, :, None], h[:, None, :], 0.0)
                acc = tl.dot(tl.reshape(hexp, (BM, SEGC * RP)), tl.reshape(astack, (SEGC * RP, BN)), acc,
                             input_precision=PREC)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


# --------------------------------------------------------------------------- launcher

# (BM, BN, BK, warps, stages), all compiled for sm_90 without a GPU (none spills more than 32 B,
# the 128x128x64 plain GEMM pipelines in 3 stages at 106 registers); never timed on a GPU.
_GPU_CONFIGS = {
    "gemm": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 64, 4, 4)],
    "gemm-fp32": [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3)],  # ieee fp32 dots run on the CUDA cores
}
INTERPRET_CONFIG = {"BM": 16, "BN": 64, "BK": 64}  # the interpreter pays per op, not per element


@cache
def _tuned(which: str) -> Any:
    """Autotuned wrapper of the GEMM kernel (CUDA only: several configs fail under the interpreter)."""
    configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in _GPU_CONFIGS[which]]
    key = ["T_BUCKET", "OUT", "IN", "MODE", "KIND", "SKIP_BASE"]
    return triton.autotune(configs, key=key, restore_value=["out_ptr"])(_gemm_kernel)  # SKIP_BASE adds to out


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


SHRINK_PROGRAMS = 1056  # one wave of an H100 (132 SMs) at 8 CTAs/SM (sm_90 build: 55-64 registers, 8-9 CTAs/SM)


def _shrink_splits(T: int, IN: int, bm: int, bk: int, interp: bool, names: int = 1) -> tuple[int, int]:
    """(K splits, BK) of the lowrank shrink: enough (row tile, K range, name) programs for one full wave.

    A decode batch has few row tiles (512 rows / 16 = 32 programs on 132 SMs), so the input dimension
    is split too, up to 32 ways, so that each program's serial loop is short (at 8960 inputs: 5 K tiles,
    not 17.5 at 8 splits); the GEMM epilogue sums the partial H of the splits in a fixed order (no
    atomics). ``names`` share the wave. Under the interpreter two splits whenever IN spans two K tiles,
    so that tests run the split path.
    """
    if interp:
        return (2 if IN >= 2 * bk else 1), bk
    if names * triton.cdiv(T, bm) >= 132:  # a program per SM already (prefill): whole rows, the BK = 128 build
        return 1, bk
    splits = min(32, max(1, SHRINK_PROGRAMS // (names * triton.cdiv(T, bm))), triton.cdiv(IN, 64))
    splits = 1 << (splits.bit_length() - 1)
    return splits, (bk if splits == 1 else 64)


def lowrank_shrink(x: torch.Tensor, rm: torch.Tensor, noise: NoiseSpec, names: list[str], coefs: list[float],
                   rank: int) -> tuple[torch.Tensor, int]:
    """One ``_shrink_kernel`` launch for up to 3 names that read x: (H fp32 [G, splits, T, RP], splits).

    Grid (row tiles, K splits, G): each program one name's B tile per run and K range, so a group costs one
    launch, not G, and each name's noise is generated once (tests/test_perturbed_linear_group.py counts it).

    ``coefs``: σ·s/√r of each name. On a GPU the names share one wave of programs (fewer K splits each
    than alone); under the interpreter the splits depend on (T, in, r) only, so a name's H is bitwise
    the one its own launch would write.
    """
    if not 1 <= len(names) <= 3 or len(coefs) != len(names):
        raise ValueError(f"lowrank_shrink takes 1 to 3 names with one coef each, got {len(names)} and {len(coefs)}")
    interp = _backend.triton_interpreted()
    T, IN = x.shape
    rp = _next_pow2(rank)
    bms = 32 if interp or T > 4096 else 16
    bks = 128 if interp else max(16, 4096 // (bms * rp))
    splits, bks = _shrink_splits(T, IN, bms, bks, interp, len(names))
    k_split = triton.cdiv(triton.cdiv(IN, splits), bks) * bks
    splits = triton.cdiv(IN, k_split)  # no empty split
    # fp32 x on the split path: BK = 32 in the same K ranges (k_split stays a multiple of 64). The BK = 64
    # fp32 Gaussian build spilled 8 B on Triton 3.6 (56 registers); BK = 32: 48 (3.6) / 54 (3.9), no spill.
    bkl = 32 if x.dtype == torch.float32 and bks == 64 and not interp else bks
    h = torch.empty((len(names), splits, T, rp), dtype=torch.float32, device=x.device)
    scalars = key_args(noise.seed, tensor_id(names[0]), noise.step)
    tids = [as_i32(tensor_id(n)) for n in names[1:]] + [0, 0]
    cs = [float(c) for c in coefs[1:]] + [0.0, 0.0]
    _shrink_kernel[(triton.cdiv(T, bms), splits, len(names))](
        x, rm, h, T, IN, rank, k_split, x.stride(0), x.stride(1), **scalars, coef=float(coefs[0]),
        tid1=tids[0], tid2=tids[1], coef1=cs[0], coef2=cs[1], KIND=KIND_INT[noise.kind], ANTI=bool(noise.antithetic),
        LAYOUT_OK=rp == rank, RP=rp, BM=bms, BK=bkl)
    return h, splits


def perturbed_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            row_member: torch.Tensor | None, noise: NoiseSpec | None, sigma: float, scale: float,
                            mode: str, rank: int, name: str, out: torch.Tensor | None = None,
                            base: str = "triton", config: dict[str, int] | None = None,
                            shrunk: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Triton launcher (arguments validated by ``perturbed_linear``); no host syncs.

    ``out``: optional [T, out] buffer of x's dtype (tests poison it). ``base``: ``triton``
    (lowrank expand fused in the GEMM epilogue) or ``torch`` (cuBLAS base GEMM, then the
    epilogue kernel adds the low-rank term to it). ``config``: fixed BM/BN/BK (+ num_warps,
    num_stages) instead of autotuning; under TRITON_INTERPRET=1 a small fixed config is used.
    ``shrunk``: lowrank only, this weight's (H [splits, T, RP], splits) from a grouped ``lowrank_shrink``.
    """
    _backend.require_triton(x, "x", _TRITON_ERROR)
    interp = _backend.triton_interpreted()
    if base not in ("triton", "torch"):
        raise ValueError(f"base must be 'triton' or 'torch', got {base!r}")
    T, IN = x.shape
    OUT = weight.shape[0]
    if out is None:
        out = torch.empty((T, OUT), dtype=x.dtype, device=x.device)
    elif out.shape != (T, OUT) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be a {x.dtype} tensor of shape {(T, OUT)} on {x.device}")
    if T == 0:
        return out
    perturb = noise is not None and row_member is not None and sigma != 0
    m = PLAIN if not perturb else LOWRANK if mode == "lowrank" else FULL
    kind = KIND_INT[noise.kind] if noise is not None else 0
    per = 4 if kind == 0 else 32
    scalars = key_args(noise.seed, tensor_id(name), noise.step) if noise is not None else key_args(0, 0, 0)
    anti = bool(noise.antithetic) if noise is not None else False
    rp = _next_pow2(rank) if m == LOWRANK else 1
    rm = row_member if row_member is not None else out
    prec = "ieee" if x.dtype == torch.float32 or interp else "tf32"
    if m == FULL:  # its own kernel (imported here: that module imports this one's device functions)
        from fastes.ops.perturbed_linear_full_triton import full_linear_triton

        full_linear_triton(x, weight, bias, rm, out, scalars, float(sigma * scale), kind, anti, prec, interp, config)
        return out
    skip = m == LOWRANK and base == "torch"
    h, splits = out, 1
    if m == LOWRANK:
        if shrunk is None:
            hs, splits = lowrank_shrink(x, rm, noise, [name], [float(sigma * scale / math.sqrt(rank))], rank)
            h = hs[0]
        else:
            h, splits = shrunk
    if skip:
        if bias is None:
            torch.mm(x, weight.t(), out=out)
        else:
            torch.addmm(bias, x, weight.t(), out=out)
    layout_ok = (rp == rank and (IN * rank) % per == 0) if m == LOWRANK else IN % per == 0
    args = (x, weight, bias if bias is not None else out, rm, h, out, T, OUT, IN, rank, IN * rank, _next_pow2(T),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1))
    meta = dict(**scalars, coef=float(sigma * scale), MODE=m, KIND=kind, ANTI=anti, HAS_BIAS=bias is not None,
                SKIP_BASE=skip, UPCAST=interp and x.dtype != torch.float32, PREC=prec,
                LAYOUT_OK=layout_ok, RP=rp, SEGC=max(1, 16 // rp), SPLITS=splits, GROUP_M=8)
    grid = lambda cfg: (triton.cdiv(T, cfg["BM"]) * triton.cdiv(OUT, cfg["BN"]),)
    if interp or config is not None:
        cfg = dict(INTERPRET_CONFIG if config is None else config)
        _gemm_kernel[grid(cfg)](*args, **meta, **cfg)
    else:
        _tuned("gemm" + ("-fp32" if x.dtype == torch.float32 else ""))[grid](*args, **meta)
    return out
