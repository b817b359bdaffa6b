"""Typed config values: YAML values and command-line strings converted to dataclass fields.

Every conversion failure is a one-line ValueError naming the key (``optim.lr must be a float,
got 'x'``); unknown keys get a did-you-mean suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

import yaml


def build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {prefix + str(key)!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value if value is not None else {}, f"{prefix}{key}.")
        elif key == "rewards":
            kwargs[key] = rewards(value)
        else:
            kwargs[key] = coerce(value, tp, prefix + key)
    return cls(**kwargs)


def rewards(value: Any) -> list[dict[str, Any]]:
    """Accept "m:f", ["m:f", ...], {"m:f": weight} or [{func, weight}] and normalize to [{func, weight}]."""
    if value is None:
        return []
    if isinstance(value, str):
        value = yaml.safe_load(value) if value.strip().startswith(("[", "{")) else [value]
    if isinstance(value, dict):
        value = [{"func": k, "weight": w} for k, w in value.items()]
    if not isinstance(value, list):
        raise ValueError(f"rewards must be a list of {{func, weight}}, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"func": item}
        if not isinstance(item, dict) or set(item) - {"func", "weight"}:
            raise ValueError(f"rewards[{i}] must be 'module:function' or {{func, weight}}, got {item!r}")
        out.append(
            {
                "func": coerce(item.get("func"), str, f"rewards[{i}].func"),
                "weight": coerce(item.get("weight", 1.0), float, f"rewards[{i}].weight"),
            }
        )
    return out


def strip_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a YAML value, or a command-line string) to field type ``tp``."""
    base, optional = strip_optional(tp)
    if isinstance(value, str) and optional and value.strip().lower() in ("null", "none", "~"):
        return None
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key} must not be null")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in BOOLS:
                return BOOLS[value.strip().lower()]
            raise TypeError
        if base is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int):
                return value
            number = float(value) if isinstance(value, (str, float)) else math.nan
            if not math.isfinite(number) or number != int(number):
                raise TypeError
            return int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else int(number)
        if base is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            number = float(value)
            if not math.isfinite(number):
                raise TypeError
            return number
        if base is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if origin is list:
            (item_tp,) = typing.get_args(base)
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else None
                value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip() else {}
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError, OverflowError, yaml.YAMLError) as err:
        if isinstance(err, ValueError) and str(err).startswith(f"{key}["):
            raise
        name = getattr(base, "__name__", str(base))
        raise ValueError(
            f"{key} must be {'a' if name != 'int' else 'an'} {name}{' or null' if optional else ''}, got {value!r}"
        ) from None
    raise ValueError(f"{key}: unsupported field type {tp!r}")


__all__ = ["BOOLS", "build", "coerce", "rewards", "strip_optional"]
