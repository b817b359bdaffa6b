"""Held-out evaluation of the unperturbed model: named eval sets, greedy or sampled with pass@k, saved outputs.

A run evaluates one or more named sets (``evaluation.sets`` in the config). Each set
is an example list (the run's task or its own task, its eval or train split) decoded
greedily (``samples: 1``, the default) or sampled ``samples`` times per prompt, and
reports ``accuracy`` (mean `task.is_correct` over completions), ``reward`` (mean
combined reward), ``pass@k`` for each requested k (the unbiased estimator,
`fastes.es.fitness.pass_at_k`, averaged over prompts), ``errors`` and ``time_s``,
under ``eval/<name>/…``. The first set is the primary one: its metrics are also
logged as ``eval/accuracy`` etc., which the progress line, curves and best-checkpoint
choice read. Every completion of an evaluation is one row of
``<run>/evals/<name>/step-<step>.jsonl`` (prompt, completion, reward, correct, answer).
Metrics are computed from the rows, so a multi-process run gathers rows and sums once.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RewardPairs = list[tuple[Callable[..., Any], float]]
EVALS_DIR = "evals"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_KEYS = {"name", "task", "task_options", "split", "size", "samples", "temperature", "top_p", "pass_k", "max_tokens",
         "use_chat_template"}


@dataclass
class EvalSpec:
    """One named eval set as configured (validated by `parse_eval_sets`)."""

    name: str
    task: str | None = None  # None: the run's task (and its rewards)
    task_options: dict[str, Any] = field(default_factory=dict)
    split: str = "eval"
    size: int | None = None  # None: the run's eval_size
    samples: int = 1
    temperature: float | None = None  # None: 0 (greedy) for one sample, the training temperature for several
    top_p: float | None = None
    pass_k: list[int] = field(default_factory=list)  # empty: [1], plus `samples` when sampling
    max_tokens: int | None = None
    use_chat_template: bool | None = None

    @property
    def ks(self) -> list[int]:
        return sorted(set(self.pass_k or ([1] if self.samples == 1 else [1, self.samples])))


def parse_eval_sets(sets: Sequence[Any]) -> list[EvalSpec]:
    """`EvalSpec`s from config mappings; one-line ValueErrors naming the set and key. Empty: one set "eval"."""
    if not sets:
        return [EvalSpec("eval")]
    out: list[EvalSpec] = []
    for i, raw in enumerate(sets):
        where = f"evaluation.sets[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must be a mapping with at least a name, got {raw!r}")
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(_KEYS)})")
        spec = EvalSpec(**raw)
        if not isinstance(spec.name, str) or not _NAME.match(spec.name):
            raise ValueError(f"{where}.name must be letters, digits, _ . or -, got {spec.name!r}")
        if spec.split not in ("eval", "train"):
            raise ValueError(f"{where}.split must be eval or train, got {spec.split!r}")
        if not isinstance(spec.samples, int) or spec.samples < 1:
            raise ValueError(f"{where}.samples must be an integer >= 1, got {spec.samples!r}")
        if spec.size is not None and (not isinstance(spec.size, int) or spec.size < 0):
            raise ValueError(f"{where}.size must be an integer >= 0 or null, got {spec.size!r}")
        if not isinstance(spec.pass_k, list) or any(not isinstance(k, int) or not 1 <= k <= spec.samples
                                                    for k in spec.pass_k):
            raise ValueError(f"{where}.pass_k must list integers in [1, samples={spec.samples}], got {spec.pass_k!r}")
        if not isinstance(spec.task_options, dict):
            raise ValueError(f"{where}.task_options must be a mapping")
        out.append(spec)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluation.sets: names must be unique, got {names}")
    return out


def sampling_for(spec: EvalSpec, config: Any, seed: int) -> Any:
    """The SamplingParams of an eval set: greedy for one sample unless a temperature is given."""
    from fastes.engine.sampling import SamplingParams

    s = config.sampling
    temperature = spec.temperature if spec.temperature is not None else (0.0 if spec.samples == 1 else s.temperature)
    top_p = spec.top_p if spec.top_p is not None else s.top_p
    shape = {"temperature": 0.0} if temperature == 0 else {"temperature": temperature, "top_p": top_p,
                                                           "top_k": s.top_k, "min_p": s.min_p}
    max_tokens = spec.max_tokens or s.max_tokens
    policy = {**s.policy(), "min_tokens": min(s.min_tokens, max_tokens)}  # penalties: the trained policy's
    return SamplingParams(max_tokens=max_tokens, stop=tuple(s.stop), ignore_eos=s.ignore_eos, seed=seed, **shape,
                          **policy)


def _is_messages(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def encode_prompts(engine: Any, task: Any, examples: Sequence[Any], use_chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt: chat messages always through the chat template, strings when asked.

    The task's system prompt is added unless the messages already start with one.
    """
    tok = engine.tokenizer
    system = getattr(task, "system_prompt", None)
    out = []
    for e in examples:
        if _is_messages(e.prompt):
            has_system = bool(e.prompt) and e.prompt[0].get("role") == "system"
            out.append(tok.encode_chat(e.prompt, system=None if has_system else system))
        elif use_chat_template:
            out.append(tok.encode_chat(e.prompt, system=system))
        else:
            out.append(tok.encode(e.prompt))
    return out


def generate_rows(engine: Any, task: Any, examples: Sequence[tuple[int, Any]], rewards: RewardPairs, sampling: Any,
                  samples: int, use_chat_template: bool, **reward_options: Any
                  ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One row per completion of the unperturbed model on ``(index, example)`` pairs, and the reward stats."""
    from fastes.es.rewards import score_completions
    from fastes.es.tasks.base import collate_columns

    if not examples:
        return [], {}
    items = [e for _, e in examples]
    outs = engine.generate(encode_prompts(engine, task, items, use_chat_template), sampling=sampling,
                           samples_per_prompt=samples)
    completions = [(i, s, outs[0][j][s]) for j, (i, _) in enumerate(examples) for s in range(samples)]
    flat = [items[j] for j in range(len(items)) for _ in range(samples)]
    texts = [c.text for _, _, c in completions]
    scores, stats = score_completions(rewards, texts, [e.prompt for e in flat], collate_columns(flat),
                                  completion_ids=[c.token_ids for _, _, c in completions], **reward_options)
    rows = []
    for (index, sample, completion), example, score in zip(completions, flat, scores, strict=True):
        rows.append({"index": index, "sample": sample, "prompt": example.prompt, "completion": completion.text,
                     "reward": score, "correct": bool(task.is_correct(completion.text, example)),
                     "answer": example.answer, "tokens": len(completion.token_ids),
                     "finish_reason": completion.finish_reason})
    return rows, stats


def summarize(rows: Sequence[dict[str, Any]], ks: Sequence[int], samples: int) -> dict[str, float]:
    """accuracy, reward, pass@k (unbiased, mean over prompts), errors from a set's rows."""
    from fastes.es.fitness import pass_at_k

    if not rows:
        return {}
    per_prompt: dict[int, list[bool]] = {}
    for r in rows:
        per_prompt.setdefault(r["index"], []).append(bool(r["correct"]))
    out = {"accuracy": sum(r["correct"] for r in rows) / len(rows),
           "reward": sum(r["reward"] for r in rows) / len(rows),
           "tokens_mean": sum(r["tokens"] for r in rows) / len(rows)}
    for k in ks:
        vals = [pass_at_k(len(c), sum(c), k) for c in per_prompt.values() if len(c) >= k]
        if vals:
            out[f"pass@{k}"] = sum(vals) / len(vals)
    return out


def write_rows(run_dir: str | Path, name: str, step: int, rows: Sequence[dict[str, Any]]) -> Path:
    """``<run>/evals/<name>/step-<step>.jsonl``, rows sorted by (index, sample); replaced atomically."""
    folder = Path(run_dir) / EVALS_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    ordered = sorted(rows, key=lambda r: (r["index"], r["sample"]))
    tmp.write_text("".join(json.dumps({"step": step, "set": name, **r}) + "\n" for r in ordered), encoding="utf-8")
    tmp.replace(path)
    return path


def metric_keys(name: str, metrics: dict[str, float], primary: bool) -> dict[str, float]:
    """``eval/<name>/<metric>``, plus ``eval/<metric>`` for the primary set (a set named "eval" logs only that)."""
    out = {} if name == "eval" else {f"eval/{name}/{k}": v for k, v in metrics.items()}
    if primary or name == "eval":
        out.update({f"eval/{k}": v for k, v in metrics.items()})
    return out


def sample_completions(prompts: Sequence[Any], texts: Sequence[str], scores: Sequence[float], count: int,
                       max_chars: int = 2000) -> list[dict[str, Any]]:
    """The first `count` rollouts as {prompt, completion, reward}, for metrics.jsonl and the console."""
    def cut(x: Any) -> Any:
        return x[:max_chars] if isinstance(x, str) else x
    return [{"prompt": cut(p), "completion": cut(t), "reward": float(s)}
            for p, t, s in list(zip(prompts, texts, scores, strict=True))[: max(0, count)]]


def evaluate(engine: Any, task: Any, examples: list[Any], rewards: RewardPairs, sampling: Any,
             use_chat_template: bool = False) -> dict[str, Any]:
    """Greedy evaluation of one example list: eval/accuracy, eval/reward, eval/errors, eval/time_s (the API of old)."""
    t0 = time.perf_counter()
    rows, stats = generate_rows(engine, task, list(enumerate(examples)), rewards, sampling, 1, use_chat_template)
    metrics = summarize(rows, [], 1)
    return {"eval/accuracy": metrics["accuracy"], "eval/reward": metrics["reward"],
            "eval/errors": stats.get("reward/errors", 0.0), "eval/time_s": time.perf_counter() - t0}


@dataclass
class EvalSet:
    """A named eval set, resolved: its task, examples, rewards and prompt rendering."""

    spec: EvalSpec
    task: Any
    examples: list[Any]
    rewards: RewardPairs
    use_chat: bool


def build_eval_sets(config: Any, task: Any, rewards: RewardPairs, use_chat: bool) -> list[EvalSet]:
    """The config's eval sets; a set without ``task`` uses the run's task, rewards and chat setting."""
    from fastes.es.runtime import resolve_task

    out = []
    for spec in parse_eval_sets(config.evaluation.sets):
        if spec.task is None:
            if spec.task_options:
                raise ValueError(f"evaluation set {spec.name!r}: task_options need a task")
            set_task, set_rewards, chat = task, rewards, use_chat
        else:
            set_task = resolve_task(spec.task, spec.task_options)
            set_rewards, chat = [(set_task.reward, 1.0)], bool(getattr(set_task, "use_chat_template", False))
        if spec.use_chat_template is not None:
            chat = spec.use_chat_template
        size = config.eval_size if spec.size is None else spec.size
        examples = set_task.eval_examples() if spec.split == "eval" else set_task.train_examples()
        out.append(EvalSet(spec, set_task, list(examples)[:size] if size else [], set_rewards, chat))
    return out


def run_eval_sets(engine: Any, sets: Sequence[EvalSet], step: int, config: Any, *, dist: Any = None,
                  run_dir: str | Path | None = None, rows_out: dict[str, list[dict[str, Any]]] | None = None,
                  **reward_options: Any) -> dict[str, Any]:
    """Evaluate every set with the unperturbed weights; metrics per set, rows written under `run_dir` if given
    (and kept in `rows_out[name]`, for `fastes eval --out`).

    With `dist`, each rank generates its shard and the rows are gathered, so every rank
    returns the same metrics. Sampled sets draw from a stream fixed per set name, so the
    evaluations of one run differ only by the weights.
    """
    from fastes.es.runtime import derive_seed

    record: dict[str, Any] = {}
    for i, es in enumerate(sets):
        if not es.examples:
            continue
        t0 = time.perf_counter()
        pairs = list(enumerate(es.examples))
        mine = dist.shard(pairs) if dist is not None else pairs
        sampling = sampling_for(es.spec, config, derive_seed(config.seed, 0, f"eval/{es.spec.name}"))
        rows, stats = generate_rows(engine, es.task, mine, es.rewards, sampling, es.spec.samples, es.use_chat,
                                    **reward_options)
        errors = stats.get("reward/errors", 0.0)
        if dist is not None:
            parts = dist.gather_objects(f"all-gather of eval set {es.spec.name}", (rows, errors))
            rows = [r for part, _ in parts for r in part]
            errors = sum(e for _, e in parts)
        metrics = summarize(rows, es.spec.ks, es.spec.samples)
        metrics.update(errors=errors, time_s=time.perf_counter() - t0)
        record.update(metric_keys(es.spec.name, metrics, primary=i == 0))
        if run_dir is not None:
            write_rows(run_dir, es.spec.name, step, rows)
        if rows_out is not None:
            rows_out[es.spec.name] = rows
    return record


__all__ = ["RewardPairs", "EvalSpec", "EvalSet", "build_eval_sets", "run_eval_sets", "parse_eval_sets",
           "sampling_for", "encode_prompts", "generate_rows", "summarize", "write_rows", "metric_keys",
           "sample_completions", "evaluate", "EVALS_DIR"]
