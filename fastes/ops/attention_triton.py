"""Triton kernels for the paged KV cache: KV write, varlen (chunked-prefill) attention, split-KV decode.

Semantics, layout and torch references: fastes/ops/attention.py. Algorithms: FlashAttention-2 online
softmax (Dao 2023) and flash-decoding split-KV (Dao et al. 2023), written from the papers.

* write_kv: one program per new token copies its [kv_heads, D] K and V rows to its slot; −1 is skipped.
* prefill (any q_len): program = (query tile, sequence, kv head). The GROUP = q_heads / kv_heads query
  heads sharing a kv head are packed into the tile rows (row r: token r // GROUP, head r % GROUP), so a
  K/V tile is read once per kv head and short chunks still fill a 16-row tl.dot. The program walks the
  KV positions [lo, hi) its rows can see (hi = last row position + 1, lo = first window start) in
  BLOCK_N columns, gathering each column's physical block from the block table (BLOCK_N need not equal
  block_size). Softmax in fp32, base 2. Grid = (cdiv(max_q_len·GROUP, BLOCK_M), S, kv_heads): tiles past
  a sequence's q_len exit at once, so the host never looks at the batch (no .item()/.tolist()).
* decode (max_q_len == 1): program = (sequence, kv head, split) over 1/num_splits of the context, all
  GROUP heads in the rows of one tl.dot (padded to 16); a reduce kernel per (sequence, q head) merges the
  splits' (max, sum, acc). num_splits depends on shapes only (S·kv_heads vs SM count, block-table width),
  so a decode step is CUDA-graph-capturable. With one split the first kernel writes the output itself.

Count for a decode step of Qwen2.5-1.5B (28 layers, 12 q / 2 kv heads, D 128, bf16), batch 256, ctx 1024:
  KV read = 28 · 256 seqs · 1024 pos · 2 (K, V) · 2 heads · 128 · 2 B = 7.52 GB → 2.28 ms at 3.3 TB/s
            (81 µs per layer); q/out traffic is 1.5 MB per layer, negligible.
  FLOPs   = 28 · 256 · 1024 · 12 heads · 128 · 4 = 45.1 GFLOP (120 GFLOP issued with the 16-row padding)
            → 0.06–0.15 ms at ~800 TFLOP/s.
  ~6 FLOP per byte: decode attention is bandwidth-bound, and at this shape it moves 2.5× the bytes of the
  weights (3 GB, 0.9 ms). Target (DESIGN §7): ≤ 1.5× the 2.28 ms floor. bench/attention.py measures it.
fp32 prefill ("ieee" dots on the CUDA cores, the CPU-parity path): per key tile 4·BLOCK_M·BLOCK_N·D FLOPs
as FMAs, K/V tiles read once per (query tile, kv head). At D = 128 a 64 × 32 tile kept whole rows of q and
k per thread for q·kᵀ: 255 registers and 788 B spilled per thread on sm_90. Now 32 × 32 tiles, q·kᵀ summed
over 32-wide head_dim chunks (q re-read from L1 per key tile: 16 KB per tile, L1-resident): 168 registers,
no spills, twice the query tiles (K/V read twice as often: +2·ctx·D·4 B per 32 query rows); predicted
faster than the spilling build, unmeasured.
Block sizes and warps below are untuned guesses (no GPU was available when this was written).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fastes import _backend

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """tl.dot in exact fp32 for fp32 inputs (the default would be tf32 on GPU)."""
    if IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     s_kt, s_kh, s_vt, s_vh, s_kcb, s_kco, s_kch, s_vcb, s_vco, s_vch,
                     KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * s_kt + h * s_kh + d, mask=mask)
    v = tl.load(v_ptr + t * s_vt + h * s_vh + d, mask=mask)
    tl.store(kc_ptr + blk * s_kcb + off * s_kco + h * s_kch + d, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + blk * s_vcb + off * s_vco + h * s_vch + d, v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_tile(k_ptr, v_ptr, bt_row, pos, col_ok, offs_d, d_ok, kvh, s_kb, s_ko, s_kh, s_vb, s_vo, s_vh,
             BLOCK_SIZE: tl.constexpr, EVEN_D: tl.constexpr, LOAD_K: tl.constexpr = True):
    """K and V [BLOCK_N, BLOCK_D] at logical positions ``pos`` (masked columns and padding dims read 0);
    K is zeros without LOAD_K (the caller reads it in head_dim chunks)."""
    phys = tl.load(bt_row + pos // BLOCK_SIZE, mask=col_ok, other=0).to(tl.int64)
    off = (pos % BLOCK_SIZE).to(tl.int64)
    if EVEN_D:
        mask = col_ok[:, None]
    else:
        mask = col_ok[:, None] & d_ok[None, :]
    if LOAD_K:
        k = tl.load(k_ptr + (phys * s_kb + off * s_ko + kvh * s_kh)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    else:
        k = tl.zeros([pos.shape[0], offs_d.shape[0]], k_ptr.dtype.element_ty)
    v = tl.load(v_ptr + (phys * s_vb + off * s_vo + kvh * s_vh)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """Online softmax over one key tile: scores ``s`` [R, N] (log2 units), V [N, D]; returns the new (m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, lens_ptr, bt_ptr, qk_scale, window,
                    s_qt, s_qh, s_ot, s_oh, s_kb, s_ko, s_kh, s_vb, s_vo, s_vh, s_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_WINDOW: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(cu_ptr + seq).to(tl.int32)
    q_len = tl.load(cu_ptr + seq + 1).to(tl.int32) - q_start
    first_tok = (tile * BLOCK_M) // GROUP
    if first_tok >= q_len:
        return
    ctx = tl.load(lens_ptr + seq).to(tl.int32) - q_len
    last_tok = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = tok < q_len
    q_pos = ctx + tok
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    row_off = (q_start + tok).to(tl.int64) * s_qt + head * s_qh
    q = tl.load(q_ptr + row_off[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    hi = ctx + last_tok + 1
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx + first_tok - window + 1, 0)
    bt_row = bt_ptr + seq.to(tl.int64) * s_bt
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: fully masked rows give p = 0, never NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # fp32 ("ieee") dots run on the CUDA cores, each thread holding whole rows of both operands: at
    # head_dim 128 the q·kᵀ operands alone fill 255 registers (sm_90: 788 B spilled), so the score is
    # summed over head_dim chunks of D_CHUNK loaded from memory (q re-read from L1 per key tile).
    D_CHUNK: tl.constexpr = 32
    CHUNKED: tl.constexpr = IEEE and BLOCK_D > 2 * D_CHUNK
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + offs_n
        k, v = _kv_tile(k_ptr, v_ptr, bt_row, pos, pos < hi, offs_d, d_ok, kvh, s_kb, s_ko, s_kh,
                        s_vb, s_vo, s_vh, BLOCK_SIZE, EVEN_D, not CHUNKED)
        v = v.to(q.dtype)
        if CHUNKED:
            phys = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < hi, other=0).to(tl.int64)
            k_row = phys * s_kb + (pos % BLOCK_SIZE).to(tl.int64) * s_ko + kvh * s_kh
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for d0 in tl.static_range(0, BLOCK_D, D_CHUNK):
                od = d0 + tl.arange(0, D_CHUNK)
                qd = tl.load(q_ptr + row_off[:, None] + od[None, :], mask=row_ok[:, None] & (od < HEAD_DIM)[None, :],
                             other=0.0).to(tl.float32)
                kd = tl.load(k_ptr + k_row[:, None] + od[None, :], mask=(pos < hi)[:, None] & (od < HEAD_DIM)[None, :],
                             other=0.0).to(tl.float32)
                s += _dot(qd, tl.trans(kd), IEEE)
            s = s * qk_scale
        else:
            k = k.to(q.dtype)
            s = _dot(q, tl.trans(k), IEEE) * qk_scale
        allowed = pos[None, :] <= q_pos[:, None]  # causal; also keeps valid rows inside [0, seq_len)
        if USE_WINDOW:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, IEEE)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (q_start + tok).to(tl.int64) * s_ot + head * s_oh
    tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, part_ptr, ml_ptr, cu_ptr, lens_ptr, bt_ptr, qk_scale, window,
                   s_qt, s_qh, s_ot, s_oh, s_kb, s_ko, s_kh, s_vb, s_vo, s_vh, s_bt,
                   Q_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(cu_ptr + seq).to(tl.int64)
    q_len = tl.load(cu_ptr + seq + 1).to(tl.int64) - q_row
    seq_len = tl.load(lens_ptr + seq).to(tl.int32)
    if (q_len == 0) | (seq_len == 0):
        return
    offs_h = tl.arange(0, BLOCK_H)
    head = kvh * GROUP + offs_h
    h_ok = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    hd_ok = h_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_row * s_qt + head[:, None] * s_qh + offs_d[None, :], mask=hd_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)
    bt_row = bt_ptr + seq.to(tl.int64) * s_bt
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        col_ok = pos < end
        k, v = _kv_tile(k_ptr, v_ptr, bt_row, pos, col_ok, offs_d, d_ok, kvh, s_kb, s_ko, s_kh,
                        s_vb, s_vo, s_vh, BLOCK_SIZE, EVEN_D)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, IEEE)
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + q_row * s_ot + head[:, None] * s_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=hd_ok)
    else:
        idx = (seq.to(tl.int64) * Q_HEADS + head) * NUM_SPLITS + split  # partials: [S, Q_HEADS, NUM_SPLITS, ...]
        tl.store(part_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=hd_ok)
        tl.store(ml_ptr + idx * 2, m_i, mask=h_ok)
        tl.store(ml_ptr + idx * 2 + 1, l_i, mask=h_ok)


@triton.jit
def _reduce_kernel(o_ptr, part_ptr, ml_ptr, cu_ptr, lens_ptr, s_ot, s_oh,
                   Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(cu_ptr + seq).to(tl.int64)
    q_len = tl.load(cu_ptr + seq + 1).to(tl.int64) - q_row
    seq_len = tl.load(lens_ptr + seq)
    if (q_len == 0) | (seq_len == 0):
        return
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    idx = (seq.to(tl.int64) * Q_HEADS + head) * NUM_SPLITS + offs_s
    m = tl.load(ml_ptr + idx * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(ml_ptr + idx * 2 + 1, mask=s_ok, other=0.0)
    part = tl.load(part_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # empty splits carry m = −1e30, l = 0, acc = 0: weight 0
    out = tl.sum(part * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(o_ptr + q_row * s_ot + head * s_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not _backend.triton_interpreted():
            raise ValueError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Scatter K/V [T, kv_heads, D] into the paged cache in place; slot −1 is left untouched."""
    _check_device(k, v, k_cache, v_cache, slot_mapping)
    # A dtype change is done by torch (round-to-nearest-even); the interpreter's fp32→bf16 cast truncates.
    k = k.to(k_cache.dtype) if k.dtype != k_cache.dtype else k
    v = v.to(v_cache.dtype) if v.dtype != v_cache.dtype else v
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a contiguous last (head_dim) dimension")
    t, kv_heads, head_dim = k.shape
    if t == 0:
        return
    _write_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim), num_warps=2)


def default_num_splits(num_seqs: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per (sequence, kv head) so decode fills the GPU (~4 programs per SM), ≥ 256 positions each.

    Only shapes enter, never tensor values, so a captured CUDA graph stays valid.
    """
    if device.type != "cuda":
        return 1
    programs = max(num_seqs * kv_heads, 1)
    want = triton.cdiv(4 * _sm_count(device.index or 0), programs)
    return max(1, min(want, triton.cdiv(max_context, 256), 64))


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                           scale: float, sliding_window: int | None = None, max_q_len: int | None = None, *,
                           num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed causal GQA attention over the paged cache (see attention.py); decode kernel when max_q_len == 1.

    ``max_q_len`` bounds every sequence's q_len (default: the token count, correct but launches more
    programs). ``num_splits`` overrides the decode split count; ``out`` receives the result if given.
    """
    _check_device(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables)
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a contiguous last (head_dim) dimension")
    n_tokens, q_heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    num_seqs = seq_lens.numel()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if n_tokens == 0 or num_seqs == 0:
        return out
    max_q_len = n_tokens if max_q_len is None else max_q_len
    interp = _backend.triton_interpreted()
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K ≥ 16
    window = int(sliding_window) if sliding_window is not None else 0
    args = (cu_seqlens_q, seq_lens, block_tables, scale * LOG2E, window, q.stride(0), q.stride(1), out.stride(0),
            out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
            v_cache.stride(1), v_cache.stride(2), block_tables.stride(0))
    flags = dict(HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_D=block_d, USE_WINDOW=sliding_window is not None,
                 UPCAST=interp, IEEE=q.dtype == torch.float32)
    if max_q_len == 1:
        if num_splits is None:
            num_splits = default_num_splits(num_seqs, kv_heads, block_tables.shape[1] * block_size, q.device)
        if num_splits < 1:
            raise ValueError(f"num_splits must be ≥ 1, got {num_splits}")
        # Interpreter: poison the scratch so a read of an unwritten partial shows up as NaN in tests.
        alloc = functools.partial(torch.full, fill_value=math.nan) if interp else torch.empty
        shape = (num_seqs, q_heads, num_splits)
        part, ml = out, out  # unused with one split
        if num_splits > 1:
            part = alloc((*shape, head_dim), dtype=torch.float32, device=q.device)
            ml = alloc((*shape, 2), dtype=torch.float32, device=q.device)
        block_n = 16 if interp else (64 if head_dim <= 128 else 32)
        _decode_kernel[(num_seqs, kv_heads, num_splits)](
            q, k_cache, v_cache, out, part, ml, *args, Q_HEADS=q_heads, GROUP=group,
            BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, NUM_SPLITS=num_splits, **flags,
            num_warps=4, num_stages=1 if interp else 3)
        if num_splits > 1:
            _reduce_kernel[(num_seqs, q_heads)](
                out, part, ml, cu_seqlens_q, seq_lens, out.stride(0), out.stride(1), Q_HEADS=q_heads,
                HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
                BLOCK_D=block_d, num_warps=4)
        return out
    rows = max(max_q_len, 1) * group
    if interp:
        block_m, block_n, warps, stages = 16, 16, 4, 1
    elif head_dim <= 128 and q.dtype != torch.float32:
        block_m, block_n, warps, stages = min(128, max(16, triton.next_power_of_2(rows))), 64, 8, 2
    elif q.dtype != torch.float32:
        block_m, block_n, warps, stages = min(64, max(16, triton.next_power_of_2(rows))), 32, 8, 1
    else:  # fp32 "ieee" dots run on the CUDA cores with operands in registers: smaller tiles, no spills
        block_m = min(32 if head_dim <= 128 else 16, max(16, triton.next_power_of_2(rows)))
        block_n, warps, stages = (32 if head_dim <= 128 else 16), 8, 1
    grid = (triton.cdiv(rows, block_m), num_seqs, kv_heads)
    _prefill_kernel[grid](q, k_cache, v_cache, out, *args, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, **flags,
                          num_warps=warps, num_stages=stages)
    return out
