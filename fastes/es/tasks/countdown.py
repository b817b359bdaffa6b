"""Countdown: combine the given numbers with + - * / to reach a target (TinyZero / Qiu et al. setup).

The model is asked to reason inside ``<think>…</think>`` and to put one equation
inside ``<answer>…</answer>``. Reward scheme (per completion, `format_score` = 0.1):

- 1.0  the last ``<answer>`` block holds a well-formed arithmetic expression that
        uses every given number exactly once (as a multiset; integer literals only)
        and equals the target exactly (rational arithmetic, so ``6/4*2`` counts).
        A trailing ``= target`` (or leading ``target =``) is allowed.
- 0.1  the last ``<answer>`` block holds a well-formed expression (within
        `safe_math` limits) that is wrong: wrong value, wrong or reused numbers,
        division by zero.
- 0.0  no ``<answer>…</answer>`` block, or its content is not an arithmetic
        expression (text, code, ``**``, over 512 characters, nesting deeper than 32).

Unlike TinyZero, text that is not an expression earns no format credit, so the
format reward cannot be farmed with arbitrary strings inside the tags. The
expression is evaluated by `fastes.es.safe_math`, never by `eval`.

The dataset is generated from a seed: 3–4 numbers in 1..99 and a target built
by combining all of them in a random order with random operations, so every
problem is solvable; the generating equation is stored as `Example.answer`.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from typing import Any

from fastes.es.safe_math import Limits, parse
from fastes.es.tasks.base import Example, Task, completion_text, last_tag_content, seeded_rng

__all__ = ["CountdownTask", "reward", "score_answer", "FORMAT_SCORE", "make_problem"]

FORMAT_SCORE = 0.1
_LIMITS = Limits(max_length=512, max_depth=32, max_digits=6, allow_decimals=False, allow_power=False)

INSTRUCTION = (
    "Using the numbers {numbers}, write an equation that equals {target}. You may use +, -, * and / "
    "and parentheses, and each number must be used exactly once. Reason step by step inside "
    "<think> </think> tags, then give only the equation inside <answer> </answer> tags, "
    "for example <answer>(7 + 5) / 3</answer>."
)
SYSTEM_PROMPT = "You are a helpful assistant. You think through the problem first, then give the answer."
BASE_TEMPLATE = (
    "A user asks a question and the assistant solves it, reasoning first and then answering.\n"
    "User: " + INSTRUCTION + "\nAssistant: Let me solve this step by step.\n<think>"
)
TEMPLATES = {"chat": INSTRUCTION, "base": BASE_TEMPLATE}


def _split_equals(text: str, target: Fraction) -> str | None:
    """Drop a ``= target`` side if present; None if the equation has a side that is not the target."""
    if "=" not in text:
        return text
    parts = text.split("=")
    if len(parts) != 2:
        return None
    for expr, other in ((parts[0], parts[1]), (parts[1], parts[0])):
        side = parse(other, _LIMITS)
        if side is not None and len(side.literals) == 1 and side.value == target:
            return expr
    return None


def score_answer(
    answer: str | None, numbers: list[int], target: int | Fraction, format_score: float = FORMAT_SCORE
) -> float:
    """Score the content of an ``<answer>`` block (see the module docstring for the scheme)."""
    if answer is None or len(answer) > _LIMITS.max_length:
        return 0.0
    try:
        goal = Fraction(target)
        given = Counter(int(n) for n in numbers)
    except (TypeError, ValueError):
        return 0.0
    expr = _split_equals(answer, goal)
    if expr is None:
        # Two or more '=' or a side that is not the target: credit only a well-formed equation.
        sides = answer.split("=")
        return format_score if len(sides) <= 3 and all(parse(s, _LIMITS) for s in sides) else 0.0
    parsed = parse(expr, _LIMITS)
    if parsed is None:
        return 0.0
    if parsed.value is None or parsed.value != goal:
        return format_score
    used = Counter(int(v) for v in parsed.literals)
    return 1.0 if used == given else format_score


def reward(
    completions: list[Any],
    prompts: list[str] | None = None,
    *,
    numbers: list[list[int]],
    target: list[int],
    format_score: float = FORMAT_SCORE,
    **_: Any,
) -> list[float]:
    """TRL-style Countdown reward: 1.0 correct, `format_score` well-formed but wrong, 0.0 otherwise."""
    if len(numbers) != len(completions) or len(target) != len(completions):
        raise ValueError("countdown.reward: numbers and target must be aligned with completions")
    out: list[float] = []
    for completion, nums, tgt in zip(completions, numbers, target, strict=True):
        text = completion_text(completion)
        answer = None if text is None else last_tag_content(text, "answer")
        out.append(score_answer(answer, nums, tgt, format_score))
    return out


_OPS = "+-*/"


def make_problem(rng: Any, count: int, max_number: int, max_target: int) -> tuple[list[int], int, str]:
    """One solvable problem: (numbers, target, a solving equation), combining all numbers at random."""
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        pool: list[tuple[int, str]] = [(n, str(n)) for n in numbers]
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (a, ea), (b, eb) = pool[i], pool[j]
            if a < b:
                (a, ea), (b, eb) = (b, eb), (a, ea)  # keep results positive
            choices = ["+", "-", "*"] + (["/"] if b and a % b == 0 else [])
            op = rng.choice(choices)
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"({ea} {op} {eb})")]
        target, expr = pool[0]
        if 1 <= target <= max_target:
            return numbers, target, expr[1:-1] if expr.startswith("(") else expr


class CountdownTask(Task):
    """Countdown with a seeded, solvable dataset (Qiu et al. trained on 200 questions)."""

    name = "countdown"

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 200,
        num_eval: int = 200,
        min_numbers: int = 3,
        max_numbers: int = 4,
        max_number: int = 99,
        max_target: int = 100,
        template: str = "chat",
        system_prompt: str | None = SYSTEM_PROMPT,
        use_chat_template: bool | None = None,
        format_score: float = FORMAT_SCORE,
    ) -> None:
        if not 2 <= min_numbers <= max_numbers:
            raise ValueError("countdown: need 2 <= min_numbers <= max_numbers")
        if max_number < 1 or max_target < 1 or num_train < 0 or num_eval < 0:
            raise ValueError("countdown: max_number, max_target must be >= 1 and sizes >= 0")
        self.seed, self.num_train, self.num_eval = seed, num_train, num_eval
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_number, self.max_target = max_number, max_target
        self.template = TEMPLATES.get(template, template)
        if "{numbers}" not in self.template or "{target}" not in self.template:
            raise ValueError("countdown: template must be 'chat', 'base' or a format string with {numbers}, {target}")
        self.use_chat_template = template != "base" if use_chat_template is None else use_chat_template
        self.system_prompt = system_prompt if self.use_chat_template else None
        self.format_score = format_score
        self._cache: dict[str, list[Example]] = {}

    def _generate(self, split: str, size: int) -> list[Example]:
        if split not in self._cache:
            rng = seeded_rng(self.seed, f"countdown-{split}")
            examples = []
            for _ in range(size):
                count = rng.randint(self.min_numbers, self.max_numbers)
                numbers, target, solution = make_problem(rng, count, self.max_number, self.max_target)
                prompt = self.template.format(numbers=numbers, target=target)
                examples.append(Example(prompt, solution, {"numbers": numbers, "target": target, "answer": solution}))
            self._cache[split] = examples
        return list(self._cache[split])

    def train_examples(self) -> list[Example]:
        return self._generate("train", self.num_train)

    def eval_examples(self) -> list[Example]:
        return self._generate("eval", self.num_eval)

    def reward(self, completions: list[Any], prompts: list[str] | None = None, **columns: Any) -> list[float]:
        columns.setdefault("format_score", self.format_score)
        return reward(completions, prompts, **columns)
