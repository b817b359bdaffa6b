"""Run logging: metrics.jsonl (the record of truth), a progress bar, TensorBoard / wandb, curves.png.

metrics.jsonl holds one JSON object per line with ``step`` and flat keys such as
``reward/mean`` or ``eval/accuracy`` (and, every few steps, ``samples``: a few
completions). ``report_to`` names the other sinks, as in TRL: ``tensorboard``
(event files under ``<run>/tensorboard``), ``wandb`` (project ``$WANDB_PROJECT`` or
"fastes"; ``WANDB_MODE=offline`` works without a network) and ``jsonl`` (always
written). A sink asked for but not installed is a one-line error before the run
starts; once running, a sink that fails is switched off with a warning, because
none of them may stop a run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
REPORT_TO = ("jsonl", "tensorboard", "wandb")


def check_report_to(names: Sequence[str]) -> list[str]:
    """The sinks, validated: unknown names and missing packages are one-line ValueErrors ("none": jsonl only)."""
    names = [str(n).strip().lower() for n in names]
    if names in (["none"], ["jsonl", "none"]):
        return ["jsonl"]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"report_to: unknown {unknown}; choose from {', '.join(REPORT_TO)} or none")
    for name, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        if name in names:
            try:
                __import__(module)
            except ImportError:
                raise ValueError(f"report_to {name}: the {name} package is not installed (pip install {name})") \
                    from None
    return list(dict.fromkeys(["jsonl", *names]))


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
        report_to: Sequence[str] | None = None,
        config: dict[str, Any] | None = None,
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
        sinks = check_report_to(report_to if report_to is not None else (["tensorboard"] if tensorboard else []))
        self.report_to = sinks
        self._tb: Any = None
        self._wandb: Any = None
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if "wandb" in sinks:
            import wandb

            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastes"), name=self.run_dir.name,
                                     dir=str(self.run_dir), config=config or {})

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
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:
            if self._tb is not None:
                for key, value in scalars.items():
                    self._tb.add_scalar(key, value, record["step"])
                if record.get("samples"):
                    self._tb.add_text("samples", _samples_markdown(record["samples"]), record["step"])
            if self._wandb is not None and scalars:
                self._wandb.log(scalars, step=record["step"])
        except Exception as exc:  # noqa: BLE001 - a sink failing mid-run is switched off, the run goes on
            print(f"warning: logging to tensorboard/wandb failed ({exc!r}); they are off for this run",
                  file=sys.stderr, flush=True)
            self._tb = self._wandb = None
        if record.get("samples"):
            self._print_samples(record["step"], record["samples"])
        info = self._summary()
        if self._bar is not None:
            done = record["step"] + (1 if "reward/mean" in record else 0)
            self._bar.update(self._task, completed=min(done, self.total), info=info)
        elif self._plain:
            print(f"step {record['step']}/{self.total} {info}", file=sys.stderr, flush=True)

    def _print_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        lines = [f"step {step} sample {i} (reward {s.get('reward', float('nan')):.3g}): "
                 + " ".join(str(s.get("completion", "")).split())[:300] for i, s in enumerate(samples)]
        if self._bar is not None:
            for line in lines:
                self._bar.console.print(line, markup=False, highlight=False)
        else:
            print("\n".join(lines), file=sys.stderr, flush=True)

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
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if not self.file.closed:
            self.file.close()
        if plot:
            plot_curves(self.run_dir)


def _samples_markdown(samples: list[dict[str, Any]]) -> str:
    """Completions as markdown code blocks (indented) for TensorBoard's text tab."""
    parts = [f"**reward {s.get('reward', 0.0):.3g}**\n\n    " + str(s.get("completion", "")).replace("\n", "\n    ")
             for s in samples]
    return "\n\n".join(parts)


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


__all__ = ["RunLogger", "check_report_to", "REPORT_TO",
           "read_metrics", "truncate_metrics", "plot_curves", "METRICS_FILE", "CURVES_FILE"]
