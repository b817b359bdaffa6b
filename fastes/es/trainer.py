"""The ES loop: ask → generate → score → shape → tell, with nothing between steps but (seed, step, state).

Every source of randomness is a function of counters: the noise of (seed, step, name,
member) by the noise contract, the sampling seed and the prompt batch of (seed, step).
So a step is reproducible from the weights and optimizer state alone, which is what
makes resume bit-identical (see fastes.es.checkpoint).

``AskTell`` is the loop without generation, for people with their own rollout code:
``pop = es.ask(step)``, evaluate the members of ``pop`` however you like, then
``es.tell(step, fitness)`` shapes the fitness and applies the update.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastes.es import checkpoint as ckpt
from fastes.es.config import TrainConfig
from fastes.es.distributed import Distributed, NullLogger
from fastes.es.evaluation import (
    RewardPairs,
    build_eval_sets,
    encode_prompts,
    evaluate,
    run_eval_sets,
    sample_completions,
)
from fastes.es.logger import RunLogger, check_report_to, truncate_metrics
from fastes.es.memory_plan import load_engine, plan_memory
from fastes.es.optim import AskTell
from fastes.es.run_dir import FailedStartCleanup, check_run_dir
from fastes.es.runtime import cpu_threads_for, derive_seed, resolve_device, resolve_dtype, resolve_task
from fastes.es.safety import FailureStreak, check_finite, check_kv_pool, observe_step, warn


class Trainer:
    """Runs a TrainConfig. ``task``/``rewards``/``member_fitness``/``engine`` override what the config names."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        task: Any = None,
        rewards: RewardPairs | None = None,
        member_fitness: Callable[..., float] | None = None,
        engine: Any = None,
    ) -> None:
        from fastes.es.rewards import load_reward

        config.validate()
        self.config = config
        self._perms: dict[int, list[int]] = {}  # epoch -> shuffled example order
        self._ids: dict[int, list[int]] = {}  # example index -> prompt token ids
        self.resume_dir = ckpt.find_checkpoint(config.resume) if config.resume else None
        self.state = ckpt.load_state(self.resume_dir) if self.resume_dir else None
        self.start_step = int(self.state["step"]) if self.state else 0
        self.run_dir = Path(config.out)
        self.dist = Distributed.from_env(config, resolve_device(config.device))  # None in one process
        self.is_main = self.dist is None or self.dist.is_main  # only rank 0 logs and writes checkpoints
        if self.is_main:
            self._check_run_dir()
        self.task = task if task is not None else resolve_task(config.task, config.task_options)
        if rewards is None:
            rewards = [(load_reward(r["func"]), float(r["weight"])) for r in config.rewards] or [
                (self.task.reward, 1.0)
            ]
        self.rewards = rewards
        spec = config.fitness.member_fitness
        self.member_fitness = member_fitness or (load_reward(spec) if spec else None)
        self.train_set = list(self.task.train_examples())
        if not self.train_set:
            raise ValueError(f"task {config.task!r} has no training examples")
        chat = config.use_chat_template
        self.use_chat = bool(getattr(self.task, "use_chat_template", False) if chat is None else chat)
        self.eval_sets = build_eval_sets(config, self.task, self.rewards, self.use_chat)  # named sets, first primary
        self.eval_set = [e for s in self.eval_sets for e in s.examples]
        self.report_to = [n for n in config.report_to if n != "tensorboard" or config.tensorboard]
        if self.is_main:
            check_report_to(self.report_to)  # a sink asked for but not installed: one line, before any loading
        self._reward_ctx: dict[str, Any] = {"timeout_s": config.reward_timeout_s}
        self.reward_errors: dict[str, str] = {}  # each failing reward plug-in's first error in the last scoring
        self.engine = engine if engine is not None else self._load_engine()
        if self.engine.tokenizer is None:
            raise ValueError(f"model directory {config.model!r} has no tokenizer (tokenizer.json)")
        self._check_kv_pool()
        scales = self.state.get("noise_scales") if self.state else None
        self.es = AskTell(self.engine, config, noise_scales=scales)
        if self.state:
            ckpt.restore_training_state(self.resume_dir, self.state, self.config.population.mode, self.engine.model,
                                        self.es.optimizer)
        self.failures = FailureStreak(config.max_failed_steps, quiet=not self.is_main)
        self.eval_history: dict[int, float] = {int(k): float(v) for k, v in
                                               ((self.state or {}).get("eval_history") or {}).items()}

    # ------------------------------------------------------------------ setup

    def _check_run_dir(self) -> None:
        check_run_dir(self.run_dir, self.resume_dir)  # never writes over what fastes did not write

    def _load_engine(self) -> Any:
        cfg = self.config
        device = self.dist.device if self.dist else resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        if not Path(cfg.model).is_dir():
            raise ValueError(f"model directory {cfg.model!r} not found")
        lora = cfg.population.mode == "lora"
        path = self.resume_dir if self.resume_dir is not None and not lora else cfg.model
        if str(device).startswith("cpu"):
            cpu_threads_for(Path(cfg.model))
        return load_engine(cfg, path, device, dtype)  # on CUDA: the KV pool after optimizer state etc.

    def _check_kv_pool(self) -> None:
        """The longest train / eval prompt plus max_tokens must fit the pool: found now, not mid-run."""
        pool = getattr(getattr(self.engine, "manager", None), "num_blocks", None)
        if pool is None:  # a stand-in engine without a paged pool
            return
        lengths = [len(self._prompt_ids(i)) for i in range(len(self.train_set))]
        lengths += [len(ids) for ids in encode_prompts(self.engine, self.task, self.eval_set, self.use_chat)]
        check_kv_pool(pool * self.engine.block_size, lengths, self.config.sampling.max_tokens)

    # ------------------------------------------------------------------ data

    def _position_index(self, position: int) -> int:
        """Training example at a position of the endless stream: epoch-wise shuffles from (seed, epoch)."""
        n = len(self.train_set)
        epoch, offset = divmod(position, n)
        if epoch not in self._perms:
            order = list(range(n))
            random.Random(derive_seed(self.config.seed, epoch, "data")).shuffle(order)
            self._perms = {epoch: order}
        return self._perms[epoch][offset]

    def batches(self, step: int) -> list[list[int]]:
        """Example indices of each prompt batch of ``step``: one shared batch, or one per noise index."""
        cfg = self.config
        count = (
            1 if cfg.same_prompts else (cfg.population.size // 2 if cfg.population.antithetic else cfg.population.size)
        )
        per = cfg.prompts_per_step
        start = step * count * per
        return [[self._position_index(start + b * per + i) for i in range(per)] for b in range(count)]

    def _prompt_ids(self, index: int) -> list[int]:
        if index not in self._ids:
            self._ids[index] = encode_prompts(self.engine, self.task, [self.train_set[index]], self.use_chat)[0]
        return self._ids[index]

    def _member_batch(self, member: int) -> int:
        if self.config.same_prompts:
            return 0
        return member // 2 if self.config.population.antithetic else member

    # ------------------------------------------------------------------ one step

    def _fitness(self, texts: list[str], flat_prompts: list[str],
                 examples: list[Any]) -> tuple[torch.Tensor, list[float], dict[str, float]]:
        """(fitness per block, rewards, reward stats) of rollouts laid out block by block (a member, or the centre)."""
        from fastes.es.fitness import evaluate_member_fitness, make_rollouts, member_fitness
        from fastes.es.rewards import score_rewards
        from fastes.es.tasks.base import collate_columns

        cfg = self.config
        per, k = cfg.prompts_per_step, cfg.samples_per_prompt
        report = score_rewards(self.rewards, texts, flat_prompts, collate_columns(examples), **self._reward_ctx)
        scores, stats, self.reward_errors = report.scores, report.stats, report.errors  # errors: plug-in -> first
        block = per * k
        blocks = len(scores) // block
        grid = [[scores[m * block + j * k : m * block + (j + 1) * k] for j in range(per)] for m in range(blocks)]
        if self.member_fitness is not None:
            rollouts = []
            for m in range(blocks):
                member_examples = examples[m * block : (m + 1) * block : k]
                columns = collate_columns(member_examples)
                completions = [texts[m * block + j * k : m * block + (j + 1) * k] for j in range(per)]
                rollouts.append(make_rollouts([e.prompt for e in member_examples], completions, grid[m], columns))
            fitness, fit_stats = evaluate_member_fitness(self.member_fitness, rollouts)
            stats.update(fit_stats)
        elif cfg.fitness.pass_at_k:
            fitness = member_fitness(grid, "pass@k", k=cfg.fitness.pass_at_k)
        else:
            fitness = member_fitness(grid, "mean")
        return fitness, scores, stats

    def center_fitness(self, step: int) -> torch.Tensor:
        """Fitness of the unperturbed weights on each prompt batch of ``step`` (the centre baseline), float64.

        Same prompts, sampling seed and fitness rule as the members; with common random numbers also the same
        sampling stream (the unperturbed row's), so member − centre isolates the perturbation's effect.
        """
        cfg = self.config
        batches = self.batches(step)
        prompts = [self._prompt_ids(i) for batch in batches for i in batch]
        sampling = cfg.sampling_params(seed=derive_seed(cfg.seed, step, "sampling"))
        outs = self.engine.generate(prompts, sampling=sampling, samples_per_prompt=cfg.samples_per_prompt)
        texts, flat_prompts, examples, ids = [], [], [], []
        for j, index in enumerate(i for batch in batches for i in batch):
            for completion in outs[0][j]:
                ids.append(completion.token_ids)
                texts.append(completion.text)
                flat_prompts.append(self.train_set[index].prompt)
                examples.append(self.train_set[index])
        self._reward_ctx = self._reward_context(step, ids)
        members_errors = self.reward_errors  # the members' reward errors are the ones a failure reports
        center = self._fitness(texts, flat_prompts, examples)[0]
        self.reward_errors = members_errors
        return center

    def _reward_context(self, step: int, ids: list[list[int]]) -> dict[str, Any]:
        """What reward functions get besides prompts, completions and columns (TRL's keyword arguments)."""
        from fastes.es.rewards import TrainerState

        position = step * len(self.batches(0)) * self.config.prompts_per_step
        state = TrainerState(global_step=step, max_steps=self.config.steps, epoch=position / len(self.train_set))
        return {"completion_ids": ids, "trainer_state": state, "timeout_s": self.config.reward_timeout_s}

    def _samples(self, step: int, prompts: list[Any], texts: list[str], scores: list[float]) -> list[Any]:
        """A few of this step's rollouts, every evaluation.log_completions_every steps (rank 0's own)."""
        ev = self.config.evaluation
        if not (ev.log_completions_every and ev.log_completions and step % ev.log_completions_every == 0):
            return []
        return sample_completions(prompts, texts, scores, ev.log_completions)

    def train_step(self, step: int) -> dict[str, Any]:
        """Generate with the population of ``step``, score, and apply the update; returns the metrics."""
        cfg, t0 = self.config, time.perf_counter()
        pop = self.es.ask(step)
        batches = self.batches(step)
        per, k = cfg.prompts_per_step, cfg.samples_per_prompt
        prompts = [self._prompt_ids(i) for batch in batches for i in batch]
        sampling = cfg.sampling_params(seed=derive_seed(cfg.seed, step, "sampling"))
        members = self.dist.members(pop) if self.dist else list(range(pop.size))
        share: dict[str, Any] = {"members": members} if self.dist else {}  # a rank generates its share
        if not cfg.same_prompts:  # each member generates only its own noise index's batch
            share["member_prompts"] = [range(self._member_batch(m) * per, (self._member_batch(m) + 1) * per)
                                       for m in members]
        outs = self.engine.generate(prompts, sampling=sampling, population=pop, step=step, samples_per_prompt=k,
                                    **share)
        gen_s = time.perf_counter() - t0
        texts, flat_prompts, examples, tokens, ids = [], [], [], 0, []
        for i, m in enumerate(members):
            b = self._member_batch(m)
            for j, index in enumerate(batches[b]):
                example = self.train_set[index]
                for completion in outs[i][j]:
                    ids.append(completion.token_ids)
                    texts.append(completion.text)
                    flat_prompts.append(example.prompt)
                    examples.append(example)
                    tokens += len(completion.token_ids)
        self._reward_ctx = self._reward_context(step, ids)
        fitness, scores, stats = self._fitness(texts, flat_prompts, examples)
        samples = self._samples(step, flat_prompts, texts, scores)
        if self.dist is not None:  # N fitness floats cross the network; rewards and stats only for the metrics
            fitness = self.dist.gather_fitness(fitness, pop)
            scores, tokens, stats = self.dist.gather_rollouts(scores, tokens, stats)
        if cfg.fitness.center_baseline:  # every rank scores the centre itself: same weights, prompts and seed
            center = self.center_fitness(step)
            stats["fitness/center"] = float(center.mean())
            fitness = fitness - center[[self._member_batch(m) for m in range(pop.size)]]
        observe_step(self, step, stats, len(scores), pop.size, texts, flat_prompts, examples)  # PluginFailure
        coeffs = self.es.tell(step, fitness)
        if coeffs is None and self.is_main and not self.failures.count:
            warn(f"step {step}: skipped, the {pop.size} member fitnesses are all equal ({float(fitness[0]):.4g})")
        check_finite(self.engine.model.params, self.engine.perturbed_names(pop), step, self.es.lr(step))
        all_scores = torch.tensor(scores, dtype=torch.float64)
        elapsed = time.perf_counter() - t0
        record = {
            "reward/mean": float(all_scores.mean()),
            "reward/std": float(all_scores.std(unbiased=False)),
            "reward/max": float(all_scores.max()),
            "fitness/mean": float(fitness.mean()),
            "fitness/std": float(fitness.std(unbiased=False)),
            "fitness/max": float(fitness.max()),
            "skipped": int(coeffs is None),
            "lr": self.es.lr(step),
            "sigma": pop.sigma,
            "completion/tokens_mean": tokens / max(1, len(scores)),
            "time/step_s": elapsed,
            "time/generate_s": gen_s,
            "tokens/s": tokens / gen_s if gen_s > 0 else 0.0,
        }
        record.update(stats)
        if samples and self.is_main:
            record["samples"] = samples
        return record

    def evaluate(self, step: int | None = None) -> dict[str, Any]:
        """The unperturbed model on every eval set (fastes.es.evaluation); rows saved when ``step`` is given."""
        save = step is not None and self.is_main and self.config.evaluation.save_outputs
        return run_eval_sets(self.engine, self.eval_sets, step or 0, self.config, dist=self.dist,
                             run_dir=self.run_dir if save else None, timeout_s=self.config.reward_timeout_s)

    # ------------------------------------------------------------------ the run

    def state_dict(self, step: int) -> dict[str, Any]:
        """What trainer_state.json records (weights and fp32 buffers go to files beside it)."""
        cfg = self.config
        return {
            "step": step,
            "seed": cfg.seed,
            "config": cfg.to_dict(),
            "rng": {
                "noise": {"key": cfg.seed, "next_step": step},
                "sampling": {"seed": "derive_seed(seed, step, 'sampling')", "next_step": step},
                "data": {
                    "next_position": step * len(self.batches(0)) * cfg.prompts_per_step,
                    "examples": len(self.train_set),
                },
            },
            "model": {
                "source": str(cfg.model),
                "dtype": str(self.engine.model.dtype).replace("torch.", ""),
                "lora": bool(self.engine.model.lora),
            },
            "optimizer": self.es.optimizer.state_meta(),
            "noise_scales": self.es.noise_scales(),
            "eval_history": {str(k): v for k, v in sorted(self.eval_history.items())},
        }

    def save(self, step: int) -> Path:
        """Rank 0 writes the checkpoint (the state is identical on every rank); the others wait for it."""
        path = ckpt.checkpoint_dir(self.run_dir, step)
        if self.is_main:
            path = ckpt.save_checkpoint(self.run_dir, step, self.engine, self.state_dict(step),
                                        self.es.optimizer.state_tensors(), source_dir=self.config.model)
            if self.engine.model.lora:  # PEFT adapter in a subfolder: at the top, transformers would load it
                from fastes.models.peft import save_peft_adapter

                save_peft_adapter(self.engine.model, path / "adapter", self.config.model)
            keep = self.config.checkpoint
            ckpt.prune_checkpoints(self.run_dir, keep.keep_last, self.eval_history if keep.keep_best else None)
        if self.dist is not None:
            self.dist.barrier()
        return path

    def _eval_due(self, step: int) -> bool:
        every = self.config.eval_every
        return bool(self.eval_set) and (step == 0 or (every > 0 and step % every == 0))

    def train(self, max_steps: int | None = None) -> dict[str, Any]:
        """Run from the start (or resumed) step to ``config.steps``; ``max_steps`` stops early with a checkpoint.

        A fresh run that fails before its first step completes leaves no run directory behind."""
        cleanup = FailedStartCleanup(self.run_dir, self.resume_dir is not None) if self.is_main else None
        self._steps_done = 0
        try:
            return self._train(max_steps, cleanup)
        except BaseException:
            if cleanup is not None and not self._steps_done:
                cleanup.undo()
            raise

    def _train(self, max_steps: int | None, cleanup: FailedStartCleanup | None) -> dict[str, Any]:
        cfg = self.config
        logger: RunLogger | NullLogger = NullLogger()
        if cleanup is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cleanup.mark()
            cfg.to_yaml(self.run_dir / "config.yaml")
            truncate_metrics(self.run_dir, self.start_step)
            logger = RunLogger(self.run_dir, cfg.steps, self.start_step, cfg.progress,
                               report_to=self.report_to, config=cfg.to_dict())
        stop = cfg.steps if max_steps is None else min(cfg.steps, self.start_step + max_steps)
        step, saved = self.start_step, self.start_step
        try:
            if self.dist is not None:  # ranks start from the same weights (same files on every node, or repaired)
                logger.log({"step": step, **self.dist.check(self.engine, self.es, step)})
            while step < stop:
                record: dict[str, Any] = {"step": step}
                if self._eval_due(step):
                    record.update(self.evaluate(step))
                    if step == self.start_step and self.is_main and "eval/accuracy" in record:
                        print(f"held-out accuracy before training (step {step}): {record['eval/accuracy']:.3f}",
                              file=sys.stderr, flush=True)
                record.update(self.train_step(step))
                self._steps_done += 1
                if "eval/accuracy" in record:  # the held-out score of the weights checkpoint step-<step> holds
                    self.eval_history[step] = float(record["eval/accuracy"])
                if self.dist is not None:  # fault hooks, and the checksum guard when due, after this update
                    record.update(self.dist.after_step(self.engine, self.es, step + 1))
                logger.log(record)
                step += 1
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    self.save(step)
                    saved = step
            if step == cfg.steps and self.eval_set:
                final = self.evaluate(step)
                logger.log({"step": step, **final})
                if "eval/accuracy" in final:
                    self.eval_history[step] = float(final["eval/accuracy"])
                if self.is_main and "eval/accuracy" in final:
                    print(f"held-out accuracy after training (step {step}): {final['eval/accuracy']:.3f}",
                          file=sys.stderr, flush=True)
            if step != saved:
                self.save(step)
        finally:
            logger.close()
        return dict(logger.last, step=step)


__all__ = ["Trainer", "AskTell", "evaluate", "plan_memory", "derive_seed", "resolve_task", "resolve_device",
           "resolve_dtype"]
