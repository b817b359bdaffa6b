"""The dry-run memory plan of a training run, from its config and the model's config.json alone."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastes.es.config import TrainConfig
from fastes.es.optim import AskTell
from fastes.es.runtime import resolve_device, resolve_dtype


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
    seqs = population.size * config.prompts_per_step * config.samples_per_prompt  # same_prompts or not
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


__all__ = ["plan_memory"]
