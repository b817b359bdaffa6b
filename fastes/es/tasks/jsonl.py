"""Any local JSONL dataset: choose the prompt and answer columns and how answers are matched.

Every other column of a row is passed to the reward as a keyword list (TRL
convention), so a custom reward plug-in can use them. Matching modes (1.0 on a
match, else 0.0); the text compared is the content of the last
``<answer>…</answer>`` block when there is one, else the whole completion:

- ``exact``: equal after stripping whitespace (case-insensitive unless `case_sensitive`).
- ``contains``: the answer occurs in the text (same normalization).
- ``numeric``: the text's final number (as in the gsm8k task) equals the answer's
  number within `tolerance` (absolute; 0 means exact rational equality).
"""

from __future__ import annotations

from typing import Any

from fastes.es.tasks.base import (
    Example,
    Task,
    completion_text,
    first_lines,
    format_prompt,
    last_tag_content,
    read_jsonl,
)
from fastes.es.tasks.gsm8k import extract_final_number, reference_number

__all__ = ["JsonlTask", "reward", "MATCHES"]

MATCHES = ("exact", "contains", "numeric")


def _normalize(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


def match_score(
    completion: Any, answer: Any, match: str, case_sensitive: bool = False, tolerance: float = 0.0
) -> float:
    """1.0 if `completion` matches `answer` under `match`, else 0.0."""
    text = completion_text(completion)
    if text is None or answer is None:
        return 0.0
    if match == "numeric":
        got = extract_final_number(text)
        want = reference_number(answer) if isinstance(answer, (str, int, float)) else None
        if got is None or want is None:
            return 0.0
        return 1.0 if abs(got - want) <= tolerance else 0.0
    inner = last_tag_content(text, "answer")
    got_text = _normalize(inner if inner is not None else text, case_sensitive)
    want_text = _normalize(str(answer), case_sensitive)
    if match == "exact":
        return 1.0 if got_text == want_text else 0.0
    if match == "contains":
        return 1.0 if want_text and want_text in got_text else 0.0
    raise ValueError(f"jsonl: match must be one of {MATCHES}, got {match!r}")


def reward(
    completions: list[Any],
    prompts: list[str] | None = None,
    *,
    answer: list[Any],
    match: str = "exact",
    case_sensitive: bool = False,
    tolerance: float = 0.0,
    **_: Any,
) -> list[float]:
    """TRL-style reward comparing each completion with its `answer` column (see the module docstring)."""
    if match not in MATCHES:
        raise ValueError(f"jsonl: match must be one of {MATCHES}, got {match!r}")
    if len(answer) != len(completions):
        raise ValueError("jsonl.reward: answer must be aligned with completions")
    return [match_score(c, a, match, case_sensitive, tolerance) for c, a in zip(completions, answer, strict=True)]


class JsonlTask(Task):
    """A local JSONL dataset with configurable columns, prompt template and matching rule."""

    name = "jsonl"

    def __init__(
        self,
        train_path: str | None = None,
        eval_path: str | None = None,
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        template: str | None = None,
        match: str = "exact",
        case_sensitive: bool = False,
        tolerance: float = 0.0,
        num_train: int | None = None,
        num_eval: int | None = None,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
    ) -> None:
        if train_path is None and eval_path is None:
            raise ValueError("jsonl: give train_path and/or eval_path (local JSONL files)")
        if match not in MATCHES:
            raise ValueError(f"jsonl: match must be one of {MATCHES}, got {match!r}")
        self.train_path, self.eval_path = train_path, eval_path
        self.prompt_column, self.answer_column, self.template = prompt_column, answer_column, template
        self.match, self.case_sensitive, self.tolerance = match, case_sensitive, float(tolerance)
        self.num_train, self.num_eval = num_train, num_eval
        self.system_prompt, self.use_chat_template = system_prompt, use_chat_template
        self._cache: dict[str, list[Example]] = {}

    def _read(self, path: str | None, limit: int | None) -> list[Example]:
        if path is None:
            return []
        if path not in self._cache:
            examples = []
            for i, row in enumerate(read_jsonl(path), 1):
                where = f"{path}: row {i}"
                if self.answer_column not in row:
                    raise ValueError(f"{where}: no answer column {self.answer_column!r}")
                if self.template is not None:
                    prompt = format_prompt(self.template, row, where)
                elif self.prompt_column in row:
                    prompt = str(row[self.prompt_column])
                else:
                    raise ValueError(f"{where}: no prompt column {self.prompt_column!r}")
                if self.match == "numeric" and reference_number(row[self.answer_column]) is None:
                    raise ValueError(f"{where}: answer {row[self.answer_column]!r} is not a number")
                skip = (self.prompt_column, self.answer_column, "completions", "prompts")
                columns = {k: v for k, v in row.items() if k not in skip}
                columns["answer"] = row[self.answer_column]
                examples.append(Example(prompt, str(row[self.answer_column]), columns))
            self._cache[path] = examples
        return first_lines(self._cache[path], limit)

    def train_examples(self) -> list[Example]:
        return self._read(self.train_path, self.num_train)

    def eval_examples(self) -> list[Example]:
        return self._read(self.eval_path, self.num_eval)

    def reward(self, completions: list[Any], prompts: list[str] | None = None, **columns: Any) -> list[float]:
        columns.setdefault("match", self.match)
        columns.setdefault("case_sensitive", self.case_sensitive)
        columns.setdefault("tolerance", self.tolerance)
        return reward(completions, prompts, **columns)
