"""BlockManager accounting, forks with copy-on-write, out-of-blocks behaviour, and the batch tensors."""

from __future__ import annotations

import pytest
import torch

from fastes.engine.attention_batch import build_attention_batch
from fastes.engine.block_manager import BlockManager, OutOfBlocksError
from fastes.engine.kv_cache import KVCache
from fastes.ops.attention import gather_kv_ref, write_kv


def test_allocate_append_free_accounting():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.num_free_blocks == 8 and bm.can_allocate(32) and not bm.can_allocate(33)
    assert bm.allocate(0, member=0, num_tokens=5) == [0, 1]
    assert bm.num_free_blocks == 6 and bm.num_tokens(0) == 5
    assert bm.slots(0, 0, 5) == [0, 1, 2, 3, 4]
    assert bm.append_slot(0) == 5  # fills block 1
    assert bm.append_slots(0, 3) == [6, 7, 8]  # crosses into a new block
    assert bm.block_table(0) == [0, 1, 2] and bm.num_free_blocks == 5
    bm.allocate(1, member=1, num_tokens=0)
    assert bm.block_table(1) == [] and bm.append_slot(1) == 12  # first token takes block 3
    bm.check()
    bm.free(0)
    assert bm.num_free_blocks == 7 and 0 not in bm
    bm.free(1)
    assert bm.num_free_blocks == 8
    bm.check()
    with pytest.raises(ValueError, match="unknown sequence"):
        bm.free(1)
    bm.allocate(2, 0, 1)
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate(2, 0, 1)


def test_refcounts_and_fork_sharing():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.allocate(0, member=3, num_tokens=6)  # blocks 0 (full) and 1 (half)
    bm.fork(0, 1)
    bm.fork(0, 2)
    assert bm.block_table(1) == bm.block_table(0) == [0, 1]
    assert bm.ref_count(0) == bm.ref_count(1) == 3 and bm.member(2) == 3
    assert bm.num_free_blocks == 8
    bm.check()
    # the first sample to append into the shared half-full block copies it
    assert bm.blocks_to_append(1) == 1
    slot = bm.append_slot(1)
    table1 = bm.block_table(1)
    assert table1[0] == 0 and table1[1] not in (0, 1) and slot == table1[1] * 4 + 2
    assert bm.take_copies() == [(1, table1[1])] and bm.take_copies() == []
    assert bm.ref_count(1) == 2 and bm.ref_count(0) == 3
    bm.append_slot(2)
    assert bm.take_copies() == [(1, bm.block_table(2)[1])]
    # the last holder writes in place: no copy
    assert bm.append_slot(0) == 1 * 4 + 2 and bm.take_copies() == []
    bm.check()
    bm.free(0)
    assert bm.ref_count(0) == 2 and bm.num_free_blocks == 10 - 3
    bm.free(1)
    bm.free(2)
    assert bm.num_free_blocks == 10
    bm.check()


def test_fork_of_full_last_block_needs_no_copy():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(0, 0, 4)
    bm.fork(0, 1)
    assert bm.blocks_to_append(1) == 1
    bm.append_slot(1)
    assert bm.take_copies() == [] and bm.block_table(1)[0] == 0 and bm.ref_count(0) == 2
    bm.check()


def test_no_sharing_across_members():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, member=0, num_tokens=5)
    bm.allocate(1, member=1, num_tokens=5)  # same prompt, another member: its own blocks
    assert not set(bm.block_table(0)) & set(bm.block_table(1))
    with pytest.raises(ValueError, match="never shared across members"):
        bm.fork(0, 2, member=1)
    assert 2 not in bm
    bm.fork(0, 2, member=0)
    bm.check()


def test_out_of_blocks_raises_without_side_effects():
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.allocate(0, 0, 3)  # 2 blocks
    with pytest.raises(OutOfBlocksError, match="out of KV blocks"):
        bm.allocate(1, 0, 3)
    assert 1 not in bm and bm.num_free_blocks == 1
    bm.fork(0, 2)
    bm.fork(0, 3)
    bm.append_slot(0)  # copy-on-write takes the last free block
    assert bm.num_free_blocks == 0 and not bm.can_append(2) and not bm.can_allocate(1)
    before = (bm.block_table(2), bm.num_tokens(2))
    with pytest.raises(OutOfBlocksError):
        bm.append_slot(2)  # shared half-full block needs a copy, none left
    assert (bm.block_table(2), bm.num_tokens(2)) == before
    bm.check()
    bm.free(0)  # preempt: the scheduler frees and retries
    assert bm.can_append(2)
    bm.append_slot(2)
    bm.check()


def test_writes_into_shared_blocks_are_refused():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate(0, 0, 3)
    bm.fork(0, 1)
    with pytest.raises(ValueError, match="shared block"):
        bm.slots(1, 0, 3)
    assert bm.slots(1, 0, 3, for_write=False) == [0, 1, 2]


def test_copy_on_write_keeps_sibling_kv():
    """Writing the forked sample's first token must not change what the sibling reads."""
    bs, heads, dim = 4, 2, 3
    bm = BlockManager(num_blocks=8, block_size=bs)
    cache = KVCache(num_layers=2, num_blocks=8, block_size=bs, num_kv_heads=heads, head_dim=dim)
    prompt_k = torch.randn(6, heads, dim)
    prompt_v = torch.randn(6, heads, dim)
    bm.allocate(0, 0, 6)
    for k, v in cache:
        write_kv(prompt_k, prompt_v, k, v, torch.tensor(bm.slots(0, 0, 6)))
    bm.fork(0, 1)
    new = {s: (torch.randn(1, heads, dim), torch.randn(1, heads, dim)) for s in (0, 1)}
    slots = {s: bm.append_slot(s) for s in (1, 0)}
    cache.copy_blocks(bm.take_copies())
    for s in (0, 1):
        for k, v in cache:
            write_kv(*new[s], k, v, torch.tensor([slots[s]]))
    for s in (0, 1):
        table = torch.tensor(bm.block_table(s))
        for k, v in cache:
            torch.testing.assert_close(gather_kv_ref(k, table, 7), torch.cat([prompt_k, new[s][0]]))
            torch.testing.assert_close(gather_kv_ref(v, table, 7), torch.cat([prompt_v, new[s][1]]))


def test_attention_batch_tensors():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(7, 0, 6)
    bm.allocate(9, 1, 2)
    bm.append_slot(9)
    attn, positions = build_attention_batch(bm, [(7, 2, 6), (9, 2, 3)])
    assert attn.cu_seqlens_q.tolist() == [0, 4, 5] and attn.cu_seqlens_q.dtype == torch.int32
    assert attn.seq_lens.tolist() == [6, 3]
    assert attn.block_tables.tolist() == [[0, 1], [2, -1]] and attn.block_tables.dtype == torch.int32
    assert attn.slot_mapping.tolist() == [2, 3, 4, 5, 10]
    assert positions.tolist() == [2, 3, 4, 5, 2]
    assert attn.max_q_len == 4 and attn.max_seq_len == 6 and attn.num_tokens == 5 and attn.num_seqs == 2
    with pytest.raises(ValueError, match="outside sequence"):
        build_attention_batch(bm, [(9, 0, 5)])


def test_kv_cache_sizing():
    from fastes.engine.kv_cache import blocks_for_bytes, kv_bytes_per_token
    from fastes.models.config import ModelConfig

    cfg = ModelConfig(model_type="llama", vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 2 * 3 * 2 * 16 * 2
    assert blocks_for_bytes(cfg, 10 * 16 * 384, 16, torch.bfloat16) == 10
    cache = KVCache.for_tokens(cfg, 33, block_size=16)
    assert len(cache) == 3 and cache.num_blocks == 3 and cache[0][0].shape == (3, 16, 2, 16)
    assert cache.nbytes == 2 * 3 * 3 * 16 * 2 * 16 * 4
