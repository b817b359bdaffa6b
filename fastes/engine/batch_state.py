"""BatchState: one persistent row per running sequence, updated only when something changes.

Rebuilding the step's metadata from Python lists costs microseconds per sequence per step
(block tables above all), which at 512–2048 sequences is as long as the GPU's whole decode
step (docs/design.md, "The host path"). Here each running sequence owns a row of host
arrays: its block table, KV length, member, prompt key, sample index and last sampled token.
The scheduler writes a row when a sequence is admitted, gets a block, forks, finishes or is
preempted; a decode step that needs no new block touches no row (its length is bumped by
one vectorized add). The runner turns a step's row list into every forward and sampler input
(positions, slot mapping, row-member tags, the gathered block tables) with a few numpy ops.

Arrays are numpy (a scalar write costs ~0.1 µs, a torch one ~5 µs); ``torch.from_numpy`` shares
them with no copy. Rows grow by doubling, so neither the number of sequences nor their
length needs to be known in advance.
"""

from __future__ import annotations

import numpy as np


class BatchState:
    """Host rows of running sequences: ``block_tables`` [rows, width] int32, ``lengths`` (tokens whose KV is
    computed after the scheduled step), ``members``, ``prompt_keys``, ``sample_index``, ``last_token`` [rows]."""

    def __init__(self, rows: int = 64, width: int = 8) -> None:
        self.block_tables = np.zeros((rows, width), dtype=np.int32)
        self.num_blocks = np.zeros(rows, dtype=np.int64)
        self.lengths = np.zeros(rows, dtype=np.int64)
        self.members = np.zeros(rows, dtype=np.int64)
        self.prompt_keys = np.zeros(rows, dtype=np.int64)
        self.sample_index = np.zeros(rows, dtype=np.int64)
        self.last_token = np.zeros(rows, dtype=np.int64)
        self._free = list(range(rows - 1, -1, -1))  # a stack: row 0 first

    @property
    def capacity(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def add(self, member: int, prompt_key: int, sample_index: int, blocks: list[int], last_token: int) -> int:
        """A row for a newly admitted sequence holding ``blocks``; returns the row index."""
        if not self._free:
            self._grow_rows()
        row = self._free.pop()
        self.members[row] = member
        self.prompt_keys[row] = prompt_key
        self.sample_index[row] = sample_index
        self.last_token[row] = last_token
        self.lengths[row] = 0
        self.num_blocks[row] = 0
        self.set_blocks(row, 0, blocks)
        return row

    def set_blocks(self, row: int, start: int, blocks: list[int]) -> None:
        """Block table entries [start, len(blocks)) of ``row`` from the block manager's list (after an append or
        a copy-on-write replaced the last block)."""
        end = len(blocks)
        if end > self.block_tables.shape[1]:
            self._grow_width(end)
        if end > start:
            self.block_tables[row, start:end] = blocks[start:end]
        self.num_blocks[row] = end

    def fork(self, parent: int, sample_index: int) -> int:
        """A row for a sibling sample: the parent's blocks, length, member and prompt key."""
        if not self._free:
            self._grow_rows()
        row = self._free.pop()
        width = int(self.num_blocks[parent])
        self.block_tables[row, :width] = self.block_tables[parent, :width]
        for array in (self.num_blocks, self.lengths, self.members, self.prompt_keys, self.last_token):
            array[row] = array[parent]
        self.sample_index[row] = sample_index
        return row

    def release(self, row: int) -> None:
        """The sequence finished or was preempted: its row is free for the next admission."""
        self._free.append(row)

    def reset(self) -> None:
        self._free = list(range(self.capacity - 1, -1, -1))

    def _grow_rows(self) -> None:
        old = self.capacity
        for name in ("block_tables", "num_blocks", "lengths", "members", "prompt_keys", "sample_index",
                     "last_token"):
            array = getattr(self, name)
            grown = np.zeros((2 * old, *array.shape[1:]), dtype=array.dtype)
            grown[:old] = array
            setattr(self, name, grown)
        self._free = list(range(2 * old - 1, old - 1, -1)) + self._free

    def _grow_width(self, need: int) -> None:
        width = self.block_tables.shape[1]
        while width < need:
            width *= 2
        grown = np.zeros((self.capacity, width), dtype=np.int32)
        grown[:, : self.block_tables.shape[1]] = self.block_tables
        self.block_tables = grown


__all__ = ["BatchState"]
