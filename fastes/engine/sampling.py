"""Sampling: vLLM-style parameters and a sampler whose randomness is counter-based.

Each row draws one uniform from Philox4x32-10 keyed by the sampling seed, with
counter (position, member, prompt key, sample index), and inverts the CDF of its
filtered distribution. The prompt key is a hash of the prompt's token ids (and of its
occurrence among equal prompts), not its index in the request. A token therefore
depends only on that row's logits and coordinates: not on batch composition, chunk
sizes, preemption, row order or the order of the prompts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fastes.noise import SEED_LIMIT, U32_LIMIT, philox4x32, split_seed

SAMPLING_STREAM = 0x53414D50  # "SAMP": keeps sampling words apart from any noise stream
MAX_SAMPLES = 1 << 16  # the sample index shares a counter word with the stream tag


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """What to generate: mirrors vLLM's SamplingParams for the fields ES needs."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    seed: int | None = None
    include_stop_str_in_output: bool = False
    common_random_numbers: bool = False  # every member draws from the unperturbed row's stream (ES fitness CRN)
    n: int = 1  # samples per prompt (Engine.generate's samples_per_prompt)
    logprobs: int | None = None  # k: the top-k raw log-probabilities (and the sampled token's) per generated token
    repetition_penalty: float = 1.0  # > 1 discourages tokens of prompt + output (fastes.engine.penalties)
    presence_penalty: float = 0.0  # subtracted from the logits of tokens the output holds
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    min_tokens: int = 0  # EOS, stop ids and stop strings are not honoured before this many tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must hold token ids >= 0, got {self.stop_token_ids!r}")
        if not all(isinstance(v, bool) for v in (self.ignore_eos, self.include_stop_str_in_output,
                                                 self.common_random_numbers)):
            raise ValueError("ignore_eos, include_stop_str_in_output and common_random_numbers must be booleans")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
        self._check_vllm_extras()

    def _check_vllm_extras(self) -> None:
        """n, logprobs, penalties and min_tokens, with vLLM's ranges."""
        if not _is_int(self.n) or not 1 <= self.n <= MAX_SAMPLES:
            raise ValueError(f"n must be an integer in [1, {MAX_SAMPLES}], got {self.n!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def prompt_keys(prompts: Sequence[Sequence[int]]) -> list[int]:
    """A 32-bit counter word per prompt from its token ids and its occurrence among equal prompts.

    Keying by content rather than by list index makes sampling independent of prompt order;
    the occurrence index keeps repeated prompts apart (they are interchangeable anyway).
    """
    seen: dict[tuple[int, ...], int] = {}
    keys = []
    for prompt in prompts:
        ids = tuple(prompt)
        occurrence = seen.get(ids, 0)
        seen[ids] = occurrence + 1
        digest = hashlib.blake2b(digest_size=4, person=b"fastes-prompt")
        digest.update(occurrence.to_bytes(8, "little"))
        digest.update(b"".join(t.to_bytes(8, "little") for t in ids))
        keys.append(int.from_bytes(digest.digest(), "little"))
    return keys


def row_uniforms(seed: int, positions: torch.Tensor, members: torch.Tensor, prompts: torch.Tensor,
                 samples: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per row from its coordinates (all int tensors of one shape).

    ``prompts`` holds the rows' prompt keys (``prompt_keys``), ``samples`` indices below MAX_SAMPLES.
    """
    k0, k1 = split_seed(seed)
    member_word = (members.long() + 1) % U32_LIMIT  # member −1 (unperturbed) maps to word 0
    words = philox4x32(positions.long(), member_word, prompts.long(),
                       (samples.long() << 16) ^ SAMPLING_STREAM, k0, k1)
    return (words[..., 0] >> 8).to(torch.float32) * 2.0**-24


def filter_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """Per-row temperature, top-k, top-p and min-p: probabilities [rows, vocab] in fp32 (rows sum to 1)."""
    logits = logits.float() / temperature.clamp_min(1e-6).unsqueeze(1)
    probs = torch.softmax(logits, dim=-1)
    vocab = probs.shape[1]
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=probs.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).unsqueeze(1)
    keep = rank < k
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep &= before < top_p.unsqueeze(1)
    keep &= sorted_probs >= min_p.unsqueeze(1) * sorted_probs[:, :1]
    keep[:, 0] = True
    kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling in vocabulary order: the first token whose cumulative mass exceeds u."""
    cdf = probs.cumsum(dim=-1)
    target = uniforms.unsqueeze(1) * cdf[:, -1:]
    token = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return token.clamp(max=probs.shape[1] - 1)


def sampling_members(params: SamplingParams, members: torch.Tensor) -> torch.Tensor:
    """The member coordinate of each row's sampling counter: its own member, or −1 (the unperturbed row's
    stream) for every row under common random numbers, so that all members draw the same uniforms."""
    if params.common_random_numbers:
        return torch.full_like(members, -1)
    return members


def needs_filter(params: SamplingParams) -> bool:
    """Whether top-k, top-p or min-p is set: only then does sampling sort the vocabulary."""
    return params.top_k > 0 or params.top_p < 1 or params.min_p > 0


def sample(logits: torch.Tensor, params: SamplingParams, seed: int, positions: torch.Tensor, members: torch.Tensor,
           prompts: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Next token per row [rows] of one batch's ``params``; rows draw from their counter coordinates.

    Fast paths, each equal bit for bit to the general one: greedy is an argmax; temperature alone is a
    softmax and the inverse CDF, with no sort (the sort only reorders, and its scatter restores the order).
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    rows, dev = logits.shape[0], logits.device
    temperature = torch.full((rows,), float(params.temperature), device=dev, dtype=torch.float32)
    if needs_filter(params):
        top_k = torch.full((rows,), max(params.top_k, 0), device=dev, dtype=torch.long)
        top_p = torch.full((rows,), float(params.top_p), device=dev, dtype=torch.float32)
        min_p = torch.full((rows,), float(params.min_p), device=dev, dtype=torch.float32)
        probs = filter_probs(logits, temperature, top_k, top_p, min_p)
    else:
        probs = torch.softmax(logits.float() / temperature.clamp_min(1e-6).unsqueeze(1), dim=-1)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    uniforms = row_uniforms(seed, positions, sampling_members(params, members), prompts, samples)
    return sample_from_probs(probs, uniforms)
