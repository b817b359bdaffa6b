"""`fastes eval`: the trainer's evaluation (fastes.es.evaluation) on any model directory, from the command line.

Without --config, one set named "eval": --task's held-out examples, greedy unless a
temperature or several samples are asked for. With --config, the config's
evaluation.sets with its task, rewards, sampling, eval_size and seed (each flag given
overrides them for every set), so a checkpoint is scored as its run scored it: a sampled
set draws from the same stream (fastes.es.evaluation.run_eval_sets). pass@k is the
unbiased estimator, averaged over prompts.

--out writes every completion as JSONL: FILE.jsonl (all sets, each row names its set) or
a directory (NAME.jsonl per set). Like save_pretrained and run directories (docs/design.md),
it never replaces what fastes did not write: a file is replaced only when every row in it is
an eval row, a non-empty directory only when it holds ``EVAL_MARKER``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fastes._cliutil import BadInput, parse_options, resolve_model_path

EVAL_MARKER = ".fastes-eval"
ROW_KEYS = frozenset({"set", "index", "sample", "prompt", "completion", "correct"})
_SET_FLAGS = {"samples": "samples", "temperature": "temperature", "top_p": "top_p", "pass_k": "pass_k",
              "max_tokens": "max_tokens", "size": "size"}  # flag -> key of every eval set it overrides
_SAMPLING_FLAGS = ("max_tokens", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "min_tokens")


def add_eval_args(ev: argparse.ArgumentParser) -> None:
    """The flags of `fastes eval` (the engine flags --dtype/--device/--chat are added by the caller)."""
    ev.add_argument("--model", help="HF model directory (default: the config's model)")
    ev.add_argument("--task", help="task name (countdown, arithmetic, gsm8k, jsonl, datasets) or module:factory")
    ev.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a task option (repeatable)")
    ev.add_argument("--config", help="YAML config: evaluate its evaluation.sets with its task, rewards and sampling")
    ev.add_argument("--set", action="append", default=[], dest="sets", metavar="NAME",
                    help="only this set of the config's evaluation.sets (repeatable)")
    ev.add_argument("--size", type=int, help="examples per set (default 64, or the config's eval_size)")
    ev.add_argument("--max-tokens", type=int, help="default 256, or the config's sampling.max_tokens")
    ev.add_argument("--samples", "--n", "-k", type=int, help="completions per prompt (vLLM's n); reports pass@1 and "
                    "pass@samples")
    ev.add_argument("--pass-k", type=int, action="append", metavar="K", help="report pass@K (repeatable)")
    ev.add_argument("--temperature", type=float, help="0 is greedy (the default for one sample); several samples "
                    "default to the config's sampling temperature (1.0)")
    ev.add_argument("--top-p", type=float)
    ev.add_argument("--top-k", type=int)
    ev.add_argument("--min-p", type=float)
    for name in ("repetition", "presence", "frequency"):
        ev.add_argument(f"--{name}-penalty", type=float)
    ev.add_argument("--min-tokens", type=int, help="no EOS / stop before this many tokens")
    ev.add_argument("--stop", action="append", help="stop string (repeatable)")
    ev.add_argument("--seed", type=int, help="seed of the sampled sets' streams (default: the config's, 0)")
    ev.add_argument("--out", metavar="FILE_OR_DIR", help="write every completion as JSONL: FILE.jsonl, or a "
                    "directory with NAME.jsonl per set")


def eval_config(args: argparse.Namespace) -> Any:
    """The TrainConfig to evaluate: --config (or a bare one for --task) with every given flag applied."""
    from fastes.es.config import TrainConfig, read_yaml

    if args.config is not None:
        data = read_yaml(args.config)
        resolve_model_path(data, Path(args.config))
    elif args.task is None:
        raise BadInput("eval needs --task NAME or --config FILE")
    else:
        data = {"eval_size": 64, "sampling": {"max_tokens": 256}}
    options = parse_options(args.option)
    if args.task is not None and args.task != data.get("task"):
        data["task"], data["task_options"] = args.task, options  # the config's options belong to its own task
    elif options:
        data["task_options"] = {**(data.get("task_options") or {}), **options}
    for key in ("model", "seed", "dtype", "device"):
        value = getattr(args, key)
        if value is not None and value != "auto":
            data[key] = value
    if args.chat is not None:
        data["use_chat_template"] = args.chat
    sampling = dict(data.get("sampling") or {})
    sampling.update({k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k) is not None})
    if args.stop is not None:
        sampling["stop"] = list(args.stop)
    data["sampling"] = sampling
    if args.size is not None:
        data["eval_size"] = args.size
    evaluation = dict(data.get("evaluation") or {})
    evaluation["sets"] = _select_sets(evaluation.get("sets") or [{"name": "eval"}], args)
    data["evaluation"] = evaluation
    for flag, value in (("--size", args.size), ("--max-tokens", args.max_tokens), ("--samples", args.samples)):
        if value is not None and value < 1:
            raise BadInput(f"{flag} must be >= 1, got {value}")
    return TrainConfig.from_dict(data)


def _select_sets(raw: list[Any], args: argparse.Namespace) -> list[Any]:
    """The sets named by --set (all without it), with the per-set flags given on the command line applied."""
    if not isinstance(raw, list):
        raise BadInput(f"evaluation.sets must be a list, got {type(raw).__name__}")
    names = [s.get("name") if isinstance(s, dict) else None for s in raw]
    unknown = [n for n in args.sets if n not in names]
    if unknown:
        raise BadInput(f"--set {unknown[0]!r}: no such evaluation set (the config has {names})")
    chosen = [dict(s) if isinstance(s, dict) else s for s, n in zip(raw, names, strict=True)
              if not args.sets or n in args.sets]
    for spec in chosen:
        if not isinstance(spec, dict):
            continue  # parse_eval_sets names the bad entry
        for flag, key in _SET_FLAGS.items():
            if getattr(args, flag) is not None:
                spec[key] = sorted(set(args.pass_k)) if flag == "pass_k" else getattr(args, flag)
        if args.samples is not None and args.pass_k is None:
            spec.pop("pass_k", None)  # pass@1 and pass@samples
    return chosen


def check_out(out: str | None) -> Path | None:
    """The --out path, after refusing anything fastes did not write (one line, before the model is loaded)."""
    if out is None:
        return None
    path = Path(out)
    if path.is_symlink():
        raise BadInput(f"--out {out!r} is a symbolic link; fastes writes only new paths or its own outputs")
    if path.suffix == ".jsonl" and not path.is_dir():
        if path.exists() and (not path.is_file() or not _eval_rows_only(path)):
            raise BadInput(f"--out {out!r} exists and is not a fastes eval output; fastes never overwrites files it "
                           "did not write (choose a new path)")
        return path
    if path.exists() and not path.is_dir():
        raise BadInput(f"--out {out!r} is a file that fastes eval did not write; name a new FILE.jsonl or a "
                       "directory")
    if path.is_dir() and any(path.iterdir()) and not (path / EVAL_MARKER).is_file():
        raise BadInput(f"--out {out!r} is a non-empty directory that fastes eval did not write (no {EVAL_MARKER}); "
                       "choose a new or empty directory")
    return path


def _eval_rows_only(path: Path) -> bool:
    """Whether every line of ``path`` is a JSON object with the keys of an eval row (an empty file qualifies)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not ROW_KEYS <= row.keys():
                        return False
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return True


def write_outputs(path: Path, rows_by_set: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """Rows sorted by (index, sample), each naming its set, into FILE.jsonl or DIR/NAME.jsonl (atomic per file)."""
    def lines(name: str) -> str:
        rows = sorted(rows_by_set[name], key=lambda r: (r["index"], r["sample"]))
        return "".join(json.dumps({"set": name, **r}) + "\n" for r in rows)

    if path.suffix == ".jsonl" and not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        files = {path: "".join(lines(n) for n in rows_by_set)}
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / EVAL_MARKER).write_text("fastes eval outputs: NAME.jsonl per evaluation set\n", encoding="utf-8")
        files = {path / f"{n}.jsonl": lines(n) for n in rows_by_set}
    for file, text in files.items():
        tmp = file.with_name(f".{file.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(file)
    return list(files)


def set_metrics(record: dict[str, Any], name: str) -> dict[str, Any]:
    """One set's metrics out of run_eval_sets' record (a set named "eval" is logged without its name)."""
    prefix = "eval/" if name == "eval" else f"eval/{name}/"
    return {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}


def run_eval(args: argparse.Namespace, load_engine: Any) -> int:
    """`fastes eval`: validate everything, load the model, evaluate each set, print a line per set, write --out."""
    from fastes.es.evaluation import build_eval_sets, run_eval_sets, sampling_for
    from fastes.es.rewards import load_reward
    from fastes.es.runtime import resolve_task

    config = eval_config(args)
    task = resolve_task(config.task, config.task_options)
    rewards = [(load_reward(r["func"]), float(r["weight"])) for r in config.rewards] or [(task.reward, 1.0)]
    chat = config.use_chat_template
    use_chat = bool(getattr(task, "use_chat_template", False) if chat is None else chat)
    sets = build_eval_sets(config, task, rewards, use_chat)
    for es in sets:
        try:
            sampling_for(es.spec, config, 0)
        except ValueError as err:
            raise BadInput(f"evaluation set {es.spec.name!r}: {err}") from None
    if not any(es.examples for es in sets):
        raise BadInput(f"no examples to evaluate (task {config.task!r}, sets {[s.spec.name for s in sets]})")
    out = check_out(args.out)
    engine = load_engine(config.model, config.dtype, config.device)
    rows_by_set: dict[str, list[dict[str, Any]]] = {}
    record = run_eval_sets(engine, sets, 0, config, rows_out=rows_by_set, timeout_s=config.reward_timeout_s)
    for es in sets:
        if not es.examples:
            print(f"{es.spec.name}: no examples (size 0 or an empty split)", file=sys.stderr)
            continue
        m = set_metrics(record, es.spec.name)
        passes = "".join(f", pass@{k} {m[f'pass@{k}']:.4f}" for k in es.spec.ks if f"pass@{k}" in m)
        drawn = "greedy" if sampling_for(es.spec, config, 0).temperature == 0 else "sampled"
        per = f" x {es.spec.samples} samples" if es.spec.samples > 1 else ""
        errors = f", {int(m['errors'])} reward errors" if m.get("errors") else ""
        print(f"{es.spec.name}: accuracy {m['accuracy']:.4f}, reward {m['reward']:.4f}{passes} on "
              f"{len(es.examples)} examples{per}, {drawn} ({m['time_s']:.1f}s){errors}")
    if out is not None:
        written = write_outputs(out, rows_by_set)
        print(f"completions: {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


__all__ = ["EVAL_MARKER", "add_eval_args", "check_out", "eval_config", "run_eval", "set_metrics", "write_outputs"]
