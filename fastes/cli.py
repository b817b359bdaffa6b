"""`fastes train | eval | generate | bench`: argument parsing only; the work lives in fastes.es and the engine.

Bad input (missing file, unknown key or task, invalid value, malformed model directory,
a device this machine lacks) is reported as one line on stderr with exit code 2, before
anything is written. A checkpoint is data: resuming never imports or calls plug-in code
that only the checkpoint names (the user names it again, or passes --trust-checkpoint-code),
and --dry-run imports and calls nothing of the user's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastes._cliutil import EXIT_BAD_INPUT, BadInput, OneLineParser, resolve_model_path, run_command
from fastes.cli_eval import add_eval_args, run_eval

TRAIN_HELP = """\
Every config key can be overridden: --key value for top-level keys (--model DIR, --task NAME, --steps N,
--out DIR, --resume DIR, --seed N), --section.key value for sections (--population.size 32, --optim.lr 1e-3,
--sampling.max_tokens 256), or --key value when the key is unique across sections (--lr 1e-3).
Task options: --task_options.NAME value. Without --config, the bundled demo (configs/demo.yaml) runs."""


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="fastes", description="Evolution Strategies fine-tuning of LLMs at the cost of "
                           "batched inference.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,generate,bench,analyze}",
                                parser_class=OneLineParser)
    train = sub.add_parser("train", help="run ES training from a YAML config", epilog=TRAIN_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    train.add_argument("--config", help="YAML config (default: the bundled demo)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and memory plan; run nothing")
    train.add_argument("--trust-checkpoint-code", action="store_true",
                       help="with --resume and no --config: import the plug-ins (task, rewards, member_fitness) the "
                       "checkpoint names; without it they must be named again on the command line")
    ev = sub.add_parser("eval", help="accuracy, reward and pass@k of a model on a task or a config's eval sets",
                        allow_abbrev=False)
    add_eval_args(ev)
    _engine_args(ev)
    gen = sub.add_parser("generate", help="generate text from a model directory", allow_abbrev=False)
    gen.add_argument("--model", required=True, help="HF model directory")
    gen.add_argument("--prompt", required=True, action="append", help="prompt text (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--samples", "--n", type=int, default=1, help="samples per prompt (vLLM's n)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    for name in ("repetition", "presence", "frequency"):
        gen.add_argument(f"--{name}-penalty", type=float, default=1.0 if name == "repetition" else 0.0)
    gen.add_argument("--min-tokens", type=int, default=0, help="no EOS / stop before this many tokens")
    gen.add_argument("--logprobs", type=int, default=None, metavar="K",
                     help="print each token's log-probability and the K most likely tokens")
    _engine_args(gen)
    bench = sub.add_parser("bench", help="run the benchmarks (python -m bench)", allow_abbrev=False)
    bench.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    sub.add_parser("analyze", help="off-task KL drift, update geometry, interpolation (fastes analyze --help)",
                   add_help=False)
    return parser


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap prompts in the tokenizer's chat template (default: the task's choice / off)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_command("fastes", lambda: _run(argv))
    except BrokenPipeError:  # `fastes ... | head`: the reader left; say nothing more
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout must stay a file until exit
        return 0


def _run(argv: list[str]) -> int:
    """Parse ``argv`` and run its command; bad input raises (``main`` reports it)."""
    parser = _parser()
    if argv[:1] == ["train"]:
        args, overrides = parser.parse_known_args(argv)
        return _train(args, overrides)
    if argv[:1] == ["analyze"]:
        from fastes.analysis import cli as analysis_cli

        return analysis_cli.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return {"eval": _eval, "generate": _generate, "bench": _bench}[args.command](args)


# ---------------------------------------------------------------------- train


def demo_config() -> Path | None:
    """configs/demo.yaml of a source checkout, or the copy installed with the package."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "configs" / "demo.yaml", package / "configs" / "demo.yaml"):
        if candidate.is_file():
            return candidate
    return None


def checkpoint_plugins(data: dict[str, Any]) -> dict[tuple[str, ...], str]:
    """Config key -> plug-in spec of every user code reference in a config mapping (built-in task names excluded)."""
    found: dict[tuple[str, ...], str] = {}
    task = data.get("task")
    if isinstance(task, str) and ":" in task:
        found[("task",)] = task
    rewards = data.get("rewards") or []
    specs = [r.get("func") if isinstance(r, dict) else r for r in (rewards if isinstance(rewards, list) else [rewards])]
    specs = [str(f) for f in specs if f is not None and ":" in str(f)]
    if specs:
        found[("rewards",)] = ", ".join(specs)
    fitness = data.get("fitness")
    if isinstance(fitness, dict) and fitness.get("member_fitness"):
        found[("fitness", "member_fitness")] = str(fitness["member_fitness"])
    return found


def _checkpoint_data(resume: str, overrides: list[str], trust: bool) -> dict[str, Any]:
    """The config stored in a checkpoint, minus its authority to run code, writing where the run now is."""
    from fastes.es import checkpoint
    from fastes.es.config import parse_overrides, resolve_key

    found = checkpoint.find_checkpoint(resume)
    data = dict(checkpoint.load_state(found)["config"])
    given = {resolve_key(k.replace("-", "_")) for k, _ in parse_overrides(overrides)
             if not k.startswith("task_options.")}
    untrusted = {key: spec for key, spec in checkpoint_plugins(data).items() if key not in given}
    if untrusted and not trust:
        named = ", ".join(f"{'.'.join(k)} {v!r}" for k, v in untrusted.items())
        again = ", ".join(f"--{'.'.join(k)}" for k in untrusted)
        raise BadInput(f"resume: the checkpoint names plug-in code ({named}); a checkpoint is data, so fastes runs "
                       f"no code it names: name it again ({again}) or add --trust-checkpoint-code")
    if ("out",) not in given and found.parent.name == "checkpoints":  # a moved run writes where it now is
        data["out"] = str(found.parent.parent)
    return data


def load_train_config(config_file: str | None, overrides: list[str], trust_checkpoint: bool = False
                      ) -> tuple[Any, bool]:
    """(TrainConfig, is_demo) from --config, or from the checkpoint named by --resume, or the demo config."""
    from fastes.es.config import TrainConfig, apply_overrides, parse_overrides, read_yaml

    resume = next((v for k, v in parse_overrides(overrides) if k == "resume"), None)
    is_demo = False
    if config_file is not None:
        data = read_yaml(config_file)
        resolve_model_path(data, Path(config_file))
    elif resume:
        data = _checkpoint_data(resume, overrides, trust_checkpoint)
    else:
        demo = demo_config()
        if demo is None:
            raise BadInput("no --config given and the bundled demo config (configs/demo.yaml) is not installed")
        data, is_demo = read_yaml(demo), True
        resolve_model_path(data, demo)
    config = TrainConfig.from_dict(apply_overrides(data, overrides))
    if is_demo and not Path(config.model).is_dir():
        raise BadInput(f"the demo model {config.model!r} is not there yet (make it with scripts/make_demo_model.py)")
    return config, is_demo


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    config, is_demo = load_train_config(args.config, overrides, args.trust_checkpoint_code)
    if args.dry_run:  # imports and calls nothing of the user's: plug-ins are listed, not loaded
        from fastes.es.memory_plan import plan_memory
        from fastes.es.runtime import resolve_task

        if ":" not in config.task:
            resolve_task(config.task, config.task_options)  # a bad built-in task name or option fails here
        plan = plan_memory(config)
        print(config.to_yaml(), end="")
        for key, spec in checkpoint_plugins(config.to_dict()).items():
            print(f"# plug-in {'.'.join(key)}: {spec} (not imported in a dry run)")
        print("# memory plan")
        for item, amount in plan:
            print(f"#   {item:<18} {amount}")
        return 0
    from fastes.es.trainer import Trainer

    if is_demo:
        print(f"fastes: running the demo config {demo_config()}", file=sys.stderr)
    from fastes.es.distributed import DistributedError
    from fastes.es.safety import NonFiniteUpdate, PluginFailure

    try:
        trainer = Trainer(config)  # loads and validates everything before the run directory is created
        result = trainer.train()
    except (PluginFailure, ValueError) as err:  # every rank of a distributed run meets the same error
        distributed = os.environ.get("WORLD_SIZE", "1") != "1"
        if isinstance(err, ValueError) and not distributed:
            raise  # one process: bad input, reported by run_command (exit 2)
        code = 1 if isinstance(err, PluginFailure) else EXIT_BAD_INPUT  # a plug-in broke at run time: exit 1
        rank = os.environ.get("RANK", "0")
        if isinstance(err, (PluginFailure, NonFiniteUpdate)):  # decided from gathered data: the same everywhere
            if rank == "0":
                print(f"fastes: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
            if distributed and trainer.dist is not None:  # nobody leaves before rank 0 has said why
                try:
                    trainer.dist.barrier()
                except DistributedError:
                    pass
        else:  # maybe this rank's own (its device, its files): every rank says what it met
            print(f"fastes: error: rank {rank}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        if distributed:
            sys.stdout.flush()
            os._exit(code)  # as below: skip the teardown of a process group
        return code
    except DistributedError as err:  # a peer died or hung: not bad input, and the last checkpoint is intact
        print(f"fastes: error: distributed run stopped: {err}; resume from the last checkpoint in {config.out} "
              "with --resume (any number of processes)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Leave without interpreter teardown: gloo/NCCL threads still hold the broken group, and their C++
        # destructors can abort() (exit -6 instead of 1). Checkpoints are already on disk (written atomically).
        os._exit(1)
    if trainer.dist is not None:
        trainer.dist.close()
    if not trainer.is_main:
        return 0
    summary = ", ".join(f"{k} {result[k]:.4g}" for k in ("reward/mean", "eval/accuracy", "eval/reward") if k in result)
    print(f"done: {result['step']} steps in {config.out}" + (f" ({summary})" if summary else ""))
    if is_demo:  # the change on concrete held-out problems, from the evaluations the run saved
        from fastes.demo import answers_table

        table = answers_table(config.out)
        if table:
            print(f"held-out answers before and after ES (curve: {config.out}/curves.png):\n{table}")
    return 0


# ---------------------------------------------------------------------- eval / generate / bench


def _load_engine(model: str, dtype: str, device: str) -> Any:
    from fastes.engine.engine import Engine
    from fastes.es.trainer import resolve_device, resolve_dtype

    if not Path(model).is_dir():
        raise BadInput(f"model directory {model!r} not found")
    dev = resolve_device(device)
    engine = Engine.from_pretrained(model, dtype=resolve_dtype(dtype, dev), device=dev)
    if engine.tokenizer is None:
        raise BadInput(f"model directory {model!r} has no tokenizer (tokenizer.json)")
    return engine


def _eval(args: argparse.Namespace) -> int:
    return run_eval(args, _load_engine)


def _generate(args: argparse.Namespace) -> int:
    from fastes.engine.sampling import SamplingParams

    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, min_tokens=args.min_tokens,
                              logprobs=args.logprobs)
    if args.samples < 1:
        raise BadInput(f"--samples must be >= 1, got {args.samples}")
    engine = _load_engine(args.model, args.dtype, args.device)
    outs = engine.generate(args.prompt, sampling=sampling, samples_per_prompt=args.samples,
                           use_chat_template=bool(args.chat))
    single = len(args.prompt) == 1 and args.samples == 1
    for p, prompt in enumerate(args.prompt):
        for s, completion in enumerate(outs[0][p]):
            if single:
                print(completion.text)
            else:
                print(f"--- prompt {p} sample {s}: {prompt!r} ({completion.finish_reason})\n{completion.text}")
            if completion.logprobs is not None:
                _print_logprobs(engine, completion, args.logprobs)
    return 0


def _print_logprobs(engine: Any, completion: Any, k: int) -> None:
    """One line per generated token: its log-probability and rank, then the k most likely tokens."""
    def show(token: int) -> str:
        return repr(engine.tokenizer.decode([token]))

    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank <= k)
        top = ", ".join(f"{show(t)} {value:.4f}" for _, t, value in ranked)
        mine = entry[token]
        print(f"  [{i}] {show(token)} logprob {mine.logprob:.4f} rank {mine.rank}" + (f" | top: {top}" if top else ""))
    print(f"  cumulative logprob {completion.cumulative_logprob:.4f}")


def bench_dir() -> Path | None:
    """The directory holding bench/__main__.py: the working directory or this source checkout."""
    root = Path(__file__).resolve().parent.parent
    return next((d for d in (Path.cwd(), root) if (d / "bench" / "__main__.py").is_file()), None)


def _bench(args: argparse.Namespace) -> int:
    where = bench_dir()
    if where is None:
        print("fastes bench: no benchmark runner (bench/__main__.py) here; run the bench modules directly from a "
              "source checkout, e.g. python -m bench.ops_linear", file=sys.stderr)
        return EXIT_BAD_INPUT
    return subprocess.call([sys.executable, "-m", "bench"] + (["--quick"] if args.quick else []), cwd=where)


if __name__ == "__main__":
    sys.exit(main())
