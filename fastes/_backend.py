"""Which compute backends are available: the C++/CUDA extension, Triton, CUDA devices.

A missing or unbuilt extension degrades to torch with one warning, never an ImportError.
"""

from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from types import ModuleType

import torch


@lru_cache(maxsize=1)
def extension() -> ModuleType | None:
    """The compiled ``fastes._C`` module, or None (warned once) when it is not built."""
    if os.environ.get("FASTES_DISABLE_EXTENSION") == "1":
        return None
    try:
        return importlib.import_module("fastes._C")
    except ImportError as err:
        warnings.warn(
            f"fastes._C extension not available ({err}); using the torch fallback on CPU. "
            "Build it with `pip install -e . --no-build-isolation`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def require_triton(t: torch.Tensor, arg: str, import_error: Exception | None) -> None:
    """Raise unless a Triton kernel can run on ``t``: RuntimeError when Triton could not be imported
    (``import_error``, None when it could), ValueError for a CPU tensor without ``TRITON_INTERPRET=1``."""
    if import_error is not None:
        raise RuntimeError(f"the Triton backend is unavailable: {import_error}")
    if t.device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"{arg} must be a CUDA tensor for the Triton backend (or set TRITON_INTERPRET=1)")


def extension_has_cuda() -> bool:
    ext = extension()
    return bool(ext is not None and getattr(ext, "has_cuda", lambda: False)())


def backends() -> dict[str, bool]:
    """Which backends are active in this process."""
    ext = extension()
    return {
        "torch": True,
        "cpp": ext is not None,
        "cuda_ext": extension_has_cuda(),
        "triton": triton_available(),
        "triton_interpreter": triton_available() and triton_interpreted(),
        "cuda_device": torch.cuda.is_available(),
    }
