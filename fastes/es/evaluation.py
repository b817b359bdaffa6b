"""Held-out evaluation of the unperturbed model, and the prompt encoding that rollouts share with it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

RewardPairs = list[tuple[Callable[..., Any], float]]


def encode_prompts(engine: Any, task: Any, examples: Sequence[Any], use_chat_template: bool) -> list[list[int]]:
    """Token ids of each example's prompt; the chat template carries the task's system prompt, if any."""
    tok = engine.tokenizer
    if not use_chat_template:
        return [tok.encode(e.prompt) for e in examples]
    system = getattr(task, "system_prompt", None)
    return [tok.encode_chat(e.prompt, system=system) for e in examples]


def evaluate(engine: Any, task: Any, examples: list[Any], rewards: RewardPairs, sampling: Any,
             use_chat_template: bool = False) -> dict[str, Any]:
    """Generate once per example with the unperturbed model; eval/accuracy (task.is_correct) and eval/reward."""
    from fastes.es.rewards import score_completions
    from fastes.es.tasks.base import collate_columns

    t0 = time.perf_counter()
    prompts = [e.prompt for e in examples]
    outs = engine.generate(encode_prompts(engine, task, examples, use_chat_template), sampling=sampling)
    texts = [outs[0][i][0].text for i in range(len(prompts))]
    correct = [bool(task.is_correct(t, e)) for t, e in zip(texts, examples, strict=True)]
    scores, stats = score_completions(rewards, texts, prompts, collate_columns(examples))
    return {"eval/accuracy": sum(correct) / len(correct), "eval/reward": sum(scores) / len(scores),
            "eval/errors": stats.get("reward/errors", 0.0), "eval/time_s": time.perf_counter() - t0}


__all__ = ["RewardPairs", "encode_prompts", "evaluate"]
