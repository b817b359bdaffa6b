"""Per-token log-probabilities returned on a Completion, as vLLM's ``SamplingParams(logprobs=k)`` does.

For each generated token: a dict {token id: Logprob} holding the sampled token and the k most
likely tokens (so k or k + 1 entries), in that order. The log-probabilities are those of the
model's raw distribution, log_softmax of the logits before penalties, temperature and
top-k/p filtering (vLLM's default "raw_logprobs" mode); ``rank`` is 1 for the most likely
token. They are computed only when ``logprobs`` is set: one log_softmax, one top-k and one
transfer per step.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastes.engine.sequence import Sequence


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the raw model distribution and its rank there (1: the most likely)."""

    logprob: float
    rank: int


TokenLogprobs = dict[int, Logprob]


def step_logprobs(raw_logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """One dict per row: the sampled ``tokens[i]`` first, then the top-``k`` tokens of row i (k capped at vocab)."""
    logp = torch.log_softmax(raw_logits.float(), dim=-1)
    tokens = tokens.to(device=logp.device, dtype=torch.long)
    chosen = logp.gather(1, tokens.unsqueeze(1))
    ranks = (logp > chosen).sum(dim=1) + 1
    k = min(k, logp.shape[1])
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], tokens[:, None][:, :0])
    rows = zip(tokens.tolist(), chosen.squeeze(1).tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist(),
               strict=True)
    out = []
    for token, value, rank, ids, values in rows:
        entry = {token: Logprob(value, rank)}
        for r, (t, v) in enumerate(zip(ids, values, strict=True), start=1):
            entry.setdefault(t, Logprob(v, r))
        out.append(entry)
    return out


def append_logprobs(seqs: Seq[Sequence], raw_logits: torch.Tensor, tokens: torch.Tensor, k: int) -> None:
    """Append each sequence's entry for the token it sampled this step (``seqs[i]`` sampled ``tokens[i]``)."""
    for seq, entry in zip(seqs, step_logprobs(raw_logits, tokens, k), strict=True):
        if seq.logprobs is None:
            seq.logprobs = []
        seq.logprobs.append(entry)


def cumulative_logprob(logprobs: list[TokenLogprobs] | None, token_ids: Seq[int]) -> float | None:
    """Sum of the sampled tokens' log-probabilities (vLLM's CompletionOutput.cumulative_logprob)."""
    if logprobs is None:
        return None
    return float(sum(entry[t].logprob for entry, t in zip(logprobs, token_ids, strict=True)))


__all__ = ["Logprob", "TokenLogprobs", "append_logprobs", "cumulative_logprob", "step_logprobs"]
