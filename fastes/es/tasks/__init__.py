"""Tasks (datasets + rewards) for ES fine-tuning, and a registry to build them by name.

Each task module also exposes a module-level TRL-style ``reward(completions, prompts,
**columns)``, e.g. ``countdown.reward(completions=[...], numbers=[[...]], target=[...])``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastes.es.tasks import arithmetic, countdown, countdown_peers, datasets_source, gsm8k, jsonl
from fastes.es.tasks.arithmetic import ArithmeticTask
from fastes.es.tasks.base import Example, Task, collate_columns
from fastes.es.tasks.countdown import CountdownTask
from fastes.es.tasks.countdown_peers import CountdownPeersTask
from fastes.es.tasks.datasets_source import DatasetsTask
from fastes.es.tasks.gsm8k import GSM8KTask
from fastes.es.tasks.jsonl import JsonlTask

__all__ = [
    "Example",
    "Task",
    "TASKS",
    "TASK_MODULES",
    "get_task",
    "collate_columns",
    "ArithmeticTask",
    "CountdownTask",
    "CountdownPeersTask",
    "DatasetsTask",
    "GSM8KTask",
    "JsonlTask",
    "arithmetic",
    "countdown",
    "countdown_peers",
    "datasets_source",
    "gsm8k",
    "jsonl",
]



def _countdown(**options: Any) -> Task:
    """``data_file`` given: the peers' countdown.json (`countdown_peers`); otherwise generated problems."""
    if options.get("data_file") is not None:
        return CountdownPeersTask(**options)
    options.pop("data_file", None)
    return CountdownTask(**options)


_REGISTRY: dict[str, Callable[..., Task]] = {
    "countdown": _countdown,
    "arithmetic": ArithmeticTask,
    "gsm8k": GSM8KTask,
    "jsonl": JsonlTask,
    "datasets": DatasetsTask,
}
TASKS: tuple[str, ...] = tuple(_REGISTRY)
TASK_MODULES = {name: name for name in TASKS} | {"datasets": "datasets_source"}  # module with the task's reward


def get_task(name: str, **options: Any) -> Task:
    """Build the task registered as `name` with its options; ValueError (one line) on a bad name or option."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    try:
        return _REGISTRY[key](**options)
    except TypeError as exc:
        raise ValueError(f"task {key!r}: bad options {sorted(options)}: {exc}") from None
