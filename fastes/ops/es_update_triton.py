"""Triton es_update: W ← W + lr·s·Σ_k c_k·E_k in place, the noise regenerated on the device, never stored per member.

Coefficients arrive folded per noise index (``fold_coefficients``: c_k = Σ sign·c_m, antithetic
pairs merged on the host, fp64) and pre-multiplied by lr·s (/√r for lowrank), so the kernels
see K (index, coefficient) pairs. No atomics; the K indices are summed in index order.

* lowrank, two launches (docs/design.md, "The update contract"):
  1. ``_lowrank_factors_kernel`` generates the step's factors once, the design minimum
     K·r·(out + in) values: stream k's elements 0 .. (in + out)·r − 1 (B then A, the contract's
     layout) block-wise (one Philox call per 4 Gaussians, per 32-bit word of signs) into an fp32
     workspace F [K·r, in + out], row k·r + j = (Bᵀ row j | c_k·Aᵀ row j): A's columns carry the
     folded coefficient, multiplied in fp32. F is K·r·(out + in)·4 bytes: at 8960 × 1536, K = 16,
     0.67 MB (r = 1), 1.34 MB (r = 2), 2.02 MB (r = 3), 2.69 MB (r = 4); the GPU memory plan's
     update workspace (fastes/es/memory_plan.py) covers it.
  2. ``_lowrank_kernel``, bandwidth-bound: per W tile, acc = A_c[BM, K·r]·Bᵀ[K·r, BN] with
     ``tl.dot`` in chunks of KC = 16 columns (past K·r: zeros, the tf32 MMA's K), then W is read
     once, added, rounded and written once. W is read after the GEMM: holding it across the dot
     would cost ~20-45 registers and one CTA per SM.
* full / 1-D (``_full_kernel``): a flat chunk of W; per index, one Philox call per 4 Gaussians
  (per 128 Rademacher signs); fp32 accumulation in index order.
* bf16 / fp16 outputs are stochastically rounded with the contract's bits (block e // 4 of
  ``sr_tensor_id(name)``, index ``SR_NOISE_INDEX``, word e % 4), bit-identical to
  ``stochastic_round_ref`` applied to the kernel's own fp32 sum; fp32 is a plain add.

Cost, lowrank, 8960 × 1536 bf16, N = 32 antithetic (K = 16), r = 1, H100 SXM (3.35 TB/s), all predicted
(``python -m bench.gpu_model``; no GPU has run it):

* factors: 16 × 10496 = 1.68e5 Gaussians (4.2e4 Philox calls, 8.4e4 Box–Muller pairs), 0.67 MB
  written; 336 programs of 512 values, 29 registers on sm_90: ≈ 2.5 µs, mostly launch and latency.
* update: bytes 2 × 2 B × 13.76e6 = 55.1 MB (W read and written once) + 0.67 MB (F, read from HBM
  once; the tiles' re-reads, 2 B per element at 64 × 64, hit L2); ops: the tf32x3 GEMM 3 × 2 × 16 =
  96 tensor-core FLOP per element (1.3e9, ≈ 3 µs of tensor cores), the rounding bits one Philox call
  per 4 elements (3.4e6 calls, ~17 INT32 ops per element) + ~4 ops to round. sm_90 compile
  (``python -m bench.compile``): 64 × 64 at 4 warps, 1 stage, 115-125 registers, no spills (Triton
  3.9 and 3.6) → 4 CTAs per SM; memory-bound at ≈ 20.5 µs.
* predicted: ≈ 23.0 µs for both launches, 71 % of 3.35 TB/s (the 16.4 µs of W traffic); at
  4864 × 896 (0.5B) ≈ 10.8 µs, 48 %: the two launches' fixed ~2 µs each weigh on a 5.2 µs W pass.
* full mode is compute-bound by design: K Gaussians per element (~45 instructions each) → values/s.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from fastes import _backend
from fastes.noise import KIND_INT, SR_NOISE_INDEX, NoiseSpec, as_i32, sr_tensor_id, tensor_id
from fastes.ops import philox
from fastes.ops._triton import key_args
from fastes.ops.member_noise import fold_coefficients
from fastes.ops.stochastic_round_triton import OUT_CODES, _flat4, _round, _sr_words_at

# Counter words vary per call: one compiled kernel for all of them. Shapes (out_f, in_f, n) stay
# specialized: knowing in_f % 16 == 0 is what lets Triton vectorize the W loads and stores.
_SCALARS = ["num_idx", "k0", "k1", "tid", "sr_tid", "sr_idx", "step"]


# --------------------------------------------------------------------------- device helpers


# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["num_idx", "k0", "k1", "tid", "step"])
def _lowrank_factors_kernel(f_ptr, idx_ptr, coef_ptr, out_f, in_f, num_idx, k0, k1, tid, step, R: tl.constexpr,
                            GROUPS: tl.constexpr, PER: tl.constexpr, KIND: tl.constexpr):
    """F[k·R + j, p] = stream_k[p·R + j] (× c_k where p >= in, the A half), p < in + out: grid (chunks, K).

    Each program generates GROUPS whole Philox blocks (Gaussian) or words (Rademacher) of one index's
    stream from element 0, so every value is generated once and block-wise whatever the shape.
    """
    k = tl.program_id(1)
    index = tl.load(idx_ptr + k)
    coef = tl.load(coef_ptr + k)
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    if KIND == 0:
        vals = philox.gaussian_blocks_flat(g, k0, k1, tid, index, step)
    else:
        vals = philox.rademacher_words_flat(g, k0, k1, tid, index, step)
    # int32 addressing: the launcher checks K·r·(in + out) < 2**31
    e = tl.program_id(0) * (GROUPS * PER) + tl.arange(0, GROUPS * PER)
    p = e // R
    ld = in_f + out_f
    vals = tl.where(p >= in_f, vals * coef, vals)  # A's columns carry lr·s·c_k/√r, in fp32 as the GEMM's input
    tl.store(f_ptr + (k * R + e % R) * ld + p, vals, mask=p < ld)


@triton.jit(do_not_specialize=["kr", "k0", "k1", "sr_tid", "sr_idx", "step"])
def _lowrank_kernel(w_ptr, f_ptr, out_f, in_f, kr, k0, k1, sr_tid, sr_idx, step, KC: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, SR_ALIGNED: tl.constexpr, OUT: tl.constexpr,
                    PRECISION: tl.constexpr):
    """W tile += A_c[BM, K·r] · Bᵀ[K·r, BN] from the factor workspace F (L2-resident), then rounded."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    # out_f / in_f stay int32 (maybe constexpr 1 when specialized); int64 rows/cols promote the products
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    # Tile addressing in int32 from an int64 tile base (int64 per element costs ~2 registers each).
    rows32 = pid_m.to(tl.int32) * BM + tl.arange(0, BM)
    cols32 = pid_n.to(tl.int32) * BN + tl.arange(0, BN)
    local = tl.arange(0, BM)[:, None] * in_f + cols32[None, :]
    tile = w_ptr + pid_m * BM * in_f
    mask = (rows[:, None] < out_f) & (cols[None, :] < in_f)
    ld = in_f + out_f
    ld64 = ld.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kc in range(0, kr, KC):  # columns (index, j) in index order; those past K·r load as zeros (dot padding)
        fk = f_ptr + kc * ld64
        c = kc + tl.arange(0, KC)
        at = tl.load(fk + tl.arange(0, KC)[:, None] * ld + (in_f + rows32)[None, :],
                     mask=(c[:, None] < kr) & (rows32[None, :] < out_f), other=0.0)
        bt = tl.load(fk + tl.arange(0, KC)[:, None] * ld + cols32[None, :],
                     mask=(c[:, None] < kr) & (cols32[None, :] < in_f), other=0.0)
        acc = tl.dot(tl.trans(at), bt, acc, input_precision=PRECISION)
    # W is read after the GEMM, not before: holding it across the dot costs ~20-45 registers (3 CTAs/SM
    # instead of 4); the other resident CTAs keep HBM busy meanwhile.
    v = tl.load(tile + local, mask=mask, other=0.0).to(tl.float32) + acc
    if OUT == 0:
        words = tl.zeros((BM, BN), dtype=tl.uint32)
    elif SR_ALIGNED:  # block (row·in + col) / 4 < 2**32 (checked by the launcher): uint32 arithmetic is exact
        qcol = (pid_n * (BN // 4)).to(tl.uint32) + tl.arange(0, BN // 4).to(tl.uint32)
        blk = rows.to(tl.uint32)[:, None] * (in_f // 4).to(tl.uint32) + qcol[None, :]
        x0, x1, x2, x3 = philox.philox4x32_10(blk, sr_tid, sr_idx, step, k0, k1)
        words = _flat4(x0, x1, x2, x3)
    else:
        words = _sr_words_at(rows[:, None] * in_f + cols[None, :], k0, k1, sr_tid, sr_idx, step)
    tl.store(tile + local, _round(v, words, OUT), mask=mask)


@triton.jit(do_not_specialize=_SCALARS)
def _full_kernel(w_ptr, idx_ptr, coef_ptr, n, num_idx, k0, k1, tid, sr_tid, sr_idx, step,
                 BLOCK: tl.constexpr, KB: tl.constexpr, KIND: tl.constexpr, OUT: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    e = start + tl.arange(0, BLOCK)
    mask = e < n
    PER: tl.constexpr = 4 if KIND == 0 else 128
    blocks = tl.broadcast_to((start // PER + tl.arange(0, BLOCK // PER))[None, :], (KB, BLOCK // PER))
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for kb in range(0, num_idx, KB):  # KB indices at a time, chunks in index order: deterministic sums
        kk = kb + tl.arange(0, KB)
        kmask = kk < num_idx
        idx = tl.broadcast_to(tl.load(idx_ptr + kk, mask=kmask, other=0)[:, None], (KB, BLOCK // PER))
        c = tl.load(coef_ptr + kk, mask=kmask, other=0.0)
        if KIND == 0:
            g0, g1, g2, g3 = philox.gaussian_block(blocks, k0, k1, tid, idx, step)
            vals = _flat4(g0, g1, g2, g3)
        else:
            vals = philox.rademacher_rows(blocks, k0, k1, tid, idx, step)
        acc += tl.sum(vals * c[:, None], axis=0)
    v = tl.load(w_ptr + e, mask=mask, other=0.0).to(tl.float32) + acc
    if OUT == 0:
        words = tl.zeros((BLOCK,), dtype=tl.uint32)
    else:
        blk = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
        x0, x1, x2, x3 = philox.philox4x32_10(blk, sr_tid, sr_idx, step, k0, k1)
        words = _flat4(x0, x1, x2, x3)
    tl.store(w_ptr + e, _round(v, words, OUT), mask=mask)


# --------------------------------------------------------------------------- launcher


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _config(lowrank: bool, numel: int, columns: int) -> dict[str, int]:
    """One fixed config per path: the interpreter cannot autotune, and it pays per executed op, not
    per element, so there it takes wide chunks (many columns per loop trip, small tiles for small W).

    ``columns`` is K·r (lowrank) or K (full). On a GPU the lowrank update tile is BM × BN at 4 warps
    with KC = 16 factor columns per ``tl.dot`` (the tf32 MMA's K, padded with zeros past K·r).
    """
    if _backend.triton_interpreted():
        if lowrank:
            return {"BM": 32, "BN": 32, "KC": min(max(16, _next_pow2(columns)), 256), "num_warps": 4}
        return {"BLOCK": min(max(128, _next_pow2(numel)), 4096), "KB": min(_next_pow2(columns), 64), "num_warps": 4}
    if lowrank:  # one stage: the K loop is one trip at K·r <= 16 and its loads hit L2 (F is small)
        return {"BM": 64, "BN": 64, "KC": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK": 1024, "KB": 1, "num_warps": 4}


def _factor_values_per_program(kind: str, length: int) -> int:
    """Stream values per factor program. GPU: Gaussian 512 (one Philox block per thread at 4 warps: ~21 programs
    per index at 8960 × 1536, enough to fill 132 SMs with K = 16), Rademacher 2048 (64 words: a word per
    thread pair, as the noise fill; fewer words spread one over more threads, each recomputing it).
    Interpreter: one program per stream when it fits (it pays per program)."""
    per = 4 if kind == "gaussian" else 32
    if _backend.triton_interpreted():
        return min(max(per, _next_pow2(length)), 8192 if kind == "gaussian" else 32768)
    return 512 if kind == "gaussian" else 2048


def es_update_triton(weight: torch.Tensor, noise: NoiseSpec, coeffs: torch.Tensor, lr: float, scale: float,
                     mode: str, rank: int, name: str, **options: object) -> None:
    """In place W ← W + lr·s·Σ_m c_m·E_m with the noise regenerated in the kernel (arguments pre-checked)."""
    plan_es_update(weight, noise, coeffs, lr, scale, mode, rank, name, **options)()


def plan_es_update(weight: torch.Tensor, noise: NoiseSpec, coeffs: torch.Tensor, lr: float, scale: float,
                   mode: str, rank: int, name: str, block_m: int | None = None, block_n: int | None = None,
                   block: int | None = None, precision: str | None = None, num_warps: int | None = None,
                   block_k: int | None = None) -> Callable[[], None]:
    """Fold, upload the K (index, coefficient) pairs and return the launch: benchmarks time it alone.

    ``block_m``/``block_n`` (lowrank tile), ``block_k`` (factor columns per ``tl.dot``) and ``block`` (full
    chunk) override the fixed config;
    results do not depend on them except through the fp32 summation order. ``precision`` is the
    lowrank GEMM's ``tl.dot`` input precision: default "tf32x3" on a GPU (three tensor-core passes,
    ~fp32 accuracy, frees the 16 FFMA/element of "ieee") and "ieee" under the interpreter.
    """
    if weight.device.type != "cuda" and not _backend.triton_interpreted():
        raise ValueError("weight must be a CUDA tensor for the Triton backend (or set TRITON_INTERPRET=1)")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous for the Triton backend (it is updated in place)")
    if weight.numel() >= 1 << 34:
        raise ValueError("weight has more than 2**34 elements: beyond one stochastic-rounding counter space")
    if precision is None:
        precision = "ieee" if _backend.triton_interpreted() else "tf32x3"
    if precision not in ("ieee", "tf32x3", "tf32"):
        raise ValueError(f"precision must be 'ieee', 'tf32x3' or 'tf32', got {precision!r}")
    folded = fold_coefficients(noise, coeffs)
    if not folded or weight.numel() == 0:
        return lambda: None  # nothing to add; rounding an exactly representable value returns it unchanged
    lowrank = mode == "lowrank" and weight.dim() == 2
    mult = lr * scale / (math.sqrt(rank) if lowrank else 1.0)
    idx = torch.tensor([i for i, _ in folded], dtype=torch.int64, device=weight.device)
    coef = torch.tensor([c * mult for _, c in folded], dtype=torch.float32, device=weight.device)
    args = dict(**key_args(noise.seed, tensor_id(name), noise.step), sr_tid=as_i32(sr_tensor_id(name)),
                sr_idx=as_i32(SR_NOISE_INDEX), KIND=KIND_INT[noise.kind], OUT=OUT_CODES[weight.dtype])
    if lowrank:
        out_f, in_f = weight.shape
        kr, length = len(folded) * rank, (in_f + out_f) * rank
        cfg = _config(True, weight.numel(), kr)
        bm, bn = block_m or cfg["BM"], block_n or cfg["BN"]
        kc = block_k or cfg["KC"]
        for value, arg in ((bm, "block_m"), (bn, "block_n"), (kc, "block_k")):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{arg} must be a power of two >= 16, got {value}")
        if kr * (in_f + out_f) >= 1 << 31:
            raise ValueError("K·r·(in + out) >= 2**31: the factor workspace is beyond int32 addressing")
        # F [K·r, in + out] fp32: Bᵀ in columns 0..in-1, the coefficient-scaled Aᵀ after them (module docstring)
        factors = torch.empty((kr, in_f + out_f), dtype=torch.float32, device=weight.device)
        values = _factor_values_per_program(noise.kind, length)
        per = 4 if noise.kind == "gaussian" else 32
        fgrid = (triton.cdiv(length, values), len(folded))
        grid = (triton.cdiv(out_f, bm), triton.cdiv(in_f, bn))
        key = args.pop("tid")
        kind = args.pop("KIND")

        def launch() -> None:
            _lowrank_factors_kernel[fgrid](factors, idx, coef, out_f, in_f, len(folded), args["k0"], args["k1"], key,
                                           args["step"], R=rank, GROUPS=values // per, PER=per, KIND=kind,
                                           num_warps=4)
            _lowrank_kernel[grid](weight, factors, out_f, in_f, kr, **args, KC=kc, BM=bm, BN=bn,
                                  SR_ALIGNED=in_f % 4 == 0, PRECISION=precision,
                                  num_warps=num_warps or cfg["num_warps"], num_stages=cfg.get("num_stages", 3))

        return launch
    cfg = _config(False, weight.numel(), len(folded))
    size = block or cfg["BLOCK"]
    if size < 128 or size & (size - 1):
        raise ValueError(f"block must be a power of two >= 128, got {size}")
    n = weight.numel()
    return lambda: _full_kernel[(triton.cdiv(n, size),)](weight, idx, coef, n, len(folded), **args, BLOCK=size,
                                                         KB=cfg["KB"], num_warps=num_warps or cfg["num_warps"])
