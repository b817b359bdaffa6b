"""Triton, when it imports: the ops modules take ``triton``, ``tl`` and ``philox`` from here.

Triton is optional at import time: without it (or with a broken install) all three are None,
``TRITON_ERROR`` says why, and CPU-only installs keep the torch and C++ paths.
"""

from __future__ import annotations

from types import ModuleType

triton: ModuleType | None
tl: ModuleType | None
philox: ModuleType | None
try:
    import triton
    import triton.language as tl

    from fastes.ops import philox

    TRITON_ERROR: Exception | None = None
except Exception as err:  # noqa: BLE001 - any failure means "no Triton backend"
    triton = tl = philox = None
    TRITON_ERROR = err
