"""The ops' backends: one list of names and one rule that picks among them (DESIGN.md §1).

Every op accepts a subset of ``BACKENDS`` (``backends(...)`` builds it, ``auto`` always first):

* ``reference``: the op's oracle (fp32, CPU, readable).
* ``torch``: the op's vectorized torch path (any device).
* ``cpu``: the op's CPU path, the C++ extension where built and torch otherwise.
* ``cpp`` / ``cuda``: the extension's kernel alone (CPU / CUDA tensors); an error when not built.
* ``triton``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

``auto`` on a CUDA tensor takes Triton when it imports, then the CUDA extension; on a CPU tensor
(or when neither applies) the op's CPU path: ``cpu``, else ``cpp`` when built, else ``torch``, else
``reference``.
"""

from __future__ import annotations

import torch

from fastes import _backend
from fastes.ops._triton import TRITON_ERROR

BACKENDS = ("auto", "reference", "torch", "cpu", "cpp", "cuda", "triton")


def backends(*names: str) -> tuple[str, ...]:
    """An op's accepted backend names: ``auto`` and ``names`` (each one of ``BACKENDS``)."""
    unknown = [n for n in names if n not in BACKENDS or n == "auto"]
    if unknown:
        raise ValueError(f"unknown backend names {unknown}; known: {BACKENDS[1:]}")
    return ("auto", *names)


def choose(backend: str, allowed: tuple[str, ...], t: torch.Tensor, cpp: bool | None = None) -> str:
    """The backend an op runs on ``t``: ``backend`` when named (ValueError unless in ``allowed``), else the
    ``auto`` rule above. ``cpp``: whether the op's extension kernel is built (default: the extension loads)."""
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend != "auto":
        return backend
    if t.is_cuda:
        if "triton" in allowed and TRITON_ERROR is None:
            return "triton"
        if "cuda" in allowed and _backend.extension_has_cuda():
            return "cuda"
    if "cpu" in allowed:
        return "cpu"
    if "cpp" in allowed and not t.is_cuda and (cpp if cpp is not None else _backend.extension() is not None):
        return "cpp"
    return "torch" if "torch" in allowed else "reference"
