"""The engine's host path: persistent BatchState rows, vectorized step inputs, member-sorted rows, the runner.

Oracles: the block manager's own tables and the list-based ``build_attention_batch`` (which the
model parity tests check against transformers) for every input a step prepares from the rows.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tiny_model import random_hf_model

from fastes import Engine, Population, SamplingParams
from fastes.engine.attention_batch import build_attention_batch
from fastes.engine.batch_state import BatchState
from fastes.engine.block_manager import BlockManager
from fastes.engine.model_runner import prepare_inputs
from fastes.engine.scheduler import Scheduler
from fastes.engine.sequence import Sequence, Status

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=96, rms_norm_eps=1e-5, bos_token_id=None,
              eos_token_id=None, tie_word_embeddings=False)
PROMPTS = [[5, 17, 20, 3, 9], [42], [7, 7, 13, 44, 2, 25, 11, 9, 31], [10, 1, 33], [8, 8]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("host") / "llama"
    random_hf_model(transformers.LlamaConfig(**CONFIG), 4, path)
    return path


def _sequences(members: int, samples: int, max_tokens: int) -> list[Sequence]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [Sequence(seq_id=m * len(PROMPTS) + j, member=m, prompt_index=j, sample_index=0, prompt_len=len(p),
                     tokens=list(p), params=params, seed=0, fork_into=list(range(1, samples)), prompt_key=j)
            for m in range(members) for j, p in enumerate(PROMPTS)]


def _drive(scheduler: Scheduler, on_step, rng: random.Random) -> int:
    """Run the scheduler to the end with random tokens; ``on_step(plan)`` checks each plan before its tokens."""
    steps = 0
    while not scheduler.done:
        plan = scheduler.schedule()
        on_step(plan)
        scheduler.postprocess(plan, [rng.randrange(64) for _ in plan.samplers])
        steps += 1
    return steps


@pytest.mark.parametrize("blocks,budget", [(200, 64), (12, 7)], ids=["roomy", "preempting"])
def test_rows_mirror_the_block_manager_and_inputs_equal_the_list_builder(blocks, budget):
    """After every schedule, each scheduled row holds its sequence's block table, KV length, member, prompt key and
    sample index; the step inputs built from the rows equal build_attention_batch's from the manager's lists."""
    manager = BlockManager(blocks, 4)
    seen = {"preempted": 0, "forks": 0, "mixed": 0}

    def stop(seq: Sequence, token: int) -> str | None:
        return "length" if seq.num_output >= 6 + seq.sample_index else None

    # a prompt's last chunk writes KV that the samples forked off it this step already share (they need
    # exactly that KV), so the list builder's shared-block guard is lifted for the oracle
    slots = manager.slots
    manager.slots = lambda seq_id, start, end, for_write=True: slots(seq_id, start, end, for_write=False)
    scheduler = Scheduler(manager, 64, budget, BatchState(rows=2, width=1), stop)  # rows and width must grow
    for seq in _sequences(3, 3, 6):
        scheduler.add(seq)
    state = scheduler.state

    def check(plan) -> None:
        seqs = plan.seqs
        assert [s.member for s in seqs] == sorted(s.member for s in seqs)
        seen["forks"] += plan.forks
        seen["mixed"] += not plan.decode_only
        for seq in seqs + plan.samplers:
            assert seq.status is Status.RUNNING
            table = manager.block_table(seq.seq_id)
            assert state.block_tables[seq.row, : len(table)].tolist() == table
            assert int(state.num_blocks[seq.row]) == len(table)
            assert (state.members[seq.row], state.prompt_keys[seq.row], state.sample_index[seq.row]) == (
                seq.member, seq.prompt_key, seq.sample_index)
        for seq in seqs:
            assert state.lengths[seq.row] == seq.num_computed + seq.scheduled == manager.num_tokens(seq.seq_id)
        chunks = [(s.seq_id, s.num_computed, s.num_computed + s.scheduled) for s in seqs]
        want, positions = build_attention_batch(manager, chunks)
        got = prepare_inputs(plan, state, manager.block_size)
        assert got.positions.tolist() == positions.tolist()
        assert got.slot_mapping.tolist() == want.slot_mapping.tolist()
        assert got.cu_seqlens_q.tolist() == want.cu_seqlens_q.tolist()
        assert got.seq_lens.tolist() == want.seq_lens.tolist()
        assert got.max_q_len == want.max_q_len
        valid = want.block_tables >= 0  # past a row's blocks the builder pads with -1, the rows keep stale ids
        assert got.block_tables.shape == tuple(want.block_tables.shape)
        assert (torch.from_numpy(got.block_tables)[valid] == want.block_tables[valid]).all()
        ids = [t for s in seqs for t in s.tokens[s.num_computed : s.num_computed + s.scheduled]]
        assert got.input_ids.tolist() == ids
        assert got.row_member.tolist() == [s.member for s in seqs for _ in range(s.scheduled)]
        sampling = [i for i, s in enumerate(seqs) if s.num_computed + s.scheduled == len(s.tokens)]
        if plan.decode_only:
            assert got.logits_rows is None and len(sampling) == len(seqs)
        else:
            assert got.logits_rows.tolist() == [int(want.cu_seqlens_q[i + 1]) - 1 for i in sampling]
        manager.check()

    _drive(scheduler, check, random.Random(0))
    seen["preempted"] = scheduler.num_preemptions
    assert seen["forks"] and seen["mixed"]
    assert (seen["preempted"] > 0) == (blocks == 12), seen
    assert manager.num_free_blocks == blocks and state.num_used == 0


def test_rows_reach_the_model_sorted_by_member(model_dir):
    """Forks join the running list at its end and preempted sequences come back out of order, so only the
    scheduler's sort keeps every forward's rows in per-member segments (what the population kernels need)."""
    engine = Engine.from_pretrained(model_dir, kv_cache_tokens=96, block_size=4, max_num_batched_tokens=24)
    seen: list[list[int]] = []
    hidden_states = engine.model.hidden_states

    def record(ids, positions, attn, kv, row_member=None, pert=None):
        seen.append(row_member.tolist())
        return hidden_states(ids, positions, attn, kv, row_member, pert)

    engine.model.hidden_states = record
    pop = Population(size=4, sigma=2e-2, seed=3)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=1)
    engine.generate(PROMPTS, params, population=pop, samples_per_prompt=3)
    assert engine.last_stats["preemptions"] > 0, "the small pool should preempt"
    assert len(seen) > 8 and any(len(set(rows)) > 1 for rows in seen)
    for rows in seen:
        assert rows == sorted(rows), rows


def test_a_decode_in_its_last_block_touches_no_row():
    """The decode fast path: a slot inside the sequence's own last block changes only the length."""
    manager = BlockManager(8, 4)
    manager.allocate(0, 0, 3)
    assert manager.append_in_last_block(0) and manager.num_tokens(0) == 4
    assert not manager.append_in_last_block(0) and manager.num_tokens(0) == 4  # the block is full
    assert manager.append_new_block(0) == 1 and manager.block_table(0) == [0, 1] and manager.num_tokens(0) == 5
    assert manager.append_new_block(0) == -1, "the last block has room: no new block"
    full = BlockManager(1, 2)
    full.allocate(0, 0, 2)
    assert full.append_new_block(0) == -1 and full.num_tokens(0) == 2  # no free block: nothing changes
    manager.fork(0, 1)
    assert not manager.append_in_last_block(1), "a shared last block must be copied first"
    assert manager.num_tokens(1) == 5
    manager.check()


def test_batch_state_fork_and_release():
    state = BatchState(rows=1, width=1)
    a = state.add(member=2, prompt_key=77, sample_index=0, blocks=[5, 9, 4], last_token=11)
    state.lengths[a] = 10
    b = state.fork(a, sample_index=3)
    assert b != a and state.capacity >= 2 and state.block_tables.shape[1] >= 3
    assert state.block_tables[b, :3].tolist() == [5, 9, 4]
    assert (state.lengths[b], state.members[b], state.prompt_keys[b], state.sample_index[b],
            state.last_token[b]) == (10, 2, 77, 3, 11)
    state.set_blocks(b, 2, [5, 9, 6, 7])  # copy-on-write of the last block, then one more
    assert state.block_tables[b, :4].tolist() == [5, 9, 6, 7] and state.block_tables[a, :3].tolist() == [5, 9, 4]
    state.release(a)
    assert state.num_used == 1
    assert state.add(0, 0, 0, [1], 0) == a  # the freed row is reused


def test_prepare_inputs_of_a_decode_step_without_python_lists():
    """A decode step's inputs come from the rows alone: last token, length − 1, the slot in the block table."""
    state = BatchState(rows=4, width=4)
    rows = [state.add(m, 0, 0, blocks, tok) for m, blocks, tok in ((0, [3, 1], 40), (1, [2], 41), (1, [0, 6], 42))]
    state.lengths[rows] = [6, 1, 8]
    seqs = [Sequence(seq_id=i, member=m, prompt_index=0, sample_index=0, prompt_len=1, tokens=[0],
                     params=SamplingParams(), seed=0) for i, m in enumerate((0, 1, 1))]
    for seq, row in zip(seqs, rows, strict=True):
        seq.row, seq.scheduled = row, 1
    from fastes.engine.scheduler import StepPlan

    got = prepare_inputs(StepPlan(seqs, decode_only=True, samplers=seqs, logit_rows=[0, 1, 2]), state, 4)
    assert got.input_ids.tolist() == [40, 41, 42]  # not seq.tokens: the rows' last sampled tokens
    assert got.positions.tolist() == [5, 0, 7]
    assert got.slot_mapping.tolist() == [1 * 4 + 1, 2 * 4 + 0, 6 * 4 + 3]
    assert got.row_member.tolist() == [0, 1, 1] and got.seq_lens.tolist() == [6, 1, 8]
    assert got.cu_seqlens_q.tolist() == [0, 1, 2, 3] and got.block_tables.shape == (3, 2)


def test_greedy_generation_unchanged_by_the_row_capacity(model_dir):
    """Rows grow by doubling mid-generate: the tokens must not depend on where a sequence's row lives."""
    pop = Population(size=2, sigma=2e-2, seed=1)
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=2)
    want = Engine.from_pretrained(model_dir, kv_cache_tokens=512, block_size=4).generate(
        PROMPTS, params, population=pop, samples_per_prompt=2)
    engine = Engine.from_pretrained(model_dir, kv_cache_tokens=512, block_size=4)
    engine.batch_state = BatchState(rows=1, width=1)
    got = engine.generate(PROMPTS, params, population=pop, samples_per_prompt=2)
    assert [[[c.token_ids for c in p] for p in m] for m in got] == [[[c.token_ids for c in p] for p in m]
                                                                    for m in want]
    assert engine.batch_state.capacity >= len(PROMPTS) * 2 * 2
    assert np.all(engine.batch_state.block_tables >= 0)


def test_engine_config_and_the_cpu_token_budget(model_dir):
    from fastes.engine.config import CPU_ACTIVATION_BYTES, EngineConfig, cpu_token_budget

    for width in (1, 128 * 4, 384 * 4, 2048 * 4, 4864 * 4, 8960 * 4, 10**9):
        fits = [t for t in (8192, 16384, 32768, 65536) if t * width <= CPU_ACTIVATION_BYTES]
        assert cpu_token_budget(width) == max(fits, default=8192), width
    assert cpu_token_budget(0) == 8192
    engine = Engine.from_pretrained(model_dir, config=EngineConfig(kv_cache_tokens=64, block_size=8, max_num_seqs=3))
    assert (engine.block_size, engine.max_num_seqs, engine.manager.num_blocks) == (8, 3, 8)
    assert engine.max_num_batched_tokens == cpu_token_budget(CONFIG["intermediate_size"] * 4)
    assert Engine.from_pretrained(model_dir, max_num_batched_tokens=77).max_num_batched_tokens == 77
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
