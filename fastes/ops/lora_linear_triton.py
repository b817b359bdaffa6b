"""Triton kernels of ``lora_linear`` (Punica SGMV-style, three launches; q/k/v and gate/up share a shrink).

The shared base GEMM ``F.linear`` (one read of W for every member), a shrink ``H = x A_mᵀ``
(fp32, as K-split partials [S, T, r]) and an expand ``y += scaling · (Σ_s H_s) B_mᵀ``, with
A_m = A + σ·sign·E_A, B_m = B + σ·sign·E_B. The expand does the adapter's own dot once for all rows
of a tile, the shrink once per group of rows of one noise index; then one noise dot per *noise index*
present (rows of other indices zeroed, each row scaled by its σ·sign): an antithetic pair shares its
noise tile, generated once.

Cost at a decode step, T = 512 rows (N = 32 × 16, sorted by member), in = out = 1536, r = 8, bf16, H100
(every time here is PREDICTED by bench/gpu_model.py on the sm_90 compile gate; no GPU has run these):

* base GEMM: 2·T·in·out = 2.4 GFLOP; W 4.7 MB + x 1.6 MB + y 1.6 MB ≈ 2.4 µs (memory).
* shrink: reads x once more (1.6 MB) and A; 2·T·in·16 FLOPs per pass (r padded to 16 for tl.dot).
  Members run in parallel across programs, not serially inside one: a program per (32-row tile, K split,
  adapter), o alone 16 × 24 = 384 programs of two K steps (32 columns each); a tile holds one noise index
  (an antithetic pair, 16 rows per member) or two, each a pass over the split with its E_A tile generated
  once. Adapters that read the same x share one launch (``lora_shrink_group``, the decoder's q/k/v and
  gate/up): q/k/v 16 × 8 × 3 = 384 programs of six K steps, x read while it sits in L2.
  sm_90: 142 registers (Triton 3.6: 162) under a 168 cap, 3 CTAs/SM, no spills. Partials S·T·r·4 B per
  adapter (0.39 MB at 24 splits).
* expand: a program per (32-row tile, 128 columns), 16 × 12 = 192 programs; reads and writes y in place
  (3.1 MB), base, members and B loaded first, the 24 partials in 3 loads of 8; sm_90 8 warps, 79 registers
  (3.6: 127), 3 (2) CTAs/SM.
* noise per launch (tests/test_work_counts.py): (noise indices present)·r'·(in + out) when each
  index's rows sit in one row tile (r' = r to a power of two; the tile is widened with zeros to the
  16 that tl.dot needs), nothing per K split or column tile beyond the index's own columns; unperturbed
  rows generate none.
* predicted (bench/gpu_model.py, Triton 3.9 gate; latency-bound, 2 µs of each is the launch): shrink
  4.5 µs and expand 4.5 µs per launch at the 1.5B o shape, the q/k/v shrink 8.1 µs (3 launches: 13.5);
  per 1.5B decode step shrink 0.91 ms (4 launches a layer; 7: 1.13 ms), expand 0.97-1.22 ms; LoRA decode
  ratio 0.733-0.751 (0.5B) and 0.760-0.782 (1.5B) of unperturbed (7 shrinks a layer: 0.696-0.708 and
  0.736-0.746; serial members: 0.55-0.56).
"""

from __future__ import annotations

import torch

from fastes import _backend
from fastes.noise import KIND_INT, VALUES_PER_BLOCK, NoiseSpec, as_i32, tensor_id
from fastes.ops._triton import TRITON_ERROR as _TRITON_ERROR
from fastes.ops._triton import key_args, philox, tl, triton

if triton is not None:
    NO_KEY = tl.constexpr(1 << 40)  # larger than any noise index: "no rows left" in the index loop

    @triton.jit
    def _row_members(member_ptr, rows, rmask, HAS_NOISE: tl.constexpr):
        """Each row's member (−1: unperturbed), loaded as early as a kernel can so that its latency overlaps."""
        if HAS_NOISE:
            return tl.load(member_ptr + rows, mask=rmask, other=-1).to(tl.int64)
        return tl.full(rows.shape, -1, tl.int64)

    @triton.jit
    def _row_keys(mem, rmask, sigma, HAS_NOISE: tl.constexpr, ANTITHETIC: tl.constexpr):
        """(noise index per row (−1: unperturbed, NO_KEY past the end), σ·sign per row, smallest index ≥ 0).

        Rows are grouped by noise index, not member: an antithetic pair shares one noise tile, applied ±.
        """
        if HAS_NOISE:
            if ANTITHETIC:
                key = tl.where(mem >= 0, mem >> 1, -1)
                c = sigma * (1 - 2 * (mem & 1)).to(tl.float32)
            else:
                key = mem
                c = sigma + 0.0 * mem.to(tl.float32)
            key = tl.where(rmask, key, NO_KEY)
            c = tl.where(key >= 0, c, 0.0)
        else:
            key = tl.where(rmask, -1, NO_KEY).to(tl.int64)
            c = 0.0 * key.to(tl.float32)
        return key, c, tl.min(tl.where(key >= 0, key, NO_KEY), axis=0)

    @triton.jit
    def _pad_last(e, PAD_STEPS: tl.constexpr):
        """[R, C] → [R, C·2**PAD_STEPS], the new columns zero: noise generated for the rank's columns only, then
        widened to the ≥ 16 that tl.dot needs (the padding used to be generated too)."""
        for _ in tl.static_range(PAD_STEPS):
            e = tl.reshape(tl.permute(tl.join(e, tl.zeros_like(e)), (0, 2, 1)), (e.shape[0], 2 * e.shape[1]))
        return e

    @triton.jit(do_not_specialize=["num_rows", "k_split", "sigma", "k0", "k1", "tid", "tid1", "tid2", "step"])
    def _shrink_kernel(h_ptr, x_ptr, a_ptr, a1_ptr, a2_ptr, member_ptr, num_rows, in_f, rank, k_split, sigma, k0,
                       k1, tid, tid1, tid2, step,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, PAD_STEPS: tl.constexpr,
                       HAS_NOISE: tl.constexpr, ANTITHETIC: tl.constexpr,
                       KIND: tl.constexpr, BLOCKED: tl.constexpr, PREC: tl.constexpr):
        """Partial H_g,s[rows] = x[rows, K_s] A_g,m[:, K_s]ᵀ, fp32 [G, S, T, r], K_s = [s·k_split, (s+1)·k_split).

        g = program_id(2) picks one of up to 3 adapters that read the same x (q/k/v, gate/up: A at ``a_ptr``,
        ``a1_ptr``, ``a2_ptr``, noise streams ``tid``, ``tid1``, ``tid2``): one launch for the group, each
        program the single adapter's code (no loop over names: that spilled in the lowrank shrink).
        One pass over K_s per group of rows (a noise index present, or the unperturbed rows): the group's
        rows of x read once per K step, x Aᵀ plus σ·sign·x E_idxᵀ (stream element j·in + k) with the
        noise tile of the rank's rows generated once. A decode tile (32 rows, 16 per member) holds one
        noise index with antithetic pairs, two without: one or two passes, each index's E_A[:, K_s] once."""
        R_GEN: tl.constexpr = R_PAD >> PAD_STEPS  # noise columns generated: the rank, to a power of two
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(1)
        g = tl.program_id(2)
        if g == 1:
            a_ptr = a1_ptr
            h_ptr += tl.num_programs(1).to(tl.int64) * num_rows * rank  # this name's [S, T, r] partials
        elif g == 2:
            a_ptr = a2_ptr
            h_ptr += 2 * tl.num_programs(1).to(tl.int64) * num_rows * rank
        tid = tid + (g == 1).to(tl.int32) * (tid1 - tid) + (g == 2).to(tl.int32) * (tid2 - tid)
        rmask = rows < num_rows
        rows64 = rows.to(tl.int64)
        jj = tl.arange(0, R_PAD)
        jmask = jj < rank
        key, c, _ = _row_keys(_row_members(member_ptr, rows, rmask, HAS_NOISE), rmask, sigma, HAS_NOISE, ANTITHETIC)
        k_lo = split * k_split
        k_end = tl.minimum(in_f, k_lo + k_split)
        acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
        group = tl.min(key, axis=0)  # −1: the unperturbed rows first; NO_KEY: nothing left
        while group < NO_KEY:
            sel = key == group
            xc = tl.where(sel, c, 0.0)
            for kb in range(k_lo, k_end, BLOCK_K):
                kk = kb + tl.arange(0, BLOCK_K)
                kmask = kk < k_end
                x = tl.load(x_ptr + rows64[:, None] * in_f + kk[None, :], mask=sel[:, None] & kmask[None, :],
                            other=0.0).to(tl.float32)
                a = tl.load(a_ptr + jj[:, None] * in_f + kk[None, :], mask=jmask[:, None] & kmask[None, :],
                            other=0.0).to(tl.float32)
                acc += tl.dot(x, tl.trans(a), input_precision=PREC)
                if HAS_NOISE:
                    if group >= 0:  # padded rows/columns get finite noise that meets zeros of x or is not stored
                        e_row = tl.arange(0, R_GEN)[:, None].to(tl.int64) * in_f + kb  # the rank's rows only
                        e = philox.noise_rows(e_row, BLOCK_K, k0, k1, tid, group, step, KIND, BLOCKED)
                        acc += tl.dot(x * xc[:, None], _pad_last(tl.trans(e), PAD_STEPS), input_precision=PREC)
            group = tl.min(tl.where(key > group, key, NO_KEY), axis=0)
        h_split = h_ptr + split.to(tl.int64) * num_rows * rank
        tl.store(h_split + rows64[:, None] * rank + jj[None, :], acc, mask=rmask[:, None] & jmask[None, :])

    @triton.jit(do_not_specialize=["num_rows", "splits", "sigma", "scaling", "k0", "k1", "tid", "step"])
    def _expand_kernel(out_ptr, base_ptr, h_ptr, b_ptr, member_ptr, num_rows, out_f, rank, splits, sigma, scaling,
                       k0, k1, tid, step, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
                       PAD_STEPS: tl.constexpr, S_CHUNK: tl.constexpr, HAS_NOISE: tl.constexpr,
                       ANTITHETIC: tl.constexpr, KIND: tl.constexpr, BLOCKED: tl.constexpr, PREC: tl.constexpr):
        """out = base + scaling · H B_mᵀ, H = Σ_s H_s (fixed order); B_m = B + σ·sign·E_B (element n·r + j):
        H Bᵀ for every row at once, plus per noise index present σ·sign·H E_Bᵀ.

        The base tile, the row members and B are loaded first, then the partials S_CHUNK splits per load: a
        program waits on ⌈S / S_CHUNK⌉ loads one after another, not one per split."""
        R_GEN: tl.constexpr = R_PAD >> PAD_STEPS  # noise columns generated: the rank, to a power of two
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < num_rows
        rows64 = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < out_f
        offs = rows64[:, None] * out_f + cols[None, :]
        mask = rmask[:, None] & cmask[None, :]
        y = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mem = _row_members(member_ptr, rows, rmask, HAS_NOISE)
        jj = tl.arange(0, R_PAD)
        b = tl.load(b_ptr + cols[:, None] * rank + jj[None, :], mask=cmask[:, None] & (jj < rank)[None, :],
                    other=0.0).to(tl.float32)
        jg = tl.arange(0, R_GEN)
        ss = tl.arange(0, S_CHUNK)
        h_ptrs = h_ptr + ss[:, None, None] * num_rows * rank + rows64[None, :, None] * rank + jg[None, None, :]
        h_mask = rmask[None, :, None] & (jg < rank)[None, None, :]
        h = tl.zeros([BLOCK_M, R_GEN], dtype=tl.float32)
        for s0 in range(0, splits, S_CHUNK):
            part = tl.load(h_ptrs + s0 * num_rows * rank, mask=h_mask & (s0 + ss < splits)[:, None, None], other=0.0)
            h += tl.sum(part, axis=0)
        h = _pad_last(h, PAD_STEPS)  # [BLOCK_M, R_PAD], the padding columns zero
        acc = tl.dot(h, tl.trans(b), input_precision=PREC)
        if HAS_NOISE:
            key, c, cur = _row_keys(mem, rmask, sigma, HAS_NOISE, ANTITHETIC)
            hc = h * c[:, None]
            while cur < NO_KEY:  # padded columns get finite noise that meets zero columns of h
                e_row = cols[:, None].to(tl.int64) * rank
                e = _pad_last(philox.noise_rows(e_row, R_GEN, k0, k1, tid, cur, step, KIND, BLOCKED), PAD_STEPS)
                acc += tl.dot(tl.where((key == cur)[:, None], hc, 0.0), tl.trans(e), input_precision=PREC)
                cur = tl.min(tl.where(key > cur, key, NO_KEY), axis=0)
        tl.store(out_ptr + offs, (y + scaling * acc).to(out_ptr.dtype.element_ty), mask=mask)

def _block(n: int, override: int | None, gpu: int) -> int:
    """Tile size: ``gpu`` on a GPU; the interpreter pays per program and per op, not per element, so it takes more.

    GPU sizes (``_gpu_blocks``) compile for sm_90 without spills for bf16 at ranks up to 64.
    """
    if override is not None:
        return override
    return max(16, min(triton.next_power_of_2(n), 128)) if _backend.triton_interpreted() else gpu


def _gpu_blocks(r_pad: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N): BLOCK_M 32 at r ≤ 16, one antithetic pair's rows at a decode step (16 rows
    per member), so that a tile holds one noise index; smaller as the rank grows, so that the [BLOCK_M, r]
    accumulator and the r-row noise tile fit registers. bf16 takes wider K and N tiles than fp32 (no spills)."""
    half = dtype != torch.float32
    block_m = max(16, min(32, 32 * 16 // r_pad))
    return block_m, 32 if r_pad == 16 and half else 16, 128 if r_pad <= 16 and half else 32


def _shrink_launch(r_pad: int, dtype: torch.dtype) -> dict[str, int]:
    """Warps and stages of the shrink that compile for sm_90 without spills under Triton 3.6 and 3.9 (found by
    ``python -m bench.compile --only lora``): rank 64 spreads its [r, BK] noise tile over 8 warps; fp32 below
    rank 64 runs its K loop unpipelined (with 3 stages 3.6 spills 16 B at r = 16; with 8 warps 3.9 does). The
    pipelined bf16 builds cap registers at 168 (3 CTAs/SM): left alone, ptxas picked 128 and spilled 24-48 B in
    some builds once the name axis came in (3.9 r = 8 Gaussian, 3.6 r = 16 Gaussian); with the cap, 140-164."""
    unpipelined = dtype == torch.float32 and r_pad < 64
    launch = {"num_warps": 8 if r_pad >= 64 else 4, "num_stages": 1 if unpipelined else 3}
    if r_pad < 64 and not unpipelined:
        launch["maxnreg"] = 168
    return launch


def _noise_launch_args(noise: NoiseSpec | None, row_member: torch.Tensor | None, sigma: float, name: str,
                       fallback: torch.Tensor) -> tuple[bool, torch.Tensor, list[int], dict[str, object]]:
    """(has_noise, member pointer, Philox scalars as int32 bit patterns, shared constexprs)."""
    has_noise = noise is not None and row_member is not None and sigma != 0
    kind = noise.kind if noise is not None else "gaussian"
    scalars = [0, 0, 0, 0]
    if has_noise:
        scalars = list(key_args(noise.seed, tensor_id(name), noise.step).values())
    members = row_member.contiguous() if has_noise else fallback  # not read without noise
    const = dict(HAS_NOISE=has_noise, ANTITHETIC=has_noise and noise.antithetic,
                 KIND=KIND_INT[kind], num_warps=4)
    return has_noise, members, scalars, const


def _pad_steps(r_pad: int, rank: int) -> int:
    """Doublings from the generated noise width (the rank, to a power of two) to the dot's r_pad."""
    return (r_pad // triton.next_power_of_2(rank)).bit_length() - 1


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots; bf16/fp16 inputs are exact in tf32 and their outputs coarser than it."""
    return "ieee" if dtype == torch.float32 else "tf32"


SHRINK_PROGRAMS = 396  # three per SM of an H100 (132 SMs): the CTAs/SM of the bf16 rank-8 shrink on sm_90
MAX_SPLITS = 32        # partials the expand sums: S·T·r·4 bytes, two loads per program at rank 8


def _splits(num_rows: int, in_f: int, block_m: int, block_k: int, names: int = 1) -> tuple[int, int]:
    """(K splits, K range per split) of the shrink: a decode batch has few row tiles (512 rows / 32 = 16),
    and a program's K steps wait on their loads one after another, so the input dimension is split until the
    grid of (row tile, K split, name) fills the GPU (in = 1536, one name: 24 splits of two steps; q/k/v:
    8 of six). Under the interpreter two splits whenever in spans two K tiles, whatever ``names``, so that
    tests run the split path and a grouped launch writes each name's partials bitwise as its own launch."""
    steps = triton.cdiv(in_f, block_k)
    if _backend.triton_interpreted():
        splits = 2 if steps >= 2 else 1
    else:
        splits = max(1, min(MAX_SPLITS, SHRINK_PROGRAMS // (names * triton.cdiv(num_rows, block_m)), steps))
    k_split = triton.cdiv(steps, splits) * block_k
    return triton.cdiv(in_f, k_split), k_split


def _split_chunk(splits: int, block_m: int, rank: int) -> int:
    """Partials the expand loads at once: all of them up to 2048 fp32 values per program (8 per thread; 16 raise
    the registers of the bf16 expand under Triton 3.6 from ~130 to ~205)."""
    return max(1, min(triton.next_power_of_2(splits), 2048 // (block_m * triton.next_power_of_2(rank))))


def lora_shrink_group(x: torch.Tensor, loras_a: list[torch.Tensor], row_member: torch.Tensor | None,
                      noise: NoiseSpec | None, sigma: float, names_a: list[str], block_m: int | None = None,
                      block_k: int | None = None) -> torch.Tensor:
    """One ``_shrink_kernel`` launch for up to 3 adapters of one rank that read x: partials fp32 [G, S, T, r].

    Grid (row tiles, K splits, G): each program one adapter's pass, so each name's E_A is generated once per
    noise index (tests/test_work_counts.py) and the group costs one launch, not G. On a GPU the names share
    one wave of programs (fewer K splits each than alone); under the interpreter a name's partials are bitwise
    those of its own launch.
    """
    _backend.require_triton(x, "x", _TRITON_ERROR)
    if not 1 <= len(loras_a) <= 3 or len(names_a) != len(loras_a) or len({a.shape for a in loras_a}) != 1:
        raise ValueError(f"lora_shrink_group takes 1 to 3 adapters A of one shape with one name each, got "
                         f"{[tuple(a.shape) for a in loras_a]} and {len(names_a)} names")
    (num_rows, in_f), rank = x.shape, loras_a[0].shape[0]
    has_noise, members, (k0, k1, tid, step), const = _noise_launch_args(noise, row_member, sigma, names_a[0], x)
    tids = [as_i32(tensor_id(n)) if has_noise else 0 for n in names_a[1:]] + [tid, tid]
    r_pad = max(16, triton.next_power_of_2(rank))
    gpu_m, gpu_k, _ = _gpu_blocks(r_pad, x.dtype)
    block_m, block_k = _block(num_rows, block_m, gpu_m), _block(in_f, block_k, gpu_k)
    splits, k_split = _splits(num_rows, in_f, block_m, block_k, len(loras_a))
    parts = torch.empty(len(loras_a), splits, num_rows, rank, dtype=torch.float32, device=x.device)
    if _backend.triton_interpreted():
        parts.fill_(float("nan"))  # poisoned (tests): a row the shrink misses turns the output NaN
    if num_rows == 0:
        return parts
    per = VALUES_PER_BLOCK[noise.kind if noise is not None else "gaussian"]
    a = [t.contiguous() for t in loras_a] + [loras_a[0].contiguous()] * (3 - len(loras_a))
    _shrink_kernel[(triton.cdiv(num_rows, block_m), splits, len(loras_a))](
        parts, x.contiguous(), a[0], a[1], a[2], members, num_rows, in_f, rank, k_split, float(sigma),
        k0, k1, tid, tids[0], tids[1], step, BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=r_pad,
        PAD_STEPS=_pad_steps(r_pad, rank), BLOCKED=in_f % per == 0 and block_k % per == 0, PREC=_precision(x.dtype),
        **{**const, **_shrink_launch(r_pad, x.dtype)},
    )
    return parts


def lora_shrink_partials(x: torch.Tensor, lora_a: torch.Tensor, row_member: torch.Tensor | None,
                         noise: NoiseSpec | None, sigma: float, name_a: str, block_m: int | None = None,
                         block_k: int | None = None) -> torch.Tensor:
    """Partial H_s = x[:, K_s] A_m[:, K_s]ᵀ over the shrink's K splits, fp32 [S, T, r]; H = Σ_s H_s."""
    return lora_shrink_group(x, [lora_a], row_member, noise, sigma, [name_a], block_m, block_k)[0]


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, row_member: torch.Tensor | None,
                       noise: NoiseSpec | None, sigma: float, name_a: str, block_m: int | None = None,
                       block_k: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """H = x A_mᵀ per row's member, fp32 [T, r] (``out`` if given): the partials summed in split order."""
    parts = lora_shrink_partials(x, lora_a, row_member, noise, sigma, name_a, block_m, block_k)
    if out is None:
        out = torch.empty(parts.shape[1:], dtype=torch.float32, device=x.device)
    return torch.sum(parts, dim=0, out=out) if parts.shape[0] > 1 else out.copy_(parts[0])


def lora_expand_triton(base: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                       row_member: torch.Tensor | None, noise: NoiseSpec | None, sigma: float, name_b: str,
                       block_m: int | None = None, block_n: int | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """out = base + scaling · H B_mᵀ (base's dtype; H fp32 [T, r], or the shrink's partials [S, T, r],
    summed here); in place into base unless ``out`` is given."""
    _backend.require_triton(base, "base", _TRITON_ERROR)
    (num_rows, out_f), rank = base.shape, lora_b.shape[1]
    base = base.contiguous()
    out = base if out is None else out
    if num_rows == 0:
        return out
    parts = h if h.dim() == 3 else h.unsqueeze(0)
    has_noise, members, (k0, k1, tid, step), const = _noise_launch_args(noise, row_member, sigma, name_b, base)
    r_pad = max(16, triton.next_power_of_2(rank))
    gpu_m, _, gpu_n = _gpu_blocks(r_pad, base.dtype)
    block_m, block_n = _block(num_rows, block_m, gpu_m), _block(out_f, block_n, gpu_n)
    per = VALUES_PER_BLOCK[noise.kind if noise is not None else "gaussian"]
    _expand_kernel[(triton.cdiv(num_rows, block_m), triton.cdiv(out_f, block_n))](
        out, base, parts.contiguous(), lora_b.contiguous(), members, num_rows, out_f, rank, parts.shape[0],
        float(sigma), float(scaling), k0, k1, tid, step, BLOCK_M=block_m, BLOCK_N=block_n, R_PAD=r_pad,
        PAD_STEPS=_pad_steps(r_pad, rank), S_CHUNK=_split_chunk(parts.shape[0], block_m, rank),
        BLOCKED=rank % per == 0, PREC=_precision(base.dtype),
        **{**const, "num_warps": 8},  # 4 warps spill 4-12 B on sm_90 (Triton 3.6 fp32, 3.9 bf16 Gaussian)
    )
    return out


def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: float, row_member: torch.Tensor | None,
                       noise: NoiseSpec | None, sigma: float, name_a: str, name_b: str,
                       out: torch.Tensor | None = None, blocks: tuple[int, int, int] | None = None,
                       parts: torch.Tensor | None = None) -> torch.Tensor:
    """Shared base GEMM, then shrink and expand; y is written in place over the base GEMM unless ``out`` is given.

    ``blocks`` = (BLOCK_M, BLOCK_K, BLOCK_N), powers of two ≥ 16, overrides the tiling; results do not
    depend on it. ``parts``: this adapter's shrink partials [S, T, r] from a grouped ``lora_shrink_group``
    (no shrink launch here).
    """
    _backend.require_triton(x, "x", _TRITON_ERROR)
    block_m, block_k, block_n = blocks if blocks is not None else (None, None, None)
    if out is not None and (out.shape != (x.shape[0], weight.shape[0]) or out.dtype != x.dtype
                            or out.device != x.device or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous [{x.shape[0]}, {weight.shape[0]}] of {x.dtype} on {x.device}")
    base = torch.nn.functional.linear(x, weight, bias)
    if parts is None:
        parts = lora_shrink_partials(x, lora_a, row_member, noise, sigma, name_a, block_m, block_k)
    return lora_expand_triton(base, parts, lora_b, scaling, row_member, noise, sigma, name_b, block_m, block_n,
                              out=out)
