"""Plots (PNG, matplotlib Agg: no display needed) and one JSON of the numbers for each analysis.

Every plot function takes either the result object or its ``to_dict()`` form, so a report
can be redrawn from ``analysis.json`` alone. ``write_report`` merges into an existing
``analysis.json`` in the output directory, so the three analyses can run as separate
commands into one report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPORT_JSON = "analysis.json"


def _as_dict(result: Any) -> dict[str, Any]:
    return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def to_jsonable(value: Any) -> Any:
    """Strict-JSON form: NaN/inf → null (undefined, e.g. the cosine of a zero update), paths → str, tuples → lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return to_jsonable(value.item())
    return value


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def plot_kl(results: Mapping[str, Any], path: str | Path) -> Path:
    """Mean per-token KL(base ‖ tuned) per model, and the spread over prompts."""
    plt = _pyplot()
    data = {label: _as_dict(r) for label, r in results.items()}
    labels = list(data)
    fig, (ax_mean, ax_box) = plt.subplots(1, 2, figsize=(10, 4))
    means = [data[k]["mean_kl"] for k in labels]
    errs = []
    for k in labels:
        values = data[k]["per_prompt"]
        n = len(values)
        mu = sum(values) / n if n else 0.0
        errs.append(math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0)
    ax_mean.bar(labels, means, yerr=errs, capsize=4, color="tab:blue")
    ax_mean.set_ylabel("mean per-token KL(base ‖ tuned) [nats]")
    ax_mean.set_title("off-task KL drift (± s.e. over prompts)")
    ax_box.boxplot([data[k]["per_prompt"] for k in labels])
    ax_box.set_xticks(range(1, len(labels) + 1), labels)
    ax_box.set_ylabel("per-prompt mean KL [nats]")
    ax_box.set_title("per-prompt KL")
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_geometry(geometry: Any, path: str | Path) -> Path:
    """‖Δ‖ and ‖Δ‖/‖W‖ per decoder layer, cosine between runs per layer, and top-k energy fraction."""
    plt = _pyplot()
    g = _as_dict(geometry)
    runs: list[str] = list(g["runs"])
    layer_keys = sorted((k for k in g["layers"] if k.startswith("layers.")), key=lambda k: int(k.split(".")[1]))
    xs = [int(k.split(".")[1]) for k in layer_keys]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for run in runs:
        axes[0, 0].plot(xs, [_num(g["layers"][k]["delta_norm"][run]) for k in layer_keys], marker="o", label=run)
        axes[0, 1].plot(xs, [_num(g["layers"][k]["relative"][run]) for k in layer_keys], marker="o", label=run)
    axes[0, 0].set(title="‖Δ‖_F per layer", xlabel="layer", ylabel="‖Δ‖_F")
    axes[0, 1].set(title="‖Δ‖ / ‖W‖ per layer", xlabel="layer", ylabel="relative")
    if any(_num(g["total"]["relative"][r]) > 0 for r in runs):
        axes[0, 1].set_yscale("log")
    pairs = list(g["total"]["cosine"])
    for pair in pairs:
        axes[1, 0].plot(xs, [_num(g["layers"][k]["cosine"][pair]) for k in layer_keys], marker="o",
                        label=f"{pair} (total {_num(g['total']['cosine'][pair]):.3f})")
    axes[1, 0].axhline(0.0, color="grey", lw=0.8)
    axes[1, 0].set(title="cos(Δ_a, Δ_b) per layer" if pairs else "cosine: needs two runs", xlabel="layer",
                   ylabel="cosine", ylim=(-1.05, 1.05))
    energy = g["total"].get("mean_energy", {})
    for run in runs:
        ks = sorted(energy.get(run, {}), key=int)
        if ks:
            axes[1, 1].plot([int(k) for k in ks], [_num(energy[run][k]) for k in ks], marker="o", label=run)
    axes[1, 1].set(title="Δ energy in top-k singular directions", xlabel="k (mean over matrices)",
                   ylabel="fraction of ‖Δ‖_F² (top-k s_i² / all)", ylim=(0, 1.05))
    finite = [line for line in axes[1, 1].lines if any(math.isfinite(float(y)) for y in line.get_ydata())]
    if finite:  # a log axis with nothing finite on it (every update zero: NaN energies) fails to draw
        axes[1, 1].set_xscale("log", base=2)
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        if ax is not axes[1, 1]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_interpolation(result: Any, path: str | Path) -> Path:
    """Each metric along α, with the straight line between the endpoints (a dip below it is a barrier)."""
    plt = _pyplot()
    r = _as_dict(result)
    alphas = r["alphas"]
    keys = [k for k in r["metrics"] if not k.endswith("time_s")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axvspan(0.0, 1.0, color="0.93", zorder=0)
    for key in keys:
        values = [_num(v) for v in r["metrics"][key]]
        (line,) = ax.plot(alphas, values, marker="o", label=key)
        if 0.0 in alphas and 1.0 in alphas:
            v0, v1 = values[alphas.index(0.0)], values[alphas.index(1.0)]
            ax.plot([0.0, 1.0], [v0, v1], ls="--", lw=0.8, color=line.get_color())
    settings = r.get("settings", {})
    ax.set(xlabel="α   (θ = (1 − α)·θ_A + α·θ_B)", ylabel="value",
           title=f"interpolation A → B on {settings.get('task', 'task')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, kl: Mapping[str, Any] | None = None, geometry: Any = None,
                 interpolation: Any = None, include_tokens: bool = False) -> dict[str, Path]:
    """Write analysis.json (merged into an existing one) and kl.png / geometry.png / interpolation.png for the
    analyses given; returns what was written by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / REPORT_JSON
    data: dict[str, Any] = {}
    if json_path.is_file():
        try:
            loaded = json.loads(json_path.read_text(encoding="utf-8"))
            data = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = {}
    written: dict[str, Path] = {}
    if kl is not None:
        data["kl"] = {label: (r.to_dict(include_tokens) if hasattr(r, "to_dict") else r) for label, r in kl.items()}
        written["kl"] = plot_kl(kl, out / "kl.png")
    if geometry is not None:
        data["geometry"] = _as_dict(geometry)
        written["geometry"] = plot_geometry(geometry, out / "geometry.png")
    if interpolation is not None:
        data["interpolation"] = _as_dict(interpolation)
        written["interpolation"] = plot_interpolation(interpolation, out / "interpolation.png")
    written["json"] = write_json(data, json_path)
    return written


__all__ = ["REPORT_JSON", "to_jsonable", "write_json", "plot_kl", "plot_geometry", "plot_interpolation",
           "write_report"]
