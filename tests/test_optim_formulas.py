"""The update arithmetic against formulas written out here: SGD + weight decay (fp32, and bf16 with stochastic
rounding), heavy-ball momentum, Adam with bias correction, the σ and lr schedules, and the per-tensor scale
s_t = std(W_t) in Engine.update and in the perturbed forward.

The ES direction of a tensor is computed here from the engine's dense per-member noise of a population
*without* layerwise scaling (σ·E_m), so no expectation shares the code path it checks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from oracle import packed_prefill, random_ids
from tiny_model import make_tiny_model

from fastes.engine.engine import Engine
from fastes.es.config import OptimConfig, PopulationConfig
from fastes.es.optim import Adam, ESOptimizer, Momentum, lr_at, scheduled, sigma_at
from fastes.models import Perturbation, load_model
from fastes.population import Population

pytestmark = pytest.mark.usefixtures("one_thread")
SIGMA = 0.05


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("optim") / "tiny", seed=4)


def engine_of(model_dir: Path, dtype: torch.dtype = torch.float32) -> Engine:
    return Engine.from_pretrained(model_dir, dtype=dtype, kv_cache_tokens=64)


def population(**kwargs: object) -> Population:
    base = dict(size=4, sigma=SIGMA, mode="lowrank", rank=2, seed=7)
    return Population(**{**base, **kwargs})  # type: ignore[arg-type]


def direction(engine: Engine, pop: Population, step: int, coeffs: list[float], name: str) -> torch.Tensor:
    """g = Σ_m c_m·E_m (s = 1), from the engine's dense σ·E_m."""
    plain = population(size=pop.size, seed=pop.seed, mode=pop.mode, rank=pop.rank)
    return sum(c * engine.perturbation(name, m, plain, step).double() / SIGMA for m, c in enumerate(coeffs))


def snapshot(engine: Engine, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: engine.model.params[n].detach().double().clone() for n in names}


C1, C2 = [0.7, -0.2, 0.4, -0.9], [-0.3, 0.5, 0.1, 0.6]


def test_sgd_with_weight_decay_fp32(model_dir):
    engine, pop = engine_of(model_dir), population()
    names = engine.perturbed_names(pop)
    w0 = snapshot(engine, names)
    lr, wd = 0.1, 0.5
    ESOptimizer(weight_decay=wd).step(engine, pop, 3, torch.tensor(C1), lr)
    for n in names:  # decoupled decay, then the ES step: W ← (1 − lr·wd)·W + lr·g
        want = (1 - lr * wd) * w0[n] + lr * direction(engine, pop, 3, C1, n)
        torch.testing.assert_close(engine.model.params[n].double(), want, rtol=1e-5, atol=1e-6)


def test_sgd_weight_decay_survives_bf16_rounding(model_dir):
    """lr·wd = 1e-4 per step: 100 steps shrink W by 0.99005; rounding to nearest would keep exactly 1.0."""
    engine, pop = engine_of(model_dir, torch.bfloat16), population()
    names = engine.perturbed_names(pop)
    for n in names:
        engine.model.params[n].fill_(1.0)
    opt, zero = ESOptimizer(weight_decay=1e-3), torch.zeros(4)
    for step in range(100):
        opt.step(engine, pop, step, zero, 0.1)
    values = torch.cat([engine.model.params[n].float().reshape(-1) for n in names])
    assert values.numel() > 4000
    assert abs(float(values.mean()) - (1 - 1e-4) ** 100) < 2e-3, float(values.mean())


def test_momentum_is_heavy_ball_not_an_average(model_dir):
    engine, pop = engine_of(model_dir), population()
    names = engine.perturbed_names(pop)
    w0 = snapshot(engine, names)
    opt, mu, lr1, lr2 = Momentum(momentum=0.9), 0.9, 0.05, 0.02
    opt.step(engine, pop, 0, torch.tensor(C1), lr1)
    opt.step(engine, pop, 1, torch.tensor(C2), lr2)
    for n in names:  # v1 = g1, v2 = μ·g1 + g2; W2 = W0 + lr1·v1 + lr2·v2
        g1, g2 = direction(engine, pop, 0, C1, n), direction(engine, pop, 1, C2, n)
        want = w0[n] + lr1 * g1 + lr2 * (mu * g1 + g2)
        torch.testing.assert_close(engine.model.params[n].double(), want, rtol=1e-5, atol=1e-6)


def test_adam_bias_correction(model_dir):
    engine, pop = engine_of(model_dir), population()
    names = engine.perturbed_names(pop)[:4]
    w0 = snapshot(engine, names)
    b1, b2, eps, lr = 0.8, 0.95, 1e-8, 0.01
    opt = Adam((b1, b2), eps)
    opt.step(engine, pop, 0, torch.tensor(C1), lr)
    w1 = snapshot(engine, names)
    opt.step(engine, pop, 1, torch.tensor(C2), lr)
    for n in names:
        g1, g2 = direction(engine, pop, 0, C1, n), direction(engine, pop, 1, C2, n)
        m1, v1 = (1 - b1) * g1, (1 - b2) * g1**2
        step1 = lr * (m1 / (1 - b1)) / ((v1 / (1 - b2)).sqrt() + eps)
        torch.testing.assert_close(w1[n], w0[n] + step1, rtol=1e-4, atol=1e-6)
        m2, v2 = b1 * m1 + (1 - b1) * g2, b2 * v1 + (1 - b2) * g2**2
        step2 = lr * (m2 / (1 - b1**2)) / ((v2 / (1 - b2**2)).sqrt() + eps)
        torch.testing.assert_close(engine.model.params[n].double(), w1[n] + step2, rtol=1e-4, atol=1e-6)


def test_sigma_and_lr_schedules():
    total = 10
    pop = PopulationConfig(sigma=0.2, sigma_final=0.05, sigma_schedule="linear")
    for step in range(total + 1):
        assert sigma_at(pop, step, total) == pytest.approx(0.2 + (0.05 - 0.2) * step / total)
    pop.sigma_schedule = "cosine"
    for step in (0, 3, 5, 10):
        want = 0.05 + (0.2 - 0.05) * 0.5 * (1 + math.cos(math.pi * step / total))
        assert sigma_at(pop, step, total) == pytest.approx(want)
    assert sigma_at(PopulationConfig(sigma=0.2, sigma_final=0.05), 7, total) == 0.2  # constant ignores the end
    optim = OptimConfig(lr=1e-2, min_lr=1e-3, schedule="linear", warmup_steps=4)
    for step in range(4):  # linear warmup to lr, then the schedule over the remaining steps
        assert lr_at(optim, step, total) == pytest.approx(1e-2 * (step + 1) / 4)
    for step in range(4, total + 1):
        assert lr_at(optim, step, total) == pytest.approx(1e-2 + (1e-3 - 1e-2) * (step - 4) / (total - 4))
    assert scheduled("cosine", 1.0, 0.0, 5, 10) == pytest.approx(0.5)


def test_engine_update_scales_by_std_of_w(model_dir):
    engine = engine_of(model_dir)
    pop = population(layerwise_scale=True)
    names = engine.perturbed_names(pop)
    w0 = snapshot(engine, names)
    std = {n: float(w0[n].std()) for n in names}  # s_t = std(W_t), unbiased, measured here
    assert max(std.values()) / min(std.values()) > 1.05  # distinct scales, so a wrong one shows
    lr = 0.3
    engine.update(pop, 2, torch.tensor(C1), lr)
    for n in names:  # W += lr·s_t·Σ c_m E_m
        want = w0[n] + lr * std[n] * direction(engine, pop, 2, C1, n)
        torch.testing.assert_close(engine.model.params[n].double(), want, rtol=1e-5, atol=1e-6)


def test_perturbed_forward_scales_by_std_of_w(model_dir):
    model, twin = load_model(model_dir), load_model(model_dir)
    pop = population(layerwise_scale=True, mode="full")
    plain = population(mode="full")
    engine = Engine(twin, kv_cache_tokens=64)
    member, step = 2, 1
    for n in engine.perturbed_names(pop):  # the twin holds W + σ·std(W)·E_m
        e = engine.perturbation(n, member, plain, step)
        twin.params[n].add_(float(twin.params[n].std()) * e)
    ids = random_ids(3, [7], vocab=model.config.vocab_size)
    got = packed_prefill(model, ids, [member], Perturbation.for_model(model, pop, step))[0]
    want = packed_prefill(twin, ids)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert (want - packed_prefill(model, ids)[0]).abs().max() > 1e-3  # the perturbation is visible
