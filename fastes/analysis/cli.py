"""`fastes analyze kl | geometry | interpolate`: argument parsing only; the work is in the sibling modules.

``main(argv)`` takes the arguments after ``analyze``. Each command writes its plot and
merges its numbers into ``OUT/analysis.json``; bad input is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fastes._cliutil import BadInput, OneLineParser, parse_options, run_command


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="report directory (analysis.json and PNGs)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def _engine_opts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--kv-tokens", type=int, default=65536, help="KV pool size in tokens (default 65536)")


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="fastes analyze", description="Compare fine-tuned checkpoints: off-task KL drift, "
                           "update geometry, linear interpolation.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="{kl,geometry,interpolate}", parser_class=OneLineParser)
    kl = sub.add_parser("kl", help="mean per-token KL(base ‖ tuned) on off-task prompts", allow_abbrev=False)
    kl.add_argument("--base", required=True, help="base model directory")
    kl.add_argument("--tuned", required=True, action="append", metavar="[LABEL=]DIR",
                    help="tuned model directory (repeatable; all share the base's continuations)")
    kl.add_argument("--prompts", help="prompt file: one per line, or .jsonl with 'prompt'/'text'")
    kl.add_argument("--prompt-set", default="english", choices=("english", "random"),
                    help="built-in off-task prompts when --prompts is not given")
    kl.add_argument("--num-prompts", type=int, default=32)
    kl.add_argument("--max-tokens", type=int, default=64, help="continuation length sampled from the base")
    kl.add_argument("--temperature", type=float, default=1.0)
    kl.add_argument("--top-p", type=float, default=1.0)
    kl.add_argument("--seed", type=int, default=0)
    kl.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    kl.add_argument("--save-tokens", action="store_true", help="also store token ids and per-token KL in the JSON")
    _engine_opts(kl)
    _common(kl)
    geo = sub.add_parser("geometry", help="‖Δ‖, ‖Δ‖/‖W‖, cosine between runs, top-k energy of Δ",
                         allow_abbrev=False)
    geo.add_argument("--base", required=True, help="base model directory")
    geo.add_argument("--run", required=True, action="append", metavar="[LABEL=]DIR",
                     help="fine-tuned model directory (repeatable; cosines for every pair)")
    geo.add_argument("--top-k", default="1,4,16", help="comma-separated k for the energy fractions")
    geo.add_argument("--svd-max-elements", type=int, default=1 << 26, help="skip the SVD of larger matrices")
    _common(geo)
    interp = sub.add_parser("interpolate", help="task metrics along θ(α) = (1 − α)·θ_A + α·θ_B",
                            allow_abbrev=False)
    interp.add_argument("--a", required=True, help="checkpoint A (α = 0)")
    interp.add_argument("--b", required=True, help="checkpoint B (α = 1)")
    interp.add_argument("--task", required=True, help="task name or module:factory")
    interp.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a task option")
    interp.add_argument("--alphas", help="comma-separated α values (overrides --grid/--lo/--hi)")
    interp.add_argument("--grid", type=int, default=11, help="number of evenly spaced α (default 11)")
    interp.add_argument("--lo", type=float, default=0.0, help="smallest α (below 0 extrapolates past A)")
    interp.add_argument("--hi", type=float, default=1.0, help="largest α (above 1 extrapolates past B)")
    interp.add_argument("--size", type=int, default=64, help="held-out examples per point")
    interp.add_argument("--train-size", type=int, default=0, help="training examples per point (train reward)")
    interp.add_argument("--max-tokens", type=int, default=256)
    interp.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="chat template (default: the task's choice)")
    _engine_opts(interp)
    _common(interp)
    return parser


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _model_dir(path: str, what: str) -> str:
    if not Path(path).is_dir():
        raise BadInput(f"{what} directory {path!r} not found")
    return path


def labelled(items: list[str], what: str) -> dict[str, str]:
    """LABEL=DIR (or DIR, labelled by its name) -> {label: dir}; labels must be unique."""
    out: dict[str, str] = {}
    for item in items:
        label, eq, path = item.partition("=")
        if not eq or not label or "/" in label:
            label, path = Path(item.rstrip("/")).name or item, item
        if label in out:
            raise BadInput(f"two {what}s are labelled {label!r}; name them with LABEL=DIR")
        out[label] = _model_dir(path, what)
    return out


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"{what} must be comma-separated numbers, got {text!r}") from None


def _kl(args: argparse.Namespace) -> int:
    from fastes.analysis.kl import kl_drift_many
    from fastes.analysis.prompts import read_prompts
    from fastes.analysis.report import write_report

    if args.num_prompts < 1 or args.max_tokens < 1:
        raise BadInput("--num-prompts and --max-tokens must be >= 1")
    base = _model_dir(args.base, "base model")
    tuned = labelled(args.tuned, "tuned model")
    prompts = read_prompts(args.prompts, args.num_prompts) if args.prompts else None
    device = _device(args.device)
    results = kl_drift_many(base, tuned, prompts=prompts, num_prompts=args.num_prompts, prompt_set=args.prompt_set,
                            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                            top_p=args.top_p, use_chat_template=args.chat, dtype=_dtype(args.dtype, device),
                            device=device, kv_cache_tokens=args.kv_tokens)
    written = write_report(args.out, kl=results, include_tokens=args.save_tokens)
    for label, r in results.items():
        print(f"KL(base ‖ {label}): {r.mean_kl:.6g} nats/token over {r.num_tokens} tokens, "
              f"{len(r.per_prompt)} prompts")
    print(f"wrote {written['kl']} and {written['json']}")
    return 0


def _geometry(args: argparse.Namespace) -> int:
    from fastes.analysis.geometry import update_geometry
    from fastes.analysis.report import write_report

    ks = [int(k) for k in _floats(args.top_k, "--top-k")]
    if not ks or min(ks) < 1:
        raise BadInput("--top-k values must be >= 1")
    runs = labelled(args.run, "run")
    geometry = update_geometry(_model_dir(args.base, "base model"), runs, top_k=ks,
                               svd_max_elements=args.svd_max_elements, device=_device(args.device))
    written = write_report(args.out, geometry=geometry)
    for run in geometry.runs:
        print(f"{run}: ‖Δ‖ {geometry.total['delta_norm'][run]:.6g}, ‖Δ‖/‖W‖ {geometry.total['relative'][run]:.4g}")
    for pair, value in geometry.total["cosine"].items():
        print(f"cos({pair.replace('|', ', ')}) = {value:.4f}")
    print(f"wrote {written['geometry']} and {written['json']}")
    return 0


def _interpolate(args: argparse.Namespace) -> int:
    from fastes.analysis.interpolate import alpha_grid, interpolate
    from fastes.analysis.report import write_report

    if args.size < 1 or args.max_tokens < 1 or args.train_size < 0:
        raise BadInput("--size and --max-tokens must be >= 1, --train-size >= 0")
    alphas = _floats(args.alphas, "--alphas") if args.alphas else alpha_grid(args.grid, args.lo, args.hi)
    device = _device(args.device)
    result = interpolate(_model_dir(args.a, "checkpoint A"), _model_dir(args.b, "checkpoint B"), args.task,
                         alphas=alphas, size=args.size, train_size=args.train_size, max_tokens=args.max_tokens,
                         use_chat_template=args.chat, task_options=parse_options(args.option),
                         dtype=_dtype(args.dtype, device), device=device, kv_cache_tokens=args.kv_tokens)
    written = write_report(args.out, interpolation=result)
    for i, alpha in enumerate(result.alphas):
        print(f"α = {alpha:+.3f}: " + ", ".join(f"{k} {v[i]:.4f}" for k, v in result.metrics.items()))
    print("barriers: " + ", ".join(f"{k} {v:.4f}" for k, v in result.barriers.items()))
    print(f"wrote {written['interpolation']} and {written['json']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``fastes analyze`` with ``argv`` (the arguments after ``analyze``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("fastes analyze", lambda: _run(argv))


def _run(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return {"kl": _kl, "geometry": _geometry, "interpolate": _interpolate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
