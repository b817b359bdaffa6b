"""BlockManager: which physical KV blocks each sequence owns, with reference counts and copy-on-write.

A sequence is (member, prompt, sample) and is known here by an integer id and its
member. KV depends on the member's weights, so blocks are shared only within one
member: ``fork`` gives the k samples of one prompt the prompt's blocks, and the
first write of a sample into a shared, partially filled block copies it first
(copy-on-write). Copies are queued as (src, dst) block pairs that the runner applies
to every layer (``KVCache.copy_blocks(manager.take_copies())``) before the next
forward writes.

Every operation either succeeds or raises without changing any state, so the
scheduler can catch ``OutOfBlocksError``, preempt a sequence and retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class OutOfBlocksError(RuntimeError):
    """Not enough free KV blocks for the request; nothing was allocated (preempt and retry)."""


@dataclass
class _Seq:
    member: int
    num_tokens: int = 0
    blocks: list[int] = field(default_factory=list)


class BlockManager:
    """Allocator of ``num_blocks`` blocks of ``block_size`` token slots."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pops 0, 1, 2, ... first
        self._refs = [0] * num_blocks
        self._owner = [-2] * num_blocks  # member whose KV a block holds (-2: free)
        self._seqs: dict[int, _Seq] = {}
        self._copies: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int, num_seqs: int = 1) -> bool:
        """Whether ``num_seqs`` new sequences of ``num_tokens`` tokens each fit now."""
        return self.blocks_for(num_tokens) * num_seqs <= len(self._free)

    def blocks_to_append(self, seq_id: int, n: int = 1) -> int:
        """Free blocks that appending ``n`` tokens to ``seq_id`` would take (incl. a copy-on-write)."""
        seq = self._get(seq_id)
        return self._cow_needed(seq) * (n > 0) + self.blocks_for(seq.num_tokens + n) - len(seq.blocks)

    def can_append(self, seq_id: int, n: int = 1) -> bool:
        return self.blocks_to_append(seq_id, n) <= len(self._free)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def num_tokens(self, seq_id: int) -> int:
        return self._get(seq_id).num_tokens

    def member(self, seq_id: int) -> int:
        return self._get(seq_id).member

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id).blocks)

    def blocks_view(self, seq_id: int) -> list[int]:
        """The sequence's live block list (read only; ``block_table`` returns a copy)."""
        return self._get(seq_id).blocks

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def slots(self, seq_id: int, start: int, end: int, for_write: bool = True) -> list[int]:
        """Slot ids (block·block_size + offset) of positions [start, end) of a sequence.

        ``for_write`` refuses shared blocks: writing there would change a sibling's KV
        (append with ``append_slots``, which copies on write, instead).
        """
        seq = self._get(seq_id)
        if not 0 <= start <= end <= seq.num_tokens:
            raise ValueError(f"positions [{start}, {end}) outside sequence {seq_id} of {seq.num_tokens} tokens")
        bs = self.block_size
        out = [seq.blocks[p // bs] * bs + p % bs for p in range(start, end)]
        if for_write and start < end and any(self._refs[b] > 1 for b in seq.blocks[start // bs : (end - 1) // bs + 1]):
            raise ValueError(f"positions [{start}, {end}) of sequence {seq_id} lie in a shared block")
        return out

    # ------------------------------------------------------------------ mutations

    def allocate(self, seq_id: int, member: int, num_tokens: int) -> list[int]:
        """Register a sequence of ``member`` (−1: unperturbed) holding ``num_tokens`` prompt slots."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already allocated")
        if member < -1:
            raise ValueError(f"member must be >= -1, got {member}")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = self.blocks_for(num_tokens)
        self._require(need, f"allocate {num_tokens} tokens for sequence {seq_id}")
        seq = _Seq(member, num_tokens, [self._take(member) for _ in range(need)])
        self._seqs[seq_id] = seq
        return list(seq.blocks)

    def append_slots(self, seq_id: int, n: int = 1) -> list[int]:
        """Extend a sequence by ``n`` token slots and return them (copy-on-write of a shared last block)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        seq = self._get(seq_id)
        if n == 0:
            return []
        self._require(self.blocks_to_append(seq_id, n), f"append {n} token(s) to sequence {seq_id}")
        if self._cow_needed(seq):
            src = seq.blocks[-1]
            dst = self._take(seq.member)
            self._refs[src] -= 1
            seq.blocks[-1] = dst
            self._copies.append((src, dst))
        start = seq.num_tokens
        seq.num_tokens += n
        while len(seq.blocks) < self.blocks_for(seq.num_tokens):
            seq.blocks.append(self._take(seq.member))
        return self.slots(seq_id, start, seq.num_tokens)

    def append_in_last_block(self, seq_id: int) -> bool:
        """Extend by one slot if it lies in the sequence's own (unshared) last block, else change nothing.

        The decode fast path: no block to take, no copy, nothing for the caller to mirror.
        """
        seq = self._seqs[seq_id]
        n = seq.num_tokens
        if n % self.block_size == 0 or self._refs[seq.blocks[-1]] > 1:
            return False
        seq.num_tokens = n + 1
        return True

    def append_new_block(self, seq_id: int) -> int:
        """Extend by one slot that starts a fresh block, if the last block is full and a block is free: returns
        the new block, or −1 with nothing changed (the decode fast path at a block boundary)."""
        seq = self._seqs[seq_id]
        if seq.num_tokens % self.block_size or not self._free:
            return -1
        block = self._take(seq.member)
        seq.blocks.append(block)
        seq.num_tokens += 1
        return block

    def append_slot(self, seq_id: int) -> int:
        """One more slot for a decoded token."""
        return self.append_slots(seq_id, 1)[0]

    def fork(self, parent_id: int, child_id: int, member: int | None = None) -> None:
        """``child_id`` shares all of ``parent_id``'s blocks (another sample of the same prompt and member)."""
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} is already allocated")
        if member is not None and member != parent.member:
            raise ValueError(f"cannot fork sequence {parent_id} of member {parent.member} into member {member}: "
                             "KV is never shared across members")
        for block in parent.blocks:
            self._refs[block] += 1
        self._seqs[child_id] = _Seq(parent.member, parent.num_tokens, list(parent.blocks))

    def free(self, seq_id: int) -> None:
        """Drop a sequence (finished or preempted); blocks return to the pool when no one else holds them."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise ValueError(f"unknown sequence {seq_id}")
        for block in reversed(seq.blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._owner[block] = -2
                self._free.append(block)

    def take_copies(self) -> list[tuple[int, int]]:
        """Pending copy-on-write (src, dst) block pairs; the caller must apply them before the next write."""
        copies, self._copies = self._copies, []
        return copies

    def reset(self) -> None:
        """Free everything (e.g. between ES steps, when all members' weights change)."""
        self.__init__(self.num_blocks, self.block_size)  # type: ignore[misc]

    def check(self) -> None:
        """Assert the internal invariants (tests and debugging)."""
        counts = [0] * self.num_blocks
        for seq in self._seqs.values():
            assert len(seq.blocks) == self.blocks_for(seq.num_tokens)
            for block in seq.blocks:
                counts[block] += 1
                assert self._owner[block] == seq.member, "a block is shared across members"
        assert counts == self._refs, "reference counts disagree with the block tables"
        free = set(self._free)
        assert len(free) == len(self._free), "a block is free twice"
        assert free == {b for b in range(self.num_blocks) if counts[b] == 0}

    # ------------------------------------------------------------------ internals

    def _get(self, seq_id: int) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id}") from None

    def _cow_needed(self, seq: _Seq) -> bool:
        return bool(seq.num_tokens % self.block_size and self._refs[seq.blocks[-1]] > 1)

    def _require(self, need: int, what: str) -> None:
        if need > len(self._free):
            raise OutOfBlocksError(f"out of KV blocks: {what} needs {need}, {len(self._free)} of "
                                   f"{self.num_blocks} free")

    def _take(self, member: int) -> int:
        block = self._free.pop()
        self._refs[block] = 1
        self._owner[block] = member
        return block


__all__ = ["BlockManager", "OutOfBlocksError"]
