"""Linear interpolation between two checkpoints: θ(α) = (1 − α)·θ_A + α·θ_B, evaluated along α.

The loss-barrier test: if reward and accuracy stay at or above the straight line between
the endpoints for α in [0, 1], the two solutions sit in one linearly connected basin (as
fine-tuning from one base usually does); a dip is a barrier. Points outside [0, 1]
extrapolate the update (α = 2 with A = base doubles the run's Δ).

One engine serves every point: parameters are overwritten in place (same tensors, so
anything that captured their addresses stays valid), computed in fp32 per tensor and cast
to the engine's dtype; α = 0 and α = 1 reproduce A and B exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastes.engine.engine import Engine
from fastes.engine.sampling import SamplingParams
from fastes.models import CausalLM, load_model

# a fixed KV pool rather than "all free memory", so θ_A and θ_B fit on the GPU beside the engine's weights
ANALYSIS_KV_TOKENS = 65536


def alpha_grid(num: int = 11, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """``num`` evenly spaced α in [lo, hi], plus 0 and 1 always (the endpoints the barrier is measured against)."""
    if num < 2 or not lo < hi:
        raise ValueError(f"need num >= 2 and lo < hi, got num={num}, lo={lo}, hi={hi}")
    values = {round(lo + (hi - lo) * i / (num - 1), 12) for i in range(num)} | {0.0, 1.0}
    return sorted(values)


def interpolate_tensor(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 − α)·a + α·b in fp32 (not lerp's a + α(b − a), which is not exactly b at α = 1)."""
    return (1.0 - alpha) * a.float() + alpha * b.float()


def interpolate_params(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """θ(α) of two parameter dicts with the same names and shapes, in a's dtype."""
    if set(a) != set(b):
        raise ValueError("the two checkpoints have different parameter names")
    return {n: interpolate_tensor(a[n], b[n], alpha).to(a[n].dtype) for n in a}


def barrier(alphas: Sequence[float], values: Sequence[float]) -> float:
    """max over α in [0, 1] of (the straight line between the endpoint values − the value at α); NaN without both
    endpoints. Positive: a dip below the line (for a higher-is-better metric)."""
    points = dict(zip(alphas, values, strict=True))
    if 0.0 not in points or 1.0 not in points:
        return float("nan")
    v0, v1 = points[0.0], points[1.0]
    return max((1.0 - a) * v0 + a * v1 - v for a, v in points.items() if 0.0 <= a <= 1.0)


@dataclass
class InterpolationResult:
    """Metrics at each α: eval accuracy and reward (greedy, the task's held-out set), optional train reward."""

    alphas: list[float]
    metrics: dict[str, list[float]]
    settings: dict[str, Any] = field(default_factory=dict)

    def at(self, alpha: float) -> dict[str, float]:
        i = self.alphas.index(alpha)
        return {k: v[i] for k, v in self.metrics.items()}

    @property
    def barriers(self) -> dict[str, float]:
        return {k: barrier(self.alphas, v) for k, v in self.metrics.items() if not k.endswith("time_s")}

    def to_dict(self) -> dict[str, Any]:
        return {"alphas": self.alphas, "metrics": self.metrics, "barriers": self.barriers, "settings": self.settings}


class ParamSwapper:
    """Holds θ_A and θ_B for an engine's model and writes θ(α) into the model's own tensors."""

    def __init__(self, model: CausalLM, b: CausalLM | Mapping[str, torch.Tensor]) -> None:
        if model.lora:
            raise ValueError("interpolation needs a model without separate LoRA adapters (load the merged directory)")
        theta_b = b.params if isinstance(b, CausalLM) else b
        shapes = {n: tuple(t.shape) for n, t in model.params.items()}
        if {n: tuple(t.shape) for n, t in theta_b.items()} != shapes:
            raise ValueError("the two checkpoints have different parameter names or shapes")
        self.model = model
        self.theta_a = {n: t.detach().clone() for n, t in model.params.items()}
        self.theta_b = {n: t.detach().to(device=model.device, dtype=model.dtype) for n, t in theta_b.items()}

    def set(self, alpha: float) -> None:
        for name, param in self.model.params.items():
            param.copy_(interpolate_tensor(self.theta_a[name], self.theta_b[name], alpha).to(param.dtype))

    def restore(self) -> None:
        for name, param in self.model.params.items():
            param.copy_(self.theta_a[name])


def _resolve_task(task: Any, options: Mapping[str, Any] | None) -> Any:
    if isinstance(task, str):
        from fastes.es.trainer import resolve_task

        return resolve_task(task, dict(options or {}))
    return task


def evaluate_point(engine: Engine, task: Any, examples: list[Any], max_tokens: int, use_chat_template: bool,
                   prefix: str = "eval") -> dict[str, float]:
    """Greedy accuracy and mean reward of the engine's current weights (the trainer's own evaluation)."""
    from fastes.es.trainer import evaluate

    result = evaluate(engine, task, examples, [(task.reward, 1.0)],
                      SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0), use_chat_template)
    return {f"{prefix}/accuracy": float(result["eval/accuracy"]), f"{prefix}/reward": float(result["eval/reward"])}


def interpolate(a: str | Path | Engine, b: str | Path | CausalLM, task: Any, alphas: Sequence[float] | None = None,
                size: int | None = 64, train_size: int = 0, max_tokens: int = 256,
                use_chat_template: bool | None = None, task_options: Mapping[str, Any] | None = None,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                kv_cache_tokens: int | None = ANALYSIS_KV_TOKENS) -> InterpolationResult:
    """Evaluate θ(α) for each α: ``eval/accuracy`` and ``eval/reward`` on the first ``size`` held-out examples
    (all when None), and ``train/accuracy``, ``train/reward`` on ``train_size`` training examples when > 0.

    ``task`` is a Task or a task name (with ``task_options``); an Engine passed as ``a`` gets θ_A back at the end.
    """
    task = _resolve_task(task, task_options)
    alphas = sorted({float(x) for x in (alphas if alphas is not None else alpha_grid())})
    if not alphas:
        raise ValueError("give at least one alpha")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    examples = list(task.eval_examples())[:size] if size is not None else list(task.eval_examples())
    if not examples:
        raise ValueError("the task has no held-out examples")
    train = list(task.train_examples())[:train_size] if train_size > 0 else []
    chat = bool(getattr(task, "use_chat_template", False)) if use_chat_template is None else use_chat_template
    engine = a if isinstance(a, Engine) else Engine.from_pretrained(a, dtype=dtype, device=device,
                                                                    kv_cache_tokens=kv_cache_tokens)
    if engine.tokenizer is None:
        raise ValueError("checkpoint A has no tokenizer; interpolation evaluates text completions")
    other = b if isinstance(b, CausalLM) else load_model(b, dtype=engine.model.dtype, device=engine.device)
    swapper = ParamSwapper(engine.model, other)
    del other
    metrics: dict[str, list[float]] = {}
    try:
        for alpha in alphas:
            swapper.set(alpha)
            point = evaluate_point(engine, task, examples, max_tokens, chat)
            if train:
                point.update(evaluate_point(engine, task, train, max_tokens, chat, prefix="train"))
            for key, value in point.items():
                metrics.setdefault(key, []).append(value)
    finally:
        swapper.restore()
    name_a = engine.model.source_dir if isinstance(a, Engine) else a
    name_b = b.source_dir if isinstance(b, CausalLM) else b
    settings = {"a": str(name_a), "b": str(name_b), "task": getattr(task, "name", type(task).__name__),
                "num_eval": len(examples), "num_train": len(train), "max_tokens": max_tokens,
                "use_chat_template": chat, "dtype": str(engine.model.dtype).replace("torch.", "")}
    return InterpolationResult(alphas, metrics, settings)


__all__ = ["alpha_grid", "interpolate_tensor", "interpolate_params", "barrier", "InterpolationResult",
           "ParamSwapper", "evaluate_point", "interpolate", "ANALYSIS_KV_TOKENS"]
