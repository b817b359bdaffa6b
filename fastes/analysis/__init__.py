"""Analyses for comparing fine-tuned checkpoints (ES vs GRPO): off-task KL drift, update geometry, interpolation.

Submodules load lazily so that ``import fastes.analysis`` does not pull in the engine or matplotlib. The
interpolation entry point is ``fastes.analysis.interpolate.interpolate`` (the module shares its name).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "KLResult": "kl", "kl_drift": "kl", "kl_drift_many": "kl", "sample_continuations": "kl", "token_kl": "kl",
    "Geometry": "geometry", "update_geometry": "geometry", "topk_energy": "geometry", "cosine": "geometry",
    "InterpolationResult": "interpolate", "alpha_grid": "interpolate",
    "barrier": "interpolate",
    "english_prompts": "prompts", "random_vocab_prompts": "prompts", "read_prompts": "prompts",
    "off_task_prompts": "prompts",
    "write_report": "report", "plot_kl": "report", "plot_geometry": "report", "plot_interpolation": "report",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"fastes.analysis.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fastes.analysis' has no attribute {name!r}")
