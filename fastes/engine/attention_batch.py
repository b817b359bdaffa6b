"""AttentionBatch: the per-forward tensors that say where each packed token's K/V goes and reads from.

Layout is that of ``fastes.ops.attention`` (vLLM style): S sequences' new tokens are
packed back to back; sequence s owns rows cu_seqlens_q[s]:cu_seqlens_q[s+1], its new
tokens sit at positions seq_lens[s] − q_len_s .. seq_lens[s] − 1, and are written to
``slot_mapping`` (block * block_size + offset) before attention reads them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastes.engine.block_manager import BlockManager


@dataclass(frozen=True)
class AttentionBatch:
    """cu_seqlens_q [S+1] int32, seq_lens [S] int32, block_tables [S, B] int32 (−1 padded),
    slot_mapping [T] int64 (−1: do not write), max_q_len and max_seq_len as host ints."""

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_q_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def to(self, device: torch.device | str) -> AttentionBatch:
        return AttentionBatch(self.cu_seqlens_q.to(device), self.seq_lens.to(device), self.block_tables.to(device),
                              self.slot_mapping.to(device), self.max_q_len, self.max_seq_len)


def build_attention_batch(manager: BlockManager, chunks: Sequence[tuple[int, int, int]],
                          device: torch.device | str = "cpu") -> tuple[AttentionBatch, torch.Tensor]:
    """(AttentionBatch, positions [T] int64) for ``chunks`` of (seq_id, start, end).

    Each chunk feeds the new tokens at positions [start, end) of a sequence whose slots the
    block manager already holds (``allocate`` / ``append_slot``); attention covers 0..end−1.
    """
    cu, seq_lens, tables, slots, positions = [0], [], [], [], []
    for seq_id, start, end in chunks:
        if not 0 <= start < end:
            raise ValueError(f"chunk of sequence {seq_id} must have 0 <= start < end, got [{start}, {end})")
        slots.extend(manager.slots(seq_id, start, end))
        positions.extend(range(start, end))
        cu.append(cu[-1] + end - start)
        seq_lens.append(end)
        tables.append(manager.block_table(seq_id))
    width = max((len(t) for t in tables), default=0)
    padded = [t + [-1] * (width - len(t)) for t in tables]
    batch = AttentionBatch(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(padded, dtype=torch.int32).reshape(len(tables), width),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_q_len=max((cu[i + 1] - cu[i] for i in range(len(chunks))), default=0),
        max_seq_len=max(seq_lens, default=0),
    )
    return batch.to(device), torch.tensor(positions, dtype=torch.int64, device=device)


__all__ = ["AttentionBatch", "build_attention_batch"]
