"""Argument checks shared by the population ops: clear ValueErrors before any kernel launches."""

from __future__ import annotations

import weakref

import torch

from fastes.noise import (
    U32_LIMIT,
    VALUES_PER_BLOCK,
    NoiseSpec,
    check_kind,
    check_mode,
    check_rank,
    check_seed,
    check_uint,
)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OFFSET_LIMIT = 1 << 62  # int64-safe; the real bound is the 2**32-block counter space, checked below


def check_tensor(t: torch.Tensor, arg: str, ndim: int, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{arg} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{arg} dtype must be one of {dtypes}, got {t.dtype}")


def check_same(t: torch.Tensor, ref: torch.Tensor, arg: str, ref_arg: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{arg} is on {t.device} but {ref_arg} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{arg} dtype {t.dtype} differs from {ref_arg} dtype {ref.dtype}")


def values_checkable(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values: not while a CUDA graph is being captured (a read syncs)."""
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


class TensorMemo:
    """A value remembered for the last tensor it was computed from, while that tensor lives unchanged.

    Every op of a forward receives the same row_member tensor; this lets them share one check or one
    layout. A weak reference and the tensor's version counter mean a freed or modified tensor never
    hits; ``key`` adds whatever else the value depends on.
    """

    def __init__(self) -> None:
        self._ref: weakref.ref[torch.Tensor] | None = None
        self._state: tuple[int, object] = (-1, None)
        self._value: object = None

    def get(self, t: torch.Tensor, key: object = None) -> object | None:
        if self._ref is not None and self._ref() is t and self._state == (t._version, key):
            return self._value
        return None

    def put(self, t: torch.Tensor, value: object, key: object = None) -> None:
        self._ref, self._state, self._value = weakref.ref(t), (t._version, key), value


_checked = TensorMemo()  # the last row_member whose values passed


def check_row_member(row_member: torch.Tensor | None, rows: int, device: torch.device, num_members: int | None) -> None:
    """row_member: one member id per row, -1 for the unperturbed model."""
    if row_member is None:
        return
    check_tensor(row_member, "row_member", 1, (torch.int32, torch.int64))
    if row_member.shape[0] != rows:
        raise ValueError(f"row_member has {row_member.shape[0]} entries for {rows} rows")
    if row_member.device != device:
        raise ValueError(f"row_member is on {row_member.device} but x is on {device}")
    if row_member.is_cuda:  # value checks would sync the device on every op; the engine builds ids on the host
        return
    if _checked.get(row_member, num_members):
        return  # every linear of a forward checks the same tensor
    if rows and int(row_member.min()) < -1:
        raise ValueError(f"row_member entries must be >= -1, got {int(row_member.min())}")
    if num_members is not None and rows and int(row_member.max()) >= num_members:
        raise ValueError(f"row_member entries must be < population size {num_members}, got {int(row_member.max())}")
    _checked.put(row_member, True, num_members)


def check_noise_args(noise: NoiseSpec | None, sigma: float, mode: str, rank: int, out_f: int, in_f: int) -> None:
    if noise is not None and not isinstance(noise, NoiseSpec):
        raise ValueError(f"noise must be a fastes.noise.NoiseSpec or None, got {type(noise).__name__}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
        raise ValueError(f"sigma must be a non-negative number, got {sigma!r}")
    check_mode(mode)
    if mode == "lowrank":
        check_rank(rank, out_f, in_f)


def members_present(row_member: torch.Tensor | None) -> list[int]:
    if row_member is None or row_member.numel() == 0:
        return []
    return [int(m) for m in torch.unique(row_member).tolist() if m >= 0]


def check_stream_args(
    seed: object, tensor_id: object, noise_index: object, step: object, offset: object, count: int, kind: str
) -> tuple[int, int, int, int, int]:
    """Validate counters and that offset .. offset+count-1 stays inside one 2**32-block counter space."""
    check_kind(kind)
    seed = check_seed(seed)
    tensor_id = check_uint(tensor_id, "tensor_id", U32_LIMIT)
    noise_index = check_uint(noise_index, "noise_index", U32_LIMIT)
    step = check_uint(step, "step", U32_LIMIT)
    offset = check_uint(offset, "offset", OFFSET_LIMIT)
    if count and (offset + count - 1) // VALUES_PER_BLOCK[kind] >= U32_LIMIT:
        raise ValueError(
            f"offset + numel = {offset + count} exceeds the 2**32-block counter space of one {kind} stream"
        )
    return seed, tensor_id, noise_index, step, offset


def check_noise_out(out: object) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.float32:
        raise ValueError(f"out must be float32, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (it is filled as one flat stream)")
    return out
