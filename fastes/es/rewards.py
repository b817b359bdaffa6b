"""Reward plug-ins: load them by name, combine them with weights, and score without ever crashing a run.

Plug-ins are called the way TRL's GRPOTrainer calls reward functions, so one written
for TRL runs here unchanged: keyword arguments ``prompts``, ``completions``,
``completion_ids`` (token ids of each completion), ``trainer_state`` (``global_step``,
``max_steps``, ``epoch``) and every dataset column as a list aligned with
`completions`. A function without ``**kwargs`` gets only the arguments it names.
When the prompts are chat messages (conversational format) each completion is a list
holding one assistant message, ``[{"role": "assistant", "content": text}]``. A
function returns one float per completion, or None where it does not apply.

An ES run scores thousands of completions per step for hundreds of steps; one odd
completion that makes a user's reward raise, return NaN or hang must cost one data
point, not the run. Each call runs under a timeout (`timeout_s`) in a daemon worker
thread; Python cannot kill a thread, so a call that never returns keeps its thread
(and whatever it holds) until the process exits, but the run goes on. ``timeout_s``
0 calls the function in the caller's thread (needed by rewards that use
``signal.alarm``, which works only in the main thread).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RewardFn", "load_reward", "WeightedReward", "score_completions", "score_rewards", "reward_name",
           "RewardReport", "TrainerState", "as_conversational", "DEFAULT_TIMEOUT_S"]

RewardFn = Callable[..., Sequence[Any]]


def load_reward(spec: str) -> RewardFn:
    """Resolve ``"module:function"``, ``"path/to/file.py:function"`` or a built-in task name ("countdown").

    Raises ValueError with a one-line reason when the module, file or attribute is missing or not callable.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    windows_path_only = spec.count(":") == 1 and len(spec) > 2 and spec[1] == ":" and spec[2] in "\\/"
    if ":" not in spec or windows_path_only:
        from fastes.es.tasks import TASK_MODULES, TASKS

        if spec in TASKS:
            return importlib.import_module(f"fastes.es.tasks.{TASK_MODULES[spec]}").reward  # type: ignore[no-any-return]
        raise ValueError(f"reward spec {spec!r}: expected 'module:function', 'file.py:function' or one of {TASKS}")
    target, attr = spec.rsplit(":", 1)
    if not attr.isidentifier():
        raise ValueError(f"reward spec {spec!r}: {attr!r} is not a function name")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"reward spec {spec!r}: file {str(path)!r} not found")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(f"fastes_reward_{path.stem}_{digest}", path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"reward spec {spec!r}: cannot load {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module  # dataclasses and pickling look plug-in modules up here
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_spec.name, None)
            raise ValueError(f"reward spec {spec!r}: importing {str(path)!r} failed: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"reward spec {spec!r}: cannot import module {target!r} ({exc})") from exc
    func = getattr(module, attr, None)
    if func is None:
        raise ValueError(f"reward spec {spec!r}: {target!r} has no attribute {attr!r}")
    if not callable(func):
        raise ValueError(f"reward spec {spec!r}: {attr!r} is not callable")
    return func  # type: ignore[no-any-return]


def reward_name(func: Any) -> str:
    """A short name for logs: the function's or class's name."""
    return str(getattr(func, "__name__", None) or type(func).__name__)


class WeightedReward:
    """Σ_i w_i·f_i as one TRL-style reward; a None from one function is skipped, all None gives None.

    This plain combination propagates exceptions; `score_completions` accepts a
    WeightedReward and isolates each component's failures.
    """

    def __init__(self, funcs: Sequence[RewardFn | str], weights: Sequence[float] | None = None) -> None:
        if not funcs:
            raise ValueError("WeightedReward needs at least one reward function")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise ValueError(f"WeightedReward: {len(funcs)} functions but {len(weights)} weights")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError("WeightedReward: weights must be finite")
        self.funcs = [load_reward(f) if isinstance(f, str) else f for f in funcs]
        self.weights = weights
        self.__name__ = "+".join(reward_name(f) for f in self.funcs)

    @property
    def funcs_and_weights(self) -> list[tuple[RewardFn, float]]:
        return list(zip(self.funcs, self.weights, strict=True))

    def __call__(self, completions: list[Any], prompts: list[str] | None = None, **columns: Any) -> list[float | None]:
        totals: list[float | None] = [None] * len(completions)
        for func, weight in self.funcs_and_weights:
            values = list(func(**_accepted(func, {"completions": completions, "prompts": prompts, **columns})))
            if len(values) != len(completions):
                raise ValueError(
                    f"{reward_name(func)} returned {len(values)} values for {len(completions)} completions"
                )
            for i, v in enumerate(values):
                if v is not None:
                    totals[i] = (totals[i] or 0.0) + weight * float(v)
        return totals


_RESERVED = {"mean", "std", "max", "min", "errors", "invalid", "none", "retried", "timeouts"}
_MISSING = object()  # marks a completion whose reward call raised or gave an unusable result
DEFAULT_TIMEOUT_S = 300.0  # per reward call: generous, so only a hung call hits it


@dataclass
class TrainerState:
    """The part of TRL's ``trainer_state`` that reward functions read (curricula, schedules)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


@dataclass
class RewardReport:
    """Scores and counters of one scoring pass, plus each failing plug-in's first error message.

    ``errors`` maps a plug-in's name to the first failure seen in this pass (an exception
    as ``raised Type: message``, a timeout, or a wrong-length result), so a caller can say which
    reward broke and why instead of training on zeros.
    """

    scores: list[float]
    stats: dict[str, float]
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def all_failed(self) -> bool:
        """Every completion hit an exception, timeout or wrong-length result."""
        return bool(self.scores) and self.stats.get("reward/errors", 0.0) >= len(self.scores)


def _as_float(value: Any) -> float | None | object:
    """float for a finite number, None for None, _MISSING for anything else (NaN, inf, str...)."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) or hasattr(value, "item"):
        try:
            x = float(value)
        except (TypeError, ValueError):
            return _MISSING
        return x if math.isfinite(x) else _MISSING
    return _MISSING


class _Timeout(Exception):
    pass


def _accepted(func: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `func` can take: all of them with ``**kwargs``, else only the names it lists."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in params if p.kind in named}
    return {k: v for k, v in kwargs.items() if k in names}


def _invoke(func: RewardFn, kwargs: dict[str, Any], timeout_s: float) -> list[Any]:
    """``list(func(**kwargs))``, in a daemon thread that is abandoned after `timeout_s` (0: no thread)."""
    if not timeout_s:
        return list(func(**kwargs))
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = list(func(**kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"fastes-reward-{reward_name(func)}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise _Timeout(f"timed out after {timeout_s:g} s (the call keeps running in a daemon thread)")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return text if isinstance(exc, _Timeout) else f"raised {type(exc).__name__}: {text}".rstrip(": ")


def _slice_columns(columns: dict[str, Any], i: int, n: int) -> dict[str, Any]:
    """Column values for completion i alone; non-list (broadcast) values are passed through."""
    return {k: v[i : i + 1] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in columns.items()}


def _call_isolated(
    func: RewardFn, kwargs: dict[str, Any], n: int, timeout_s: float
) -> tuple[list[Any], bool, str | None, int]:
    """One reward function over the batch; on a raise or a wrong-length result, one call per completion.

    Returns the per-completion raw values (``_MISSING`` where even the single call
    failed), whether the batch call was retried, the first failure message, and the
    number of timed-out calls. A batch call that times out is not retried per
    completion (that could cost n timeouts); after one single call times out the
    remaining completions are marked failed for the same reason.
    """
    kwargs = _accepted(func, kwargs)
    first: str | None = None
    try:
        values = _invoke(func, kwargs, timeout_s)
        if len(values) == n:
            return values, False, None, 0
        first = f"returned {len(values)} values for {n} completions"
    except _Timeout as exc:
        return [_MISSING] * n, False, _message(exc), 1
    except Exception as exc:  # user code: anything may be raised, and the run must go on
        first = _message(exc)
    out: list[Any] = []
    for i in range(n):
        try:
            single = _invoke(func, _slice_columns(kwargs, i, n), timeout_s)
            out.append(single[0] if len(single) == 1 else _MISSING)
        except _Timeout:
            return out + [_MISSING] * (n - i), True, first, 1
        except Exception:
            out.append(_MISSING)
    return out, True, first, 0


def _is_messages(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def as_conversational(completions: list[Any], prompts: list[Any] | None) -> list[Any]:
    """TRL's conversational format: text completions become one assistant message when prompts are messages."""
    if not prompts or not all(_is_messages(p) for p in prompts):
        return completions
    return [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]


_WARNED: set[tuple[str, str]] = set()


def _warn_once(name: str, message: str) -> None:
    """One stderr line per (plug-in, error type): silent zeros are how a broken reward goes unnoticed."""
    key = (name, message.split(":", 1)[0])  # e.g. "raised KeyError"
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: reward {name!r} failed: {message}", file=sys.stderr, flush=True)


def score_rewards(
    funcs_and_weights: Sequence[tuple[RewardFn, float]] | WeightedReward | RewardFn,
    completions: list[Any],
    prompts: list[Any] | None = None,
    columns: dict[str, Any] | None = None,
    on_error: float = 0.0,
    *,
    completion_ids: list[list[int]] | None = None,
    trainer_state: Any = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    warn: bool = True,
) -> RewardReport:
    """Weighted reward of each completion, never raising because of a reward function.

    Per completion: a function that raises (also when called on that completion
    alone, after the batch call failed), times out, or returns NaN/inf/a non-number/a
    wrong-length list makes the completion score `on_error`; None from a function means
    "does not apply" and that function is skipped; all functions None also gives `on_error`.

    Stats: ``reward/errors`` (completions hit by an exception, timeout or wrong length),
    ``reward/invalid`` (completions with NaN/inf/non-numeric values), ``reward/none``
    (completions no function applied to), ``reward/retried`` (functions whose batch
    call failed), ``reward/timeouts`` (timed-out calls), and ``reward/<name>`` (mean of
    each function's valid values, when it has any).
    """
    if isinstance(funcs_and_weights, WeightedReward):
        pairs = funcs_and_weights.funcs_and_weights
    elif callable(funcs_and_weights):
        pairs = [(funcs_and_weights, 1.0)]
    else:
        pairs = [(f, float(w)) for f, w in funcs_and_weights]
    if not pairs:
        raise ValueError("score_completions needs at least one reward function")
    if not timeout_s >= 0:
        raise ValueError(f"reward timeout_s must be >= 0, got {timeout_s}")
    prompts = list(prompts) if prompts is not None else None
    completions = as_conversational(list(completions), prompts)
    n = len(completions)
    kwargs = {k: v for k, v in (columns or {}).items()
              if k not in ("completions", "prompts", "completion_ids", "trainer_state")}
    kwargs.update(completions=completions, prompts=prompts, trainer_state=trainer_state)
    if completion_ids is not None:
        if len(completion_ids) != n:
            raise ValueError(f"score_completions: {len(completion_ids)} completion_ids for {n} completions")
        kwargs["completion_ids"] = [list(ids) for ids in completion_ids]

    totals: list[float | None] = [None] * n
    failed = [False] * n
    invalid = [False] * n
    stats: dict[str, float] = {"reward/errors": 0.0, "reward/invalid": 0.0, "reward/none": 0.0,
                               "reward/retried": 0.0, "reward/timeouts": 0.0}
    errors: dict[str, str] = {}
    names: dict[str, int] = {}
    for func, weight in pairs:
        raw, retried, first, timeouts = _call_isolated(func, kwargs, n, timeout_s)
        stats["reward/retried"] += float(retried)
        stats["reward/timeouts"] += float(timeouts)
        valid: list[float] = []
        for i, value in enumerate(raw):
            if value is _MISSING:
                failed[i] = True
                continue
            x = _as_float(value)
            if x is _MISSING:
                invalid[i] = True
            elif x is not None:
                valid.append(x)  # type: ignore[arg-type]
                totals[i] = (totals[i] or 0.0) + weight * x  # type: ignore[operator]
        name = reward_name(func)
        if first is not None and any(v is _MISSING for v in raw):
            errors.setdefault(name, first)
            if warn:
                _warn_once(name, first)
        if name in _RESERVED:  # keep the trainer's reward/mean etc. and the counters from being overwritten
            name += "_fn"
        names[name] = names.get(name, 0) + 1
        key = f"reward/{name}" if names[name] == 1 else f"reward/{name}_{names[name]}"
        if valid:  # omitted rather than NaN, which JSON metrics files cannot hold
            stats[key] = sum(valid) / len(valid)

    scores: list[float] = []
    for i in range(n):
        total = totals[i]
        if failed[i]:
            stats["reward/errors"] += 1
            scores.append(on_error)
        elif invalid[i] or (total is not None and not math.isfinite(total)):  # finite parts can overflow
            stats["reward/invalid"] += 1
            scores.append(on_error)
        elif total is None:
            stats["reward/none"] += 1
            scores.append(on_error)
        else:
            scores.append(total)
    return RewardReport(scores, stats, errors)


def score_completions(
    funcs_and_weights: Sequence[tuple[RewardFn, float]] | WeightedReward | RewardFn,
    completions: list[Any],
    prompts: list[Any] | None = None,
    columns: dict[str, Any] | None = None,
    on_error: float = 0.0,
    **options: Any,
) -> tuple[list[float], dict[str, float]]:
    """`score_rewards` as ``(scores, stats)``; `options` are its keyword-only arguments."""
    report = score_rewards(funcs_and_weights, completions, prompts, columns, on_error, **options)
    return report.scores, report.stats
