"""Bounded arithmetic over exact rationals, for scoring model-written equations.

Model output is untrusted: it must never reach `eval`, and a hostile answer (a
megabyte string, 10k nested parentheses, ``9**9**9**9``) must cost microseconds,
not minutes. So this module is a small tokenizer and recursive-descent parser
that rejects anything outside fixed limits *before* doing work, and evaluates
with `fractions.Fraction` so that ``6/4*2 == 3`` holds exactly.

Grammar (``^``/``**`` only when `Limits.allow_power`)::

    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '/') unary)*
    unary  := ('+' | '-') unary | power
    power  := atom [('^' | '**') unary]      # right-associative
    atom   := NUMBER | '(' expr ')'

Unicode ``−`` ``×`` ``÷`` ``·`` are accepted as ``-`` ``*`` ``/`` ``*``; digits are
ASCII only. Every failure (syntax, limits, division by zero) returns None.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

__all__ = ["Limits", "DEFAULT_LIMITS", "Parsed", "parse", "evaluate", "evaluate_with_literals", "integer_literals"]


@dataclass(frozen=True)
class Limits:
    """Bounds that keep parsing and evaluation cheap on adversarial input."""

    max_length: int = 512  # characters of the expression
    max_depth: int = 32  # nesting of parentheses and unary signs
    max_digits: int = 24  # digits of one number literal
    max_bits: int = 4096  # bit length of any intermediate numerator/denominator
    allow_decimals: bool = True  # literals like 2.5
    allow_power: bool = False  # ^ and **
    max_exponent: int = 16  # |exponent| when powers are allowed


DEFAULT_LIMITS = Limits()

_OPS = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "\u00d7": "*", "\u00b7": "*", "/": "/", "\u00f7": "/"}
_WS = " \t\r\n"
_ZERO = Fraction(0)


class _Reject(Exception):
    """Internal: the input is malformed or out of bounds."""


def _tokenize(text: str, limits: Limits) -> list[tuple[str, object]]:
    tokens: list[tuple[str, object]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _WS:
            i += 1
        elif "0" <= ch <= "9" or ch == ".":
            j = i
            while j < n and "0" <= text[j] <= "9":
                j += 1
            int_part = text[i:j]
            frac_part = None
            if j < n and text[j] == ".":
                if not limits.allow_decimals:
                    raise _Reject
                k = j + 1
                while k < n and "0" <= text[k] <= "9":
                    k += 1
                frac_part = text[j + 1 : k]
                j = k
                if not frac_part or not int_part:
                    raise _Reject  # "3." and ".5" are rejected: keep the format unambiguous
            if not int_part or len(int_part) + len(frac_part or "") > limits.max_digits:
                raise _Reject
            if frac_part is None:
                tokens.append(("num", (Fraction(int(int_part)), True)))
            else:
                value = Fraction(int(int_part + frac_part), 10 ** len(frac_part))
                tokens.append(("num", (value, False)))
            i = j
        elif ch in _OPS:
            if ch == "*" and i + 1 < n and text[i + 1] == "*":
                tokens.append(("pow", None))
                i += 2
            else:
                tokens.append(("op", _OPS[ch]))
                i += 1
        elif ch == "^":
            tokens.append(("pow", None))
            i += 1
        elif ch in "()":
            tokens.append((ch, None))
            i += 1
        else:
            raise _Reject
    if any(kind == "pow" for kind, _ in tokens) and not limits.allow_power:
        raise _Reject
    return tokens


@dataclass(frozen=True)
class Parsed:
    """A well-formed expression: its value (None if it divides by zero or grows past
    `Limits.max_bits`) and its literals in order of appearance."""

    value: Fraction | None
    literals: tuple[Fraction, ...]
    all_integer_literals: bool  # False if any literal was written with a decimal point


class _Parser:
    """Recursive descent that evaluates as it parses (no tree: long flat chains cost no recursion).

    Recursion happens only on parentheses, unary signs and exponents, all counted against
    `max_depth`. An arithmetic failure does not stop parsing: it clears `ok`, so callers can
    still tell a well-formed expression (``1/0``) from garbage.
    """

    def __init__(self, tokens: list[tuple[str, object]], limits: Limits) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.limits = limits
        self.literals: list[Fraction] = []
        self.all_int = True
        self.ok = True

    def _peek(self) -> tuple[str, object] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise _Reject

    def _apply(self, op: str, left: Fraction, right: Fraction) -> Fraction:
        if not self.ok:
            return _ZERO
        lim = self.limits
        if op == "+":
            out = left + right
        elif op == "-":
            out = left - right
        elif op == "*":
            out = left * right
        elif op == "/":
            if right == 0:
                self.ok = False
                return _ZERO
            out = left / right
        else:  # power: integer exponent, bounded; the result's size is checked before computing it
            size = max(abs(left.numerator).bit_length(), left.denominator.bit_length())
            if (
                right.denominator != 1
                or abs(right.numerator) > lim.max_exponent
                or (left == 0 and right < 0)
                or size * abs(right.numerator) > lim.max_bits
            ):
                self.ok = False
                return _ZERO
            out = left**right.numerator
        if abs(out.numerator).bit_length() > lim.max_bits or out.denominator.bit_length() > lim.max_bits:
            self.ok = False
            return _ZERO
        return out

    def expr(self) -> Fraction:
        value = self.term()
        while (tok := self._peek()) is not None and tok[0] == "op" and tok[1] in "+-":
            self.pos += 1
            value = self._apply(str(tok[1]), value, self.term())
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while (tok := self._peek()) is not None and tok[0] == "op" and tok[1] in "*/":
            self.pos += 1
            value = self._apply(str(tok[1]), value, self.unary())
        return value

    def unary(self) -> Fraction:
        tok = self._peek()
        if tok is not None and tok[0] == "op" and tok[1] in "+-":
            self.pos += 1
            self._enter()
            inner = self.unary()
            self.depth -= 1
            return -inner if tok[1] == "-" else inner
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        tok = self._peek()
        if tok is not None and tok[0] == "pow":
            self.pos += 1
            self._enter()
            exponent = self.unary()
            self.depth -= 1
            return self._apply("^", base, exponent)
        return base

    def atom(self) -> Fraction:
        tok = self._peek()
        if tok is None:
            raise _Reject
        self.pos += 1
        if tok[0] == "num":
            value, is_int = tok[1]  # type: ignore[misc]
            self.literals.append(value)
            self.all_int = self.all_int and is_int
            return value
        if tok[0] == "(":
            self._enter()
            value = self.expr()
            self.depth -= 1
            close = self._peek()
            if close is None or close[0] != ")":
                raise _Reject
            self.pos += 1
            return value
        raise _Reject


def parse(text: str, limits: Limits = DEFAULT_LIMITS) -> Parsed | None:
    """Parse and evaluate `text`; None if it is malformed or breaks a syntactic limit."""
    if not isinstance(text, str) or len(text) > limits.max_length:
        return None
    try:
        tokens = _tokenize(text, limits)
        if not tokens:
            return None
        parser = _Parser(tokens, limits)
        value = parser.expr()
        if parser.pos != len(tokens):
            return None
    except _Reject:
        return None
    return Parsed(value if parser.ok else None, tuple(parser.literals), parser.all_int)


def evaluate_with_literals(text: str, limits: Limits = DEFAULT_LIMITS) -> tuple[Fraction, list[Fraction]] | None:
    """Value and literals (in order) of `text`; None if malformed, out of bounds or dividing by zero."""
    parsed = parse(text, limits)
    if parsed is None or parsed.value is None:
        return None
    return parsed.value, list(parsed.literals)


def evaluate(text: str, limits: Limits = DEFAULT_LIMITS) -> Fraction | None:
    """Exact value of `text`, or None (never raises on any string)."""
    parsed = parse(text, limits)
    return None if parsed is None else parsed.value


def integer_literals(text: str, limits: Limits = DEFAULT_LIMITS) -> list[int] | None:
    """The integer literals of a well-formed `text`, in order; None if malformed or any literal is a decimal.

    Countdown uses this to check that each given number is used exactly once.
    """
    parsed = parse(text, limits)
    if parsed is None or not parsed.all_integer_literals:
        return None
    return [int(v) for v in parsed.literals]
