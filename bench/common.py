"""What every benchmark shares: device and version facts, the git commit, timers and the JSON result file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# FASTES_BENCH_RESULTS redirects smoke runs (make test runs `bench --quick`) away from the committed results.
RESULTS = Path(os.environ.get("FASTES_BENCH_RESULTS") or ROOT / "bench" / "results")


def current_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str | None = None) -> str:
    """The GPU's name on ``cuda``, else the CPU's (processor, machine, or just "cpu")."""
    if (device or current_device()) == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def triton_version() -> str | None:
    """Triton's version, None when it is missing or broken (reported, never fatal)."""
    try:
        import triton
    except Exception:  # noqa: BLE001 - report, never fail, on a broken Triton
        return None
    return triton.__version__


def versions() -> dict[str, str | None]:
    """torch, transformers, Triton and Python versions."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version(),
            "python": platform.python_version()}


def git_commit(dirty: bool = True) -> str:
    """HEAD of the checkout (with "-dirty" when ``dirty`` and the tree has changes), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        if not dirty:
            return head.stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_cpu(fn: Callable[[], object], reps: int, budget_s: float = 0.0, max_reps: int = 100) -> list[float]:
    """Wall-clock milliseconds per call after one warm-up call: ``reps`` calls, more (up to ``max_reps``)
    while under ``budget_s``, so that fast calls get enough samples for a stable median on a busy host."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_gpu(fn: Callable[[], object]) -> list[float]:
    """Milliseconds per call: every triton.testing.do_bench sample (CUDA events, L2 flushed between calls)."""
    from triton.testing import do_bench

    return [float(t) for t in do_bench(fn, return_mode="all")]


def timed(fn: Callable[[], object], reps: int, device: str = "cpu") -> list[float]:
    """Wall-clock seconds of ``reps`` calls, no warm-up (the caller's); CUDA synchronized around each."""
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def slug(text: str) -> str:
    """``text`` as a file-name part: lower case, runs of other characters than letters and digits as "-"."""
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def write_result(name: str, payload: dict, device: str | None = None, path: Path | None = None) -> Path:
    """Write ``payload`` as JSON to ``path``, by default bench/results/<name>-<device>-<timestamp>.json.

    ``device``: the name in the file name (default: this machine's ``device_name()``).
    """
    if path is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = RESULTS / f"{name}-{slug(device or device_name())}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is argparse's one-line error, exit 2)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value

