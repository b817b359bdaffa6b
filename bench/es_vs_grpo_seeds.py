"""bench/es_vs_grpo.py over several seeds: mean ± sd of both methods at equal training time and per sample.

    python -m bench.es_vs_grpo_seeds --seeds 0 1 2 --jobs 2 --out DIR -- [bench.es_vs_grpo arguments]

Each seed is one ``bench.es_vs_grpo`` run in its own process (``--es seed=N``: ES noise, data order and
sampling; GRPO's TRL seed is the same config seed), written to DIR/seed-N/. The held-out set is the task's,
the same for every seed. Then DIR/summary.json, DIR/summary.md and DIR/curves_seeds.png: accuracy at each
evaluation time (the evaluation due then, run after the step that crossed it), best and final accuracy,
and completions to first reach each accuracy threshold, as mean ± sample sd over seeds (a seed that never
reached it is counted as not reached, not averaged in).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

METHODS = ("es", "grpo")
THRESHOLDS = (0.45, 0.5, 0.55, 0.6)


def run_seed(seed: int, out: Path, passthrough: list[str]) -> Path:
    """One bench.es_vs_grpo run; its stdout/stderr go to out/seed-N.log."""
    target = out / f"seed-{seed}"
    cmd = [sys.executable, "-m", "bench.es_vs_grpo", "--out", str(target), "--es", f"seed={seed}", *passthrough]
    with open(out / f"seed-{seed}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise RuntimeError(f"seed {seed} failed (exit {code}); see {out / f'seed-{seed}.log'}")
    return target


def accuracy_at(curve: list[dict[str, Any]], t: float) -> float:
    """Held-out accuracy of the evaluation due at training time ``t``: the first at or after it (an evaluation
    runs after the step that crosses its time, so it is stamped up to one step late), else the last one."""
    return next((p["accuracy"] for p in curve if p["train_s"] >= t - 1e-6), curve[-1]["accuracy"])


def first_reach(curve: list[dict[str, Any]], threshold: float) -> int | None:
    """Completions generated before the first evaluation at or above ``threshold`` (None: never)."""
    return next((p["samples"] for p in curve if p["accuracy"] >= threshold), None)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean ± sd over seeds at equal time points, best/final accuracy, samples to thresholds."""
    budget, evals = results[0]["budget_s"], max(len(r["es"]["curve"]) for r in results) - 1  # start, evals-1, end
    times = [budget * i / max(1, evals) for i in range(evals + 1)] + [budget]
    summary: dict[str, Any] = {"seeds": len(results), "budget_s": budget, "clock": results[0].get("clock", "wall"),
                               "times": sorted(set(times))}
    for name in METHODS:
        runs = [r[name] for r in results if r[name]["status"] == "ok"]
        if not runs:
            summary[name] = {"status": "skipped"}
            continue
        curves = [r["curve"] for r in runs]
        summary[name] = {
            "runs": len(runs),
            "at_time": [mean_sd([accuracy_at(c, t) for c in curves]) for t in summary["times"]],
            "final": mean_sd([c[-1]["accuracy"] for c in curves]),
            "best": mean_sd([max(p["accuracy"] for p in c) for c in curves]),
            "steps": mean_sd([r["steps"] for r in runs]),
            "samples": mean_sd([r["samples"] for r in runs]),
            "to_threshold": {str(th): [first_reach(c, th) for c in curves] for th in THRESHOLDS},
        }
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """The table for BENCHMARKS.md."""
    def cell(pair: tuple[float, float], digits: int = 3) -> str:
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    ok = [m for m in METHODS if summary[m].get("runs")]
    unit = "CPU s" if summary["clock"] == "cpu" else "s"
    lines = ["| | " + " | ".join(ok) + " |", "| --- |" + " --- |" * len(ok)]
    for i, t in enumerate(summary["times"]):
        lines.append(f"| accuracy at {t:.0f} {unit} | " + " | ".join(cell(summary[m]["at_time"][i]) for m in ok) + " |")
    for key, label in (("best", "best accuracy"), ("final", "final accuracy")):
        lines.append(f"| {label} | " + " | ".join(cell(summary[m][key]) for m in ok) + " |")
    for key, label in (("steps", "optimizer steps"), ("samples", "completions generated")):
        lines.append(f"| {label} | " + " | ".join(cell(summary[m][key], 0) for m in ok) + " |")
    for th in THRESHOLDS:
        def reach(m: str, th: float = th) -> str:
            got = summary[m]["to_threshold"][str(th)]
            hit = [g for g in got if g is not None]
            text = f"{statistics.fmean(hit):,.0f}" if hit else "–"
            return f"{text} ({len(hit)}/{len(got)} seeds)"
        lines.append(f"| completions to first reach {th:.2f} | " + " | ".join(reach(m) for m in ok) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Every seed's curve (thin) and the mean over seeds at equal time (thick), against time and samples."""
    from fastes.analysis.report import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"es": "tab:blue", "grpo": "tab:orange"}
    for name in METHODS:
        if not summary[name].get("runs"):
            continue
        for r in results:
            curve = r[name]["curve"]
            axes[0].plot([p["train_s"] for p in curve], [p["accuracy"] for p in curve], color=colors[name], lw=0.7,
                         alpha=0.5)
            axes[1].plot([p["samples"] for p in curve], [p["accuracy"] for p in curve], color=colors[name], lw=0.7,
                         alpha=0.5, marker=".")
        means = [m for m, _ in summary[name]["at_time"]]
        sds = [s for _, s in summary[name]["at_time"]]
        axes[0].errorbar(summary["times"], means, yerr=sds, color=colors[name], lw=2, capsize=3,
                         label=f"{name} (mean ± sd, {summary[name]['runs']} seeds)")
    unit = "CPU seconds" if summary["clock"] == "cpu" else "wall-clock seconds"
    axes[0].set(xlabel=f"training {unit} (evaluation excluded)", ylabel="held-out greedy accuracy",
                title="accuracy vs training time")
    axes[1].set(xlabel="completions generated for training (log above 1,000)", ylabel="held-out greedy accuracy",
                title="accuracy vs samples (each seed)")
    axes[1].set_xscale("symlog", linthresh=1000)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, passthrough = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once (use --clock cpu with more than one)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--summarize-only", action="store_true", help="read DIR/seed-N/results.json, run nothing")
    args = p.parse_args(own)
    if args.jobs < 1 or len(set(args.seeds)) != len(args.seeds):
        p.error("--jobs must be >= 1 and --seeds distinct")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize_only:
        env_note = {"passthrough": passthrough, "jobs": args.jobs, "loadavg_start": os.getloadavg()}
        (args.out / "command.json").write_text(json.dumps(env_note, indent=2) + "\n")
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda s: run_seed(s, args.out, passthrough), args.seeds))
    results = [json.loads((args.out / f"seed-{s}" / "results.json").read_text()) for s in args.seeds]
    summary = summarize(results)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = markdown(summary)
    (args.out / "summary.md").write_text(text + "\n")
    plot(results, summary, args.out / "curves_seeds.png")
    print(text)
    return summary


if __name__ == "__main__":
    main()
