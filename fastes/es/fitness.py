"""From rewards to update coefficients: member fitness, fitness shaping, and the c_m convention.

Pipeline per ES step (DESIGN.md §5): rewards of every rollout → one fitness per
member (`member_fitness`, or a member-level plug-in via `evaluate_member_fitness`)
→ `shape` (rank/normalize so the step size does not depend on the reward's
scale) → `coefficients` c_m → ``engine.update(coeffs=c, lr=lr)``.

Update convention. Member m is evaluated at θ + σ·s·E_m (s: per-tensor scale,
1 unless "layerwise"; E_m carries the antithetic sign). The engine applies
``W += lr · s · Σ_m c_m · E_m``. With the default ``c_m = z_m / (N·σ)`` this is
plain gradient ascent ``θ += lr · ĝ`` with the standard ES estimator
``ĝ = 1/(N·σ) · Σ_m z_m · E_m`` in the scaled coordinates u = W/s (for s = 1,
exactly the parameter-space step). Qiu et al. 2025 write the step as
``θ += (α/N) · Σ_m z_m · ε_m`` with perturbations σ·ε_m; equating
``lr/(N·σ) = α/N`` gives ``lr = α·σ`` (their α = 5e-4 with σ = 1e-3 is
lr = 5e-7 here); `lr_from_alpha` does this conversion. Antithetic pairs need no
special case: E_{2i+1} = −E_{2i}, so Σ c_m E_m = Σ_i (c_{2i} − c_{2i+1}) ε_i.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "SHAPING_METHODS",
    "pass_at_k",
    "member_fitness",
    "Rollout",
    "MemberFitness",
    "make_rollouts",
    "evaluate_member_fitness",
    "mean_reward",
    "answer_kl_fitness",
    "shape",
    "coefficients",
    "lr_from_alpha",
    "apply_weight_decay",
]

SHAPING_METHODS = ("zscore", "centered_rank", "group_global", "sign", "raw")
Rollout = dict[str, Any]  # prompt, completion, reward, columns, prompt_index, sample_index
MemberFitness = Callable[[list[Rollout]], float]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k)/C(n, k).

    Computed as 1 − Π_{i=n−c+1..n} (1 − k/i), which never forms the huge binomials.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _flatten(values: Any) -> list[float]:
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.reshape(-1).tolist()]
    if isinstance(values, (list, tuple)):
        out: list[float] = []
        for v in values:
            out.extend(_flatten(v))
        return out
    return [0.0 if values is None else float(values)]


def member_fitness(
    rewards_per_member: Sequence[Any], how: str = "mean", *, k: int | None = None, success_threshold: float = 1.0
) -> torch.Tensor:
    """One fitness per member, float64 [N].

    how="mean": mean of all of a member's rewards (any nesting). how="pass@k" (or
    "pass@4"): `rewards_per_member[m][p][s]` per prompt p and sample s; a sample is a
    success when its reward >= `success_threshold`; the unbiased pass@k per prompt is
    averaged over prompts.
    """
    if not rewards_per_member:
        raise ValueError("member_fitness: no members")
    if how == "mean":
        out = []
        for m, rewards in enumerate(rewards_per_member):
            flat = _flatten(rewards)
            if not flat:
                raise ValueError(f"member_fitness: member {m} has no rewards")
            out.append(math.fsum(flat) / len(flat))
        return torch.tensor(out, dtype=torch.float64)
    if how.startswith("pass@"):
        kk = k if how == "pass@k" else int(how[5:]) if how[5:].isdigit() else None
        if kk is None or kk < 1:
            raise ValueError(f"member_fitness: {how!r} needs a positive k (how='pass@4' or k=4)")
        out = []
        for m, prompts in enumerate(rewards_per_member):
            if not prompts:
                raise ValueError(f"member_fitness: member {m} has no prompts")
            per_prompt = []
            for samples in prompts:
                flat = _flatten(samples)
                correct = sum(1 for r in flat if r >= success_threshold)
                per_prompt.append(pass_at_k(len(flat), correct, kk))
            out.append(math.fsum(per_prompt) / len(per_prompt))
        return torch.tensor(out, dtype=torch.float64)
    raise ValueError(f"member_fitness: how must be 'mean' or 'pass@k', got {how!r}")


def make_rollouts(
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]] | None = None,
    columns: Mapping[str, Sequence[Any]] | None = None,
) -> list[Rollout]:
    """One member's rollouts as dicts, from `completions[p][s]`, `rewards[p][s]` and per-prompt column lists."""
    rollouts: list[Rollout] = []
    for p, prompt in enumerate(prompts):
        cols = {key: values[p] for key, values in (columns or {}).items()}
        for s, text in enumerate(completions[p]):
            reward = None if rewards is None else rewards[p][s]
            rollouts.append(
                {
                    "prompt": prompt,
                    "completion": text,
                    "reward": reward,
                    "columns": cols,
                    "prompt_index": p,
                    "sample_index": s,
                }
            )
    return rollouts


def evaluate_member_fitness(
    fn: MemberFitness, rollouts_per_member: Sequence[list[Rollout]], on_error: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Apply a member-level plug-in to each member; a raise or a non-finite result gives `on_error`, counted."""
    values: list[float] = []
    errors = 0
    for rollouts in rollouts_per_member:
        try:
            x = float(fn(rollouts))
        except Exception:  # user code: one member's failure must not end the run
            x = math.nan
        if not math.isfinite(x):
            errors += 1
            x = on_error
        values.append(x)
    return torch.tensor(values, dtype=torch.float64), {"fitness/errors": float(errors)}


def mean_reward(rollouts: list[Rollout]) -> float:
    """The default member fitness as a plug-in: the mean reward of the member's rollouts."""
    rewards = [float(r["reward"]) for r in rollouts if r.get("reward") is not None]
    return math.fsum(rewards) / len(rewards) if rewards else 0.0


def _default_extract(text: str) -> str | None:
    from fastes.es.tasks.base import last_tag_content

    inner = last_tag_content(text, "answer") if isinstance(text, str) else None
    return inner.strip() if inner is not None else None


def answer_kl_fitness(
    target_distribution: Mapping[Any, float],
    extract: Callable[[str], Any] | None = None,
    *,
    eps: float = 1e-6,
    direction: str = "forward",
) -> MemberFitness:
    """A plug-in scoring −KL between the member's distribution of extracted answers and a target.

    For objectives on a whole set of rollouts (e.g. "answer uniformly in 1..10").
    `extract(completion) -> answer or None` (default: stripped ``<answer>`` content);
    None is its own outcome, with target mass 0. Both distributions get additive
    smoothing `eps` over the union of outcomes, so the KL stays finite.
    direction="forward": KL(target ‖ model) (mass-covering); "reverse": KL(model ‖ target).
    """
    if direction not in ("forward", "reverse"):
        raise ValueError("answer_kl_fitness: direction must be 'forward' or 'reverse'")
    total = math.fsum(float(v) for v in target_distribution.values())
    if not target_distribution or total <= 0 or any(float(v) < 0 for v in target_distribution.values()):
        raise ValueError("answer_kl_fitness: target_distribution needs non-negative masses with a positive sum")
    target = {key: float(v) / total for key, v in target_distribution.items()}
    get = extract or _default_extract

    def fitness(rollouts: list[Rollout]) -> float:
        if not rollouts:
            raise ValueError("answer_kl_fitness: no rollouts")
        counts = Counter(get(r["completion"]) for r in rollouts)
        support = list(dict.fromkeys([*target, *counts]))
        zp = 1.0 + eps * len(support)
        zq = len(rollouts) + eps * len(support)
        p = [(target.get(o, 0.0) + eps) / zp for o in support]
        q = [(counts.get(o, 0) + eps) / zq for o in support]
        a, b = (p, q) if direction == "forward" else (q, p)
        return 0.0 - math.fsum(x * math.log(x / y) for x, y in zip(a, b, strict=True))

    return fitness


def _as_vector(fitness: torch.Tensor | Sequence[float]) -> torch.Tensor:
    f = torch.as_tensor(fitness, dtype=torch.float64).detach().cpu().reshape(-1)
    if not bool(torch.isfinite(f).all()):
        raise ValueError("shape: fitness contains NaN or inf (sanitize rewards with score_completions first)")
    return f


def _centered_ranks(f: torch.Tensor) -> torch.Tensor:
    """Ranks 0..N−1 with ties averaged, mapped linearly to [−0.5, 0.5]."""
    values, inverse, counts = torch.unique(f, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    avg_rank = first.to(torch.float64) + (counts.to(torch.float64) - 1) / 2
    return avg_rank[inverse] / (f.numel() - 1) - 0.5


def shape(
    fitness: torch.Tensor | Sequence[float],
    method: str = "zscore",
    antithetic: bool = False,
    *,
    group_size: int | None = None,
    eps: float = 1e-12,
) -> torch.Tensor | None:
    """Shaped fitness, float32 [N], or None when there is no spread to learn from.

    Methods: ``zscore`` (f − mean)/std, population std (Qiu et al.); ``centered_rank``
    ranks scaled to [−0.5, 0.5], ties averaged (OpenAI ES); ``group_global`` f minus
    its group's mean, over the std of all f (EGGROLL); ``sign`` sign of f minus its
    group's mean; ``raw`` f unchanged. Groups are consecutive blocks of `group_size`
    members, default 2 (the mirrored pair) when `antithetic`, else the whole population.

    None (the trainer should skip the step and log it) when N < 2, all fitnesses are
    equal within `eps` (relative), or the shaped vector is all zeros (e.g. every
    antithetic pair tied under group_global/sign).
    """
    if method not in SHAPING_METHODS:
        raise ValueError(f"shape: method must be one of {SHAPING_METHODS}, got {method!r}")
    f = _as_vector(fitness)
    n = f.numel()
    if antithetic and n % 2:
        raise ValueError(f"shape: antithetic sampling needs an even population, got {n}")
    g = group_size or (2 if antithetic else n)
    if g < 1 or n % max(g, 1):
        raise ValueError(f"shape: group_size {g} does not divide the population {n}")
    if n < 2:
        return None
    spread = float(f.max() - f.min())
    if spread <= eps * max(1.0, float(f.abs().max())):
        return None
    if method == "zscore":
        out = (f - f.mean()) / f.std(unbiased=False)
    elif method == "centered_rank":
        out = _centered_ranks(f)
    elif method == "raw":
        out = f.clone()
    else:
        centered = (f.reshape(n // g, g) - f.reshape(n // g, g).mean(dim=1, keepdim=True)).reshape(-1)
        centered = torch.where(centered.abs() <= eps * max(1.0, float(f.abs().max())), 0.0, centered)
        out = centered / f.std(unbiased=False) if method == "group_global" else torch.sign(centered)
    if not bool(out.any()):
        return None
    return out.to(torch.float32)


def coefficients(shaped: torch.Tensor, sigma: float, population_size: int | None = None) -> torch.Tensor:
    """c_m = shaped_m / (N·σ), float32: the coefficients for ``engine.update`` (W += lr·s·Σ c_m E_m).

    See the module docstring for why; Qiu et al.'s α maps to ``lr = α·σ`` (`lr_from_alpha`).
    """
    if not sigma > 0:
        raise ValueError(f"coefficients: sigma must be > 0, got {sigma}")
    shaped = torch.as_tensor(shaped, dtype=torch.float64).reshape(-1)
    n = shaped.numel() if population_size is None else int(population_size)
    if n < 1:
        raise ValueError("coefficients: empty population")
    return (shaped / (n * float(sigma))).to(torch.float32)


def lr_from_alpha(alpha: float, sigma: float) -> float:
    """Learning rate in fastes's convention for a step written θ += (α/N)·Σ z·ε (Qiu et al.): lr = α·σ."""
    return float(alpha) * float(sigma)


@torch.no_grad()
def apply_weight_decay(tensors: Iterable[torch.Tensor], lr: float, weight_decay: float) -> float:
    """Decoupled weight decay W ← (1 − lr·wd)·W in place, applied before the ES update; returns the factor.

    With ES learning rates (often ≪ 1e-3) `weight_decay` must be correspondingly large to matter.
    """
    factor = 1.0 - float(lr) * float(weight_decay)
    if factor != 1.0:
        for t in tensors:
            t.mul_(factor)
    return factor
