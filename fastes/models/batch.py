"""AttentionBatch: the per-forward tensors that say where each packed token's K/V goes and reads from.

Layout is that of ``fastes.ops.attention`` (vLLM style): S sequences' new tokens are
packed back to back; sequence s owns rows cu_seqlens_q[s]:cu_seqlens_q[s+1], its new
tokens sit at positions seq_lens[s] − q_len_s .. seq_lens[s] − 1, and are written to
``slot_mapping`` (block * block_size + offset) before attention reads them back.

It lives below the engine (docs/design.md, "Layers"): the model reads it, the engine
builds it, and nothing under models/ or ops/ imports fastes.engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


__all__ = ["AttentionBatch"]
