"""Integer addition / multiplication, with the number of digits as the difficulty knob.

Cheap to generate, exactly checkable, and hard enough for small models at 3+ digits
(emparu: Gemma-3-1B, 3-digit multiplication, 15% → 60%). The prompt format is a
template (default ``"{a}{sym}{b}="``, e.g. ``"12*34="``) because a model trained on
one format should be evaluated on the same one.

Reward scheme (per completion):

- the predicted answer is the first integer inside the last ``<answer>…</answer>``
  block if there is one, else the first integer in the completion (ASCII digits,
  optional leading ``-``; ``1,234`` reads as 1). Integers longer than
  `MAX_ANSWER_DIGITS` are rejected without conversion.
- 1.0 if it equals the reference exactly (leading zeros ignored), else 0.0.
- `partial_credit=True`: a wrong answer scores the fraction of digit positions
  that match, aligned from the least significant digit, over the longer length
  (a wrong sign scores 0); never 1.0 unless exact.
"""

from __future__ import annotations

from typing import Any

from fastes.es.tasks.base import Example, Task, completion_text, last_tag_content, seeded_rng

__all__ = ["ArithmeticTask", "reward", "extract_integer", "score_answer", "MAX_ANSWER_DIGITS"]

MAX_ANSWER_DIGITS = 256
_SYMBOLS = {"add": "+", "mul": "*"}


def extract_integer(text: str | None) -> str | None:
    """The predicted integer as a normalized string ("-12", "0"), or None if absent or implausibly long."""
    if not isinstance(text, str):
        return None
    inner = last_tag_content(text, "answer")
    if inner is not None:
        text = inner
    # str.find per digit runs at memchr speed; a regex scan of a megabyte completion does not.
    start = len(text)
    for d in "0123456789":
        i = text.find(d, 0, start)
        if i >= 0:
            start = i
    if start == len(text):
        return None
    end = start
    while end < len(text) and "0" <= text[end] <= "9" and end - start <= MAX_ANSWER_DIGITS:
        end += 1
    digits = text[start:end]
    if len(digits) > MAX_ANSWER_DIGITS:
        return None
    negative = start > 0 and text[start - 1] == "-"
    digits = digits.lstrip("0") or "0"
    return "-" + digits if negative and digits != "0" else digits


def score_answer(predicted: str | None, answer: str | int, partial_credit: bool = False) -> float:
    """1.0 for an exact match; with `partial_credit`, the digit-wise match fraction otherwise."""
    ref = extract_integer(str(answer))
    if predicted is None or ref is None:
        return 0.0
    if predicted == ref:
        return 1.0
    if not partial_credit or predicted.startswith("-") != ref.startswith("-"):
        return 0.0
    p, r = predicted.lstrip("-"), ref.lstrip("-")
    width = max(len(p), len(r))
    matches = sum(1 for x, y in zip(reversed(p), reversed(r), strict=False) if x == y)
    return matches / width


def reward(
    completions: list[Any],
    prompts: list[str] | None = None,
    *,
    answer: list[str | int],
    partial_credit: bool = False,
    **_: Any,
) -> list[float]:
    """TRL-style arithmetic reward: 1.0 for the exact integer (see the module docstring)."""
    if len(answer) != len(completions):
        raise ValueError("arithmetic.reward: answer must be aligned with completions")
    return [
        score_answer(extract_integer(completion_text(c)), ans, partial_credit)
        for c, ans in zip(completions, answer, strict=True)
    ]


def _operand(rng: Any, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


class ArithmeticTask(Task):
    """Seeded a op b problems with `digits`-digit operands; train and eval are disjoint where the space allows."""

    name = "arithmetic"

    def __init__(
        self,
        seed: int = 0,
        digits: int = 2,
        op: str = "mul",
        num_train: int = 1000,
        num_eval: int = 200,
        template: str = "{a}{sym}{b}=",
        partial_credit: bool = False,
        system_prompt: str | None = None,
        use_chat_template: bool = False,
    ) -> None:
        if op not in _SYMBOLS:
            raise ValueError(f"arithmetic: op must be one of {sorted(_SYMBOLS)}, got {op!r}")
        if not 1 <= int(digits) <= 64:
            raise ValueError("arithmetic: digits must be in 1..64")
        if num_train < 0 or num_eval < 0:
            raise ValueError("arithmetic: sizes must be >= 0")
        try:
            template.format(a=1, b=2, sym="+", op="add")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"arithmetic: bad template {template!r} (fields: a, b, sym, op): {exc}") from None
        self.seed, self.digits, self.op = seed, int(digits), op
        self.num_train, self.num_eval = num_train, num_eval
        self.template, self.partial_credit = template, partial_credit
        self.system_prompt, self.use_chat_template = system_prompt, use_chat_template
        self._splits: tuple[list[Example], list[Example]] | None = None

    def _example(self, a: int, b: int) -> Example:
        result = a + b if self.op == "add" else a * b
        prompt = self.template.format(a=a, b=b, sym=_SYMBOLS[self.op], op=self.op)
        return Example(prompt, str(result), {"a": a, "b": b, "op": self.op, "answer": str(result)})

    def _build(self) -> tuple[list[Example], list[Example]]:
        if self._splits is None:
            rng = seeded_rng(self.seed, f"arithmetic-{self.op}-{self.digits}")
            space = (10**self.digits - (0 if self.digits == 1 else 10 ** (self.digits - 1))) ** 2
            unique = self.num_train + self.num_eval <= space // 2  # else duplicates are unavoidable: allow them
            seen: set[tuple[int, int]] = set()
            pairs: list[tuple[int, int]] = []
            while len(pairs) < self.num_train + self.num_eval:
                pair = (_operand(rng, self.digits), _operand(rng, self.digits))
                if unique and pair in seen:
                    continue
                seen.add(pair)
                pairs.append(pair)
            examples = [self._example(a, b) for a, b in pairs]
            self._splits = examples[: self.num_train], examples[self.num_train :]
        return self._splits

    def train_examples(self) -> list[Example]:
        return list(self._build()[0])

    def eval_examples(self) -> list[Example]:
        return list(self._build()[1])

    def reward(self, completions: list[Any], prompts: list[str] | None = None, **columns: Any) -> list[float]:
        columns.setdefault("partial_credit", self.partial_credit)
        return reward(completions, prompts, **columns)
