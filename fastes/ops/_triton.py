"""Triton, when it imports, and the Philox scalars every noise kernel takes.

The ops modules take ``triton``, ``tl`` and ``philox`` from here. Triton is optional at import
time: without it (or with a broken install) all three are None, ``TRITON_ERROR`` says why, and
CPU-only installs keep the torch and C++ paths.
"""

from __future__ import annotations

from types import ModuleType

from fastes.noise import as_i32, split_seed

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

# Kernels list these among ``do_not_specialize``: one compiled kernel serves every seed, name and step.
KEY_ARGS = ["k0", "k1", "tid", "step"]


def key_args(seed: int, tid: int, step: int) -> dict[str, int]:
    """The Philox key (seed low/high words) and the tensor-id and step counter words of a stream, as the
    int32 bit patterns the kernels take (``k0``, ``k1``, ``tid``, ``step``); Philox reads them as uint32."""
    k0, k1 = split_seed(seed)
    return {"k0": as_i32(k0), "k1": as_i32(k1), "tid": as_i32(tid), "step": as_i32(step)}
