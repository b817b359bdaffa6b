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

import hashlib
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastes.es import checkpoint as ckpt
from fastes.es.config import TrainConfig
from fastes.es.distributed import Distributed, NullLogger
from fastes.es.logger import RunLogger, truncate_metrics
from fastes.es.optim import AskTell

RewardPairs = list[tuple[Callable[..., Any], float]]


def derive_seed(seed: int, step: int, purpose: str) -> int:
    """A 64-bit seed from (run seed, step, purpose): independent streams without stored RNG state."""
    digest = hashlib.blake2b(f"fastes/{purpose}/{seed}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_task(name: str, options: dict[str, Any]) -> Any:
    """A registered task (``countdown``) or a user's ``module:factory`` / ``file.py:factory`` returning a Task."""
    if ":" in name:
        from fastes.es.rewards import load_reward

        factory = load_reward(name)
        try:
            return factory(**options)
        except TypeError as err:
            raise ValueError(f"task {name!r}: bad options {sorted(options)}: {err}") from None
    from fastes.es.tasks import get_task

    return get_task(name, **options)


def encode_prompts(engine: Any, task: Any, examples: Sequence[Any], use_chat_template: bool) -> list[list[int]]:
    """Token ids of each example's prompt; the chat template carries the task's system prompt, if any."""
    tok = engine.tokenizer
    if not use_chat_template:
        return [tok.encode(e.prompt) for e in examples]
    system = getattr(task, "system_prompt", None)
    return [tok.encode_chat(e.prompt, system=system) for e in examples]


def evaluate(engine: Any, task: Any, examples: list[Any], rewards: RewardPairs, sampling: Any,
             use_chat_template: bool = False) -> dict[str, Any]:
    """Generate once per example with the unperturbed model; eval/accuracy (task.is_correct) and eval/reward."""
    from fastes.es.rewards import score_completions
    from fastes.es.tasks.base import collate_columns

    t0 = time.perf_counter()
    prompts = [e.prompt for e in examples]
    outs = engine.generate(encode_prompts(engine, task, examples, use_chat_template), sampling=sampling)
    texts = [outs[0][i][0].text for i in range(len(prompts))]
    correct = [bool(task.is_correct(t, e)) for t, e in zip(texts, examples, strict=True)]
    scores, stats = score_completions(rewards, texts, prompts, collate_columns(examples))
    return {"eval/accuracy": sum(correct) / len(correct), "eval/reward": sum(scores) / len(scores),
            "eval/errors": stats.get("reward/errors", 0.0), "eval/time_s": time.perf_counter() - t0}


SMALL_HIDDEN = 1024


def cpu_threads_for(model_dir: Path) -> None:
    """One intra-op thread for small models on CPU, unless OMP_NUM_THREADS says otherwise.

    Their matmuls are too small to split: on a 2-core machine one demo-model population
    generate took 2.4 s with one thread and 8.1 s with two (thread synchronization).
    """
    import json
    import os

    if os.environ.get("OMP_NUM_THREADS"):
        return
    try:
        hidden = int(json.loads((model_dir / "config.json").read_text()).get("hidden_size", 0))
    except (OSError, ValueError, TypeError):
        return
    if 0 < hidden <= SMALL_HIDDEN:
        torch.set_num_threads(1)


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
        self.eval_set = list(self.task.eval_examples())[: config.eval_size] if config.eval_size else []
        chat = config.use_chat_template
        self.use_chat = bool(getattr(self.task, "use_chat_template", False) if chat is None else chat)
        self.engine = engine if engine is not None else self._load_engine()
        if self.engine.tokenizer is None:
            raise ValueError(f"model directory {config.model!r} has no tokenizer (tokenizer.json)")
        scales = self.state.get("noise_scales") if self.state else None
        self.es = AskTell(self.engine, config, noise_scales=scales)
        if self.state:
            self._restore()

    # ------------------------------------------------------------------ setup

    def _check_run_dir(self) -> None:
        out = self.run_dir
        if out.exists() and not out.is_dir():
            raise ValueError(f"out {str(out)!r} exists and is not a directory")
        if out.is_dir() and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
            inside = self.resume_dir is not None and self.resume_dir.resolve().parent.parent == out.resolve()
            if not inside:
                raise ValueError(
                    f"run directory {str(out)!r} already holds a run: pass --resume {out} to continue "
                    "it, or choose another --out"
                )

    def _load_engine(self) -> Any:
        from fastes.engine.engine import Engine

        cfg = self.config
        device = self.dist.device if self.dist else resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        if not Path(cfg.model).is_dir():
            raise ValueError(f"model directory {cfg.model!r} not found")
        lora = cfg.population.mode == "lora"
        path = self.resume_dir if self.resume_dir is not None and not lora else cfg.model
        if str(device).startswith("cpu"):
            cpu_threads_for(Path(cfg.model))
        return Engine.from_pretrained(
            path,
            dtype=dtype,
            device=device,
            kv_cache_tokens=cfg.kv_cache_tokens,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
        )

    def _restore(self) -> None:
        """Optimizer state and LoRA adapters from the checkpoint (weights came with the engine)."""
        state, model = self.state or {}, self.engine.model
        saved = (state.get("config") or {}).get("population", {}).get("mode")
        if saved != self.config.population.mode:
            raise ValueError(
                f"resume: checkpoint was trained in mode {saved!r}, config asks for {self.config.population.mode!r}"
            )
        if model.lora:
            adapters = ckpt.load_tensors(self.resume_dir, "adapters", state)  # type: ignore[arg-type]
            if set(adapters) != set(model.lora_names()):
                raise ValueError("resume: the checkpoint's LoRA adapters do not match lora.rank/targets")
            for name, tensor in adapters.items():
                if tuple(tensor.shape) != tuple(model.params[name].shape):
                    raise ValueError(
                        f"resume: adapter {name} has shape {tuple(tensor.shape)}, expected "
                        f"{tuple(model.params[name].shape)} (lora.rank changed?)"
                    )
                model.params[name].copy_(tensor)
        tensors = ckpt.load_tensors(self.resume_dir, "optimizer", state)  # type: ignore[arg-type]
        self.es.optimizer.load_state(state.get("optimizer") or {}, tensors, model.device)

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

    def train_step(self, step: int) -> dict[str, Any]:
        """Generate with the population of ``step``, score, and apply the update; returns the metrics."""
        from fastes.es.fitness import evaluate_member_fitness, make_rollouts, member_fitness
        from fastes.es.rewards import score_completions
        from fastes.es.tasks.base import collate_columns

        cfg, t0 = self.config, time.perf_counter()
        pop = self.es.ask(step)
        batches = self.batches(step)
        per, k = cfg.prompts_per_step, cfg.samples_per_prompt
        prompts = [self._prompt_ids(i) for batch in batches for i in batch]
        sampling = cfg.sampling_params(seed=derive_seed(cfg.seed, step, "sampling"))
        members = self.dist.members(pop) if self.dist else list(range(pop.size))
        share = {"members": members} if self.dist else {}  # a rank generates its share of the population
        outs = self.engine.generate(prompts, sampling=sampling, population=pop, step=step, samples_per_prompt=k,
                                    **share)
        gen_s = time.perf_counter() - t0
        texts, flat_prompts, examples, tokens = [], [], [], 0
        for i, m in enumerate(members):
            b = self._member_batch(m)
            for j, index in enumerate(batches[b]):
                example = self.train_set[index]
                for completion in outs[i][b * per + j]:
                    texts.append(completion.text)
                    flat_prompts.append(example.prompt)
                    examples.append(example)
                    tokens += len(completion.token_ids)
        scores, stats = score_completions(self.rewards, texts, flat_prompts, collate_columns(examples))
        block = per * k
        grid = [[scores[m * block + j * k : m * block + (j + 1) * k] for j in range(per)] for m in range(len(members))]
        if self.member_fitness is not None:
            rollouts = []
            for m in range(len(members)):
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
        if self.dist is not None:  # N fitness floats cross the network; rewards and stats only for the metrics
            fitness = self.dist.gather_fitness(fitness, pop)
            scores, tokens, stats = self.dist.gather_rollouts(scores, tokens, stats)
        coeffs = self.es.tell(step, fitness)
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
        return record

    def evaluate(self) -> dict[str, Any]:
        """Greedy decoding of the unperturbed model on the held-out set: accuracy and mean reward."""
        if not self.eval_set:
            return {}
        examples = self.dist.shard(self.eval_set) if self.dist else self.eval_set
        result = evaluate(self.engine, self.task, examples, self.rewards,
                          self.config.sampling_params(seed=0, greedy=True), self.use_chat) if examples else None
        return self.dist.merge_eval(result, len(examples)) if self.dist else result  # type: ignore[return-value]

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
        }

    def save(self, step: int) -> Path:
        """Rank 0 writes the checkpoint (the state is identical on every rank); the others wait for it."""
        path = ckpt.checkpoint_dir(self.run_dir, step)
        if self.is_main:
            path = ckpt.save_checkpoint(self.run_dir, step, self.engine, self.state_dict(step),
                                        self.es.optimizer.state_tensors(), source_dir=self.config.model)
        if self.dist is not None:
            self.dist.barrier()
        return path

    def _eval_due(self, step: int) -> bool:
        every = self.config.eval_every
        return bool(self.eval_set) and (step == 0 or (every > 0 and step % every == 0))

    def train(self, max_steps: int | None = None) -> dict[str, Any]:
        """Run from the start (or resumed) step to ``config.steps``; ``max_steps`` stops early with a checkpoint."""
        cfg = self.config
        logger: RunLogger | NullLogger = NullLogger()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.run_dir / "config.yaml")
            truncate_metrics(self.run_dir, self.start_step)
            logger = RunLogger(self.run_dir, cfg.steps, self.start_step, cfg.progress, cfg.tensorboard)
        stop = cfg.steps if max_steps is None else min(cfg.steps, self.start_step + max_steps)
        step, saved = self.start_step, self.start_step
        try:
            if self.dist is not None:  # ranks start from the same weights (same files on every node, or repaired)
                logger.log({"step": step, **self.dist.check(self.engine, self.es, step)})
            while step < stop:
                record: dict[str, Any] = {"step": step}
                if self._eval_due(step):
                    record.update(self.evaluate())
                    if step == self.start_step and self.is_main and "eval/accuracy" in record:
                        print(f"held-out accuracy before training (step {step}): {record['eval/accuracy']:.3f}",
                              file=sys.stderr, flush=True)
                record.update(self.train_step(step))
                if self.dist is not None:  # fault hooks, and the checksum guard when due, after this update
                    record.update(self.dist.after_step(self.engine, self.es, step + 1))
                logger.log(record)
                step += 1
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    self.save(step)
                    saved = step
            if step == cfg.steps and self.eval_set:
                final = self.evaluate()
                logger.log({"step": step, **final})
                if self.is_main and "eval/accuracy" in final:
                    print(f"held-out accuracy after training (step {step}): {final['eval/accuracy']:.3f}",
                          file=sys.stderr, flush=True)
            if step != saved:
                self.save(step)
        finally:
            logger.close()
        return dict(logger.last, step=step)


def _gb(nbytes: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


def plan_memory(config: TrainConfig) -> list[tuple[str, str]]:
    """(item, amount) lines of the memory a run will hold, from config.json alone (no weights are read)."""
    from fastes.engine.engine import CPU_KV_TOKENS
    from fastes.models import perturbed_names
    from fastes.models.config import ModelConfig, read_config_json
    from fastes.models.lora import adapter_names, target_weights

    if not Path(config.model).is_dir():
        raise ValueError(f"model directory {config.model!r} not found")
    mc = ModelConfig.from_dict(read_config_json(config.model))
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    esize = torch.finfo(dtype).bits // 8
    shapes = mc.param_shapes()
    numel = {n: math.prod(s) for n, (s, _) in shapes.items()}
    pop_cfg, lora = config.population, config.lora
    lora_names: dict[str, str] = {}
    if pop_cfg.mode == "lora":
        for base in target_weights(shapes, lora.targets):
            name_a, name_b = adapter_names(base)
            out_f, in_f = shapes[base][0]
            numel[name_a], numel[name_b] = lora.rank * in_f, out_f * lora.rank
            lora_names.update({name_a: base, name_b: base})
    population = AskTell.population_of(config, 0)
    perturbed = perturbed_names(shapes, population, lora_names)
    n_pert = sum(numel[n] for n in perturbed)
    slots = {"sgd": 0, "momentum": 1, "adam": 2}[config.optim.name]
    if config.kv_cache_tokens is not None or device == "cpu":
        tokens = config.kv_cache_tokens or CPU_KV_TOKENS
        kv = _gb(tokens * mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * esize) + f" ({tokens} tokens)"
    else:
        kv = "sized from free GPU memory at start (set kv_cache_tokens to fix it)"
    seqs = population.size * config.prompts_per_step * config.samples_per_prompt
    if not config.same_prompts:
        seqs *= population.num_noise
    base = sum(v for n, v in numel.items() if n not in lora_names)
    lines = [("model", f"{mc.model_type}, {base:,} parameters, {str(dtype).replace('torch.', '')}, {device}"),
             ("weights", _gb(base * esize)), ("KV pool", kv),
             ("perturbed", f"{len(perturbed)} tensors, {n_pert / 1e6:.2f}M elements ({pop_cfg.mode} mode)"),
             ("population noise", f"0 B (regenerated from counters for {population.size} members)"),
             ("optimizer state", f"{_gb(4 * slots * n_pert)} ({config.optim.name})"),
             ("update scratch", f"<= {_gb(4 * max((numel[n] for n in perturbed), default=0))} (fp32, one tensor)"),
             ("rollouts per step", f"{seqs} sequences of <= {config.sampling.max_tokens} new tokens")]
    if lora_names:
        lines.insert(2, ("LoRA adapters", _gb(sum(numel[n] for n in lora_names) * esize)))
    return lines


__all__ = ["Trainer", "AskTell", "evaluate", "plan_memory", "derive_seed", "resolve_task", "resolve_device",
           "resolve_dtype"]
