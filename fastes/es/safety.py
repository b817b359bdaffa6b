"""Fail loudly: the trainer's guards against runs that go on while learning nothing, or write garbage.

- A reward (or member fitness) that fails on every rollout makes every step a no-op: the
  fitnesses are all equal and the step is skipped. One such step can be bad luck; K in a
  row (``max_failed_steps``) is a broken plug-in, and the run stops naming it and its
  first error (found by calling it once more on one rollout, under a time limit).
- An update that makes a weight NaN/inf (``--optim.lr 1e38``) is refused: the run stops
  before anything is saved, since every later step and checkpoint would be garbage.
- A KV pool too small for the longest prompt plus ``max_tokens`` is found at start, not
  in the middle of the first step that draws that prompt.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

DIAGNOSE_TIMEOUT_S = 60.0


class PluginFailure(RuntimeError):
    """Rewards or fitness failed on every rollout for too many consecutive steps (exit 1, one line)."""


class NonFiniteUpdate(ValueError):
    """An update produced NaN/inf weights; nothing is saved (exit 2, one line: the settings are bad input)."""


def warn(message: str) -> None:
    print(f"fastes: warning: {message}", file=sys.stderr, flush=True)


def _describe(values: Any) -> str | None:
    """What is wrong with one plug-in result for one completion, or None when it is a finite number."""
    try:
        values = list(values)
    except TypeError:
        return f"returned {type(values).__name__} {values!r:.60}, not a list"
    if len(values) != 1:
        return f"returned {len(values)} values for 1 completion"
    value = values[0]
    if value is None:
        return "returned None (does not apply) for every completion"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return f"returned {type(value).__name__} {value!r:.60}, not a number"
    return None if math.isfinite(x) else f"returned {x}"


def _call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> tuple[Any, BaseException | None, bool]:
    """(result, exception, finished) of ``fn()`` run in a daemon thread for at most ``timeout_s``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:  # user code: report whatever it raised
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True, name="fastes-diagnose")
    thread.start()
    thread.join(timeout_s)
    return box.get("result"), box.get("error"), not thread.is_alive()


def first_reward_error(rewards: Sequence[tuple[Any, float]], completion: str, prompt: Any,
                       columns: dict[str, Any], timeout_s: float = DIAGNOSE_TIMEOUT_S) -> tuple[str, str]:
    """(plug-in name, what it did wrong) for the first reward function that fails on one completion."""
    from fastes.es.rewards import _accepted, reward_name

    one = {k: v[:1] if isinstance(v, (list, tuple)) else v for k, v in columns.items()}
    kwargs = {**one, "completions": [completion], "prompts": [prompt]}
    for func, _ in rewards:  # called as the trainer calls it: only the keywords a function without **kwargs names
        result, err, done = _call_with_timeout(lambda f=func: f(**_accepted(f, kwargs)), timeout_s)
        name = reward_name(func)
        if not done:
            return name, f"did not return within {timeout_s:g}s"
        if err is not None:
            return name, f"raised {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        problem = _describe(result)
        if problem is not None:
            return name, problem
    names = ", ".join(reward_name(f) for f, _ in rewards)
    return names, "failed on every rollout of the step (but not when called again on its first one)"


def first_fitness_error(fn: Any, rollouts: list[dict[str, Any]], timeout_s: float = DIAGNOSE_TIMEOUT_S
                        ) -> tuple[str, str]:
    """(plug-in name, what it did wrong) of a member-fitness function called on one member's rollouts."""
    from fastes.es.rewards import reward_name

    result, err, done = _call_with_timeout(lambda: fn(rollouts), timeout_s)
    name = reward_name(fn)
    if not done:
        return name, f"did not return within {timeout_s:g}s"
    if err is not None:
        return name, f"raised {type(err).__name__}: {' '.join(str(err).split())[:200]}"
    return name, _describe([result]) or "failed on every member of the step"


class FailureStreak:
    """Counts consecutive steps whose plug-ins failed on every rollout; raises PluginFailure at ``limit``."""

    def __init__(self, limit: int, quiet: bool = False) -> None:
        self.limit, self.quiet = int(limit), quiet  # quiet: ranks other than 0 of a distributed run
        self.count = 0
        self.first: tuple[int, str, str] | None = None  # (step, plug-in, error) of the streak's first step

    def observe(self, step: int, failed: bool, diagnose: Callable[[], tuple[str, str]]) -> None:
        """Record step ``step``; ``diagnose`` is called once per streak, on its first failed step."""
        if not failed:
            self.count, self.first = 0, None
            return
        self.count += 1
        if self.first is None:
            self.first = (step, *diagnose())
        _, name, error = self.first
        if self.count >= self.limit:
            raise PluginFailure(f"{name!r} failed on every rollout for {self.count} consecutive steps "
                                f"(from step {self.first[0]}): {error}")
        if not self.quiet:
            warn(f"step {step}: {name!r} failed on every rollout ({error}); the step is skipped "
                 f"({self.count}/{self.limit} before the run stops)")


def observe_step(trainer: Any, step: int, stats: dict[str, float], rollouts: int, members: int, texts: list[str],
                 prompts: list[Any], examples: list[Any]) -> None:
    """Count a trainer step whose rewards / fitness failed on every rollout (``trainer.failures``), naming the
    plug-in and its first error: what the real calls raised when the scoring recorded it, else one more call."""
    from fastes.es.fitness import make_rollouts
    from fastes.es.tasks.base import collate_columns

    rewards_failed, fitness_failed = all_rollouts_failed(stats, rollouts, members)
    fitness_failed = fitness_failed and trainer.member_fitness is not None

    def diagnose() -> tuple[str, str]:
        errors = getattr(trainer, "reward_errors", None)
        if rewards_failed and errors:  # what the real calls raised, with TRL's arguments
            return next(iter(errors.items()))
        if rewards_failed and texts:
            return first_reward_error(trainer.rewards, texts[0], prompts[0], collate_columns(examples[:1]))
        if fitness_failed and texts:
            k = trainer.config.samples_per_prompt
            one = make_rollouts([examples[0].prompt], [texts[:k]], None, collate_columns(examples[:1]))
            return first_fitness_error(trainer.member_fitness, one)
        return "rewards" if rewards_failed else "member_fitness", "failed on another rank"

    trainer.failures.observe(step, rewards_failed or fitness_failed, diagnose)


def all_rollouts_failed(stats: dict[str, float], rollouts: int, members: int) -> tuple[bool, bool]:
    """(rewards failed on every rollout, member fitness failed on every member), from the summed counters."""
    bad = stats.get("reward/errors", 0.0) + stats.get("reward/invalid", 0.0) + stats.get("reward/none", 0.0)
    return rollouts > 0 and bad >= rollouts, members > 0 and stats.get("fitness/errors", 0.0) >= members


def check_finite(params: dict[str, torch.Tensor], names: Sequence[str], step: int, lr: float) -> None:
    """NonFiniteUpdate naming the first tensor the update of ``step`` made NaN/inf."""
    if not names:
        return
    flags = torch.stack([torch.isfinite(params[n]).all() for n in names])
    if bool(flags.all()):
        return
    bad = [n for n, ok in zip(names, flags.tolist(), strict=True) if not ok]
    raise NonFiniteUpdate(f"step {step}: the update (lr {lr:g}) made {len(bad)} tensor(s) non-finite ({bad[0]}"
                          f"{', ...' if len(bad) > 1 else ''}); refused, nothing saved: lower optim.lr or "
                          "population.sigma, or check the fitness scale")


def check_kv_pool(pool_tokens: int, prompt_lengths: Sequence[int], max_tokens: int) -> None:
    """ValueError at start when the longest prompt plus ``max_tokens`` cannot fit the KV pool."""
    longest = max(prompt_lengths, default=0)
    if longest + max_tokens > pool_tokens:
        raise ValueError(f"KV cache too small: the longest prompt has {longest} tokens and sampling.max_tokens is "
                         f"{max_tokens}, but the pool holds {pool_tokens} tokens; raise kv_cache_tokens or lower "
                         "sampling.max_tokens")


__all__ = ["FailureStreak", "NonFiniteUpdate", "PluginFailure", "all_rollouts_failed", "check_finite",
           "check_kv_pool", "first_fitness_error", "first_reward_error", "observe_step", "warn"]
