"""Sampling: vLLM-style parameters and a sampler whose randomness is counter-based.

Each row draws one uniform from Philox4x32-10 keyed by the sampling seed, with
counter (position, member, prompt index, sample index), and inverts the CDF of its
filtered distribution. A token therefore depends only on that row's logits and
coordinates: not on batch composition, chunk sizes, preemption or row order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastes.noise import SEED_LIMIT, U32_LIMIT, philox4x32, split_seed

SAMPLING_STREAM = 0x53414D50  # "SAMP": keeps sampling words apart from any noise stream


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_uniforms(seed: int, positions: torch.Tensor, members: torch.Tensor, prompts: torch.Tensor,
                 samples: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per row from its coordinates (all int tensors of one shape)."""
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


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: torch.Tensor,
           members: torch.Tensor, prompts: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Next token per row [rows]; greedy rows take argmax, the others draw from their coordinates."""
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    tokens = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return tokens
    dev = logits.device
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=dev, dtype=torch.float32)
    top_k = torch.tensor([max(p.top_k, 0) for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=torch.float32)
    probs = filter_probs(logits, temperature, top_k, top_p, min_p)
    uniforms = torch.empty(len(params), device=dev, dtype=torch.float32)
    for seed in sorted(set(seeds)):
        rows = torch.tensor([s == seed for s in seeds], device=dev)
        uniforms[rows] = row_uniforms(seed, positions[rows], members[rows], prompts[rows], samples[rows])
    drawn = sample_from_probs(probs, uniforms)
    return torch.where(greedy, tokens, drawn)
