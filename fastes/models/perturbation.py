"""Perturbation: what the forward needs to run population members θ + σ·s_t·E_m,t.

It binds a Population to one ES step and to the per-tensor scales s_t, and is the
single place that decides which parameter is perturbed (the update kernel must use
the same decision, via ``perturbed_names``). Nothing here stores a matrix of noise;
only 1-D parameters' dense noise vectors are cached (they are tiny and reused by
every forward of the step).

Decision rules (``Population.perturbs`` applied to HF names):

* lowrank / full: every parameter of ``ModelConfig.param_shapes`` whose role is
  allowed (matrix; embedding / lm_head by flag; 1-D norms and biases by
  ``perturb_1d``), then the include/exclude patterns. A tied embedding is one
  parameter: it is perturbed (at both the lookup and the lm_head) when either the
  embedding or the lm_head flag admits it.
* lora: only the adapters are perturbed (dense noise on ``...lora_A.weight`` and
  ``...lora_B.weight``); an adapter pair is perturbed when its base weight name
  passes ``perturbs(name, 2, "matrix")``. Frozen weights, norms and embeddings stay
  unperturbed, and layerwise scale does not apply (``lora_linear`` takes σ alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fastes.noise import NoiseSpec
from fastes.ops import member_noise
from fastes.population import Population

if TYPE_CHECKING:
    from fastes.models.decoder import CausalLM


def measure_scales(params: Mapping[str, torch.Tensor], names: list[str] | None = None) -> dict[str, float]:
    """std(W_t) per parameter (fp32, unbiased), for layerwise scaling; measured once at start."""
    names = list(params) if names is None else names
    return {n: float(params[n].float().std()) if params[n].numel() > 1 else 1.0 for n in names}


@dataclass
class Perturbation:
    """A population at one step, ready for the ops: NoiseSpec, σ, mode, rank, per-tensor scales.

    ``scales`` maps parameter name -> s_t (missing names use 1.0); pass the dict measured
    once with ``measure_scales`` when ``population.layerwise_scale``. ``backend`` is handed
    to the population ops (auto | reference | cpu | triton). ``members`` lists the members a
    forward may see (the engine's generate passes its own; None: the whole population), which
    bounds the cached 1-D noise to those members.
    """

    population: Population
    step: int = 0
    scales: dict[str, float] = field(default_factory=dict)
    backend: str = "auto"
    members: tuple[int, ...] | None = None
    noise: NoiseSpec = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.population, Population):
            raise ValueError(f"population must be a fastes.Population, got {type(self.population).__name__}")
        self.noise = self.population.spec(self.step)
        self._decisions: dict[tuple[str, int, str], bool] = {}
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._lookup: dict[str, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model: CausalLM, population: Population, step: int = 0, backend: str = "auto",
                  members: tuple[int, ...] | None = None) -> Perturbation:
        """The perturbation of ``model``'s parameters: scales from ``model.noise_scales`` when layerwise."""
        if population.mode == "lora" and not model.lora:
            raise ValueError("population mode 'lora' needs LoRA adapters: call model.add_lora(...) first")
        if population.mode != "lora" and model.lora:
            raise ValueError(f"model has LoRA adapters, so population mode must be 'lora', got {population.mode!r}")
        scales = model.noise_scales() if population.layerwise_scale and population.mode != "lora" else {}
        return cls(population, step, scales, backend, members)

    @property
    def sigma(self) -> float:
        return float(self.population.sigma)

    @property
    def mode(self) -> str:
        return self.population.mode

    @property
    def rank(self) -> int:
        return self.population.rank

    @property
    def num_members(self) -> int:
        return self.population.size

    def scale(self, name: str) -> float:
        return self.scales.get(name, 1.0)

    def perturbs(self, name: str, ndim: int, role: str) -> bool:
        """Whether HF parameter ``name`` (role embedding | lm_head | matrix | norm | bias | tied) gets noise."""
        key = (name, ndim, role)
        if key not in self._decisions:
            pop = self.population
            if pop.mode == "lora":
                decision = role == "lora" and pop.perturbs(name, 2, "matrix")
            elif role == "lora":
                decision = False
            elif role == "tied":
                decision = pop.perturbs(name, ndim, "embedding") or pop.perturbs(name, ndim, "lm_head")
            else:
                decision = pop.perturbs(name, ndim, role if role in ("embedding", "lm_head") else "matrix")
            self._decisions[key] = decision
        return self._decisions[key]

    def vector_deltas(self, name: str, shape: tuple[int, ...],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(table [1 + M, D] fp32, lookup [size + 1] int64) of a small (1-D) parameter, cached for this step.

        table row 0 is zero (the unperturbed model), row 1 + i is σ·s·E_m of ``members[i]``; lookup maps
        member id + 1 to its table row (−1 to row 0, members outside ``members`` to the invalid row −1), so a
        forward turns row_member into per-row deltas by two gathers, without a host sync.
        """
        members = self.members if self.members is not None else range(self.num_members)
        key = (name, str(device))
        if key not in self._cache:
            coef = self.sigma * self.scale(name)
            rows = [torch.zeros(shape, dtype=torch.float32, device=device)]
            rows += [coef * member_noise.dense(self.noise, name, m, shape, device) for m in members]
            self._cache[key] = torch.stack(rows)
        if str(device) not in self._lookup:
            lookup = torch.full((self.num_members + 1,), -1, dtype=torch.long)
            lookup[0] = 0
            for i, m in enumerate(members):
                lookup[m + 1] = i + 1
            self._lookup[str(device)] = lookup.to(device)
        return self._cache[key], self._lookup[str(device)]


def perturbed_names(config_shapes: Mapping[str, tuple[tuple[int, ...], str]], population: Population,
                    lora_names: Mapping[str, str] | None = None) -> list[str]:
    """Names of the parameters a population perturbs, by the same rules as the forward.

    ``config_shapes`` is ``ModelConfig.param_shapes()``; ``lora_names`` maps adapter names to their base
    weight name (``CausalLM.lora_names()``), needed in lora mode.
    """
    probe = Perturbation(population)
    if population.mode == "lora":
        return [n for n, base in (lora_names or {}).items() if probe.perturbs(base, 2, "lora")]
    tied = "lm_head.weight" not in config_shapes
    out = []
    for name, (shape, role) in config_shapes.items():
        if tied and role == "embedding":
            role = "tied"
        if probe.perturbs(name, len(shape), role):
            out.append(name)
    return out


__all__ = ["Perturbation", "measure_scales", "perturbed_names"]
