"""ES vs GRPO, side by side: same base model, task, held-out eval and wall-clock budget, then the analyses.

    python -m bench.es_vs_grpo [--quick] [--model DIR] [--task NAME --task-option KEY=VALUE ...]
                               [--budget-s 300] [--es KEY=VALUE ...] [--grpo-num-generations N] [--out DIR]

ES: fastes' ``Trainer`` unchanged (``--es-config`` or configs/demo.yaml, plus ``--es`` overrides), stepped
here only to stop on a wall-clock budget. GRPO: TRL's ``GRPOTrainer`` (optional ``grpo`` extra) with TRL's
default group size and batch, rewarded by ``score_completions`` with the run's rewards (what ES optimizes).
Both are scored by ``fastes.es.trainer.evaluate`` (greedy, same held-out set; GRPO weights are copied into
a fastes engine) at start, every budget/evals seconds of training (eval time excluded) and at the end.
Samples = completions generated for training. The final checkpoints then go through ``fastes.analysis``:
KL(base ‖ tuned) off-task (English openings, or random strings of the model's vocabulary when its
tokenizer cannot spell English) and on task prompts, geometry of Δ = θ − θ_base incl. cos(Δ_ES, Δ_GRPO),
and interpolation ES ↔ GRPO, base → ES, base → GRPO. JSON + PNGs + both runs' metrics go flat into
bench/results/es_vs_grpo-<device>-<timestamp>/ (checkpoints only with ``--keep-checkpoints``). Without
TRL the GRPO side reports "TRL not installed" and ES with its analyses still runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.es_vs_grpo_report import analyze, plot_curves, table

NO_TRL = "TRL not installed (pip install 'fastes[grpo]')"


class Clock:
    """Training time with evaluation time taken out, a budget, and evaluation points every budget/evals s.

    ``timer`` is wall-clock (time.perf_counter) or this process's CPU time (time.process_time): on a machine
    shared with other jobs, CPU time is what a one-thread run would have taken on a quiet machine, and it does
    not favour whichever method happened to run while the load was lower.
    """

    def __init__(self, budget_s: float, evals: int, timer: Callable[[], float] = time.perf_counter) -> None:
        self.now = timer
        self.budget, self.every = budget_s, budget_s / max(1, evals)
        self.t0, self.paused_s, self.next_eval = 0.0, 0.0, budget_s / max(1, evals)
        self.pause_t: float | None = None

    def start(self) -> None:
        self.t0, self.paused_s = self.now(), 0.0

    def train_s(self) -> float:
        """Stands still while paused, so an eval point is stamped with the time its weights were trained for."""
        return (self.pause_t or self.now()) - self.t0 - self.paused_s

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause_t = self.now()
        try:
            yield
        finally:
            self.paused_s += self.now() - self.pause_t
            self.pause_t = None

    def eval_due(self) -> bool:
        if self.train_s() < self.next_eval:
            return False
        while self.next_eval <= self.train_s():
            self.next_eval += self.every
        return True

    def done(self) -> bool:
        return self.train_s() >= self.budget


def point(clock: Clock, step: int, samples: int, tokens: int, result: dict[str, Any], started: bool) -> dict[str, Any]:
    """One curve point: where on the clock and the sample count, and the held-out numbers."""
    return {"step": step, "train_s": clock.train_s() if started else 0.0, "samples": samples, "tokens": tokens,
            "accuracy": result["eval/accuracy"], "reward": result["eval/reward"], "eval_s": result["eval/time_s"]}


def run_es(cfg: Any, clock: Clock, work: Path) -> tuple[dict[str, Any], Any]:
    """fastes' Trainer, unchanged, stepped until the clock's budget is spent; returns (results, trainer)."""
    from fastes.es.logger import RunLogger
    from fastes.es.trainer import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(dataclasses.replace(cfg, out=str(work / "es")))
    setup_s = time.perf_counter() - t0
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    trainer.config.to_yaml(trainer.run_dir / "config.yaml")
    logger = RunLogger(trainer.run_dir, cfg.steps, 0, progress=False, tensorboard=False)
    curve: list[dict[str, Any]] = []
    step = samples = tokens = 0
    load = os.getloadavg()[0]

    def evaluate() -> None:
        with clock.paused():
            result = trainer.evaluate()
            curve.append(point(clock, step, samples, tokens, result, step > 0))
            logger.log({"step": step, **result, "bench/train_s": curve[-1]["train_s"], "bench/samples": samples})

    try:
        evaluate()
        clock.start()
        while not clock.done() and step < cfg.steps:
            record = trainer.train_step(step)
            n = cfg.population.size * len(trainer.batches(step)) * cfg.prompts_per_step * cfg.samples_per_prompt
            samples += n
            tokens += round(record["completion/tokens_mean"] * n)
            logger.log({"step": step, **record, "bench/train_s": clock.train_s(), "bench/samples": samples})
            step += 1
            if clock.eval_due() and not clock.done():
                evaluate()
        train_s = clock.train_s()
        evaluate()
    finally:
        logger.close()
    ckpt = trainer.save(step)
    return {"status": "ok", "steps": step, "train_s": train_s, "samples": samples, "tokens": tokens,
            "setup_s": setup_s, "loadavg_1min_before": load, "loadavg_1min_after": os.getloadavg()[0],
            "curve": curve, "checkpoint": str(ckpt), "metrics_file": str(trainer.run_dir / "metrics.jsonl"),
            "config": trainer.config.to_dict()}, trainer


def run_grpo(cfg: Any, args: argparse.Namespace, clock: Clock, work: Path, es: Any) -> dict[str, Any]:
    """TRL's GRPOTrainer from the same base, rewarded by the run's reward and evaluated like ES."""
    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        return {"status": "skipped", "reason": NO_TRL}
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    from fastes.engine.engine import Engine
    from fastes.es.rewards import score_completions
    from fastes.es.tasks.base import collate_columns, completion_text
    from fastes.es.trainer import evaluate, resolve_device, resolve_dtype
    from fastes.models import save_pretrained

    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(cfg.model, dtype=resolve_dtype(cfg.dtype, device), device=device,
                                    kv_cache_tokens=cfg.kv_cache_tokens or 16384)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    system = getattr(es.task, "system_prompt", None)

    def prompt_of(text: str) -> Any:
        if not es.use_chat:
            return text
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]

    keys = sorted(collate_columns(es.train_set))
    rows = [{**{k: e.columns.get(k) for k in keys}, "prompt": prompt_of(e.prompt)} for e in es.train_set]
    count = {"samples": 0, "tokens": 0}

    def run_reward(prompts: list[Any], completions: list[Any], completion_ids: Any = None, **kw: Any) -> list[float]:
        count["samples"] += len(completions)
        count["tokens"] += sum(len(c) for c in completion_ids or [])
        texts = [completion_text(c) or "" for c in completions]
        scores, _ = score_completions(es.rewards, texts, [completion_text(p) for p in prompts],
                                      {k: kw[k] for k in keys if k in kw})
        return scores

    options = {"output_dir": str(work / "grpo"), "learning_rate": args.grpo_lr, "lr_scheduler_type": "constant",
               "max_steps": 10**8, "max_completion_length": cfg.sampling.max_tokens, "save_strategy": "no",
               "report_to": "none", "logging_steps": 10, "disable_tqdm": True, "seed": cfg.seed,
               "use_cpu": device == "cpu", "bf16": device != "cpu" and torch.cuda.is_bf16_supported()}
    if args.grpo_num_generations:
        options["num_generations"] = args.grpo_num_generations
    if args.grpo_batch_size:
        options["per_device_train_batch_size"] = args.grpo_batch_size
    config = GRPOConfig(**options)
    probe = GRPOConfig(output_dir=options["output_dir"], use_cpu=options["use_cpu"], bf16=options["bf16"])
    curve: list[dict[str, Any]] = []
    sampling = cfg.sampling_params(seed=0, greedy=True)

    def eval_now(state: dict[str, torch.Tensor], step: int, started: bool) -> None:
        """The transformers weights copied into the fastes engine's own tensors, then ES's evaluation."""
        with clock.paused(), torch.no_grad():
            for name, param in engine.model.params.items():
                param.copy_(state[name].to(device=param.device, dtype=param.dtype))
            primary = es.eval_sets[0]  # ES's eval/accuracy is this set's (es.eval_set joins every set)
            result = evaluate(engine, primary.task, primary.examples, primary.rewards, sampling, primary.use_chat)
            curve.append(point(clock, step, count["samples"], count["tokens"], result, started))

    class Budget(TrainerCallback):
        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            clock.start()

        def on_step_end(self, _args: Any, state: Any, control: Any, **kw: Any) -> None:
            if clock.done():
                control.should_training_stop = True
            elif clock.eval_due():
                eval_now(kw["model"].state_dict(), state.global_step, True)

    eval_now(model.state_dict(), 0, False)
    trainer = GRPOTrainer(model=model, reward_funcs=run_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=AutoTokenizer.from_pretrained(cfg.model), callbacks=[Budget()])
    trainer.remove_callback(PrinterCallback)  # one dict per step on stdout; the log is kept in the JSON
    setup_s, load = time.perf_counter() - t0, os.getloadavg()[0]
    trainer.train()
    train_s, step = clock.train_s(), trainer.state.global_step
    eval_now(trainer.model.state_dict(), step, True)
    ckpt = save_pretrained(engine.model, work / "grpo" / "final", source_dir=cfg.model)
    shown = ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
            "learning_rate", "lr_scheduler_type", "temperature", "top_p", "beta", "loss_type", "scale_rewards",
            "num_iterations", "epsilon", "max_completion_length", "optim")
    used, defaults = ({k: getattr(getattr(c, k), "value", getattr(c, k)) for k in shown} for c in (config, probe))
    log = [r for r in trainer.state.log_history if "step" in r]
    del trainer, model
    return {"status": "ok", "trl_version": trl.__version__, "steps": step, "train_s": train_s,
            "samples": count["samples"], "tokens": count["tokens"], "setup_s": setup_s,
            "loadavg_1min_before": load, "loadavg_1min_after": os.getloadavg()[0], "curve": curve,
            "checkpoint": str(ckpt), "log": log,  # TRL's metrics, averaged over 10 steps: grpo_metrics.jsonl
            "settings": used, "trl_defaults": defaults,
            "changed_from_trl_defaults": [k for k in shown if used[k] != defaults[k]]}


def build_config(args: argparse.Namespace) -> Any:
    """The ES TrainConfig: --es-config or the demo config, with model/task/eval and --es overrides applied."""
    from fastes.cli import load_train_config
    from fastes.es.config import TrainConfig, apply_overrides

    overrides = ["--save_every", "0", "--eval_every", "0", "--progress", "false",
                 "--tensorboard", "false"] + (["--model", args.model] if args.model else [])
    overrides += (["--eval_size", str(args.eval_size)] if args.eval_size else []) + ["--" + kv for kv in args.es]
    config, _ = load_train_config(args.es_config, overrides)
    data = config.to_dict()
    if data["optim"]["schedule"] == "constant" and data["population"]["sigma_schedule"] == "constant":
        data["steps"] = 10**8  # nothing decays: run until the budget
    # else the config's (or --es steps=N's) step count is the schedules' length: ES stops at the
    # budget or there, whichever comes first (a cosine stretched to 1e8 steps would be a constant lr)
    if args.task:
        data.update(task=args.task, task_options={})
    return TrainConfig.from_dict(apply_overrides(data, [f"--task_options.{o}" for o in args.task_option]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model directory (default: the bundled demo model)")
    p.add_argument("--task", help="task name or module:factory (default: the demo's 3-digit addition)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--es-config", help="ES config YAML (default: configs/demo.yaml)")
    p.add_argument("--es", action="append", default=[], metavar="KEY=VALUE", help="ES override: optim.lr=2e-4")
    p.add_argument("--budget-s", type=float, help="training wall-clock per method (default 300; quick 30)")
    p.add_argument("--evals", type=int, default=8, help="evaluation points per run besides start and end")
    p.add_argument("--eval-size", type=int, help="held-out examples (default: the config's eval_size)")
    p.add_argument("--grpo-num-generations", type=int, help="group size (default: TRL's num_generations)")
    p.add_argument("--grpo-batch-size", type=int, help="per_device_train_batch_size (default: TRL's)")
    p.add_argument("--grpo-lr", type=float, default=3e-5, help="GRPO learning rate (TRL's 1e-6 is for billion-"
                   "parameter models; 3e-5 was the best of 1e-5..1e-3 on the demo model)")
    p.add_argument("--skip-grpo", action="store_true", help="ES and its analyses only")
    p.add_argument("--kl-prompts", type=int, default=32)
    p.add_argument("--kl-tokens", type=int, default=32, help="continuation tokens sampled from the base for KL")
    p.add_argument("--threads", type=int, help="torch CPU threads (default on CPU: 1)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="budget in wall-clock or in this "
                   "process's CPU seconds (cpu: fair on a machine shared with other jobs; one thread)")
    p.add_argument("--skip-analysis", action="store_true", help="curves only: no KL, geometry or interpolation")
    p.add_argument("--quick", action="store_true", help="30 s budgets, 3-point interpolation")
    p.add_argument("--out", type=Path, help="results directory (default: bench/results/es_vs_grpo-<dev>-<time>)")
    p.add_argument("--keep-checkpoints", action="store_true", help="copy the final checkpoints into --out")
    args = p.parse_args(argv)
    args.budget_s = args.budget_s or (30.0 if args.quick else 300.0)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads or not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
        os.environ["OMP_NUM_THREADS"] = str(args.threads or 1)  # the ES trainer keeps it (runtime.cpu_threads_for)
    from bench.common import RESULTS, device_name, git_commit, slug, versions
    from fastes.analysis.report import to_jsonable
    from fastes.es.trainer import resolve_device

    cfg = build_config(args)
    dev = resolve_device(cfg.device)
    device = device_name(dev)
    out = args.out or RESULTS / f"es_vs_grpo-{slug(device)}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="es_vs_grpo-"))
    results: dict[str, Any] = {"bench": "es_vs_grpo", "device": device, "device_type": dev, **versions(),
                               "trl": getattr(_trl(), "__version__", None), "git_commit": git_commit(),
                               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "quick": args.quick,
                               "budget_s": args.budget_s, "clock": args.clock,
                               "model": cfg.model, "task": {"name": cfg.task, "options": cfg.task_options},
                               "eval": {"size": cfg.eval_size, "max_tokens": cfg.sampling.max_tokens, "greedy": True}}
    try:
        print(f"{device}, {torch.get_num_threads()} thread(s); model {cfg.model}; task {cfg.task} "
              f"{cfg.task_options}; budget {args.budget_s:g} s per method")
        timer = time.process_time if args.clock == "cpu" else time.perf_counter
        results["es"], es = run_es(cfg, Clock(args.budget_s, args.evals, timer), work)
        shutil.copy(results["es"]["metrics_file"], out / "es_metrics.jsonl")
        es.engine = es.es = None  # free the ES weights before GRPO loads its own
        gc.collect()
        if args.skip_grpo:
            results["grpo"] = {"status": "skipped", "reason": "--skip-grpo"}
        else:
            results["grpo"] = run_grpo(cfg, args, Clock(args.budget_s, args.evals, timer), work, es)
        print(f"GRPO: {'TRL ' + results['grpo']['trl_version'] if results['grpo']['status'] == 'ok' else ''}"
              f"{results['grpo'].get('reason', '')}; settings {results['grpo'].get('settings', {})}")
        if results["grpo"]["status"] == "ok":
            log = results["grpo"].pop("log")
            (out / "grpo_metrics.jsonl").write_text("".join(json.dumps(to_jsonable(r)) + "\n" for r in log))
        runs = {k: results[k]["checkpoint"] for k in ("es", "grpo") if results[k]["status"] == "ok"}
        results["analysis"] = {} if args.skip_analysis else analyze(cfg, es, runs, args, out)
        plot_curves(results, out / "curves.png")
        if args.keep_checkpoints:
            for k, path in runs.items():
                shutil.copytree(path, out / f"checkpoint-{k}", dirs_exist_ok=True)
        results["files"] = sorted(p.name for p in out.iterdir())
        (out / "results.json").write_text(json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n")
        print(table(results))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _trl() -> Any:
    try:
        import trl

        return trl
    except ImportError:
        return None


if __name__ == "__main__":
    main()
