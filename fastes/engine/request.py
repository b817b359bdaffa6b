"""Checks and readings of a generate request: prompt token ids, each member's prompts, the EOS ids HF uses."""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence as Seq
from pathlib import Path


def member_prompt_indices(member_prompts: Seq[Seq[int]] | None, num_members: int, num_prompts: int) -> list[list[int]]:
    """Each member's prompt indices: all prompts by default; ValueError on a malformed ``member_prompts``."""
    if member_prompts is None:
        return [list(range(num_prompts))] * num_members
    if isinstance(member_prompts, (str, bytes)) or len(member_prompts) != num_members:
        raise ValueError(f"member_prompts must hold one list of prompt indices per member ({num_members})")
    out = []
    for m, indices in enumerate(member_prompts):
        ids = token_ids(indices)
        if ids is None or not ids or any(not 0 <= p < num_prompts for p in ids):
            raise ValueError(f"member_prompts[{m}] must be a non-empty list of indices in [0, {num_prompts})")
        out.append(ids)
    return out


def token_ids(prompt: object) -> list[int] | None:
    """A prompt's ids as Python ints (numpy / torch integers accepted), or None if it is not integers."""
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
        return None
    ids = []
    for t in prompt:  # type: ignore[attr-defined]
        if isinstance(t, bool):
            return None
        try:
            ids.append(operator.index(t))
        except TypeError:
            return None
    return ids


def generation_config_eos(source_dir: Path | None) -> list[int]:
    """EOS ids of generation_config.json: what HF generate stops on (instruct models list several)."""
    if source_dir is None or not (source_dir / "generation_config.json").is_file():
        return []
    try:
        value = json.loads((source_dir / "generation_config.json").read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


__all__ = ["generation_config_eos", "member_prompt_indices", "token_ids"]
