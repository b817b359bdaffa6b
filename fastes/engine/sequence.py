"""A sequence: one (member, prompt, sample) rollout, with what is computed and what is generated."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fastes.engine.logprobs import TokenLogprobs
from fastes.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class Completion:
    """What one sequence generated: token ids, text, and why it stopped (stop | length); with
    ``SamplingParams(logprobs=k)`` also one {token id: Logprob} per token and their sum (fastes.engine.logprobs)."""

    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None


@dataclass(eq=False)  # identity: two rollouts are never "equal", and list.remove stays a pointer scan
class Sequence:
    """``tokens`` = prompt + generated; the first ``num_computed`` have KV in the cache.

    A step computes KV for tokens [num_computed, end) and, when that reaches the last
    token, samples the next one at position len(tokens). Prefill, chunked prefill,
    decode and recompute after preemption are all this one rule.
    ``fork_into`` lists sample indices still to be split off this sequence's prompt
    blocks once its prompt is computed (the k samples of one prompt share them).
    ``prompt_key`` names the prompt in the sampling counter by its content (not its index
    in the request), so that reordering the prompts does not change what is sampled.
    The fields after ``text`` are the scheduler's and the runner's bookkeeping.
    """

    seq_id: int
    member: int
    prompt_index: int
    sample_index: int
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    seed: int
    fork_into: list[int] = field(default_factory=list)
    prompt_key: int = 0
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str | None = None
    row: int = -1  # its row in the scheduler's BatchState while running
    scheduled: int = 0  # tokens the current step computes, from num_computed on
    last_step: int = -1  # the scheduler step that last scheduled it
    detok: object | None = None  # incremental detokenizer state while stop strings are checked
    logprobs: list[TokenLogprobs] | None = None  # one entry per output token with SamplingParams.logprobs

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def remaining(self) -> int:
        """Tokens whose KV is still to compute before the next sample."""
        return len(self.tokens) - self.num_computed
