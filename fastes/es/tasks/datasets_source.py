"""Any dataset the `datasets` library reads: local json/jsonl, parquet, csv, arrow files, folders, hub names.

``path`` is a file (its builder chosen by extension), a ``save_to_disk`` folder
(``load_from_disk``), a folder of data files (``load_dataset(folder)``), or a hub
name (``load_dataset(name)``; where no hub is reachable this fails with one line).
A split is a name with an optional slice, ``train`` or ``train[:200]`` or
``test[50:]``. A single file loads as split ``train``.

Prompts come from ``prompt_column`` (a string, or TRL's conversational form: a list
of ``{"role", "content"}`` messages), a ``template`` over the row's fields, or
``messages_column`` (a conversation whose trailing assistant turn, if any, is
dropped from the prompt and used as the answer when there is no answer column).
Message prompts are always rendered with the model's chat template; string prompts
when ``use_chat_template``. Every other column reaches the reward as a keyword list
(TRL convention); the default reward matches ``answer_column`` like the jsonl task.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastes.es.tasks.base import Example, Task, format_prompt
from fastes.es.tasks.jsonl import MATCHES, reward

__all__ = ["DatasetsTask", "load_split", "reward", "BUILDERS"]

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
_SPLIT = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[(-?\d*):(-?\d*)\])?$")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_all(path: str) -> Any:
    """A DatasetDict (or a Dataset, for a ``save_to_disk`` of one split) for `path`."""
    try:
        import datasets
    except ImportError:
        raise ValueError("task datasets needs the `datasets` package: pip install datasets") from None
    datasets.disable_progress_bars()
    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(f"dataset file {path!r}: unknown extension (use one of {', '.join(BUILDERS)})")
            options = {"delimiter": "\t"} if local.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(builder, data_files=str(local), **options)
        if local.is_dir():
            if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                return datasets.load_from_disk(str(local))
            return datasets.load_dataset(str(local))
        if path.startswith((".", "/", "~")) or local.suffix.lower() in BUILDERS:
            raise ValueError(f"dataset {path!r} not found")
        return datasets.load_dataset(path)
    except ValueError as exc:
        if str(exc).startswith("dataset"):
            raise
        raise ValueError(f"cannot load dataset {path!r}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - hub, network and format errors alike become one line
        where = "" if local.exists() else " (not a local path; from the hub, which may be unreachable)"
        raise ValueError(f"cannot load dataset {path!r}{where}: {_first_line(exc)}") from None


def load_split(path: str, split: str) -> list[dict[str, Any]]:
    """Rows of ``split`` (``name`` or ``name[a:b]``) of the dataset at `path`, as plain dicts."""
    match = _SPLIT.match(split.strip())
    if match is None:
        raise ValueError(f"split {split!r}: expected a name or name[start:stop], e.g. train[:200]")
    name, start, stop = match.groups()
    data = _load_all(path)
    if hasattr(data, "keys"):  # DatasetDict
        if name not in data:
            raise ValueError(f"dataset {path!r} has no split {name!r}; it has {sorted(data.keys())}")
        data = data[name]
    elif name != "train":
        raise ValueError(f"dataset {path!r} is a single split: use split 'train', not {name!r}")
    rows = [dict(r) for r in data]
    return rows[slice(int(start) if start else None, int(stop) if stop else None)]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


class DatasetsTask(Task):
    """Train and eval sets from the `datasets` library; see the module docstring for the options."""

    name = "datasets"

    def __init__(
        self,
        path: str,
        split: str = "train",
        eval_path: str | None = None,
        eval_split: str | None = None,
        prompt_column: str = "prompt",
        messages_column: str | None = None,
        answer_column: str | None = "answer",
        template: str | None = None,
        match: str = "exact",
        case_sensitive: bool = False,
        tolerance: float = 0.0,
        num_train: int | None = None,
        num_eval: int | None = None,
        system_prompt: str | None = None,
        use_chat_template: bool = True,
    ) -> None:
        if not isinstance(path, str) or not path:
            raise ValueError("datasets: path must be a file, folder or hub dataset name")
        if match not in MATCHES:
            raise ValueError(f"datasets: match must be one of {MATCHES}, got {match!r}")
        self.path, self.split = path, split
        self.eval_path = eval_path
        self.eval_split = eval_split if eval_split is not None or eval_path is None else "train"
        self.prompt_column, self.messages_column, self.answer_column = prompt_column, messages_column, answer_column
        self.template, self.match, self.case_sensitive, self.tolerance = template, match, case_sensitive, tolerance
        self.num_train, self.num_eval = num_train, num_eval
        self.system_prompt, self.use_chat_template = system_prompt, use_chat_template
        self._cache: dict[tuple[str, str], list[Example]] = {}

    def _example(self, row: dict[str, Any], where: str) -> Example:
        answer: Any = None
        skip = {self.prompt_column, self.messages_column, self.answer_column, "completions", "prompts"}
        if self.messages_column is not None:
            messages = row.get(self.messages_column)
            if not _is_messages(messages):
                raise ValueError(f"{where}: {self.messages_column!r} is not a list of {{role, content}} messages")
            if messages[-1]["role"] == "assistant":
                answer, messages = messages[-1]["content"], messages[:-1]
            if not messages:
                raise ValueError(f"{where}: {self.messages_column!r} holds no prompt before the assistant turn")
            prompt: Any = [{"role": m["role"], "content": m["content"]} for m in messages]
        elif self.template is not None:
            prompt = format_prompt(self.template, row, where)
        elif self.prompt_column in row:
            value = row[self.prompt_column]
            prompt = [dict(m) for m in value] if _is_messages(value) else str(value)
        else:
            raise ValueError(f"{where}: no prompt column {self.prompt_column!r} (columns: {sorted(row)})")
        if self.answer_column is not None:
            if self.answer_column not in row:
                if answer is None:
                    raise ValueError(f"{where}: no answer column {self.answer_column!r} (columns: {sorted(row)})")
            else:
                answer = row[self.answer_column]
        columns = {k: v for k, v in row.items() if k not in skip}
        columns["answer"] = answer
        return Example(prompt, "" if answer is None else str(answer), columns)

    def _read(self, path: str, split: str, limit: int | None) -> list[Example]:
        key = (path, split)
        if key not in self._cache:
            rows = load_split(path, split)
            self._cache[key] = [self._example(r, f"{path} [{split}] row {i}") for i, r in enumerate(rows)]
        examples = self._cache[key]
        return list(examples if limit is None else examples[: max(0, int(limit))])

    def train_examples(self) -> list[Example]:
        return self._read(self.path, self.split, self.num_train)

    def eval_examples(self) -> list[Example]:
        if self.eval_split is None:
            return []
        return self._read(self.eval_path or self.path, self.eval_split, self.num_eval)

    def reward(self, completions: list[Any], prompts: list[Any] | None = None, **columns: Any) -> list[float]:
        columns.setdefault("match", self.match)
        columns.setdefault("case_sensitive", self.case_sensitive)
        columns.setdefault("tolerance", self.tolerance)
        return reward(completions, prompts, **columns)
