"""Checkpoints: ``run/checkpoints/step-N/`` = an HF directory + ``trainer_state.json`` (+ fp32 state files).

Between ES steps the whole training state is (seed, step, weights, optimizer buffers,
noise scales measured at start): the noise and the sampling randomness are functions of
counters. A checkpoint is staged in a hidden temporary directory, fsynced, and renamed
into place, so a kill at any moment leaves every earlier ``step-N`` complete; staging
leftovers start with "." and are never taken for a checkpoint; the next save removes them.
Retention: the last ``keep_last`` checkpoints are kept, and the best one by held-out
accuracy (``eval_history`` in its state) too; older ones are renamed out of the way
first, then deleted, so a kill mid-prune never leaves a half-deleted ``step-N``.
A save that fails (disk full, permissions) is a one-line ValueError; the earlier
checkpoints are untouched.

LoRA runs save merged weights (so transformers loads the directory as is) *and* the
adapters themselves in ``adapters.safetensors``: resuming from merged weights would
not be bit-identical, so resume rebuilds base + adapters from the frozen base model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastes._fsutil import chmod_files_like_open, fsync_dir, fsync_tree
from fastes.models import save_pretrained

if TYPE_CHECKING:
    from fastes.engine.engine import Engine

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
ADAPTER_FILE = "adapters.safetensors"
STATE_FORMAT = "fastes-trainer-state"
STATE_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")
LEFTOVER = re.compile(r"^\.step-\d+\.(tmp|del)-[A-Za-z0-9_]{8}$")  # staging / pruning dirs of this module


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, permissions): one line, the earlier ones are intact."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    engine: Engine,
    state: dict[str, Any],
    optimizer_tensors: dict[str, torch.Tensor] | None = None,
    source_dir: str | Path | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step-<step>`` atomically; returns its path."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)
        staging = Path(tempfile.mkdtemp(prefix=f".step-{step}.tmp-", dir=root))
    except OSError as err:
        raise CheckpointWriteError(f"cannot write checkpoint {str(final)!r}: {err}") from None
    try:
        target = staging / "checkpoint"
        source = Path(source_dir) if source_dir is not None and Path(source_dir).is_dir() else None
        save_pretrained(engine.model, target, source_dir=source)
        state = dict(state, format=STATE_FORMAT, version=STATE_VERSION, step=step)
        if engine.model.lora:
            adapters = {n: engine.model.params[n].detach().to("cpu").contiguous() for n in engine.model.lora_names()}
            _write_tensors(target / ADAPTER_FILE, adapters)
        if optimizer_tensors:
            _write_tensors(target / OPTIM_FILE, optimizer_tensors)
        state["files"] = {
            "optimizer": OPTIM_FILE if optimizer_tensors else None,
            "adapters": ADAPTER_FILE if engine.model.lora else None,
        }
        chmod_files_like_open(target)
        _write_json(target / STATE_FILE, state)  # last: its presence marks a complete directory
        fsync_tree(target, ignore_errors=True)
        if final.exists():  # only when a step is saved twice: move the old one into staging, then swap
            os.replace(final, staging / "previous")
        os.replace(target, final)
        fsync_dir(root, ignore_errors=True)
    except OSError as err:  # ENOSPC, EDQUOT, EACCES...: the staging directory goes, earlier steps stay
        raise CheckpointWriteError(f"cannot write checkpoint {str(final)!r}: {err}; the earlier checkpoints "
                                   "are intact") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def remove_leftovers(root: Path) -> None:
    """Delete the staging / pruning directories a killed save or prune left in ``run/checkpoints``."""
    for child in root.iterdir():
        if LEFTOVER.match(child.name) and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)


def complete_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """step -> ``run_dir/checkpoints/step-N`` for every checkpoint whose state file is in place."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return {}
    out = {}
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            out[int(match.group(1))] = child
    return out


def prune_checkpoints(run_dir: str | Path, keep_last: int, scores: dict[int, float] | None = None) -> list[int]:
    """Delete all but the last ``keep_last`` checkpoints (0: keep all) and the best-scored one; returns the steps
    deleted. ``scores``: step -> held-out accuracy of that checkpoint's weights (higher is better, ties: latest)."""
    steps = complete_checkpoints(run_dir)
    if keep_last <= 0 or len(steps) <= keep_last:
        return []
    keep = set(sorted(steps)[-keep_last:])
    scored = [(score, step) for step, score in (scores or {}).items() if step in steps]
    if scored:
        keep.add(max(scored)[1])
    removed = []
    for step in sorted(set(steps) - keep):
        path = steps[step]
        trash = Path(tempfile.mkdtemp(prefix=f".step-{step}.del-", dir=path.parent))
        os.replace(path, trash / "d")
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(step)
    return removed


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the latest complete ``step-N`` of a run directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"resume: {str(path)!r} is neither a checkpoint nor a run directory")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            steps.append((int(match.group(1)), child))
    if not steps:
        raise ValueError(f"resume: no complete checkpoint (step-N/{STATE_FILE}) under {str(path)!r}")
    return max(steps)[1]


def load_state(checkpoint: str | Path) -> dict[str, Any]:
    """Parse and check ``trainer_state.json``; ValueError (one line) when it is not one of ours."""
    file = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"resume: cannot read {str(file)!r}: {err}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"resume: {str(file)!r} is not a fastes trainer state")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"resume: {str(file)!r} has version {state.get('version')}, expected {STATE_VERSION}")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise ValueError(f"resume: {str(file)!r} has no valid step")
    return state


def load_tensors(checkpoint: str | Path, kind: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The optimizer or adapter tensors a state refers to (empty when it has none)."""
    name = (state.get("files") or {}).get(kind)
    if not name:
        return {}
    file = Path(checkpoint) / name
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"resume: cannot read {str(file)!r}: {err}") from None


def _write_tensors(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def restore_training_state(resume_dir: Path, state: dict[str, Any], mode: str, model: Any, optimizer: Any) -> None:
    """Optimizer state and LoRA adapters from a checkpoint (the weights came with the engine's load)."""
    saved = (state.get("config") or {}).get("population", {}).get("mode")
    if saved != mode:
        raise ValueError(f"resume: checkpoint was trained in mode {saved!r}, config asks for {mode!r}")
    if model.lora:
        adapters = load_tensors(resume_dir, "adapters", state)
        if set(adapters) != set(model.lora_names()):
            raise ValueError("resume: the checkpoint's LoRA adapters do not match lora.rank/targets")
        for name, tensor in adapters.items():
            if tuple(tensor.shape) != tuple(model.params[name].shape):
                raise ValueError(
                    f"resume: adapter {name} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(model.params[name].shape)} (lora.rank changed?)"
                )
            model.params[name].copy_(tensor)
    tensors = load_tensors(resume_dir, "optimizer", state)
    optimizer.load_state(state.get("optimizer") or {}, tensors, model.device)


__all__ = [
    "save_checkpoint",
    "find_checkpoint",
    "load_state",
    "load_tensors",
    "restore_training_state",
    "checkpoint_dir",
    "complete_checkpoints",
    "prune_checkpoints",
    "remove_leftovers",
    "CheckpointWriteError",
    "STATE_FILE",
    "OPTIM_FILE",
    "ADAPTER_FILE",
]
