"""The ES algorithm options of issue 18, each against an independent formula.

Anchored weight decay pulls toward the starting weights θ₀; reused noise gives the same
perturbations; the centre baseline subtracts the unperturbed score; fitness.group_size reaches
the shaping; common random numbers give every member the unperturbed row's sampling stream.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_model import DigitTask, make_tiny_model

from fastes.engine.sampling import SamplingParams
from fastes.es.config import TrainConfig
from fastes.es.optim import AskTell, ESOptimizer, Momentum, es_direction
from fastes.es.trainer import Trainer, derive_seed
from fastes.population import Population

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=3)


def engine_of(model_dir: Path):  # noqa: ANN201
    from fastes.engine.engine import Engine

    return Engine.from_pretrained(model_dir, kv_cache_tokens=1024)


def make_config(model: Path, **over: object) -> TrainConfig:
    data: dict = dict(model=str(model), task="digits", out="unused", device="cpu", steps=8, seed=5,
                      prompts_per_step=3, eval_every=0, eval_size=0, progress=False, tensorboard=False,
                      kv_cache_tokens=1024, population=dict(size=8, rank=2, sigma=0.1, perturb_lm_head=True),
                      optim=dict(lr=0.05), sampling=dict(max_tokens=5, temperature=1.0))
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.from_dict(data)


# ---------------------------------------------------------------------- anchored weight decay


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_anchored_decay_pulls_toward_the_starting_weights(model_dir, optimizer):
    """Step 1 moves θ₀ to θ₁ (no decay: θ = θ₀); step 2 with zero coefficients gives θ₀ + (1 − lr·wd)(θ₁ − θ₀)."""
    engine = engine_of(model_dir)
    pop = Population(size=4, sigma=0.1, rank=2, seed=1)
    lr, wd = 0.05, 4.0
    opt = ESOptimizer(wd, "start") if optimizer == "sgd" else Momentum(0.0, wd, "start")
    names = engine.perturbed_names(pop)
    theta0 = {n: engine.model.params[n].clone() for n in names}
    coeffs = torch.tensor([1.0, -0.5, 0.25, 2.0])
    expected1 = {n: theta0[n] + lr * es_direction(engine, pop, 0, coeffs, n) for n in names}
    opt.step(engine, pop, 0, coeffs, lr)
    for n in names:
        torch.testing.assert_close(engine.model.params[n], expected1[n], rtol=1e-5, atol=1e-6)
    theta1 = {n: engine.model.params[n].clone() for n in names}
    opt.step(engine, pop, 1, torch.zeros(4), lr)
    for n in names:
        torch.testing.assert_close(engine.model.params[n], theta0[n] + (1 - lr * wd) * (theta1[n] - theta0[n]),
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(engine.model.params[n], (1 - lr * wd) * theta1[n], atol=1e-4)  # not toward 0


def test_anchor_is_state_saved_and_restored(model_dir):
    engine = engine_of(model_dir)
    pop = Population(size=4, sigma=0.1, seed=1)
    opt = ESOptimizer(1.0, "start")
    assert opt.anchored and opt.slots == ("anchor",) and opt.state_bytes(10) == 40
    assert not ESOptimizer(0.0, "start").anchored and ESOptimizer(1.0).state_bytes(10) == 0
    start = {n: engine.model.params[n].clone() for n in engine.perturbed_names(pop)}
    opt.step(engine, pop, 0, torch.tensor([1.0, 0.0, 0.0, -1.0]), 0.1)
    tensors = opt.state_tensors()
    assert set(tensors) == {f"anchor/{n}" for n in start}
    assert all(torch.equal(tensors[f"anchor/{n}"], start[n].float()) for n in start)
    again = ESOptimizer(1.0, "start")
    again.load_state(opt.state_meta(), tensors, torch.device("cpu"))
    assert all(torch.equal(again.state["anchor"][n], start[n]) for n in start)
    with pytest.raises(ValueError, match="no starting weights"):
        ESOptimizer(1.0, "start").load_state({"name": "sgd", "t": 3}, {}, torch.device("cpu"))
    with pytest.raises(ValueError, match="decay_to"):
        make_config(model_dir, optim=dict(decay_to="origin"))


# ---------------------------------------------------------------------- noise reuse


def test_reused_noise_gives_the_same_perturbations(model_dir):
    """With noise_reuse k, step s perturbs exactly like step ⌊s/k⌋ without reuse (6 → 1 for k = 4, not 6 mod 4)."""
    engine = engine_of(model_dir)
    plain = Population(size=4, sigma=0.1, rank=2, seed=2)
    reused = Population(size=4, sigma=0.1, rank=2, seed=2, noise_reuse=4)
    coeffs = torch.tensor([0.5, -1.0, 2.0, 0.25])
    name = engine.perturbed_names(plain)[0]
    for step, source in ((0, 0), (3, 0), (4, 1), (6, 1), (9, 2)):
        assert reused.noise_step(step) == source
        torch.testing.assert_close(es_direction(engine, reused, step, coeffs, name),
                                   es_direction(engine, plain, source, coeffs, name), rtol=0, atol=0)
    assert not torch.equal(es_direction(engine, reused, 3, coeffs, name), es_direction(engine, reused, 4, coeffs, name))
    sampling = SamplingParams(max_tokens=5, temperature=0.0)
    prompts = ["12+3=", "abc"]
    assert engine.generate(prompts, sampling, reused, step=5) == engine.generate(prompts, sampling, plain, step=1)
    config = make_config(model_dir, population=dict(noise_reuse=4))
    assert AskTell.population_of(config, 7).noise_step(7) == 1
    with pytest.raises(ValueError, match="noise_reuse"):
        make_config(model_dir, population=dict(noise_reuse=0))


# ---------------------------------------------------------------------- centre baseline


@pytest.mark.parametrize("same_prompts", [True, False])
def test_center_baseline_subtracts_the_unperturbed_score(model_dir, same_prompts):
    """fitness_m = mean reward of member m − mean reward of the unperturbed model on m's prompts (same seed)."""
    config = make_config(model_dir, same_prompts=same_prompts, fitness=dict(center_baseline=True, shaping="raw"),
                         population=dict(size=4))
    trainer = Trainer(config, task=DigitTask())
    task, step = DigitTask(), 2
    batches = trainer.batches(step)
    prompts = [task.train_examples()[i].prompt for batch in batches for i in batch]
    sampling = SamplingParams(max_tokens=5, temperature=1.0, seed=derive_seed(config.seed, step, "sampling"))
    pop = trainer.es.ask(step)
    members = trainer.engine.generate(prompts, sampling, pop, step=step)
    center = trainer.engine.generate(prompts, sampling)[0]

    def mean_reward(outs: list, batch: int) -> float:
        rows = range(batch * 3, batch * 3 + 3)
        return sum(task.reward([outs[j][0].text])[0] for j in rows) / 3

    batch_of = [0, 0, 0, 0] if same_prompts else [0, 0, 1, 1]
    want = [mean_reward(members[m], batch_of[m]) - mean_reward(center, batch_of[m]) for m in range(4)]
    seen: list[torch.Tensor] = []
    trainer.es.tell = lambda s, f: seen.append(torch.as_tensor(f))  # type: ignore[method-assign]
    record = trainer.train_step(step)
    torch.testing.assert_close(seen[0], torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    centers = [mean_reward(center, b) for b in sorted(set(batch_of))]
    assert record["fitness/center"] == pytest.approx(sum(centers) / len(centers))
    assert any(abs(c) > 0.05 for c in centers)  # the test would not see a missing subtraction otherwise


# ---------------------------------------------------------------------- group size


def test_group_size_from_config_reaches_the_shaping(model_dir):
    """group_global with groups of 4: c_m = (f_m − mean of m's group) / std(f) / (N·σ)."""
    engine = engine_of(model_dir)
    config = make_config(model_dir, fitness=dict(shaping="group_global", group_size=4))
    es = AskTell(engine, config)
    seen: list[torch.Tensor] = []
    es.optimizer.step = lambda e, p, s, c, lr: seen.append(c)  # type: ignore[method-assign]
    f = torch.tensor([1.0, 3.0, 2.0, 6.0, 0.0, 0.5, 4.0, 1.5], dtype=torch.float64)
    es.tell(0, f)
    groups = f.reshape(2, 4)
    want = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1) / f.std(unbiased=False) / (8 * 0.1)
    torch.testing.assert_close(seen[0], want.float())
    for size, group in ((8, 3), (12, 3)):  # not a divisor; odd under antithetic pairs
        with pytest.raises(ValueError, match="group_size"):
            make_config(model_dir, fitness=dict(group_size=group), population=dict(size=size))
    assert make_config(model_dir, fitness=dict(group_size=3), population=dict(size=12, antithetic=False))


# ---------------------------------------------------------------------- common random numbers


def test_common_random_numbers_share_the_unperturbed_stream(model_dir):
    """σ = 0: every member has the unperturbed weights, so with CRN all members sample what the centre samples."""
    engine = engine_of(model_dir)
    pop = Population(size=6, sigma=0.0, seed=1)
    prompts = ["12+3=", "abc", "x y"]
    crn = SamplingParams(max_tokens=5, temperature=1.5, seed=11, common_random_numbers=True)
    own = SamplingParams(max_tokens=5, temperature=1.5, seed=11)
    center = [[c.token_ids for c in p] for p in engine.generate(prompts, own)[0]]  # its own stream, no CRN
    with_crn = [[[c.token_ids for c in p] for p in m] for m in engine.generate(prompts, crn, pop, step=1)]
    without = [[[c.token_ids for c in p] for p in m] for m in engine.generate(prompts, own, pop, step=1)]
    assert all(m == center for m in with_crn)
    assert any(m != without[0] for m in without[1:])  # the dice differ per member without CRN
    config = make_config(model_dir, sampling=dict(common_random_numbers=True))
    assert config.sampling_params(seed=1).common_random_numbers
    assert not config.sampling_params(seed=1, greedy=True).common_random_numbers


def test_memory_plan_counts_the_lowrank_factor_workspace(model_dir):
    """The lowrank update's fp32 factors, K·r·(out + in)·4 B of the widest perturbed matrix (lm_head here:
    vocab + hidden), on top of the optimizer's temporaries; full-rank noise has none."""
    from fastes.es.memory_plan import training_reserve
    from fastes.models.config import ModelConfig

    mc = ModelConfig.from_pretrained(model_dir)
    shapes = {n: s for n, (s, _) in mc.param_shapes().items()}
    full = training_reserve(make_config(model_dir, population=dict(mode="full")), mc, torch.float32)
    widest = sum(shapes["lm_head.weight"])
    for antithetic, k in ((True, 4), (False, 8)):  # N = 8 members: 4 noise indices when antithetic
        low = training_reserve(make_config(model_dir, population=dict(antithetic=antithetic)), mc, torch.float32)
        assert low["workspace"] == full["workspace"] + 4 * k * 2 * widest


def test_memory_plan_counts_the_anchor_copy(model_dir):
    """Anchored decay keeps θ₀ in fp32: 4 bytes per perturbed element on top of the optimizer's own state."""
    from fastes.es.memory_plan import training_reserve
    from fastes.models.config import ModelConfig

    mc = ModelConfig.from_pretrained(model_dir)
    for name, slots in (("sgd", 0), ("adam", 2)):
        plain = training_reserve(make_config(model_dir, optim=dict(name=name, weight_decay=1.0)), mc, torch.float32)
        anchored = training_reserve(make_config(model_dir, optim=dict(name=name, weight_decay=1.0, decay_to="start")),
                                    mc, torch.float32)
        assert plain["optimizer"] == 4 * slots * plain["perturbed_numel"]
        assert anchored["optimizer"] == 4 * (slots + 1) * plain["perturbed_numel"]
