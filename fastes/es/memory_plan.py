"""The memory plan of a training run: what it holds besides the KV pool, and how big the pool may be.

On CUDA the KV pool takes what is left of the GPU, so it must be sized *after* everything
else a run allocates is accounted for: the LoRA adapters (added after the engine is
built), the optimizer's fp32 state (momentum: one slot, Adam: two, per perturbed element)
and the update's fp32 workspace. ``training_reserve`` counts them from config.json alone;
the trainer subtracts them from the engine's measured budget (``kv_tokens_after_reserve``),
and ``--dry-run`` prints the same numbers (``plan_memory``), with the pool predicted from
the free memory the GPU reports (or a figure the caller passes, for tests).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from fastes.es.config import TrainConfig
from fastes.es.optim import AskTell

GPU_MEMORY_UTILIZATION = 0.9  # as the engine's profile_num_blocks: the share of total GPU memory a run may use
OPTIM_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2}
# fp32 temporaries of one tensor's update: sgd 1 (a bf16 weight decayed in fp32 before rounding);
# momentum / adam: the direction g, the fp32 weight, the delta and (adam) m̂, v̂ (fastes.es.optim)
WORKSPACE_TENSORS = {"sgd": 1, "momentum": 4, "adam": 6}


def _gb(nbytes: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


def _plan_device(device: str) -> str:
    """The config's device without checking this machine has it: a dry run may plan a GPU run on a laptop."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def lowrank_factor_bytes(config: TrainConfig, shapes: dict[str, Any], perturbed: list[str] | set[str]) -> int:
    """The lowrank update's fp32 factors, K·r·(out + in)·4 bytes for its widest 2-D tensor (K noise indices: N/2
    antithetic), alive beside the optimizer's temporaries: the Triton launch's F, the CPU path's streams."""
    pop = config.population
    if pop.mode != "lowrank":
        return 0
    indices = pop.size // 2 if pop.antithetic else pop.size
    widest = max((sum(shapes[n][0]) for n in perturbed if len(shapes[n][0]) == 2), default=0)
    return 4 * indices * pop.rank * widest


def training_reserve(config: TrainConfig, model_config: Any, dtype: torch.dtype) -> dict[str, int]:
    """Bytes the run allocates beyond weights and KV pool: adapters, optimizer state, update workspace."""
    from fastes.models import perturbed_names
    from fastes.models.lora import adapter_names, target_weights

    esize = torch.finfo(dtype).bits // 8
    shapes = model_config.param_shapes()
    numel = {n: math.prod(s) for n, (s, _) in shapes.items()}
    lora_names: dict[str, str] = {}
    if config.population.mode == "lora":
        for base in target_weights(shapes, config.lora.targets):
            name_a, name_b = adapter_names(base)
            out_f, in_f = shapes[base][0]
            numel[name_a], numel[name_b] = config.lora.rank * in_f, out_f * config.lora.rank
            lora_names.update({name_a: base, name_b: base})
    perturbed = perturbed_names(shapes, AskTell.population_of(config, 0), lora_names)
    n_pert = sum(numel[n] for n in perturbed)
    anchored = int(config.optim.decay_to == "start" and config.optim.weight_decay > 0)  # θ₀ copy, fp32
    largest = max((numel[n] for n in perturbed), default=0)
    return {
        "adapters": sum(numel[n] for n in lora_names) * esize,
        "optimizer": 4 * (OPTIM_SLOTS[config.optim.name] + anchored) * n_pert,
        "workspace": (4 * WORKSPACE_TENSORS[config.optim.name] * largest
                      + lowrank_factor_bytes(config, shapes, perturbed)),
        "perturbed_numel": n_pert,
        "perturbed_tensors": len(perturbed),
        "base_numel": sum(v for n, v in numel.items() if n not in lora_names),
    }


def reserve_bytes(reserve: dict[str, int]) -> int:
    return reserve["adapters"] + reserve["optimizer"] + reserve["workspace"]


def kv_tokens_after_reserve(budget_tokens: int, reserve: int, bytes_per_token: int, block_size: int,
                            minimum: int) -> int:
    """The pool (tokens, whole blocks) left once ``reserve`` bytes are taken from a ``budget_tokens`` pool.

    ValueError (one line) when fewer than ``minimum`` tokens remain: the run could not hold one
    sequence of prompt + max_tokens, and would otherwise fail at its first update or mid-run.
    """
    reserve_tokens = -(-reserve // bytes_per_token)
    tokens = (budget_tokens - reserve_tokens) // block_size * block_size
    if tokens < minimum:
        raise ValueError(f"GPU memory: after adapters, optimizer state and update workspace ({_gb(reserve)}) the KV "
                         f"pool holds {max(tokens, 0)} tokens, fewer than the {minimum} one sequence needs; use "
                         "optim.name sgd, a smaller model or lora.rank, or a larger GPU")
    return tokens


def load_engine(config: TrainConfig, path: str | Path, device: str, dtype: torch.dtype) -> Any:
    """The run's Engine; on CUDA with no ``kv_cache_tokens`` its pool is what the measured budget leaves after
    ``training_reserve`` (the engine alone would take it all, and Adam would run out at its first update)."""
    from fastes.engine.engine import Engine
    from fastes.engine.kv_cache import DEFAULT_BLOCK_SIZE, kv_bytes_per_token, profile_num_blocks
    from fastes.models import load_model
    from fastes.models.tokenizer import load_tokenizer

    options = dict(max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
                   cuda_graphs=config.cuda_graphs if str(device).startswith("cuda") else False)
    if config.kv_cache_tokens is not None or not str(device).startswith("cuda"):
        return Engine.from_pretrained(path, dtype=dtype, device=device, kv_cache_tokens=config.kv_cache_tokens,
                                      **options)
    model = load_model(path, dtype=dtype, device=device)
    path = Path(path)
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(path)
    per_token = kv_bytes_per_token(model.config, dtype)
    budget = profile_num_blocks(model, config.max_num_batched_tokens or 8192, DEFAULT_BLOCK_SIZE) * DEFAULT_BLOCK_SIZE
    tokens = kv_tokens_after_reserve(budget, reserve_bytes(training_reserve(config, model.config, dtype)), per_token,
                                     DEFAULT_BLOCK_SIZE, config.sampling.max_tokens + 1)
    return Engine(model, tokenizer, kv_cache_tokens=tokens, **options)


def plan_memory(config: TrainConfig, gpu_memory: tuple[int, int] | None = None) -> list[tuple[str, str]]:
    """(item, amount) lines of the memory a run will hold, from config.json alone (no weights are read).

    ``gpu_memory``: (free, total) bytes of the GPU for a CUDA run (default: what the GPU reports,
    when there is one); the KV pool line is then predicted from it.
    """
    from fastes.engine.engine import CPU_KV_TOKENS
    from fastes.engine.kv_cache import kv_bytes_per_token
    from fastes.es.runtime import resolve_dtype
    from fastes.models.config import ModelConfig, read_config_json

    if not Path(config.model).is_dir():
        raise ValueError(f"model directory {config.model!r} not found")
    mc = ModelConfig.from_dict(read_config_json(config.model))
    device = _plan_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    esize = torch.finfo(dtype).bits // 8
    reserve = training_reserve(config, mc, dtype)
    weights = reserve["base_numel"] * esize
    per_token = kv_bytes_per_token(mc, dtype)
    population = AskTell.population_of(config, 0)
    if config.kv_cache_tokens is not None or device == "cpu":
        tokens = config.kv_cache_tokens or CPU_KV_TOKENS
        kv = f"{_gb(tokens * per_token)} ({tokens} tokens)"
    else:
        if gpu_memory is None and torch.cuda.is_available():
            gpu_memory = torch.cuda.mem_get_info(torch.device(device))
        if gpu_memory is None:
            kv = f"sized from free GPU memory at start, after the items below ({per_token} B per token)"
        else:
            free, total = gpu_memory
            budget = int(total * GPU_MEMORY_UTILIZATION) - (total - free) - weights - reserve_bytes(reserve)
            tokens = max(0, budget // per_token)
            kv = (f"{_gb(tokens * per_token)} ({tokens} tokens, predicted: {GPU_MEMORY_UTILIZATION:.0%} of "
                  f"{_gb(total)} minus {_gb(total - free)} in use, weights and the items below; forward "
                  "activations are measured at start and come off it)")
    seqs = population.size * config.prompts_per_step * config.samples_per_prompt  # same_prompts or not
    anchor = " + θ₀ for anchored decay" if config.optim.decay_to == "start" and config.optim.weight_decay else ""
    lines = [("model", f"{mc.model_type}, {reserve['base_numel']:,} parameters, "
              f"{str(dtype).replace('torch.', '')}, {device}"),
             ("weights", _gb(weights)), ("KV pool", kv),
             ("perturbed", f"{reserve['perturbed_tensors']} tensors, {reserve['perturbed_numel'] / 1e6:.2f}M "
              f"elements ({config.population.mode} mode)"),
             ("population noise", f"0 B (regenerated from counters for {population.size} members)"),
             ("optimizer state", f"{_gb(reserve['optimizer'])} ({config.optim.name}{anchor})"),
             ("update workspace", f"<= {_gb(reserve['workspace'])} (fp32, one tensor at a time)"),
             ("rollouts per step", f"{seqs} sequences of <= {config.sampling.max_tokens} new tokens")]
    if config.population.mode == "lora":
        lines.insert(2, ("LoRA adapters", _gb(reserve["adapters"])))
    return lines


__all__ = ["load_engine", "plan_memory", "training_reserve", "reserve_bytes", "kv_tokens_after_reserve",
           "GPU_MEMORY_UTILIZATION"]
