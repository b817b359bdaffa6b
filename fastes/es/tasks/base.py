"""The Task interface the ES trainer drives, plus helpers shared by the built-in tasks.

A task owns its data (generated from a seed or read from local files; only the
``datasets`` task may fetch a hub dataset, when given a hub name) and its reward.
Rewards follow the TRL convention so that the same function works in TRL's
GRPOTrainer and here: ``reward(completions, prompts,
**columns)`` where every dataset column arrives as a keyword list aligned with
`completions`, returning one float (or None: "does not apply") per completion.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")

__all__ = [
    "Example",
    "Task",
    "collate_columns",
    "completion_text",
    "last_tag_content",
    "seeded_rng",
    "read_jsonl",
    "parse_number",
    "last_number",
    "first_lines",
    "format_prompt",
]


@dataclass
class Example:
    """One prompt with its reference answer; `columns` are passed to the reward as keyword lists.

    By convention `columns` also holds ``answer`` so that answer-matching rewards see it.
    """

    prompt: str
    answer: str
    columns: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class: subclasses set `name` and implement the data methods and `reward`.

    `system_prompt` and `use_chat_template` are hints to whoever turns `Example.prompt`
    into tokens: instruct models want the chat template, a completion-style prompt
    (``"12*34="``) for a base model does not.
    """

    name: str = "task"
    system_prompt: str | None = None
    use_chat_template: bool = False

    def train_examples(self) -> list[Example]:
        raise NotImplementedError

    def eval_examples(self) -> list[Example]:
        raise NotImplementedError

    def reward(self, completions: list[Any], prompts: list[str] | None = None, **columns: Any) -> list[float | None]:
        raise NotImplementedError

    def is_correct(self, completion: str, example: Example) -> bool:
        """Accuracy criterion for eval: by default a full reward (>= 1.0) on this one example."""
        cols = {k: [v] for k, v in example.columns.items() if k not in ("completions", "prompts")}
        score = self.reward([completion], [example.prompt], **cols)[0]
        return score is not None and score >= 1.0

    def columns(self, examples: Sequence[Example]) -> dict[str, list[Any]]:
        """Keyword lists for `reward`, aligned with `examples`."""
        return collate_columns(examples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def collate_columns(examples: Sequence[Example]) -> dict[str, list[Any]]:
    """Turn per-example `columns` dicts into TRL-style keyword lists (missing keys become None)."""
    keys: list[str] = []
    for ex in examples:
        for k in ex.columns:
            if k not in keys and k not in ("completions", "prompts"):
                keys.append(k)
    return {k: [ex.columns.get(k) for ex in examples] for k in keys}


def completion_text(completion: Any) -> str | None:
    """Plain text of a completion; TRL's conversational form (a list of messages) gives the last content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        return content if isinstance(content, str) else None
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[-1])
    text = getattr(completion, "text", None)  # fastes Completion objects
    return text if isinstance(text, str) else None


def last_tag_content(text: str, tag: str = "answer") -> str | None:
    """Content of the last ``<tag>…</tag>`` pair, found with rfind so it is linear even on hostile input."""
    close = f"</{tag}>"
    end = text.rfind(close)
    if end < 0:
        return None
    start = text.rfind(f"<{tag}>", 0, end)
    if start < 0:
        return None
    return text[start + len(tag) + 2 : end]


def seeded_rng(seed: int, salt: str) -> random.Random:
    """A generator that depends only on (seed, salt): stable across runs and Python versions."""
    return random.Random(f"fastes:{salt}:{int(seed)}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local JSONL file; a clear ValueError names the file and line of a bad row."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"dataset file not found: {p}")
    rows: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


_NUMBER = re.compile(r"-?\$?\s?[0-9][0-9,]*(?:\.[0-9]+)?")
_MAX_NUMBER_CHARS = 64


def parse_number(text: str) -> Fraction | None:
    """Exact value of a number as written in answers ("1,234", "$5", "-3.50", "7."); None if not a number."""
    if not isinstance(text, str):
        return None
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not s or len(s) > _MAX_NUMBER_CHARS or not re.fullmatch(r"[-+]?[0-9]+(?:\.[0-9]+)?", s):
        return None
    return Fraction(s)


def last_number(text: str, window: int = 4096) -> Fraction | None:
    """Last number in `text`, searched in the final `window` characters so huge completions stay cheap."""
    if not isinstance(text, str):
        return None
    truncated = len(text) > window
    tail = text[-window:] if truncated else text
    found = None
    for m in _NUMBER.finditer(tail):
        if truncated and m.start() == 0:
            continue  # may be the cut-off end of a longer number
        found = m.group(0)
    return None if found is None else parse_number(found)


def first_lines(rows: Iterable[_T], limit: int | None) -> list[_T]:
    """The first `limit` items (all when None): subsets are deterministic and file-ordered."""
    items = list(rows)
    return items if limit is None else items[: max(0, int(limit))]


def format_prompt(template: str, row: dict[str, Any], where: str) -> str:
    """`template.format(**row)` with a ValueError that names the missing field instead of a bare KeyError."""
    try:
        return template.format(**row)
    except (KeyError, IndexError, ValueError) as exc:
        msg = f"{where}: prompt template {template!r} does not fit the row (fields {sorted(row)}): {exc}"
        raise ValueError(msg) from None
