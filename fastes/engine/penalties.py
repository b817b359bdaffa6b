"""Logit processing before sampling: vLLM's repetition / presence / frequency penalties and min_tokens.

Semantics are vLLM's (docs/design.md, "The engine"): the repetition penalty r touches every
token that occurs in the prompt or the output so far, dividing a positive logit by r and
multiplying a negative one by r; the frequency penalty subtracts f·count and the presence
penalty p·[count > 0], counting the output only. While a sequence has fewer than
``min_tokens`` output tokens its stop ids (EOS unless ignore_eos, and stop_token_ids) get
−inf, so it cannot stop. Everything here depends only on a row's own tokens, so sampling
stays independent of batch composition, chunking and preemption.

Cost: nothing when no penalty and no min_tokens is set (``LogitsProcessor.for_params`` gives
None and the runner never calls it). With penalties, each step scatters the sampling rows'
token ids into a [rows, vocab] count tensor (one host gather of the ids, one device scatter,
as large as the logits); the prompt's tokens are gathered only for a repetition penalty.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

import numpy as np
import torch

from fastes.engine.sampling import SamplingParams
from fastes.engine.sequence import Sequence


def needs_penalties(params: SamplingParams) -> bool:
    """Whether any penalty changes the logits (only then are token counts built)."""
    return params.repetition_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0


def _flat_ids(seqs: Seq[Sequence], vocab: int, device: torch.device, prompt: bool) -> torch.Tensor:
    """row·vocab + token for every prompt token (``prompt``) or every output token of the rows ``seqs``."""
    parts = [s.tokens[: s.prompt_len] if prompt else s.tokens[s.prompt_len :] for s in seqs]
    lens = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    ids = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=int(lens.sum()))
    flat = np.repeat(np.arange(len(parts), dtype=np.int64) * vocab, lens) + ids
    return torch.from_numpy(flat).to(device)


def output_counts(seqs: Seq[Sequence], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] fp32: how often each token occurs in each row's output so far."""
    flat = _flat_ids(seqs, vocab, device, prompt=False)
    counts = torch.zeros(len(seqs) * vocab, dtype=torch.float32, device=device)
    counts.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float32, device=device))
    return counts.view(len(seqs), vocab)


def prompt_mask(seqs: Seq[Sequence], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] bool: which tokens occur in each row's prompt."""
    mask = torch.zeros(len(seqs) * vocab, dtype=torch.bool, device=device)
    mask[_flat_ids(seqs, vocab, device, prompt=True)] = True
    return mask.view(len(seqs), vocab)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor | None,
                    repetition: float, presence: float, frequency: float) -> torch.Tensor:
    """vLLM's penalties on fp32 ``logits`` [rows, vocab] from output ``counts`` (a new tensor; inputs untouched).

    ``in_prompt`` (needed when ``repetition`` != 1) marks prompt tokens; output tokens are those with counts > 0.
    """
    in_output = counts > 0
    if repetition != 1:
        assert in_prompt is not None
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(in_prompt | in_output, penalized, logits)
    if frequency != 0:
        logits = logits - frequency * counts
    if presence != 0:
        logits = logits - presence * in_output.to(logits.dtype)
    return logits


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
        self.stop_ids = sorted(t for t in stop_ids if 0 <= t < vocab) if params.min_tokens else []

    @classmethod
    def for_params(cls, params: SamplingParams, stop_ids: frozenset[int], vocab: int) -> LogitsProcessor | None:
        """A processor, or None when the logits go to the sampler untouched (the fast path)."""
        processor = cls(params, stop_ids, vocab)
        return processor if processor.penalties or processor.stop_ids else None

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        """Processed logits of the rows ``seqs`` (row i of ``logits`` is the next token of ``seqs[i]``)."""
        p, dev = self.params, logits.device
        vocab = logits.shape[1]
        if self.penalties:
            counts = output_counts(seqs, vocab, dev)
            in_prompt = prompt_mask(seqs, vocab, dev) if p.repetition_penalty != 1 else None
            logits = apply_penalties(logits.float(), counts, in_prompt, p.repetition_penalty, p.presence_penalty,
                                     p.frequency_penalty)
        if self.stop_ids:
            short = [i for i, s in enumerate(seqs) if s.num_output < p.min_tokens]
            if short:
                logits = mask_stop_tokens(logits, torch.tensor(short, dtype=torch.long, device=dev),
                                          torch.tensor(self.stop_ids, dtype=torch.long, device=dev))
        return logits


__all__ = ["LogitsProcessor", "apply_penalties", "mask_stop_tokens", "needs_penalties", "output_counts",
           "prompt_mask"]
