"""The value rules of TrainConfig: (key, check, what it must be), one row per key, checked in order.

A check receives the value and the whole config (for rules between keys); a failing row is the
one-line ValueError ``<key> must be <what>, got <value>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

MODES = ("lowrank", "full", "lora")
NOISE_KINDS = ("gaussian", "rademacher")
SHAPINGS = ("zscore", "centered_rank", "group_global", "sign", "raw")
OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[Any, Any], bool], str]:
    return (lambda v, _c: v in choices), "one of " + ", ".join(choices)


_AT_LEAST_0 = (lambda v, _c: v >= 0), ">= 0"
_AT_LEAST_1 = (lambda v, _c: v >= 1), ">= 1"
_POSITIVE = (lambda v, _c: v > 0), "> 0"
_NONE_OR_1 = (lambda v, _c: v is None or v >= 1), ">= 1 or null"
_UNIT = (lambda v, _c: 0 <= v < 1), "in [0, 1)"
RULES: list[tuple[str, Callable[[Any, Any], bool], str]] = [
    ("dtype", *_one_of(DTYPES)),
    ("device", lambda v, _c: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu or cuda[:N]"),
    ("cuda_graphs", lambda v, c: v is not True or c.device != "cpu", "false or null on device cpu"),
    ("seed", lambda v, _c: 0 <= v < 2**64, "in [0, 2**64)"),
    ("steps", *_AT_LEAST_0), ("eval_every", *_AT_LEAST_0), ("eval_size", *_AT_LEAST_0),
    ("save_every", *_AT_LEAST_0), ("max_failed_steps", *_AT_LEAST_1), ("checkpoint.keep_last", *_AT_LEAST_0),
    ("prompts_per_step", *_AT_LEAST_1), ("samples_per_prompt", *_AT_LEAST_1),
    ("kv_cache_tokens", *_NONE_OR_1), ("max_num_batched_tokens", *_NONE_OR_1), ("max_num_seqs", *_NONE_OR_1),
    ("population.size", *_AT_LEAST_1),
    ("population.size", lambda v, c: not (c.population.antithetic and v % 2), "even with antithetic sampling"),
    ("population.mode", *_one_of(MODES)), ("population.noise", *_one_of(NOISE_KINDS)),
    ("population.sigma_schedule", *_one_of(SCHEDULES)), ("population.rank", *_AT_LEAST_1),
    ("population.noise_reuse", *_AT_LEAST_1),
    ("population.sigma", *_POSITIVE), ("population.sigma_final", lambda v, _c: v is None or v > 0, "> 0 or null"),
    ("lora.rank", *_AT_LEAST_1), ("lora.targets", lambda v, _c: bool(v), "a non-empty list"),
    ("lora.alpha", lambda v, _c: v is None or v > 0, "> 0 or null"),
    ("lora.init_from", lambda v, c: v is None or c.population.mode == "lora", "null unless population.mode is lora"),
    ("fitness.shaping", *_one_of(SHAPINGS)),
    ("fitness.pass_at_k", lambda v, c: v is None or 1 <= v <= c.samples_per_prompt,
     "null or in [1, samples_per_prompt]"),
    ("fitness.member_fitness", lambda v, _c: v is None or ":" in v, "'module:function' or null"),
    ("fitness.group_size", lambda v, c: v is None or (v >= 1 and c.population.size % v == 0
                                                      and not (c.population.antithetic and v % 2)),
     "null or an (even, with antithetic sampling) divisor of population.size"),
    ("optim.name", *_one_of(OPTIMIZERS)), ("optim.schedule", *_one_of(SCHEDULES)), ("optim.lr", *_POSITIVE),
    ("optim.min_lr", *_AT_LEAST_0), ("optim.warmup_steps", *_AT_LEAST_0), ("optim.momentum", *_UNIT),
    ("optim.betas", lambda v, _c: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("optim.eps", *_POSITIVE), ("optim.weight_decay", *_AT_LEAST_0),
    ("optim.decay_to", *_one_of(("zero", "start"))),
    ("reward_timeout_s", *_AT_LEAST_0), ("evaluation.log_completions_every", *_AT_LEAST_0),
    ("evaluation.log_completions", *_AT_LEAST_0),
    ("report_to", lambda v, _c: all(str(n).lower() in ("jsonl", "tensorboard", "wandb", "none") for n in v),
     "a list of jsonl, tensorboard, wandb (or none)"),
    ("distributed.check_every", *_AT_LEAST_0), ("distributed.timeout_s", *_POSITIVE),
]


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
