"""ES training loop: trainer, fitness shaping, optimizers, tasks, rewards and checkpoints."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "fastes.es.config",
    "Trainer": "fastes.es.trainer",
    "AskTell": "fastes.es.optim",
    "make_optimizer": "fastes.es.optim",
    "plan_memory": "fastes.es.trainer",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    """Loaded on first use, so `import fastes.es.tasks` does not pull in the engine."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastes.es' has no attribute {name!r}")
