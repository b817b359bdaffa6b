"""ModelRunner: a step's plan in, sampled tokens out (prepare inputs, forward or graph replay, sample).

Every input of the forward comes from the scheduler's BatchState rows with a few vectorized
numpy ops over the step's row list (docs/design.md, "The host path"): positions and slot
mapping from the rows' KV lengths and block tables, row-member tags from the rows' members,
the attention batch's block tables as one gather. Only a step with prefill chunks reads
token ids from the sequences' Python lists (its new tokens; a decode reads the rows' last
sampled token). On CPU the arrays become tensors without a copy; a decode step that a CUDA
graph replays goes to the device in one pinned non-blocking copy (fastes.engine.cuda_graphs).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fastes.engine.batch_state import BatchState
from fastes.engine.cuda_graphs import DecodeGraphs, GraphCaptureError
from fastes.engine.kv_cache import KVCache
from fastes.engine.logprobs import append_logprobs
from fastes.engine.penalties import LogitsProcessor
from fastes.engine.sampling import SamplingParams, sample
from fastes.engine.scheduler import StepPlan
from fastes.models import CausalLM, Perturbation
from fastes.models.batch import AttentionBatch


@dataclass
class StepInputs:
    """Host arrays of one forward: T token rows of S sequences (``logits_rows`` None: every row samples)."""

    input_ids: np.ndarray
    positions: np.ndarray
    row_member: np.ndarray
    slot_mapping: np.ndarray
    cu_seqlens_q: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    max_q_len: int
    logits_rows: np.ndarray | None


def prepare_inputs(plan: StepPlan, state: BatchState, block_size: int) -> StepInputs:
    """The forward's inputs for ``plan`` from the rows of ``state`` (lengths already include this step)."""
    seqs = plan.seqs
    num_seqs = len(seqs)
    rows = np.fromiter((s.row for s in seqs), dtype=np.int64, count=num_seqs)
    lengths = state.lengths[rows]
    if plan.decode_only:  # one token per sequence, every one sampling
        positions = lengths - 1
        token_rows = rows
        input_ids = state.last_token[rows]
        cu = np.arange(num_seqs + 1, dtype=np.int32)
        max_q_len, logits_rows = 1, None
    else:
        q_lens = np.fromiter((s.scheduled for s in seqs), dtype=np.int64, count=num_seqs)
        cu64 = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu64[1:])
        total = int(cu64[-1])
        # token i of sequence s sits at position start_s + (i − cu_s), start_s = length_s − q_s
        positions = np.arange(total, dtype=np.int64) - np.repeat(cu64[:-1] - (lengths - q_lens), q_lens)
        token_rows = np.repeat(rows, q_lens)
        input_ids = np.fromiter(itertools.chain.from_iterable(
            s.tokens[s.num_computed : s.num_computed + s.scheduled] for s in seqs), dtype=np.int64, count=total)
        cu = cu64.astype(np.int32)
        max_q_len = int(q_lens.max())
        samples = np.fromiter((s.num_computed + s.scheduled == len(s.tokens) for s in seqs), dtype=bool,
                              count=num_seqs)
        logits_rows = cu64[1:][samples] - 1
    blocks = state.block_tables[token_rows, positions // block_size].astype(np.int64)
    slot_mapping = blocks * block_size + positions % block_size
    width = -(-int(lengths.max()) // block_size)
    return StepInputs(input_ids=input_ids, positions=positions, row_member=state.members[token_rows].astype(np.int32),
                      slot_mapping=slot_mapping, cu_seqlens_q=cu, seq_lens=lengths.astype(np.int32),
                      block_tables=state.block_tables[rows, :width], max_q_len=max_q_len, logits_rows=logits_rows)


class ModelRunner:
    """Runs a model over planned steps in a paged KV cache, with optional decode CUDA graphs."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.graphs = graphs
        self.device = model.device
        self.block_size = kv_cache.block_size

    def run(self, plan: StepPlan, state: BatchState, pert: Perturbation | None, params: SamplingParams,
            seed: int, processor: LogitsProcessor | None = None) -> list[int]:
        """Forward the plan's rows and sample one token per ``plan.samplers`` entry (``processor``: penalties
        and min_tokens, fastes.engine.penalties; logprobs are of the raw logits, fastes.engine.logprobs)."""
        self.kv_cache.copy_blocks(plan.copies)
        logits = self.forward(plan, state, pert)
        if not plan.samplers:
            return []
        if plan.forks:
            logits = logits.index_select(0, torch.tensor(plan.logit_rows, dtype=torch.long, device=logits.device))
        raw = logits
        if processor is not None:
            logits = processor(logits, plan.samplers)
        tokens = self.sample(logits, plan, state, params, seed)
        if params.logprobs is not None:
            append_logprobs(plan.samplers, raw, tokens, params.logprobs)
        return tokens.tolist()

    def forward(self, plan: StepPlan, state: BatchState, pert: Perturbation | None) -> torch.Tensor:
        """fp32 logits, one row per sequence of ``plan.seqs`` that samples, in that order."""
        inputs = prepare_inputs(plan, state, self.block_size)
        graphs = self.graphs
        if (graphs is not None and plan.decode_only
                and graphs.fits(len(plan.seqs), inputs.block_tables.shape[1])):
            try:
                return self._forward_graph(inputs, pert)
            except GraphCaptureError as err:
                warnings.warn(f"{err}; decoding without CUDA graphs from now on", RuntimeWarning, stacklevel=3)
                self.graphs = None
        dev = self.device

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(dev, non_blocking=True)

        attn = AttentionBatch(cu_seqlens_q=tensor(inputs.cu_seqlens_q), seq_lens=tensor(inputs.seq_lens),
                              block_tables=tensor(inputs.block_tables), slot_mapping=tensor(inputs.slot_mapping),
                              max_q_len=inputs.max_q_len, max_seq_len=int(inputs.seq_lens.max()))
        row_member = tensor(inputs.row_member) if pert is not None else None
        logits_rows = tensor(inputs.logits_rows) if inputs.logits_rows is not None else None
        return self.model.forward(tensor(inputs.input_ids), tensor(inputs.positions), attn, self.kv_cache,
                                  row_member, pert, logits_rows)

    def _forward_graph(self, inputs: StepInputs, pert: Perturbation | None) -> torch.Tensor:
        """A decode step replayed from a CUDA graph; the final norm and LM head run eagerly on the real rows."""
        graphs = self.graphs
        assert graphs is not None
        hidden = graphs.run(inputs.input_ids, inputs.positions, inputs.row_member, inputs.slot_mapping,
                            inputs.seq_lens, inputs.block_tables)
        row_member = graphs.row_member[: hidden.shape[0]] if pert is not None else None
        return self.model.logits(hidden, row_member, pert)

    def sample(self, logits: torch.Tensor, plan: StepPlan, state: BatchState, params: SamplingParams,
               seed: int) -> torch.Tensor:
        """Tokens of ``plan.samplers``; each row's counter (position, member, prompt key, sample) from its row."""
        if params.greedy:  # no counters to gather
            return logits.argmax(dim=-1)
        n = len(plan.samplers)
        rows = np.fromiter((s.row for s in plan.samplers), dtype=np.int64, count=n)
        dev = logits.device
        coords = [torch.from_numpy(array[rows]).to(dev) for array in
                  (state.lengths, state.members, state.prompt_keys, state.sample_index)]
        return sample(logits, params, seed, *coords)


__all__ = ["ModelRunner", "StepInputs", "prepare_inputs"]
