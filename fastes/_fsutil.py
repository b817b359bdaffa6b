"""fsync helpers for atomic directory writes (stage, fsync, rename): the bottom layer, imported by models and es."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path, ignore_errors: bool = False) -> None:
    """fsync a directory so that renames into it are durable; one that cannot be opened is skipped.

    ``ignore_errors``: also let a failing fsync pass (some file systems refuse directories).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if not ignore_errors:
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path, ignore_errors: bool = False) -> None:
    """fsync every file directly in ``path``, then ``path`` itself (``ignore_errors``: as in ``fsync_dir``)."""
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path, ignore_errors)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def chmod_like_mkdir(path: Path) -> None:
    """Give a directory made by ``tempfile.mkdtemp`` (0700) the mode ``mkdir`` would: 0777 minus the umask."""
    os.chmod(path, 0o777 & ~_umask())


def chmod_files_like_open(path: Path) -> None:
    """Give every file directly in ``path`` the mode ``open`` would: 0666 minus the umask (safetensors writes
    0600, through a temporary file)."""
    mode = 0o666 & ~_umask()
    for file in path.iterdir():
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)
