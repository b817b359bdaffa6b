"""Where and how a run executes: device, dtype, CPU threads, its task, and its counter-derived seeds."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import torch


def derive_seed(seed: int, step: int, purpose: str) -> int:
    """A 64-bit seed from (run seed, step, purpose): independent streams without stored RNG state."""
    digest = hashlib.blake2b(f"fastes/{purpose}/{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when there is one, else cpu; ``cpu`` / ``cuda[:N]`` checked against this machine.

    A device the machine lacks is bad input (one-line ValueError), not a CUDA traceback mid-load.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", str(device))
    if match is None:
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no usable CUDA GPU (torch.cuda.is_available() "
                             "is False); use --device cpu")
        count = torch.cuda.device_count()
        if match.group(1) is not None and int(match.group(1)) >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s)")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_task(name: str, options: dict[str, Any]) -> Any:
    """A registered task (``countdown``) or a user's ``module:factory`` / ``file.py:factory`` returning a Task."""
    if ":" in name:
        from fastes.es.rewards import load_reward

        factory = load_reward(name)
        try:
            task = factory(**options)
        except TypeError as err:
            raise ValueError(f"task {name!r}: bad options {sorted(options)}: {err}") from None
        missing = [a for a in TASK_METHODS if not callable(getattr(task, a, None))]
        if missing:
            raise ValueError(f"task {name!r} returned a {type(task).__name__}, not a task (it lacks "
                             f"{', '.join(missing)}; see fastes.es.tasks.base.Task)")
        return task
    from fastes.es.tasks import get_task

    return get_task(name, **options)


TASK_METHODS = ("train_examples", "eval_examples", "reward")  # what the trainer calls on a task
SMALL_HIDDEN = 1024


def idle_cores(cores: int | None = None, load: float | None = None) -> int:
    """Cores no other process is using now: usable cores minus the 1-minute load average, at least 1."""
    import os

    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            return 1
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def cpu_threads_for(model_dir: Path) -> int | None:
    """Intra-op threads for small models on CPU: one per idle core, unless OMP_NUM_THREADS says otherwise.

    Their matmuls are small, so threads only pay when each has a core of its own: on an idle 2-core
    machine the demo's step took 0.65 s with two threads and 1.0 s with one, but with the cores shared
    with other jobs one population generate took 8.1 s with two threads and 2.4 s with one (threads
    waiting on each other). Returns the thread count set (None: left as torch chose).
    """
    import json
    import os

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        hidden = int(json.loads((model_dir / "config.json").read_text()).get("hidden_size", 0))
    except (OSError, ValueError, TypeError):
        return None
    if not 0 < hidden <= SMALL_HIDDEN:
        return None
    threads = idle_cores()
    torch.set_num_threads(threads)
    return threads


__all__ = ["TASK_METHODS", "SMALL_HIDDEN", "cpu_threads_for", "idle_cores", "derive_seed", "resolve_device",
           "resolve_dtype", "resolve_task"]
