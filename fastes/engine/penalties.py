"""Logit processing before sampling: vLLM's repetition / presence / frequency penalties and min_tokens.

Semantics are vLLM's (docs/design.md, "The engine"): the repetition penalty r touches every
token that occurs in the prompt or the output so far, dividing a positive logit by r and
multiplying a negative one by r; the frequency penalty subtracts f·count and the presence
penalty p·[count > 0], counting the output only. While a sequence has fewer than
``min_tokens`` output tokens its stop ids (EOS unless ignore_eos, and stop_token_ids) get
−inf, so it cannot stop. Everything here depends only on a row's own tokens, so sampling
stays independent of batch composition, chunking and preemption.

Cost: nothing when no penalty and no min_tokens is set (``LogitsProcessor.for_params`` gives
None and the runner never calls it). With penalties, the rows' tokens live on the device
(``TokenHistory``: a decode step uploads one token per row), and each step sorts every row's
ids and rewrites only the (row, token) pairs that occur: O(rows · length · log length) work
and one copy of the logits, with no [rows, vocab] count tensor.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from fastes.engine.sampling import SamplingParams
from fastes.engine.sequence import Sequence


def needs_penalties(params: SamplingParams) -> bool:
    """Whether any penalty changes the logits (only then are token counts built)."""
    return params.repetition_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0


class TokenHistory:
    """The running sequences' tokens (prompt + output) on the logits' device, one row per BatchState row,
    written incrementally.

    A decode step writes one token per sampling row (the host reads only ``tokens[-1]``); a sequence
    that newly holds its row (admitted, forked, or back from preemption) writes all its tokens once.
    Counts and masks are then built on the device from the rows' histories, so a step's host work does
    not grow with the output length, and memory is bounded by the running rows, not by all sequences.
    """

    def __init__(self, device: torch.device, rows: int = 64, width: int = 256) -> None:
        self.tokens = torch.zeros((rows, width), dtype=torch.int32, device=device)
        self.written = np.zeros(rows, dtype=np.int64)
        self.owner = np.full(rows, -1, dtype=np.int64)  # seq_id whose tokens a row holds

    def update(self, seqs: Seq[Sequence]) -> None:
        """Write the tokens of ``seqs`` not written yet."""
        need_rows = max(s.row for s in seqs) + 1
        need_width = max(len(s.tokens) for s in seqs)
        if need_rows > self.tokens.shape[0] or need_width > self.tokens.shape[1]:
            self._grow(need_rows, need_width)
        written, owner = self.written, self.owner
        rows: list[int] = []
        cols: list[int] = []
        values: list[int] = []
        for seq in seqs:
            sid, tokens = seq.row, seq.tokens
            if owner[sid] != seq.seq_id:  # a new holder of this row: write all its tokens
                owner[sid], written[sid] = seq.seq_id, 0
            start = int(written[sid])
            if start + 1 == len(tokens):  # the usual decode step: only the last sampled token is new
                rows.append(sid)
                cols.append(start)
                values.append(tokens[-1])
            elif start < len(tokens):
                rows.extend([sid] * (len(tokens) - start))
                cols.extend(range(start, len(tokens)))
                values.extend(tokens[start:])
            written[sid] = len(tokens)
        if rows:
            index = torch.from_numpy(np.array([rows, cols], dtype=np.int64)).to(self.tokens.device)
            self.tokens[index[0], index[1]] = torch.tensor(values, dtype=torch.int32).to(self.tokens.device)

    def _grow(self, rows: int, width: int) -> None:
        old_rows, old_width = self.tokens.shape
        new_rows, new_width = old_rows, old_width
        while new_rows < rows:
            new_rows *= 2
        while new_width < width:
            new_width *= 2
        grown = torch.zeros((new_rows, new_width), dtype=torch.int32, device=self.tokens.device)
        grown[:old_rows, :old_width] = self.tokens
        self.tokens = grown
        self.written = np.concatenate([self.written, np.zeros(new_rows - old_rows, dtype=np.int64)])
        self.owner = np.concatenate([self.owner, np.full(new_rows - old_rows, -1, dtype=np.int64)])

    def rows(self, seqs: Seq[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(history [rows, width] int64, prompt lengths [rows, 1], lengths [rows, 1]) of ``seqs`` after ``update``;
        history entries at or past a row's length are stale and must be masked."""
        meta = np.array([[s.row, s.prompt_len, len(s.tokens)] for s in seqs], dtype=np.int64)
        meta_t = torch.from_numpy(meta).to(self.tokens.device)
        history = self.tokens[meta_t[:, 0], : int(meta[:, 2].max())].long()
        return history, meta_t[:, 1:2], meta_t[:, 2:3]


def _first_of_runs(keys: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``keys`` (token ids, ``vocab`` = padding) sorted, and where a run of equal valid ids starts."""
    ordered = keys.sort(dim=1).values
    first = ordered < vocab
    first[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    return ordered, first


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, prompt_lens: torch.Tensor, lengths: torch.Tensor,
                    repetition: float, presence: float, frequency: float) -> torch.Tensor:
    """vLLM's penalties on ``logits`` [rows, vocab] from each row's tokens (a new fp32 tensor; inputs untouched).

    ``history[i, :lengths[i]]`` holds row i's prompt (its first ``prompt_lens[i]`` tokens) and output. Only the
    (row, token) pairs that occur are touched: the rows' ids are sorted, each distinct id read, changed and
    written once (no [rows, vocab] count tensor), in vLLM's order: repetition, then frequency and presence.
    """
    rows, vocab = logits.shape
    dev = logits.device
    pad = rows * vocab
    flat = torch.empty(pad + 1, dtype=torch.float32, device=dev)  # the last slot takes the padding's writes
    flat[:pad].copy_(logits.reshape(-1))  # (torch.cat is several times slower here on CPU)
    flat[pad] = 0.0
    base = torch.arange(rows, device=dev).unsqueeze(1) * vocab
    pos = torch.arange(history.shape[1], device=dev).unsqueeze(0)
    valid = pos < lengths
    if repetition != 1:
        ordered, first = _first_of_runs(torch.where(valid, history, vocab), vocab)
        index = torch.where(first, base + ordered, pad)
        values = flat[index]
        flat[index] = torch.where(values > 0, values / repetition, values * repetition)
    if presence != 0 or frequency != 0:
        ordered, first = _first_of_runs(torch.where(valid & (pos >= prompt_lens), history, vocab), vocab)
        counts = torch.searchsorted(ordered, ordered, right=True) - pos  # run length, read at a run's start
        index = torch.where(first, base + ordered, pad)
        flat[index] = flat[index] - frequency * counts.to(flat.dtype) - presence
    return flat[:pad].view(rows, vocab)


def mask_stop_tokens(logits: torch.Tensor, rows: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """``logits`` with −inf at ``stop_ids`` in the given ``rows`` (a new tensor)."""
    logits = logits.clone()
    logits[rows.unsqueeze(1), stop_ids.unsqueeze(0)] = -torch.inf
    return logits


class LogitsProcessor:
    """Penalties and the min_tokens mask of one generate call; ``__call__(logits, seqs)`` per sampling step."""

    def __init__(self, params: SamplingParams, stop_ids: frozenset[int], vocab: int) -> None:
        self.params = params
        self.penalties = needs_penalties(params)
        self.history: TokenHistory | None = None  # built on the first step, on the logits' device
        self.stop_ids = sorted(t for t in stop_ids if 0 <= t < vocab) if params.min_tokens else []

    @classmethod
    def for_params(cls, params: SamplingParams, stop_ids: frozenset[int], vocab: int) -> LogitsProcessor | None:
        """A processor, or None when the logits go to the sampler untouched (the fast path)."""
        processor = cls(params, stop_ids, vocab)
        return processor if processor.penalties or processor.stop_ids else None

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        """Processed logits of the rows ``seqs`` (row i of ``logits`` is the next token of ``seqs[i]``)."""
        p, dev = self.params, logits.device
        if self.penalties:
            if self.history is None:
                self.history = TokenHistory(dev)
            self.history.update(seqs)
            logits = apply_penalties(logits, *self.history.rows(seqs), p.repetition_penalty, p.presence_penalty,
                                     p.frequency_penalty)
        if self.stop_ids:
            short = [i for i, s in enumerate(seqs) if s.num_output < p.min_tokens]
            if short:
                logits = mask_stop_tokens(logits, torch.tensor(short, dtype=torch.long, device=dev),
                                          torch.tensor(self.stop_ids, dtype=torch.long, device=dev))
        return logits


__all__ = ["LogitsProcessor", "TokenHistory", "apply_penalties", "mask_stop_tokens", "needs_penalties"]
