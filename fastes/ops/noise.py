"""The noise op: fill a float32 buffer with elements offset .. offset+n-1 of one noise stream.

Backends, all bit-compatible with the contract in ``fastes/noise.py``:

* ``torch``  -- ``fastes.noise.stream`` (the reference; computed on CPU, copied to ``out``).
* ``triton`` -- ``noise_triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
  one Philox call per block of 4 Gaussians / 32-bit word of signs.
* ``cpp`` / ``cuda`` -- ``fastes._C.noise_fill`` on CPU / CUDA tensors.
* ``auto``   -- Triton on CUDA tensors, the C++ extension on CPU when built, else torch.

This module imports without a GPU and without a usable Triton: the kernels are only
defined when ``import triton`` succeeds, and the Triton backend says so when it does not.
"""

from __future__ import annotations

import torch

from fastes import _backend
from fastes.noise import KIND_INT, stream
from fastes.ops._triton import TRITON_ERROR as _TRITON_ERROR
from fastes.ops._triton import triton
from fastes.ops.checks import OFFSET_LIMIT, check_noise_out, check_stream_args
from fastes.ops.dispatch import backends, choose
from fastes.ops.noise_triton import GROUP, noise_fill_triton, philox_blocks_triton

BACKENDS = backends("torch", "triton", "cpp", "cuda")
__all__ = ["BACKENDS", "GROUP", "OFFSET_LIMIT", "noise_fill", "noise_fill_triton", "philox_blocks_triton", "triton",
           "_TRITON_ERROR"]


# --------------------------------------------------------------------------- dispatcher


def _resolve_backend(backend: str, out: torch.Tensor) -> str:
    return choose(backend, BACKENDS, out)


def noise_fill(
    out: torch.Tensor,
    seed: int,
    tensor_id: int,
    noise_index: int,
    step: int = 0,
    offset: int = 0,
    kind: str = "gaussian",
    backend: str = "auto",
) -> torch.Tensor:
    """Fill ``out`` (float32, contiguous, any shape, read flat) with one stream's elements from ``offset``.

    The antithetic sign is not applied here (callers pass the member's noise index and scale).
    An explicitly requested backend that is unavailable raises RuntimeError; ``auto`` degrades.
    """
    out = check_noise_out(out)
    n = out.numel()
    seed, tensor_id, noise_index, step, offset = check_stream_args(seed, tensor_id, noise_index, step, offset, n, kind)
    chosen = _resolve_backend(backend, out)
    if n == 0:
        return out
    if chosen == "triton":
        return noise_fill_triton(out, seed, tensor_id, noise_index, step, offset, kind)
    if chosen == "torch":
        out.copy_(stream(seed, tensor_id, noise_index, step, offset, n, kind).view(out.shape))
        return out
    ext = _backend.extension()
    if ext is None:
        raise RuntimeError(f"backend {chosen!r} needs the fastes._C extension, which is not built")
    if chosen == "cpp" and out.device.type != "cpu":
        raise ValueError(f"out must be a CPU tensor for backend 'cpp', got device {out.device}")
    if chosen == "cuda":
        if out.device.type != "cuda":
            raise ValueError(f"out must be a CUDA tensor for backend 'cuda', got device {out.device}")
        if not _backend.extension_has_cuda():
            raise RuntimeError("backend 'cuda' needs fastes._C built with CUDA")
    ext.noise_fill(out, seed, tensor_id, noise_index, step, offset, KIND_INT[kind])
    return out
