"""Tokenizer of a local HF directory: encode/decode, EOS ids, chat template.

transformers' AutoTokenizer is used only as a file loader (local files only); the
engine works on token ids. EOS ids are the union of generation_config.json's
``eos_token_id`` (instruct models often list several), config.json's and the
tokenizer's own, because generation must stop on any of them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from None
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """Thin wrapper over an HF fast tokenizer loaded from ``path``."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ValueError(f"no tokenizer.json or tokenizer_config.json in {str(path)!r}")
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as err:  # noqa: BLE001 - any loader failure is a bad directory
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"cannot load the tokenizer in {str(path)!r}: {message}") from None
        self.path = path
        eos = _ids(_read_json(path / "generation_config.json").get("eos_token_id"))
        eos += _ids(_read_json(path / "config.json").get("eos_token_id"))
        eos += _ids(self.hf.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        self.bos_token_id: int | None = self.hf.bos_token_id
        self.pad_token_id: int | None = self.hf.pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: str | list[dict[str, str]], add_generation_prompt: bool = True,
                            system: str | None = None) -> str:
        """The prompt text for a chat (a string is one user turn); ValueError if there is no template."""
        if not self.has_chat_template:
            raise ValueError(f"the tokenizer in {str(self.path)!r} has no chat template")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: str | list[dict[str, str]], add_generation_prompt: bool = True,
                    system: str | None = None) -> list[int]:
        """Token ids of a chat prompt; the template already holds any BOS, so none is added again."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, system), add_special_tokens=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(path)


__all__ = ["Tokenizer", "load_tokenizer"]
