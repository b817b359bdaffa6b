"""Reward plug-ins: load them by name, combine them with weights, and score without ever crashing a run.

Plug-ins follow the TRL convention: ``func(completions=[...], prompts=[...], **columns)``
with every dataset column as a keyword list aligned with `completions`, returning
one float (or None: "does not apply to this completion") per completion. An ES run
scores thousands of completions per step for hundreds of steps; one odd completion
that makes a user's reward raise, or return NaN, must cost one data point, not the run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RewardFn", "load_reward", "WeightedReward", "score_completions", "reward_name"]

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
        from fastes.es.tasks import TASKS

        if spec in TASKS:
            return importlib.import_module(f"fastes.es.tasks.{spec}").reward  # type: ignore[no-any-return]
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
            values = list(func(completions=completions, prompts=prompts, **columns))
            if len(values) != len(completions):
                raise ValueError(
                    f"{reward_name(func)} returned {len(values)} values for {len(completions)} completions"
                )
            for i, v in enumerate(values):
                if v is not None:
                    totals[i] = (totals[i] or 0.0) + weight * float(v)
        return totals


_RESERVED = {"mean", "std", "max", "min", "errors", "invalid", "none", "retried"}
_MISSING = object()  # marks a completion whose reward call raised or gave an unusable result


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


def _slice_columns(columns: dict[str, Any], i: int, n: int) -> dict[str, Any]:
    """Column values for completion i alone; non-list (broadcast) values are passed through."""
    return {k: v[i : i + 1] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in columns.items()}


def _call_isolated(
    func: RewardFn, completions: list[Any], prompts: list[Any] | None, columns: dict[str, Any]
) -> tuple[list[Any], bool]:
    """One reward function over the batch; on a raise or a wrong-length result, one call per completion.

    Returns the per-completion raw values (``_MISSING`` where even the single call failed)
    and whether the batch call had to be retried.
    """
    n = len(completions)
    try:
        values = list(func(completions=completions, prompts=prompts, **columns))
        if len(values) == n:
            return values, False
    except Exception:  # user code: anything may be raised, and the run must go on
        pass
    out: list[Any] = []
    for i in range(n):
        one_prompt = prompts[i : i + 1] if prompts is not None and len(prompts) == n else prompts
        try:
            single = list(func(completions=completions[i : i + 1], prompts=one_prompt, **_slice_columns(columns, i, n)))
            out.append(single[0] if len(single) == 1 else _MISSING)
        except Exception:
            out.append(_MISSING)
    return out, True


def score_completions(
    funcs_and_weights: Sequence[tuple[RewardFn, float]] | WeightedReward | RewardFn,
    completions: list[Any],
    prompts: list[Any] | None = None,
    columns: dict[str, Any] | None = None,
    on_error: float = 0.0,
) -> tuple[list[float], dict[str, float]]:
    """Weighted reward of each completion, never raising because of a reward function.

    Per completion: a function that raises (also when called on that completion
    alone, after the batch call failed) or returns NaN/inf/a non-number/a wrong-length
    list makes the completion score `on_error`; None from a function means "does not
    apply" and that function is skipped; all functions None also gives `on_error`.

    Stats: ``reward/errors`` (completions hit by an exception or wrong length),
    ``reward/invalid`` (completions with NaN/inf/non-numeric values), ``reward/none``
    (completions no function applied to), ``reward/retried`` (functions whose batch
    call failed), and ``reward/<name>`` (mean of each function's valid values, when it has any).
    """
    if isinstance(funcs_and_weights, WeightedReward):
        pairs = funcs_and_weights.funcs_and_weights
    elif callable(funcs_and_weights):
        pairs = [(funcs_and_weights, 1.0)]
    else:
        pairs = [(f, float(w)) for f, w in funcs_and_weights]
    if not pairs:
        raise ValueError("score_completions needs at least one reward function")
    completions = list(completions)
    n = len(completions)
    columns = {k: v for k, v in (columns or {}).items() if k not in ("completions", "prompts")}
    prompts = list(prompts) if prompts is not None else None

    totals: list[float | None] = [None] * n
    failed = [False] * n
    invalid = [False] * n
    stats: dict[str, float] = {"reward/errors": 0.0, "reward/invalid": 0.0, "reward/none": 0.0, "reward/retried": 0.0}
    names: dict[str, int] = {}
    for func, weight in pairs:
        raw, retried = _call_isolated(func, completions, prompts, columns)
        stats["reward/retried"] += float(retried)
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
        elif invalid[i]:
            stats["reward/invalid"] += 1
            scores.append(on_error)
        elif total is None:
            stats["reward/none"] += 1
            scores.append(on_error)
        elif not math.isfinite(total):  # finite parts can still overflow when weighted
            stats["reward/invalid"] += 1
            scores.append(on_error)
        else:
            scores.append(total)
    return scores, stats
