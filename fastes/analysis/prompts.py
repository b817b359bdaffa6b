"""Off-task prompt sets for measuring drift: text that has nothing to do with the task being tuned.

KL drift is only meaningful on prompts the reward never saw, so the default set is a
fixed list of plain-English sentence openings (no arithmetic, no puzzles), and a
"random" set draws word-like tokens from the tokenizer's own vocabulary. Neither needs
a download. ``read_prompts`` takes a user's file instead (one prompt per line, or JSONL
with a ``prompt`` / ``text`` field).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENGLISH_PROMPTS: tuple[str, ...] = (
    "The old lighthouse keeper climbed the stairs every evening and",
    "When the rain finally stopped, the children ran outside to",
    "My grandmother always said that the secret to good bread is",
    "The museum opened a new exhibition about ancient ships, which",
    "Late in the autumn, the birds gather on the telephone wires before",
    "She opened the letter slowly, afraid of what it might say about",
    "The recipe calls for two onions, a clove of garlic and",
    "In the small village by the river, the market is held every",
    "He had never seen the ocean before, so when the train arrived",
    "The library was quiet except for the sound of",
    "Our neighbour keeps bees in the garden, and every summer",
    "The history of the bicycle begins in the early nineteenth century, when",
    "After the storm, the fishermen repaired their nets and",
    "A good walking boot should be comfortable, waterproof and",
    "The violinist tuned her instrument while the audience",
    "Every morning the baker wakes before dawn to",
    "The mountain path was narrow and steep, and the travellers",
    "Cats often sleep for most of the day because",
    "The town council decided to plant more trees along the main street so that",
    "In the story, the young prince leaves the castle in search of",
    "The first thing you notice about the forest in winter is",
    "My favourite season is spring, because the days grow longer and",
    "The painter mixed blue and yellow on her palette and",
    "During the festival, the streets are filled with music and",
    "The ship's captain looked at the sky and warned the crew that",
    "To grow tomatoes well, you need plenty of sunlight and",
    "The detective examined the muddy footprints near the door and",
    "On Sunday afternoons the family likes to walk along the canal and",
    "The inventor spent years in his workshop trying to build",
    "Snow fell all night, and by morning the whole valley",
    "The teacher asked the class to write a short poem about",
    "Coffee was first grown in the highlands, where farmers",
    "The train was late again, so the passengers on the platform",
    "An old map hung on the wall of the inn, showing",
    "The gardener pruned the roses carefully, explaining that",
    "At the edge of the desert there is a small oasis where",
    "The choir rehearsed the song until every voice",
    "Wool from the mountain sheep is prized because",
    "The postman knows every house on the hill, and he",
    "Long before there were clocks, people told the time by",
)


def english_prompts(num: int = 32, seed: int = 0) -> list[str]:
    """``num`` sentence openings from the fixed list, in a seeded order (all of them, cycled, if num exceeds it)."""
    if num < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {num}")
    order = list(ENGLISH_PROMPTS)
    random.Random(f"fastes-analysis-prompts:{seed}").shuffle(order)
    return [order[i % len(order)] for i in range(num)]


def _wordlike_ids(tokenizer: Any) -> list[int]:
    """Token ids that decode to letters (optionally with a leading space): text-ish, never special or numeric."""
    hf = getattr(tokenizer, "hf", tokenizer)
    special = set(getattr(hf, "all_special_ids", []) or [])
    ids = []
    for token_id in range(len(hf)):
        if token_id in special:
            continue
        text = hf.decode([token_id])
        if text.strip().isalpha() and text.strip().isascii():
            ids.append(token_id)
    return ids


def random_vocab_prompts(tokenizer: Any, num: int = 32, length: int = 16, seed: int = 0) -> list[list[int]]:
    """``num`` prompts of ``length`` word-like token ids drawn uniformly from the vocabulary (token ids, not text,
    so no re-tokenization changes them)."""
    if num < 1 or length < 1:
        raise ValueError(f"num and length must be >= 1, got {num}, {length}")
    pool = _wordlike_ids(tokenizer)
    if not pool:
        raise ValueError("the tokenizer has no word-like tokens to build random prompts from")
    rng = random.Random(f"fastes-analysis-random:{seed}")
    return [[rng.choice(pool) for _ in range(length)] for _ in range(num)]


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts of a file: JSONL rows with ``prompt`` or ``text`` (``.jsonl``), else one prompt per non-empty line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file not found: {p}")
    prompts: list[str] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if p.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
                text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
                if not isinstance(text, str) or not text:
                    raise ValueError(f"{p}:{lineno}: expected an object with a non-empty 'prompt' or 'text'")
                prompts.append(text)
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise ValueError(f"prompt file {p} holds no prompts")
    return prompts[:limit] if limit is not None else prompts


def off_task_prompts(kind: str = "english", num: int = 32, seed: int = 0, tokenizer: Any = None,
                     length: int = 16, path: str | Path | None = None) -> Sequence[str] | Sequence[list[int]]:
    """The prompt set named by ``kind``: english | random (needs the tokenizer) | file (needs ``path``)."""
    if kind == "english":
        return english_prompts(num, seed)
    if kind == "random":
        if tokenizer is None:
            raise ValueError("random prompts need the model's tokenizer")
        return random_vocab_prompts(tokenizer, num, length, seed)
    if kind == "file":
        if path is None:
            raise ValueError("a file prompt set needs a path")
        return read_prompts(path, num)
    raise ValueError(f"unknown prompt set {kind!r}; use english, random or file")


__all__ = ["ENGLISH_PROMPTS", "english_prompts", "random_vocab_prompts", "read_prompts", "off_task_prompts"]
