"""GSM8K from local JSONL files (``{"question": ..., "answer": "... #### 72"}`` per line).

Nothing is downloaded: point `train_path` / `eval_path` at copies of the official
files. Reward: 1.0 if the completion's final number equals the reference number
exactly (rational comparison: ``72``, ``72.0``, ``$72`` and ``72.`` all match
``72``; ``1,234`` reads as 1234), else 0.0. The completion's final number is, in
order of preference: the last number inside the last ``<answer>…</answer>``
block; the first number after the last ``####``; the number in the last
``\\boxed{…}``; the last number in the completion.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from fastes.es.tasks.base import (
    Example,
    Task,
    completion_text,
    first_lines,
    format_prompt,
    last_number,
    last_tag_content,
    parse_number,
    read_jsonl,
)

__all__ = ["GSM8KTask", "reward", "extract_final_number", "reference_number"]

PROMPT_TEMPLATE = "{question}\nSolve the problem step by step, then write the final numeric answer after '####'."
_FIRST_NUMBER = re.compile(r"-?\$?\s?[0-9][0-9,]*(?:\.[0-9]+)?")


def extract_final_number(text: str | None) -> Fraction | None:
    """The number a completion commits to (see the module docstring for the order of preference)."""
    if not isinstance(text, str):
        return None
    inner = last_tag_content(text, "answer")
    if inner is not None:
        return last_number(inner)
    hashes = text.rfind("####")
    if hashes >= 0:
        m = _FIRST_NUMBER.search(text, hashes + 4, hashes + 4 + 256)
        return None if m is None else parse_number(m.group(0))
    boxed = text.rfind("\\boxed{")
    if boxed >= 0:
        close = text.find("}", boxed, boxed + 256)
        if close >= 0:
            return last_number(text[boxed + 7 : close])
    return last_number(text)


def reference_number(answer: Any) -> Fraction | None:
    """The reference value: the number after ``####`` in a GSM8K answer, or the answer itself if numeric."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return Fraction(str(answer))
    if not isinstance(answer, str):
        return None
    if "####" in answer:
        return parse_number(answer.rsplit("####", 1)[1])
    return parse_number(answer)


def reward(completions: list[Any], prompts: list[str] | None = None, *, answer: list[Any], **_: Any) -> list[float]:
    """TRL-style GSM8K reward: 1.0 when the final number matches the reference, else 0.0."""
    if len(answer) != len(completions):
        raise ValueError("gsm8k.reward: answer must be aligned with completions")
    out = []
    for completion, ref in zip(completions, answer, strict=True):
        want = reference_number(ref)
        got = extract_final_number(completion_text(completion))
        out.append(1.0 if want is not None and got is not None and got == want else 0.0)
    return out


def _load(path: str | Path, template: str, question_key: str, answer_key: str) -> list[Example]:
    examples = []
    for i, row in enumerate(read_jsonl(path), 1):
        if question_key not in row or answer_key not in row:
            raise ValueError(f"{path}: row {i} lacks {question_key!r} or {answer_key!r}")
        value = reference_number(row[answer_key])
        if value is None:
            raise ValueError(f"{path}: row {i}: no final number in answer {str(row[answer_key])[-60:]!r}")
        final = str(value.numerator) if value.denominator == 1 else str(float(value))
        columns = {k: v for k, v in row.items() if k not in (answer_key, "completions", "prompts")}
        columns["answer"] = final
        columns["solution"] = row[answer_key]
        prompt = format_prompt(template, {**row, "question": row[question_key]}, f"{path}: row {i}")
        examples.append(Example(prompt, final, columns))
    return examples


class GSM8KTask(Task):
    """GSM8K read from local files. Without `eval_path`, `num_eval` rows are held out from the end of the train file."""

    name = "gsm8k"

    def __init__(
        self,
        train_path: str | None = None,
        eval_path: str | None = None,
        num_train: int | None = None,
        num_eval: int | None = None,
        template: str = PROMPT_TEMPLATE,
        question_key: str = "question",
        answer_key: str = "answer",
        system_prompt: str | None = None,
        use_chat_template: bool = True,
    ) -> None:
        if train_path is None and eval_path is None:
            raise ValueError("gsm8k: give train_path and/or eval_path (local JSONL files; nothing is downloaded)")
        self.train_path, self.eval_path = train_path, eval_path
        self.num_train, self.num_eval = num_train, num_eval
        self.template, self.question_key, self.answer_key = template, question_key, answer_key
        self.system_prompt, self.use_chat_template = system_prompt, use_chat_template
        self._splits: tuple[list[Example], list[Example]] | None = None

    def _build(self) -> tuple[list[Example], list[Example]]:
        if self._splits is None:
            train = self._read(self.train_path) if self.train_path else []
            if self.eval_path:
                evals = first_lines(self._read(self.eval_path), self.num_eval)
            elif self.num_eval:
                held = min(self.num_eval, len(train))
                train, evals = train[: len(train) - held], train[len(train) - held :]
            else:
                evals = []
            self._splits = first_lines(train, self.num_train), evals
        return self._splits

    def _read(self, path: str) -> list[Example]:
        return _load(path, self.template, self.question_key, self.answer_key)

    def train_examples(self) -> list[Example]:
        return list(self._build()[0])

    def eval_examples(self) -> list[Example]:
        return list(self._build()[1])

    def reward(self, completions: list[Any], prompts: list[str] | None = None, **columns: Any) -> list[float]:
        return reward(completions, prompts, **columns)
