"""Let fastes' launchers run on ``meta`` tensors as if they were CUDA tensors, for the gate only.

The launchers refuse non-CUDA tensors unless the Triton interpreter is on, and some ask the CUDA
runtime for the SM count. The gate answers "CUDA, compiled, 132 SMs"; the checks to answer are
listed in ``cases.DEVICE_CHECKS``. Nothing else in fastes is changed.
"""

from __future__ import annotations

import importlib
import inspect
import re
import textwrap
import warnings
from typing import Any

H100_SMS = 132

_NOT_CUDA = re.compile(r"\b[\w.]+\.device\.type\s*!=\s*[\"']cuda[\"']")


def _require_triton(t: Any, arg: str, import_error: Exception | None) -> None:
    if import_error is not None:
        raise RuntimeError(f"the Triton backend is unavailable: {import_error}")


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _sms(*args: Any, **kwargs: Any) -> int:
    return H100_SMS


def _rewrite(module: Any, fn: Any) -> Any:
    """``fn`` recompiled from its own source with every ``x.device.type != "cuda"`` read as False."""
    source = textwrap.dedent(inspect.getsource(fn))
    new, count = _NOT_CUDA.subn("False", source)
    if not count:
        raise RuntimeError(f"{module.__name__}.{fn.__name__} has no device.type check left to answer")
    namespace: dict[str, Any] = {}
    exec(compile(new, inspect.getsourcefile(fn) or module.__name__, "exec"), module.__dict__, namespace)  # noqa: S102
    return namespace[fn.__name__]


def apply(device_checks: dict[str, str]) -> list[str]:
    """Patch fastes in this process; returns warnings for listed checks that no longer exist."""
    from fastes import _backend

    _backend.triton_interpreted = lambda: False
    _backend.require_triton = _require_triton
    missing = []
    for target, how in device_checks.items():
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name)
        fn = getattr(module, attr, None)
        if fn is None:
            missing.append(f"{target} is gone: drop it from DEVICE_CHECKS in bench/compile/cases.py")
            continue
        if how == "noop":
            setattr(module, attr, _noop)
        elif how == "sms":
            setattr(module, attr, _sms)
        elif how == "rewrite":
            try:
                setattr(module, attr, _rewrite(module, fn))
            except RuntimeError as err:
                missing.append(f"{target}: {err}")
        else:
            raise ValueError(f"unknown device-check patch {how!r} for {target}")
    for line in missing:
        warnings.warn(line, RuntimeWarning, stacklevel=2)
    return missing
