"""Continuous batching over every sequence of every member: decode first, then prefill chunks.

``schedule`` plans a step: every running sequence gets its decode token (a slot for the
token it last sampled); when blocks run out the most recently admitted running sequence is
preempted (its blocks freed; it is recomputed later, which sampling's counters make
invisible in the output). The rest of the token budget goes to waiting sequences in arrival
order, chunked, admitted only when their chunk's blocks are free. A prompt that finishes
this step forks its sibling samples, which share its blocks and its logits row. Rows are
sorted by member so that they reach the population kernels as contiguous per-member
segments (docs/design.md, "The host path").

``postprocess`` books the step's sampled tokens: it advances what is computed, appends each
token, asks the stop checker and finishes sequences.

The scheduler owns the BatchState rows: it writes a row when a sequence is admitted, gets a
block, forks, finishes or is preempted. A decode whose slot lies in the sequence's own last
block (15 steps in 16 with blocks of 16) touches neither the block manager's lists nor the row;
one that starts a new block while blocks are free writes one table entry. Everything else
(prefill chunks, copy-on-write, a full pool) takes the general path with its checks.

A sequence whose KV can never fit the whole pool raises ``KVCacheTooSmallError`` as soon as
it is seen: chunked prefill would otherwise admit it chunk by chunk, preempt it when the
pool is full and recompute it forever.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fastes.engine.batch_state import BatchState
from fastes.engine.block_manager import BlockManager
from fastes.engine.sequence import Sequence, Status

_member = operator.attrgetter("member")


class KVCacheTooSmallError(RuntimeError):
    """A sequence needs more KV blocks than the whole pool holds (raise kv_cache_tokens)."""


@dataclass
class StepPlan:
    """One step: ``seqs`` (sorted by member) each feed ``seq.scheduled`` tokens from ``seq.num_computed``.

    ``samplers`` sample a token this step; ``logit_rows[i]`` is the forward's output row sampler i reads (the
    rows of the sampling seqs in ``seqs`` order; forked siblings share their parent's row).
    """

    seqs: list[Sequence]
    decode_only: bool
    samplers: list[Sequence] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)
    num_tokens: int = 0
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block pairs to apply first

    @property
    def forks(self) -> bool:
        """Whether some sampler reads another's logits row (the forward's rows are not the samplers')."""
        return len(self.samplers) != len(set(self.logit_rows))


class Scheduler:
    def __init__(self, manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 state: BatchState | None = None,
                 stop_reason: Callable[[Sequence, int], str | None] | None = None) -> None:
        """``stop_reason(seq, token)`` -> "stop" | "length" | None after ``token`` was appended."""
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.manager = manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.state = state if state is not None else BatchState()
        self.stop_reason = stop_reason
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_steps = 0
        self._next_id = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)
        self._next_id = max(self._next_id, seq.seq_id + 1)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    # ------------------------------------------------------------------ planning a step

    def schedule(self) -> StepPlan:
        """The next step's plan, block slots already reserved and rows updated."""
        step = self.num_steps = self.num_steps + 1
        manager, state = self.manager, self.state
        seqs: list[Sequence] = []
        decode_rows: list[int] = []  # rows whose KV length grows by the one token they decode
        decode_only = True
        budget = self.max_num_batched_tokens
        for seq in list(self.running):  # decodes and unfinished prefills, oldest first
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            size = len(seq.tokens) - seq.num_computed
            if size != 1 or not (manager.append_in_last_block(seq.seq_id) or self._append_block(seq)):
                size = self._schedule_running(seq, min(size, budget), step)
                if not size:
                    continue
            seq.scheduled, seq.last_step = size, step
            seqs.append(seq)
            budget -= size
            if size == 1 and seq.num_computed + 1 == len(seq.tokens):
                decode_rows.append(seq.row)
            else:
                decode_only = False
                state.lengths[seq.row] = seq.num_computed + size
        if decode_rows:
            state.lengths[np.asarray(decode_rows, dtype=np.int64)] += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self._check_fits_pool(seq)
            size = min(len(seq.tokens) - seq.num_computed, budget)
            if not manager.can_allocate(size):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            manager.allocate(seq.seq_id, seq.member, size)
            seq.row = state.add(seq.member, seq.prompt_key, seq.sample_index, manager.blocks_view(seq.seq_id),
                                seq.tokens[-1])
            state.lengths[seq.row] = size
            seq.scheduled, seq.last_step = size, step
            seqs.append(seq)
            budget -= size
            decode_only = False
        if not seqs and self.waiting:
            seq = self.waiting[0]
            need = manager.blocks_for(min(seq.remaining, self.max_num_batched_tokens))
            raise KVCacheTooSmallError(f"KV cache too small: a chunk of sequence {seq.seq_id} needs {need} blocks "
                                       f"and the pool has {manager.num_blocks}; raise kv_cache_tokens")
        seqs.sort(key=_member)  # stable: per-member segments, in admission order within a member
        return self._plan(seqs, decode_only, budget)

    def _append_block(self, seq: Sequence) -> bool:
        """A decode that starts a new block while one is free: the block goes straight into the row."""
        block = self.manager.append_new_block(seq.seq_id)
        if block < 0:
            return False
        state, row = self.state, seq.row
        col = int(state.num_blocks[row])
        if col >= state.block_tables.shape[1]:
            state.set_blocks(row, col, self.manager.blocks_view(seq.seq_id))
        else:
            state.block_tables[row, col] = block
            state.num_blocks[row] = col + 1
        return True

    def _schedule_running(self, seq: Sequence, size: int, step: int) -> int:
        """The slow path of a running sequence (a new block, a copy-on-write or a prefill chunk): reserve ``size``
        slots, preempting the most recently admitted unscheduled sequences while they do not fit; 0 if ``seq``
        itself was preempted."""
        manager = self.manager
        self._check_fits_pool(seq)
        while not manager.can_append(seq.seq_id, size):
            victim = next(s for s in reversed(self.running) if s.last_step != step)
            self._preempt(victim)
            if victim is seq:
                return 0
        blocks = manager.blocks_view(seq.seq_id)
        before = len(blocks)
        last = blocks[-1] if blocks else -1
        manager.append_slots(seq.seq_id, size)
        blocks = manager.blocks_view(seq.seq_id)
        copied = before > 0 and blocks[before - 1] != last  # copy-on-write replaced the shared last block
        self.state.set_blocks(seq.row, before - 1 if copied else before, blocks)
        return size

    def _plan(self, seqs: list[Sequence], decode_only: bool, budget: int) -> StepPlan:
        """Fork the prompts that finish this step and list who samples from which logits row."""
        plan = StepPlan(seqs, decode_only, num_tokens=self.max_num_batched_tokens - budget,
                        copies=self.manager.take_copies())
        samplers, rows = plan.samplers, plan.logit_rows
        row = 0
        for seq in seqs:
            if seq.num_computed + seq.scheduled != len(seq.tokens):
                continue  # a prefill chunk short of the last token: nothing to sample yet
            samplers.append(seq)
            rows.append(row)
            for sample_index in seq.fork_into:  # prompt done: siblings split off, sharing its blocks
                samplers.append(self._fork(seq, sample_index))
                rows.append(row)
            seq.fork_into = []
            row += 1
        if decode_only and len(samplers) != len(seqs):
            plan.decode_only = False  # defensive: a decode step samples every row
        return plan

    def _fork(self, parent: Sequence, sample_index: int) -> Sequence:
        child = Sequence(seq_id=self._next_id, member=parent.member, prompt_index=parent.prompt_index,
                         sample_index=sample_index, prompt_len=parent.prompt_len, tokens=list(parent.tokens),
                         params=parent.params, seed=parent.seed, prompt_key=parent.prompt_key)
        self._next_id += 1
        self.manager.fork(parent.seq_id, child.seq_id)
        child.num_computed = parent.num_computed + parent.scheduled
        child.status = Status.RUNNING
        child.row = self.state.fork(parent.row, sample_index)
        child.last_step = parent.last_step
        self.running.append(child)
        return child

    # ------------------------------------------------------------------ after the step

    def postprocess(self, plan: StepPlan, tokens: list[int]) -> list[Sequence]:
        """Book the sampled ``tokens`` (one per ``plan.samplers``); returns the sequences that finished."""
        for seq in plan.seqs:
            seq.num_computed += seq.scheduled
        state, stop_reason = self.state, self.stop_reason
        finished: list[Sequence] = []
        for seq, token in zip(plan.samplers, tokens, strict=True):
            seq.tokens.append(token)
            state.last_token[seq.row] = token
            reason = stop_reason(seq, token) if stop_reason is not None else None
            if reason is not None:
                seq.status = Status.FINISHED
                seq.finish_reason = reason
                self.manager.free(seq.seq_id)
                state.release(seq.row)
                finished.append(seq)
        if finished:
            self.running = [s for s in self.running if s.status is Status.RUNNING]
        return finished

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.manager.free(seq.seq_id)
        self.state.release(seq.row)

    # ------------------------------------------------------------------ internals

    def _check_fits_pool(self, seq: Sequence) -> None:
        """Raise when ``seq`` needs more blocks than the pool has: waiting would never end."""
        need = self.manager.blocks_for(len(seq.tokens))
        if need > self.manager.num_blocks:
            raise KVCacheTooSmallError(
                f"KV cache too small: sequence {seq.seq_id} (member {seq.member}, prompt {seq.prompt_index}) needs "
                f"{len(seq.tokens)} tokens of KV ({need} blocks) and the pool has {self.manager.num_blocks} blocks of "
                f"{self.manager.block_size}; raise kv_cache_tokens")

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and row; it goes back to the front of the queue to be recomputed."""
        self.running.remove(seq)
        if seq.seq_id in self.manager:
            self.manager.free(seq.seq_id)
        self.state.release(seq.row)
        seq.row = -1
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1


__all__ = ["KVCacheTooSmallError", "Scheduler", "StepPlan"]
