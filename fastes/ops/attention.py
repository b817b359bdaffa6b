"""Paged attention over a block KV cache: the KV write, varlen (chunked-prefill) attention and decode.

Layout (vLLM-style), one pair of tensors per layer:
  k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
  slot = block_id * block_size + offset; slot −1 means "do not write" (padding).

A batch packs S sequences' new tokens back to back: ``cu_seqlens_q`` [S+1] (int32)
delimits them, ``seq_lens`` [S] is each sequence's total length *including* the new
tokens (already written to the cache), ``block_tables`` [S, max_blocks] (int32, −1
padded) maps logical block j of sequence s to a physical block. New token i of
sequence s sits at position p = seq_lens[s] − q_len_s + i and attends causally to
positions 0..p (and only to p − window < pos when ``sliding_window`` is set). GQA:
query head h reads kv head h // (q_heads // kv_heads). Decode is q_len = 1.

This file holds the torch reference (a per-sequence loop: the oracle), the CPU KV write, the launcher of the
C++ kernel (csrc/attention_cpu.cpp, the CPU backend for float32), a vectorized torch path
(the CPU fallback: other dtypes, or no extension) and the dispatchers; the Triton kernels live
beside them in attention_triton.py (CUDA, and the interpreter in tests).
"""

from __future__ import annotations

import torch

from fastes import _backend
from fastes.ops.dispatch import backends, choose

BACKENDS = backends("reference", "torch", "cpu", "triton")


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows [T, kv_heads, head_dim] into the cache at their slots (−1 skipped)."""
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[valid].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[valid].to(v_cache.dtype)


def write_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """The CPU write: ``index_copy_`` into the cache viewed as [slots, kv_heads, head_dim].

    One copy per tensor instead of the reference's block/offset split and two advanced-index
    assignments; the −1 slots (padding) are filtered only when present.
    """
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    slots = slot_mapping.long()
    if bool((slots < 0).any()):
        valid = slots >= 0
        slots, k, v = slots[valid], k[valid], v[valid]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` positions of one sequence from the paged cache: [length, kv_heads, head_dim]."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    blocks = block_table[:n_blocks].long()
    return cache[blocks].reshape(n_blocks * block_size, *cache.shape[2:])[:length]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                        sliding_window: int | None = None) -> torch.Tensor:
    """Causal GQA attention of packed queries [T, q_heads, D] over the paged cache, fp32 softmax."""
    out = torch.empty_like(q)
    q_heads, kv_heads = q.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    cu = cu_seqlens_q.tolist()
    for s, total in enumerate(seq_lens.tolist()):
        start, end = cu[s], cu[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        keys = gather_kv_ref(k_cache, block_tables[s], total).float().repeat_interleave(group, dim=1)
        values = gather_kv_ref(v_cache, block_tables[s], total).float().repeat_interleave(group, dim=1)
        qs = q[start:end].float()
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale
        q_pos = torch.arange(total - q_len, total, device=q.device).unsqueeze(1)
        k_pos = torch.arange(total, device=q.device).unsqueeze(0)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed.unsqueeze(0), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_start: torch.Tensor,
                  q_lens: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                  sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded batched attention for a group of sequences: (out rows [n, H, D], their row indices [n])."""
    num_seqs, (total_rows, q_heads, dim) = seq_lens.numel(), q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    max_q, max_len = int(q_lens.max()), int(seq_lens.max())
    num_blocks = -(-max_len // block_size)
    tables = block_tables[:, :num_blocks].clamp_min(0).long().reshape(-1)  # index_select: ~2x advanced indexing
    keys = k_cache.index_select(0, tables).view(num_seqs, num_blocks * block_size, kv_heads, dim)[:, :max_len].float()
    values = v_cache.index_select(0, tables).view(num_seqs, num_blocks * block_size, kv_heads, dim)[:, :max_len].float()
    offs = torch.arange(max_q, device=q.device)
    valid_q = offs.unsqueeze(0) < q_lens.unsqueeze(1)  # [S, max_q]
    rows = (q_start.unsqueeze(1) + offs.unsqueeze(0)).clamp(max=total_rows - 1)
    queries = q[rows].float().reshape(num_seqs, max_q, kv_heads, group, dim)
    q_pos = (seq_lens - q_lens).unsqueeze(1) + offs.unsqueeze(0)  # [S, max_q]
    k_pos = torch.arange(max_len, device=q.device)
    allowed = k_pos.view(1, 1, -1) <= q_pos.unsqueeze(2)
    if sliding_window is not None:
        allowed &= k_pos.view(1, 1, -1) > q_pos.unsqueeze(2) - sliding_window
    allowed |= ~valid_q.unsqueeze(2) & (k_pos.view(1, 1, -1) == 0)  # padding rows: finite, then dropped
    scores = torch.einsum("sqkgd,slkd->skgql", queries, keys) * scale
    scores = scores.masked_fill(~allowed.view(num_seqs, 1, 1, max_q, max_len), float("-inf"))
    out = torch.einsum("skgql,slkd->sqkgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(num_seqs, max_q, q_heads, dim)[valid_q], rows[valid_q]


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                          sliding_window: int | None = None) -> torch.Tensor:
    """Vectorized torch path (the CPU backend): decodes in one padded batch, prefill chunks in another.

    Splitting by q_len keeps the padded score tensor small when one long prefill chunk
    shares a step with many single-token decodes.
    """
    out = torch.empty_like(q)
    cu = cu_seqlens_q.long()
    q_lens, starts, lens = cu[1:] - cu[:-1], cu[:-1], seq_lens.long()
    for selected in (q_lens == 1, q_lens > 1):
        if bool(selected.any()):
            values, rows = _attend_group(q, k_cache, v_cache, starts[selected], q_lens[selected], lens[selected],
                                         block_tables[selected], scale, sliding_window)
            out[rows] = values.to(q.dtype)
    return out


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
           seq_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("q must be [T, heads, D] and k_cache/v_cache [blocks, block_size, kv_heads, D] alike")
    if q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_heads={k_cache.shape[2]}, D={k_cache.shape[3]}")
    if cu_seqlens_q.numel() != seq_lens.numel() + 1 or block_tables.shape[0] != seq_lens.numel():
        raise ValueError("cu_seqlens_q must have S+1 entries and block_tables S rows for S = len(seq_lens)")


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str = "auto") -> None:
    """Write K/V of the new tokens into the paged cache (Triton; the reference; else the CPU index copy)."""
    chosen = choose(backend, BACKENDS, k)
    if chosen == "triton":
        from fastes.ops.attention_triton import write_kv_triton

        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    elif chosen == "reference" or k.is_cuda:
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                    sliding_window: int | None = None, max_q_len: int | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Attention for packed new tokens (prefill chunks and decode alike); see the module docstring."""
    chosen = choose(backend, BACKENDS, q)
    _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables)
    if chosen == "triton":
        from fastes.ops.attention_triton import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                                      sliding_window, max_q_len)
    if chosen == "reference":
        return paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, sliding_window)
    if chosen == "cpu":
        out = paged_attention_cpp(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, sliding_window)
        if out is not None:
            return out
    return paged_attention_torch(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, sliding_window)


def paged_attention_cpp(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                        sliding_window: int | None = None) -> torch.Tensor | None:
    """The C++ kernel of fastes._C (float32 CPU tensors, contiguous caches), or None where it does not apply.

    Each query row reads its K/V straight from the block pool: nothing is gathered or padded, and a
    row's result does not depend on the rest of the batch.
    """
    ext = _backend.extension()
    if (ext is None or not hasattr(ext, "paged_attention") or q.is_cuda or q.dtype != torch.float32
            or k_cache.dtype != torch.float32 or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        return None
    out = torch.empty(q.shape, dtype=torch.float32)
    return ext.paged_attention(q if q.stride(-1) == 1 else q.contiguous(), k_cache, v_cache,
                               cu_seqlens_q.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous(),
                               block_tables.to(torch.int32).contiguous(), float(scale), out,
                               int(sliding_window) if sliding_window is not None else 0)
