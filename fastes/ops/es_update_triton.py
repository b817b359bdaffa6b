"""Triton es_update: W ← W + lr·s·Σ_k c_k·E_k in place, every E_k regenerated in registers.

Coefficients arrive folded per noise index (``fold_coefficients``: c_k = Σ sign·c_m, antithetic
pairs merged on the host, fp64) and pre-multiplied by lr·s (/√r for lowrank), so the kernels
see K (index, coefficient) pairs. No atomics; the K indices are summed in index order.

* lowrank (``_lowrank_kernel``): one GEMM per W tile, (BM × K·r)·(K·r × BN), in chunks of KC
  columns; column c ↦ (index k = c // r, j = c % r). The A chunk [BM, KC] and Bᵀ chunk
  [KC, BN] are generated in the kernel, one Philox call per 4 Gaussians when the factors'
  stream offsets are 4-aligned (``BLOCKGEN``: r a power of two and in·r % 4 == 0, i.e. every
  LLM shape), element-wise otherwise. The W tile is read once, updated, written once.
* full / 1-D (``_full_kernel``): a flat chunk of W; per index, one Philox call per 4 Gaussians
  (per 128 Rademacher signs); fp32 accumulation in index order.
* bf16 / fp16 outputs are stochastically rounded with the contract's bits (block e // 4 of
  ``sr_tensor_id(name)``, index ``SR_NOISE_INDEX``, word e % 4), bit-identical to
  ``stochastic_round_ref`` applied to the kernel's own fp32 sum; fp32 is a plain add.

Cost model, 8960 × 1536 bf16, N = 32 antithetic (K = 16 indices), r = 1, tile BM × BN = 64 × 128,
H100 SXM (3.35 TB/s; 132 SMs × 4 schedulers × 32 lanes × 1.755 GHz ≈ 3.0e13 issued lane-instr/s):

* bytes: W read + written once, 2 × 2 B × 13.76e6 = 55.1 MB (coefficients: 256 B) → 16.4 µs.
* FLOPs + Philox: GEMM 2·K·r = 32 FLOP/elem = 0.44 GFLOP; factor noise K·r·(1/BM + 1/BN) =
  0.375 values/elem = 5.2e6 values = 1.29e6 Philox calls + 2.6e6 Box–Muller pairs; stochastic
  rounding, 1 Philox call per 4 elements (the contract's word e % 4) = 3.44e6 calls. Per element,
  in issued instructions: GEMM 16 FFMA ("ieee"; ~0 on tensor cores with "tf32x3"), Box–Muller ~16,
  factor Philox ~5, rounding Philox ~11 + ~5 to round, load/convert/add/address ~5: ≈ 58 ("ieee")
  or ≈ 42 ("tf32x3") → 0.80e9 / 0.58e9 lane-instructions.
* predicted: ≈ 27 µs with "ieee" (61 % of 3.35 TB/s), ≈ 20 µs with "tf32x3" (≈ 80 %), if the W
  read (issued before the K loop) overlaps the generation. bf16 sits at the compute/memory ridge and
  its largest fixed term is the rounding bits; fp32 weights (110 MB, no rounding bits) are
  memory-bound at ≈ 33 µs. sm_90 compile (``python -m bench.compile``, no GPU): 204 registers at
  64 × 128 / 8 warps → one CTA per SM, ~35-50 % of bandwidth predicted (one CTA cannot overlap its
  W load with its generation); now 64 × 64 / 4 warps, 204 registers, no spills → 2 CTAs per SM, one
  generating while the other loads or stores. The smaller tile regenerates more factor noise,
  K·r·(1/64 + 1/64) = 0.5 values/elem instead of 0.375 (+1.7e6 values, ~+2 µs): predicted ≈ 22 µs
  with "tf32x3" (≈ 75 % of 3.35 TB/s). Unmeasured: no GPU in this session.
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


@triton.jit(do_not_specialize=_SCALARS)
def _lowrank_kernel(w_ptr, idx_ptr, coef_ptr, out_f, in_f, num_idx, k0, k1, tid, sr_tid, sr_idx, step,
                    R: tl.constexpr, KC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    KIND: tl.constexpr, BLOCKGEN: tl.constexpr, SR_ALIGNED: tl.constexpr,
                    OUT: tl.constexpr, PRECISION: tl.constexpr):
    KCK: tl.constexpr = KC // R  # noise indices per chunk (BLOCKGEN: KC is a multiple of R)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    # out_f / in_f stay int32 (maybe constexpr 1 when specialized); int64 rows/cols promote the products
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    # Tile addressing in int32 from an int64 tile base (int64 per element costs ~2 registers each).
    local = tl.arange(0, BM)[:, None] * in_f + (pid_n.to(tl.int32) * BN + tl.arange(0, BN))[None, :]
    tile = w_ptr + pid_m * BM * in_f
    mask = (rows[:, None] < out_f) & (cols[None, :] < in_f)
    # Issue the W read first: its latency hides behind the noise generation of the K loop.
    w = tl.load(tile + local, mask=mask, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kc in range(0, num_idx * R, KC):
        if BLOCKGEN:
            kk = kc // R + tl.arange(0, KCK)
            kmask = kk < num_idx
            idx = tl.load(idx_ptr + kk, mask=kmask, other=0)
            coef = tl.load(coef_ptr + kk, mask=kmask, other=0.0)
            # A_k rows pid_m*BM.. are stream elements in*R + (pid_m*BM)*R + [0, BM*R); B_k rows pid_n*BN..
            # are (pid_n*BN)*R + [0, BN*R): 4-aligned (Gaussian blocks) resp. 32-aligned (Rademacher words).
            if KIND == 0:
                ba = (in_f * R + pid_m * (BM * R)) // 4 + tl.arange(0, BM * R // 4)
                ba2 = tl.broadcast_to(ba[None, :], (KCK, BM * R // 4))
                ia2 = tl.broadcast_to(idx[:, None], (KCK, BM * R // 4))
                g0, g1, g2, g3 = philox.gaussian_block(ba2, k0, k1, tid, ia2, step)
                fa = _flat4(g0, g1, g2, g3) * coef[:, None]  # [KCK, BM*R]
                bb = (pid_n * (BN * R)) // 4 + tl.arange(0, BN * R // 4)
                bb2 = tl.broadcast_to(bb[None, :], (KCK, BN * R // 4))
                ib2 = tl.broadcast_to(idx[:, None], (KCK, BN * R // 4))
                h0, h1, h2, h3 = philox.gaussian_block(bb2, k0, k1, tid, ib2, step)
                fb = _flat4(h0, h1, h2, h3)  # [KCK, BN*R]
            else:
                wa = (in_f * R + pid_m * (BM * R)) // 32 + tl.arange(0, BM * R // 32)
                wa2 = tl.broadcast_to(wa[None, :], (KCK, BM * R // 32))
                fa = philox.rademacher_words_2d(wa2, k0, k1, tid, idx[:, None], step) * coef[:, None]
                wb = (pid_n * (BN * R)) // 32 + tl.arange(0, BN * R // 32)
                wb2 = tl.broadcast_to(wb[None, :], (KCK, BN * R // 32))
                fb = philox.rademacher_words_2d(wb2, k0, k1, tid, idx[:, None], step)
            a = tl.reshape(tl.permute(tl.reshape(fa, (KCK, BM, R)), (1, 0, 2)), (BM, KC))
            bt = tl.reshape(tl.permute(tl.reshape(fb, (KCK, BN, R)), (0, 2, 1)), (KC, BN))
        else:
            c = kc + tl.arange(0, KC)
            k = c // R
            j = (c % R).to(tl.int64)
            kmask = k < num_idx
            idx = tl.load(idx_ptr + k, mask=kmask, other=0)
            coef = tl.load(coef_ptr + k, mask=kmask, other=0.0)
            ea = in_f * R + rows[:, None] * R + j[None, :]
            ia = tl.broadcast_to(idx[None, :], (BM, KC))
            a = philox.noise_at(ea, k0, k1, tid, ia, step, KIND) * coef[None, :]
            eb = cols[None, :] * R + j[:, None]
            ib = tl.broadcast_to(idx[:, None], (KC, BN))
            bt = philox.noise_at(eb, k0, k1, tid, ib, step, KIND)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    v = w.to(tl.float32) + acc
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


def _config(lowrank: bool, numel: int, columns: int, blockgen: bool = True) -> dict[str, int]:
    """One fixed config per path: the interpreter cannot autotune, and it pays per executed op, not
    per element, so there it takes wide chunks (many indices per loop trip, small tiles for small W).

    ``columns`` is K·r (lowrank) or K (full). On a GPU the lowrank tile is 64 × 64 at 4 warps for
    block-wise factors (Gaussian blocks or Rademacher words): 2 CTAs/SM on sm_90 (64 × 128 at 8 warps:
    1 CTA/SM); the element-wise path (odd ranks, unaligned shapes) spills at 64 × 64 and keeps 64 × 128.
    Still spilling on Triton 3.6: fp32 weights with Rademacher factors, 72 B (64 × 128: 56 B).
    """
    if _backend.triton_interpreted():
        if lowrank:
            return {"BM": 32, "BN": 32, "KC": min(max(16, _next_pow2(columns)), 256), "num_warps": 4}
        return {"BLOCK": min(max(128, _next_pow2(numel)), 4096), "KB": min(_next_pow2(columns), 64), "num_warps": 4}
    if lowrank:  # 64 rows: the [BM, BN/4] rounding-bit Philox states must fit beside the fp32 accumulator
        if blockgen:
            return {"BM": 64, "BN": 64, "KC": 16, "num_warps": 4}
        return {"BM": 64, "BN": 128, "KC": 16, "num_warps": 8}
    return {"BLOCK": 1024, "KB": 1, "num_warps": 4}


def es_update_triton(weight: torch.Tensor, noise: NoiseSpec, coeffs: torch.Tensor, lr: float, scale: float,
                     mode: str, rank: int, name: str, **options: object) -> None:
    """In place W ← W + lr·s·Σ_m c_m·E_m with the noise regenerated in the kernel (arguments pre-checked)."""
    plan_es_update(weight, noise, coeffs, lr, scale, mode, rank, name, **options)()


def plan_es_update(weight: torch.Tensor, noise: NoiseSpec, coeffs: torch.Tensor, lr: float, scale: float,
                   mode: str, rank: int, name: str, block_m: int | None = None, block_n: int | None = None,
                   block: int | None = None, precision: str | None = None,
                   num_warps: int | None = None) -> Callable[[], None]:
    """Fold, upload the K (index, coefficient) pairs and return the launch: benchmarks time it alone.

    ``block_m``/``block_n`` (lowrank tile) and ``block`` (full chunk) override the fixed config;
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
        per = 4 if noise.kind == "gaussian" else 32  # stream values per Philox block resp. word
        blockgen = rank & (rank - 1) == 0 and (in_f * rank) % per == 0
        cfg = _config(True, weight.numel(), len(folded) * rank, blockgen)
        bm, bn = block_m or cfg["BM"], block_n or cfg["BN"]
        for value, arg in ((bm, "block_m"), (bn, "block_n")):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{arg} must be a power of two >= 16, got {value}")
        blockgen = blockgen and (bm * rank) % per == 0 and (bn * rank) % per == 0
        kc = max(cfg["KC"], rank) if blockgen else cfg["KC"]
        grid = (triton.cdiv(out_f, bm), triton.cdiv(in_f, bn))
        return lambda: _lowrank_kernel[grid](weight, idx, coef, out_f, in_f, len(folded), **args, R=rank, KC=kc,
                                             BM=bm, BN=bn, BLOCKGEN=blockgen, SR_ALIGNED=in_f % 4 == 0,
                                             PRECISION=precision, num_warps=num_warps or cfg["num_warps"])
    cfg = _config(False, weight.numel(), len(folded))
    size = block or cfg["BLOCK"]
    if size < 128 or size & (size - 1):
        raise ValueError(f"block must be a power of two >= 128, got {size}")
    n = weight.numel()
    return lambda: _full_kernel[(triton.cdiv(n, size),)](weight, idx, coef, n, len(folded), **args, BLOCK=size,
                                                         KB=cfg["KB"], num_warps=num_warps or cfg["num_warps"])
