"""build_attention_batch: an AttentionBatch (fastes.models.batch) from a block manager's tables.

The engine's own steps build their batch from persistent rows (fastes.engine.batch_state);
this list-based builder serves tests, oracles and the KL analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fastes.models.batch import AttentionBatch

if TYPE_CHECKING:
    from fastes.engine.block_manager import BlockManager


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
