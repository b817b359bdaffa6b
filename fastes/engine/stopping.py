"""When a sequence stops, and its text: EOS / stop ids, stop strings, max_tokens, the context.

Stop strings are matched on text decoded incrementally (docs/design.md, "The host path"):
each step decodes only the few tokens since the last complete character, and searches only
the tail window where a stop string could have appeared since the previous step
(the new text plus the longest stop string's length − 1 before it). A step therefore costs
O(new tokens), not a decode of the whole output. The final text of a stopped sequence is
one full decode, cut at the first stop string, exactly as if the whole text were searched.
Texts of the sequences that did not stop on a string are decoded once, when the whole
generate is done (``finish_texts``), not at every stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastes.engine.sampling import SamplingParams
from fastes.engine.sequence import Sequence
from fastes.models import Tokenizer

REPLACEMENT = "\ufffd"  # what a decode of an incomplete UTF-8 sequence ends with


@dataclass
class _Detok:
    """Incremental text of a sequence's output: ``text`` = decode(output[:read]); ``prefix`` <= read is where the
    decoded window starts: both decodes of a step start there, so a tokenizer that drops the leading space
    of a window's first token drops it from both and their difference is the new text."""

    text: str = ""
    prefix: int = 0
    read: int = 0
    floor: int = 0  # text length at min_tokens output tokens: a stop string must end after it (vLLM)


class StopChecker:
    """``check(seq, token)`` after ``token`` was appended: "stop", "length" or None (one call per sampled token)."""

    def __init__(self, params: SamplingParams, eos_token_ids: frozenset[int], tokenizer: Tokenizer | None,
                 max_positions: int) -> None:
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= eos_token_ids
        self.stop_ids = frozenset(stop_ids)
        self.params = params
        self.stops = params.stop if tokenizer is not None else ()
        self.window = max((len(s) for s in self.stops), default=0)
        self.tokenizer = tokenizer
        self.max_tokens = params.max_tokens
        self.min_tokens = params.min_tokens
        self.max_positions = max_positions

    def __call__(self, seq: Sequence, token: int) -> str | None:
        if token in self.stop_ids:
            return "stop"
        if self.stops and self._stop_string(seq):
            return "stop"
        n = len(seq.tokens)
        if n - seq.prompt_len >= self.max_tokens or n >= self.max_positions:
            return "length"
        return None

    def _stop_string(self, seq: Sequence) -> bool:
        """Decode the new tokens; on a stop string in the tail window, set ``seq.text`` to the cut full text."""
        state = seq.detok
        if not isinstance(state, _Detok):
            state = seq.detok = _Detok()
        tokens, first = seq.tokens, seq.prompt_len  # output = tokens[first:], not copied
        decode = self.tokenizer.decode  # type: ignore[union-attr]
        before = decode(tokens[first + state.prefix : first + state.read]) if state.read > state.prefix else ""
        window = decode(tokens[first + state.prefix :])
        if len(window) <= len(before):
            return False  # nothing new to read yet
        text = state.text + window[len(before) :]
        start = max(0, len(state.text) - self.window + 1)
        if not window.endswith(REPLACEMENT):  # complete characters: commit, the next window starts here
            state.text, state.prefix, state.read = text, state.read, len(tokens) - first
        if len(tokens) - first <= self.min_tokens:  # as vLLM: stop strings count once the output is longer
            state.floor = len(text)
            return False
        # an incomplete character is searched too (the whole-output decode would show it as U+FFFD)
        if not any(text.find(s, max(start, state.floor - len(s) + 1)) >= 0 for s in self.stops):
            return False
        seq.text = self.cut(decode(tokens[first:]), state.floor)
        return True

    def cut(self, text: str, floor: int = 0) -> str:
        """``text`` up to its first stop string ending after ``floor`` (included when include_stop_str_in_output)."""
        hits = [(text.find(s, max(0, floor - len(s) + 1)), s) for s in self.stops]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return text
        pos, stop = min(hits)
        return text[: pos + (len(stop) if self.params.include_stop_str_in_output else 0)]


def finish_texts(seqs: list[Sequence], tokenizer: Tokenizer | None) -> None:
    """Fill ``seq.text`` of every finished sequence that has none yet (one decode each)."""
    todo = [s for s in seqs if s.text is None]
    if not todo:
        return
    if tokenizer is None:
        for seq in todo:
            seq.text = ""
        return
    for seq in todo:
        seq.text = tokenizer.decode(seq.output_ids)


__all__ = ["StopChecker", "finish_texts"]
