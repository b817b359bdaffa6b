"""Countdown exactly as the ES-at-Scale, Propagate and EGGROLL-vLLM runs set it up: one ``countdown.json``.

That file is a JSON list of ``{id, context, numbers, target, solution}`` objects:
``context`` is the full raw prompt (no chat template is applied), ending with an
opened ``<think>`` tag; ``target`` is a string. The first 200 rows train, the rest
(2,000 in their file) evaluate; decoding is greedy with up to 1024 new tokens. Their
accuracies (e.g. Qwen2.5-1.5B-Instruct after ES) are comparable only on this setup,
which is why it exists beside fastes' own generated Countdown (`countdown.py`).

Reward = 0.1 · format + answer, both scored on ``"<think>" + completion`` (the prompt
opened the think block):

- format 1.0 when the whole text is one think block, a newline and one answer block
  (it starts with ``<think>``, ends with ``</answer>`` and holds ``</think>\\n<answer>``;
  as with a ``$`` anchor, one trailing newline is allowed); otherwise 0.1 if a closed
  think block appears, plus 0.5 if a closed answer block appears.
- answer 1.0 when the last ``<answer>…</answer>`` holds only digits, ``+ - * / ( )``
  and spaces, its digit runs are the given numbers as a multiset, and its value is
  within 1e-5 of the target. The value comes from `fastes.es.safe_math`, never from
  ``eval``. Where Python's ``eval`` (which they use) differs, this module follows
  Python: ``**`` is a power, a literal with a leading zero such as ``05`` is a syntax
  error (0). One difference remains: ``//`` (floor division) scores 0 here.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from fastes.es.safe_math import Limits, parse
from fastes.es.tasks.base import Example, Task, completion_text

__all__ = ["CountdownPeersTask", "reward", "format_score", "answer_score", "read_countdown_json", "NUM_TRAIN"]

NUM_TRAIN = 200  # their split: rows [0, 200) train, the rest evaluate
FORMAT_WEIGHT = 0.1
TOLERANCE = 1e-5
_LIMITS = Limits(max_length=4096, max_depth=64, max_digits=24, allow_decimals=False, allow_power=True)
_ALLOWED = re.compile(r"[0-9+\-*/() ]+\n?")
_CLOSED_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_CLOSED_ANSWER = re.compile(r"<answer>.*?</answer>", re.DOTALL)
_LEADING_ZERO = re.compile(r"(?<![0-9])0+[1-9]")


def format_score(text: str) -> float:
    """Format part of the reward for ``"<think>" + completion`` (see the module docstring)."""
    body = text[:-1] if text.endswith("\n") else text
    if body.startswith("<think>") and body.endswith("</answer>") and "</think>\n<answer>" in body:
        return 1.0
    return (0.1 if _CLOSED_THINK.search(text) else 0.0) + (0.5 if _CLOSED_ANSWER.search(text) else 0.0)


def answer_score(text: str, numbers: list[int], target: str | int | float) -> float:
    """1.0 when the last answer block is an allowed expression of exactly `numbers` equal to `target`, else 0.0."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    if start < 0:
        return 0.0
    content = text[start + len("<answer>") : end]
    if not _ALLOWED.fullmatch(content) or _LEADING_ZERO.search(content):
        return 0.0
    try:
        if sorted(int(d) for d in re.findall(r"[0-9]+", content)) != sorted(int(n) for n in numbers):
            return 0.0
        goal = Fraction(str(target).strip())
    except (TypeError, ValueError):
        return 0.0
    parsed = parse(content, _LIMITS)
    if parsed is None or parsed.value is None:
        return 0.0
    return 1.0 if abs(parsed.value - goal) < TOLERANCE else 0.0


def reward(
    completions: list[Any],
    prompts: list[Any] | None = None,
    *,
    numbers: list[list[int]],
    target: list[str],
    **_: Any,
) -> list[float]:
    """TRL-style reward of the peers' Countdown: 0.1 · format + answer on ``"<think>" + completion``."""
    if len(numbers) != len(completions) or len(target) != len(completions):
        raise ValueError("countdown (peers) reward: numbers and target must be aligned with completions")
    out = []
    for completion, nums, tgt in zip(completions, numbers, target, strict=True):
        text = "<think>" + (completion_text(completion) or "")
        out.append(FORMAT_WEIGHT * format_score(text) + answer_score(text, nums, tgt))
    return out


def read_countdown_json(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a countdown.json, checked for the fields and types the task needs (one-line errors)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"countdown data_file {str(p)!r} not found")
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{p}: expected a JSON list of {{id, context, numbers, target, solution}} objects")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"context", "numbers", "target"} <= set(row):
            raise ValueError(f"{p}: row {i} lacks context, numbers or target")
        if not isinstance(row["context"], str) or not isinstance(row["numbers"], list):
            raise ValueError(f"{p}: row {i}: context must be a string and numbers a list")
    return rows


class CountdownPeersTask(Task):
    """The peers' countdown.json: raw prompts, rows [0, num_train) train and the rest evaluate."""

    name = "countdown"
    use_chat_template = False
    system_prompt = None

    def __init__(self, data_file: str, num_train: int = NUM_TRAIN, num_eval: int | None = None) -> None:
        if num_train < 0 or (num_eval is not None and num_eval < 0):
            raise ValueError("countdown: num_train and num_eval must be >= 0")
        self.data_file, self.num_train, self.num_eval = str(data_file), int(num_train), num_eval
        self._rows = read_countdown_json(self.data_file)
        if len(self._rows) <= self.num_train:
            raise ValueError(f"countdown: {self.data_file} has {len(self._rows)} rows, none left to evaluate "
                             f"after num_train={self.num_train}")

    def _examples(self, rows: list[dict[str, Any]]) -> list[Example]:
        out = []
        for row in rows:
            solution = str(row.get("solution", ""))
            columns = {"numbers": [int(n) for n in row["numbers"]], "target": str(row["target"]),
                       "answer": solution, "id": row.get("id")}
            out.append(Example(row["context"], solution, columns))
        return out

    def train_examples(self) -> list[Example]:
        return self._examples(self._rows[: self.num_train])

    def eval_examples(self) -> list[Example]:
        rest = self._rows[self.num_train :]
        return self._examples(rest if self.num_eval is None else rest[: self.num_eval])

    def reward(self, completions: list[Any], prompts: list[Any] | None = None, **columns: Any) -> list[float]:
        return reward(completions, prompts, **columns)

    def is_correct(self, completion: str, example: Example) -> bool:
        """Accuracy as they report it: the answer part is 1 (format does not count)."""
        text = "<think>" + (completion_text(completion) or "")
        return answer_score(text, example.columns["numbers"], example.columns["target"]) == 1.0
