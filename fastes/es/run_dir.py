"""The run directory: what ``--out`` may point at, and what a failed start leaves behind (nothing).

fastes writes into a run directory only what it made: a new or empty directory, or one
holding a fastes run (``RUN_MARKER``, or the metrics.jsonl / checkpoints/ of runs made
before the marker existed). A run with a complete checkpoint is continued only with
``--resume``; a run that never saved one cannot be resumed, so it may be started over
(its files are fastes's own). A run that fails before its first step completes removes
what it wrote, so that the same command can simply be run again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fastes.es import checkpoint as ckpt

RUN_MARKER = ".fastes-run"
RUN_FILES = ("metrics.jsonl", "checkpoints", RUN_MARKER)


def is_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def check_run_dir(out: Path, resume_dir: Path | None) -> None:
    """ValueError (one line) unless a run may write into ``out``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_run(out):
        raise ValueError(f"out {str(out)!r} is a non-empty directory that is not a fastes run; choose a new or "
                         "empty directory (fastes never overwrites files it did not write)")
    inside = resume_dir is not None and resume_dir.resolve().parent.parent == out.resolve()
    if ckpt.complete_checkpoints(out) and not inside:
        raise ValueError(f"run directory {str(out)!r} already holds a run: pass --resume {out} to continue it, "
                         "or choose another --out")


class FailedStartCleanup:
    """Remembers whether ``out`` is fresh; ``undo()`` removes what the run wrote there (a fresh run only)."""

    def __init__(self, out: Path, resuming: bool) -> None:
        self.out = out
        existed = out.is_dir()
        self.fresh = not resuming and (not existed or not any(out.iterdir()) or not ckpt.complete_checkpoints(out))
        self.remove_dir = not existed

    def mark(self) -> None:
        """Write the run marker (call after the directory is made)."""
        (self.out / RUN_MARKER).write_text("fastes run directory\n", encoding="utf-8")

    def undo(self) -> None:
        if not self.fresh or not self.out.is_dir():
            return
        if self.remove_dir:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        for child in self.out.iterdir():  # an empty or fastes-run directory: everything in it is ours
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


__all__ = ["RUN_MARKER", "FailedStartCleanup", "check_run_dir", "is_run"]
