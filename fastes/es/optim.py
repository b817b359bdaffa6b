"""The update side of ES: ask/tell, optimizers on the ES direction, and the lr / sigma schedules.

The ES direction of parameter t is g_t = s_t·Σ_m c_m·E_m,t (an ascent direction). Plain
SGD applies W += lr·g through ``engine.update`` and stores nothing: the noise is
regenerated from counters. Momentum and Adam need g itself, so they materialize it into
a zero fp32 buffer with the same update kernel (lr = 1), keep fp32 state per perturbed
parameter, and write the weight once (stochastic rounding below fp32, like the engine).
Their state is the only thing besides (seed, step) a checkpoint must hold.

Weight decay pulls toward zero (decoupled, W ← W − lr·wd·W) or, with ``decay_to="start"``,
toward the run's starting weights θ₀ (anchored decay: W ← W − lr·wd·(W − θ₀), against
forgetting). θ₀ is an fp32 copy of every perturbed tensor taken at the first step, the
"anchor" slot: 4 bytes per perturbed parameter (one more model copy in fp32), saved
with the optimizer state so a resumed run keeps the original anchor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fastes.es.config import OptimConfig, PopulationConfig, TrainConfig
from fastes.models import Perturbation
from fastes.ops.es_update import es_update
from fastes.ops.stochastic_round import stochastic_round
from fastes.population import Population

if TYPE_CHECKING:
    from fastes.engine.engine import Engine


def scheduled(kind: str, start: float, end: float, step: int, total: int, warmup: int = 0) -> float:
    """Value at ``step`` of a constant / linear / cosine schedule from start to end, after a linear warmup."""
    if warmup > 0 and step < warmup:
        return start * (step + 1) / warmup
    if kind == "constant":
        return start
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")


def lr_at(optim: OptimConfig, step: int, total: int) -> float:
    return scheduled(optim.schedule, optim.lr, optim.min_lr, step, total, optim.warmup_steps)


def sigma_at(population: PopulationConfig, step: int, total: int) -> float:
    end = population.sigma if population.sigma_final is None else population.sigma_final
    return scheduled(population.sigma_schedule, population.sigma, end, step, total)


def _update_mode(param: torch.Tensor, population: Population) -> str:
    """The noise layout of one tensor, as engine.update decides it (1-D and LoRA adapters are dense)."""
    return population.mode if param.dim() == 2 and population.mode != "lora" else "full"


def es_direction(
    engine: Engine, population: Population, step: int, coeffs: torch.Tensor, name: str, pert: Perturbation | None = None
) -> torch.Tensor:
    """g_t = s_t·Σ_m c_m·E_m,t of one parameter as a fresh fp32 tensor on its device."""
    param = engine.model.params[name]
    pert = pert or Perturbation.for_model(engine.model, population, step)
    buf = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    es_update(
        buf,
        pert.noise,
        coeffs.to(device=param.device, dtype=torch.float32),
        1.0,
        pert.scale(name),
        _update_mode(param, population),
        population.rank,
        name,
        backend=engine.backend,
    )
    return buf


DECAY_SR_PREFIX = "decay/"  # the decay's rounding bits: a tensor id apart from the update's rounding of the same step


def write_weight(param: torch.Tensor, value: torch.Tensor, seed: int, name: str, step: int) -> None:
    """param ← value (fp32), stochastically rounded with the contract's bits below fp32."""
    if param.dtype == torch.float32:
        param.copy_(value)
    else:
        stochastic_round(value, param, seed, name, step)  # C++ on CPU, Triton on CUDA; same bits as the reference


class ESOptimizer:
    """SGD on the ES direction (default): W += lr·g, through the engine's update, no state."""

    name = "sgd"
    slots: tuple[str, ...] = ()

    def __init__(self, weight_decay: float = 0.0, decay_to: str = "zero") -> None:
        if decay_to not in ("zero", "start"):
            raise ValueError(f"decay_to must be 'zero' or 'start', got {decay_to!r}")
        self.weight_decay, self.decay_to = float(weight_decay), decay_to
        if self.anchored:
            self.slots = (*type(self).slots, "anchor")
        self.t = 0  # optimizer steps taken (skipped ES steps do not count)
        self.state: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in self.slots}

    @property
    def anchored(self) -> bool:
        """Decay toward θ₀ (which then needs its fp32 copy), not toward zero."""
        return self.decay_to == "start" and self.weight_decay > 0

    def capture_anchor(self, engine: Engine, population: Population) -> None:
        """θ₀: the perturbed tensors as they are now (call before the first update; a no-op once taken)."""
        anchor = self.state.get("anchor")
        if anchor is None:
            return
        for name in engine.perturbed_names(population):
            if name not in anchor:
                anchor[name] = engine.model.params[name].detach().float().clone()

    def decay_target(self, name: str) -> torch.Tensor | float:
        """What W decays toward: θ₀ (anchored) or 0."""
        return self.state["anchor"][name] if self.anchored else 0.0

    def step(self, engine: Engine, population: Population, step: int, coeffs: torch.Tensor, lr: float) -> None:
        """Apply one update for ES step ``step`` with member coefficients ``coeffs``."""
        self.t += 1
        self.capture_anchor(engine, population)
        if self.anchored:
            for name in engine.perturbed_names(population):
                param = engine.model.params[name]
                pulled = param.float().lerp_(self.state["anchor"][name], lr * self.weight_decay)
                write_weight(param, pulled, population.seed, DECAY_SR_PREFIX + name, step)  # own rounding bits
        elif self.weight_decay:
            factor = 1.0 - lr * self.weight_decay
            for name in engine.perturbed_names(population):
                param = engine.model.params[name]
                if param.dtype == torch.float32:
                    param.mul_(factor)
                else:  # rounding W·(1 − lr·wd) to nearest gives W back in bf16: decay would do nothing at all
                    write_weight(param, param.float().mul_(factor), population.seed, DECAY_SR_PREFIX + name, step)
        engine.update(population, step, coeffs, lr)

    # ------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``slot/name`` -> fp32 CPU tensor, for a safetensors file."""
        return {
            f"{slot}/{name}": t.detach().to("cpu").contiguous()
            for slot, d in self.state.items()
            for name, t in d.items()
        }

    def state_meta(self) -> dict[str, Any]:
        return {"name": self.name, "t": self.t, "weight_decay": self.weight_decay, "decay_to": self.decay_to}

    def load_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        if meta.get("name") != self.name:
            raise ValueError(f"checkpoint optimizer is {meta.get('name')!r}, config asks for {self.name!r}")
        self.t = int(meta.get("t", 0))
        self.state = {slot: {} for slot in self.slots}
        for key, tensor in tensors.items():
            slot, _, name = key.partition("/")
            if slot not in self.state:
                raise ValueError(f"unexpected optimizer state entry {key!r} for {self.name}")
            self.state[slot][name] = tensor.to(device=device, dtype=torch.float32).contiguous()
        if self.anchored and self.t and not self.state["anchor"]:
            raise ValueError("resume: optim.decay_to is 'start' but the checkpoint holds no starting weights "
                             "(it was trained with decay toward zero)")

    def state_bytes(self, numel: int) -> int:
        """Memory this optimizer keeps for ``numel`` perturbed elements."""
        return 4 * numel * len(self.slots)


class _DirectionOptimizer(ESOptimizer):
    """Shared loop of the stateful optimizers: materialize g per tensor, update state, write W once."""

    def step(self, engine: Engine, population: Population, step: int, coeffs: torch.Tensor, lr: float) -> None:
        self.t += 1
        self.capture_anchor(engine, population)
        coeffs = torch.as_tensor(coeffs, dtype=torch.float32).reshape(-1)
        pert = Perturbation.for_model(engine.model, population, step)
        for name in engine.perturbed_names(population):
            param = engine.model.params[name]
            g = es_direction(engine, population, step, coeffs, name, pert)
            delta = self._delta(name, g, lr)
            if self.weight_decay:
                delta.add_(param.float() - self.decay_target(name), alpha=-lr * self.weight_decay)
            write_weight(param, param.float() + delta, population.seed, name, step)

    def _buffer(self, slot: str, name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in self.state[slot]:
            self.state[slot][name] = torch.zeros_like(like, dtype=torch.float32)
        return self.state[slot][name]

    def _delta(self, name: str, g: torch.Tensor, lr: float) -> torch.Tensor:
        raise NotImplementedError


class Momentum(_DirectionOptimizer):
    """Heavy ball: v ← μ·v + g; W += lr·v."""

    name = "momentum"
    slots = ("momentum",)

    def __init__(self, momentum: float = 0.9, weight_decay: float = 0.0, decay_to: str = "zero") -> None:
        super().__init__(weight_decay, decay_to)
        self.momentum = float(momentum)

    def _delta(self, name: str, g: torch.Tensor, lr: float) -> torch.Tensor:
        v = self._buffer("momentum", name, g)
        v.mul_(self.momentum).add_(g)
        return v * lr


class Adam(_DirectionOptimizer):
    """Adam ascent on g (OpenAI ES used Adam 0.01 with centered ranks): W += lr·m̂/(√v̂ + ε)."""

    name = "adam"
    slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decay_to: str = "zero") -> None:
        super().__init__(weight_decay, decay_to)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)

    def _delta(self, name: str, g: torch.Tensor, lr: float) -> torch.Tensor:
        m = self._buffer("exp_avg", name, g)
        v = self._buffer("exp_avg_sq", name, g)
        m.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
        m_hat = m / (1.0 - self.beta1**self.t)
        v_hat = v / (1.0 - self.beta2**self.t)
        return m_hat.div_(v_hat.sqrt_().add_(self.eps)).mul_(lr)


def make_optimizer(config: OptimConfig) -> ESOptimizer:
    if config.name == "sgd":
        return ESOptimizer(config.weight_decay, config.decay_to)
    if config.name == "momentum":
        return Momentum(config.momentum, config.weight_decay, config.decay_to)
    if config.name == "adam":
        return Adam((config.betas[0], config.betas[1]), config.eps, config.weight_decay, config.decay_to)
    raise ValueError(f"optim.name must be sgd, momentum or adam, got {config.name!r}")


class AskTell:
    """ES as ask(step) → Population and tell(step, fitness) → coefficients (update applied), on one engine."""

    def __init__(
        self,
        engine: Any,
        config: TrainConfig,
        optimizer: ESOptimizer | None = None,
        noise_scales: dict[str, float] | None = None,
    ) -> None:
        self.engine, self.config = engine, config
        pop = config.population
        if pop.mode == "lora" and not engine.model.lora:
            lora = config.lora
            if lora.init_from:  # an existing PEFT adapter: its rank, alpha and modules (fastes.models.peft)
                from fastes.models.peft import load_peft_adapter

                load_peft_adapter(engine.model, lora.init_from)
            else:
                engine.model.add_lora(lora.rank, lora.targets, lora.alpha, seed=config.seed)
        if noise_scales is not None:
            engine.model.set_noise_scales(noise_scales)
        elif pop.layerwise_scale and pop.mode != "lora":
            engine.model.noise_scales()  # measured now, on the starting weights, and kept
        self.optimizer = optimizer or make_optimizer(config.optim)

    def lr(self, step: int) -> float:
        return lr_at(self.config.optim, step, self.config.steps)

    def sigma(self, step: int) -> float:
        return sigma_at(self.config.population, step, self.config.steps)

    def ask(self, step: int) -> Population:
        """The population evaluated at ES step ``step`` (pass it to engine.generate with the same step)."""
        return self.population_of(self.config, step)

    @staticmethod
    def population_of(config: TrainConfig, step: int) -> Population:
        p, lora = config.population, config.lora
        return Population(size=p.size, sigma=sigma_at(p, step, config.steps), mode=p.mode, rank=p.rank,
                          noise=p.noise, antithetic=p.antithetic, seed=config.seed, layerwise_scale=p.layerwise_scale,
                          perturb_embeddings=p.perturb_embeddings, perturb_lm_head=p.perturb_lm_head,
                          perturb_1d=p.perturb_1d, include=tuple(p.include), exclude=tuple(p.exclude),
                          lora_alpha=lora.alpha, lora_targets=tuple(lora.targets), noise_reuse=p.noise_reuse)

    def tell(self, step: int, fitness: torch.Tensor | Sequence[float]) -> torch.Tensor | None:
        """Shape ``fitness`` [N], apply the update; the coefficients, or None when the step is skipped (no spread)."""
        from fastes.es.fitness import coefficients, shape

        pop = self.ask(step)
        shaped = shape(fitness, self.config.fitness.shaping, antithetic=pop.antithetic,
                       group_size=self.config.fitness.group_size)
        if shaped is None:
            return None
        coeffs = coefficients(shaped, pop.sigma, pop.size)
        self.optimizer.step(self.engine, pop, step, coeffs, self.lr(step))
        return coeffs

    def noise_scales(self) -> dict[str, float] | None:
        pop = self.config.population
        return dict(self.engine.model.noise_scales()) if pop.layerwise_scale and pop.mode != "lora" else None


__all__ = ["AskTell", "ESOptimizer", "Momentum", "Adam", "make_optimizer", "lr_at", "sigma_at", "scheduled",
           "es_direction"]
