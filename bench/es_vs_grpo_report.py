"""The analyses and report of bench/es_vs_grpo.py: off-task prompts, KL / geometry / interpolation, curves, table."""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any


def off_task_prompts(tokenizer: Any, num: int, seed: int) -> tuple[str, list[Any]]:
    """English openings when the tokenizer spells them back exactly, else random strings of its own vocabulary."""
    from fastes.analysis.prompts import english_prompts

    english = english_prompts(num, seed)
    if all(tokenizer.decode(tokenizer.encode(p)) == p for p in english):
        return "english", english
    special = set(getattr(tokenizer.hf, "all_special_ids", []) or [])
    pool = [i for i in range(tokenizer.vocab_size) if i not in special]
    rng = random.Random(f"es_vs_grpo-offtask:{seed}")
    return "random-vocab-strings", [[rng.choice(pool) for _ in range(12)] for _ in range(num)]


def analyze(cfg: Any, es: Any, runs: dict[str, str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """KL drift, update geometry and interpolation of the final checkpoints; PNGs and analysis.json in ``out``."""
    from fastes.analysis.geometry import update_geometry
    from fastes.analysis.interpolate import alpha_grid, interpolate
    from fastes.analysis.kl import kl_drift_many
    from fastes.analysis.report import plot_interpolation, write_report
    from fastes.engine.engine import Engine
    from fastes.es.trainer import encode_prompts, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    kv = cfg.kv_cache_tokens or 16384
    engine = Engine.from_pretrained(cfg.model, dtype=dtype, device=device, kv_cache_tokens=kv)
    kind, prompts = off_task_prompts(engine.tokenizer, args.kl_prompts, cfg.seed)
    longest = max(len(p) if isinstance(p, list) else len(engine.tokenizer.encode(p)) for p in prompts)
    room = engine.model.config.max_position_embeddings - longest - 1
    kl = kl_drift_many(engine, runs, prompts=prompts, max_tokens=min(args.kl_tokens, room), seed=cfg.seed)
    on_task = encode_prompts(engine, es.task, es.eval_set[: args.kl_prompts], es.use_chat)
    room = engine.model.config.max_position_embeddings - max(map(len, on_task)) - 1
    kl_task = kl_drift_many(engine, runs, prompts=on_task, max_tokens=min(args.kl_tokens, room), seed=cfg.seed)
    del engine
    geometry = update_geometry(cfg.model, runs)
    alphas = [0.0, 0.5, 1.0] if args.quick else alpha_grid(11)
    common = dict(task=es.task, alphas=alphas, size=len(es.eval_set), max_tokens=cfg.sampling.max_tokens,
                  use_chat_template=es.use_chat, dtype=dtype, device=device, kv_cache_tokens=kv)
    lines = {f"base->{k}": interpolate(cfg.model, v, **common) for k, v in runs.items()}
    if "es" in runs and "grpo" in runs:
        lines["es->grpo"] = interpolate(runs["es"], runs["grpo"], **common)
    plot_note = None
    try:
        write_report(out, kl=kl, geometry=geometry, interpolation=lines.get("es->grpo"))
    except ValueError as err:  # plot_geometry cannot draw runs that moved no weight (every Δ = 0)
        plot_note = f"geometry.png not drawn: {err}"
        write_report(out, kl=kl, interpolation=lines.get("es->grpo"))
    for key, result in lines.items():
        plot_interpolation(result, out / f"interpolation_{key.replace('->', '_to_')}.png")
    total = geometry.total
    return {"kl_off_task": {k: {"mean_kl": r.mean_kl, "num_tokens": r.num_tokens} for k, r in kl.items()},
            "kl_off_task_prompts": kind, "plot_note": plot_note,
            "kl_on_task": {k: {"mean_kl": r.mean_kl, "num_tokens": r.num_tokens} for k, r in kl_task.items()},
            "geometry": {"delta_norm": total["delta_norm"], "relative": total["relative"], "cosine": total["cosine"],
                         "weight_norm": total["weight_norm"], "mean_energy": total["mean_energy"]},
            "interpolation": {k: {"alphas": r.alphas, "metrics": r.metrics, "barriers": r.barriers}
                              for k, r in lines.items()}}


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Held-out accuracy against training wall-clock and against generated samples, both methods."""
    from fastes.analysis.report import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("es", "grpo"):
        curve = results[name].get("curve") or []
        if curve:
            axes[0].plot([p["train_s"] for p in curve], [p["accuracy"] for p in curve], marker="o", label=name)
            axes[1].plot([p["samples"] for p in curve], [p["accuracy"] for p in curve], marker="o", label=name)
    axes[0].set(xlabel="training wall-clock [s] (evaluation excluded)", ylabel="held-out greedy accuracy",
                title=f"accuracy vs time ({results['device']})")
    axes[1].set(xlabel="completions generated for training", ylabel="held-out greedy accuracy",
                title="accuracy vs samples")
    if results["grpo"]["status"] != "ok":
        axes[0].text(0.5, 0.05, f"GRPO: {results['grpo']['reason']}", transform=axes[0].transAxes, ha="center")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    """The plain-text summary printed at the end (and easy to paste into BENCHMARKS.md)."""
    a = results.get("analysis", {})
    lines = ["| method | steps | train s | samples | acc start | acc final | best acc | reward final | off-task KL "
             "| on-task KL | ‖Δ‖/‖W‖ |", "|" + "---|" * 11]
    for name in ("es", "grpo"):
        r = results[name]
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['reason']} |" + " |" * 9)
            continue
        accs = [p["accuracy"] for p in r["curve"]]
        kl = a.get("kl_off_task", {}).get(name, {}).get("mean_kl", float("nan"))
        klt = a.get("kl_on_task", {}).get(name, {}).get("mean_kl", float("nan"))
        rel = a.get("geometry", {}).get("relative", {}).get(name, float("nan"))
        lines.append(f"| {name} | {r['steps']} | {r['train_s']:.0f} | {r['samples']} | {accs[0]:.3f} | "
                     f"{accs[-1]:.3f} | {max(accs):.3f} | {r['curve'][-1]['reward']:.3f} | {kl:.4g} | {klt:.4g} "
                     f"| {rel:.3g} |")
    lines += [f"\ncos(Δ_{k.replace('|', ', Δ_')}) = {c:.4f}" for k, c in a.get("geometry", {}).get("cosine",
                                                                                                   {}).items()]
    for key, line in a.get("interpolation", {}).items():
        acc = ", ".join(f"{x:g}:{v:.2f}" for x, v in zip(line["alphas"], line["metrics"]["eval/accuracy"], strict=True))
        lines.append(f"{key}: accuracy barrier {line['barriers'].get('eval/accuracy', float('nan')):.3f} "
                     f"(α:acc {acc})")
    return "\n".join(lines)


__all__ = ["analyze", "off_task_prompts", "plot_curves", "table"]
