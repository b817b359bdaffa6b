"""fastes: Evolution Strategies fine-tuning of language models at the cost of batched inference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastes import noise
from fastes._backend import backends
from fastes.population import Population

if TYPE_CHECKING:
    from fastes.engine.engine import Completion, Engine
    from fastes.engine.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["noise", "backends", "Population", "Engine", "SamplingParams", "Completion", "__version__"]

_LAZY = {
    "Engine": ("fastes.engine.engine", "Engine"),
    "Completion": ("fastes.engine.sequence", "Completion"),
    "SamplingParams": ("fastes.engine.sampling", "SamplingParams"),
}


def __getattr__(name: str) -> Any:
    """Engine and friends load on first use, so `import fastes` stays light."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fastes' has no attribute {name!r}")
