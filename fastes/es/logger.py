"""Run logging: metrics.jsonl (the record of truth), a progress bar, TensorBoard if installed, curves.png.

metrics.jsonl holds one JSON object per line with ``step`` and flat keys such as
``reward/mean`` or ``eval/accuracy``; everything else (bar, TensorBoard, plot) is a
view of it and is optional: none of it may stop a run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a torn last line, from a kill mid-write, is skipped)."""
    file = Path(path)
    if file.is_dir():
        file = file / METRICS_FILE
    if not file.is_file():
        return []
    out = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def truncate_metrics(run_dir: str | Path, before_step: int) -> None:
    """Keep only records with step < ``before_step`` (a resumed run re-logs from there)."""
    file = Path(run_dir) / METRICS_FILE
    if not file.is_file():
        return
    kept = [r for r in read_metrics(file) if r["step"] < before_step]
    file.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: numbers as float/int, NaN/inf dropped (JSON cannot hold them)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[key] = value
    return out


class RunLogger:
    """Appends records to metrics.jsonl and mirrors them to a progress bar and TensorBoard."""

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.total = total_steps
        self.last: dict[str, Any] = {}
        self._bar: Any = None
        self._task: Any = None
        self._plain = False
        if progress:
            self._start_progress(start_step)
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional: missing or broken means off
                self._tb = None

    def _start_progress(self, start_step: int) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            self._plain = True
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("ES"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.total, completed=start_step, info="")

    def log(self, record: dict[str, Any]) -> None:
        record = _clean(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.last.update(record)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])
        info = self._summary()
        if self._bar is not None:
            done = record["step"] + (1 if "reward/mean" in record else 0)
            self._bar.update(self._task, completed=min(done, self.total), info=info)
        elif self._plain:
            print(f"step {record['step']}/{self.total} {info}", file=sys.stderr, flush=True)

    def _summary(self) -> str:
        parts = []
        for key, label in (("reward/mean", "reward"), ("eval/accuracy", "acc"), ("eval/reward", "eval_reward")):
            if isinstance(self.last.get(key), (int, float)):
                parts.append(f"{label} {self.last[key]:.4g}")
        return "  ".join(parts)

    def close(self, plot: bool = True) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if not self.file.closed:
            self.file.close()
        if plot:
            plot_curves(self.run_dir)


def plot_curves(run_dir: str | Path) -> Path | None:
    """curves.png: training reward (mean ± std) and eval reward / accuracy vs step; None if nothing to plot."""
    records = read_metrics(run_dir)
    train = [r for r in records if "reward/mean" in r]
    evals = [r for r in records if "eval/accuracy" in r or "eval/reward" in r]
    if not train and not evals:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - plotting is a convenience
        return None
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        steps = [r["step"] for r in train]
        mean = [r["reward/mean"] for r in train]
        std = [r.get("reward/std", 0.0) for r in train]
        ax_r.plot(steps, mean, label="train reward (population)")
        ax_r.fill_between(
            steps,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            alpha=0.2,
        )
    with_reward = [r for r in evals if "eval/reward" in r]
    if with_reward:
        ax_r.plot(
            [r["step"] for r in with_reward],
            [r["eval/reward"] for r in with_reward],
            "o-",
            label="eval reward (greedy)",
        )
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("reward")
    ax_r.legend(loc="best")
    with_acc = [r for r in evals if "eval/accuracy" in r]
    if with_acc:
        ax_a.plot([r["step"] for r in with_acc], [r["eval/accuracy"] for r in with_acc], "o-", color="C2")
    ax_a.set_xlabel("step")
    ax_a.set_ylabel("eval accuracy")
    ax_a.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    out = Path(run_dir) / CURVES_FILE
    tmp = out.with_name(".curves.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


__all__ = ["RunLogger", "read_metrics", "truncate_metrics", "plot_curves", "METRICS_FILE", "CURVES_FILE"]
