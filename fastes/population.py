"""A population of perturbed models: what ES evaluates at each step.

It is a description, not storage: every member's weights are θ + σ·s_t·E_m,t with
E regenerated from (seed, step, parameter name, member) by the noise contract.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from fastes.noise import MODES, NoiseSpec, check_kind, check_mode, check_seed, check_uint

U32 = 1 << 32


@dataclass(frozen=True)
class Population:
    """N perturbed copies of the model's weights (DESIGN.md section 2).

    mode: ``lowrank`` (EGGROLL, A_m B_mᵀ/√r), ``full`` (dense E_m) or ``lora``
    (frozen W, dense noise on rank-``rank`` adapters). ``layerwise_scale`` scales
    each tensor's noise by std(W_t) measured once. Which parameters are perturbed:
    2-D matrices of the decoder by default; embeddings, lm_head and 1-D params
    (norms, biases) only when enabled; ``include``/``exclude`` are fnmatch patterns
    over HF parameter names applied after those switches. ``noise_reuse`` k > 1 keeps one
    noise draw for k consecutive steps (EGGROLL-vLLM uses 4): step s uses the noise of
    counter step ⌊s/k⌋, so those steps evaluate the same directions on fresh prompts.
    """

    size: int
    sigma: float = 1e-3
    mode: str = "lowrank"
    rank: int = 1
    noise: str = "gaussian"
    antithetic: bool = True
    seed: int = 0
    layerwise_scale: bool = False
    perturb_embeddings: bool = False
    perturb_lm_head: bool = False
    perturb_1d: bool = False
    include: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    noise_reuse: int = 1

    def __post_init__(self) -> None:
        check_uint(self.size, "size", U32)
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.antithetic and self.size % 2:
            raise ValueError(f"size must be even with antithetic sampling, got {self.size}")
        if not isinstance(self.sigma, (int, float)) or isinstance(self.sigma, bool) or not self.sigma >= 0:
            raise ValueError(f"sigma must be a non-negative number, got {self.sigma!r}")
        check_mode(self.mode)
        check_kind(self.noise)
        check_seed(self.seed)
        check_uint(self.rank, "rank", U32)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        check_uint(self.noise_reuse, "noise_reuse", U32)
        if self.noise_reuse < 1:
            raise ValueError(f"noise_reuse must be >= 1, got {self.noise_reuse}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    def noise_step(self, step: int) -> int:
        """The counter step whose noise ES step ``step`` uses: ⌊step / noise_reuse⌋."""
        return step // self.noise_reuse

    def spec(self, step: int) -> NoiseSpec:
        return NoiseSpec(seed=self.seed, step=self.noise_step(step), kind=self.noise, antithetic=self.antithetic)

    def member_index(self, member: int) -> tuple[int, int]:
        """(noise index, sign) of a member; ValueError if it is outside the population."""
        if not 0 <= member < self.size:
            raise ValueError(f"member must be in [0, {self.size}), got {member}")
        return self.spec(0).member(member)

    @property
    def num_noise(self) -> int:
        """Distinct noise indices: N/2 with antithetic pairs, N otherwise."""
        return self.size // 2 if self.antithetic else self.size

    def perturbs(self, name: str, ndim: int, role: str = "matrix") -> bool:
        """Whether parameter ``name`` (of role matrix | embedding | lm_head) gets noise."""
        if role == "embedding" and not self.perturb_embeddings:
            return False
        if role == "lm_head" and not self.perturb_lm_head:
            return False
        if ndim == 1 and not self.perturb_1d:
            return False
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


__all__ = ["Population", "MODES"]
