"""Continuous batching over every sequence of every member: decode first, then prefill chunks.

Each step: every running sequence gets its decode token (a slot for the token it last
sampled); when blocks run out the most recently admitted running sequence is preempted
(its blocks freed; it is recomputed later, which sampling's counters make invisible in
the output). The rest of the token budget goes to waiting sequences in arrival order,
chunked, admitted only when their chunk's blocks are free. Chunks are ordered by member
so that rows reach the population kernels as contiguous per-member segments.

A sequence whose KV can never fit the whole pool raises ``KVCacheTooSmallError`` as soon as
it is seen: chunked prefill would otherwise admit it chunk by chunk, preempt it when the
pool is full and recompute it forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fastes.engine.block_manager import BlockManager
from fastes.engine.sequence import Sequence, Status


class KVCacheTooSmallError(RuntimeError):
    """A sequence needs more KV blocks than the whole pool holds (raise kv_cache_tokens)."""


@dataclass(frozen=True)
class Chunk:
    seq: Sequence
    start: int
    end: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the last token, so the step samples a new one."""
        return self.end == len(self.seq.tokens)


class Scheduler:
    def __init__(self, manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.manager = manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> list[Chunk]:
        """The chunks of the next forward, block slots already reserved, sorted by member."""
        chunks: list[Chunk] = []
        scheduled: set[int] = set()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):  # decodes and unfinished prefills, oldest first
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            self._check_fits_pool(seq)
            size = min(seq.remaining, budget)
            while not self._fits(seq, size):
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            chunks.append(self._reserve(seq, size))
            scheduled.add(seq.seq_id)
            budget -= size
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self._check_fits_pool(seq)
            size = min(seq.remaining, budget)
            if not self._fits(seq, size):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(self._reserve(seq, size))
            budget -= size
        if not chunks and self.waiting:
            seq = self.waiting[0]
            need = self.manager.blocks_for(min(seq.remaining, self.max_num_batched_tokens))
            raise KVCacheTooSmallError(f"KV cache too small: a chunk of sequence {seq.seq_id} needs {need} blocks "
                                       f"and the pool has {self.manager.num_blocks}; raise kv_cache_tokens")
        chunks.sort(key=lambda c: c.seq.member)
        return chunks

    def _check_fits_pool(self, seq: Sequence) -> None:
        """Raise when ``seq`` needs more blocks than the pool has: waiting would never end."""
        need = self.manager.blocks_for(len(seq.tokens))
        if need > self.manager.num_blocks:
            raise KVCacheTooSmallError(
                f"KV cache too small: sequence {seq.seq_id} (member {seq.member}, prompt {seq.prompt_index}) needs "
                f"{len(seq.tokens)} tokens of KV ({need} blocks) and the pool has {self.manager.num_blocks} blocks of "
                f"{self.manager.block_size}; raise kv_cache_tokens")

    def _fits(self, seq: Sequence, size: int) -> bool:
        if seq.seq_id in self.manager:
            return self.manager.can_append(seq.seq_id, size)
        return self.manager.can_allocate(size)

    def _reserve(self, seq: Sequence, size: int) -> Chunk:
        """Reserve slots for the next ``size`` tokens of ``seq`` (the caller checked they fit)."""
        start = seq.num_computed
        if seq.seq_id in self.manager:
            self.manager.append_slots(seq.seq_id, size)
        else:
            self.manager.allocate(seq.seq_id, seq.member, size)
        return Chunk(seq, start, start + size)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it goes back to the front of the queue to be recomputed."""
        self.running.remove(seq)
        if seq.seq_id in self.manager:
            self.manager.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.manager.free(seq.seq_id)

    def admit_fork(self, parent: Sequence, child: Sequence) -> None:
        """A sibling sample sharing the parent's computed prompt blocks (same member)."""
        self.manager.fork(parent.seq_id, child.seq_id)
        child.num_computed = parent.num_computed
        child.status = Status.RUNNING
        self.running.append(child)
