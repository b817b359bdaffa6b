"""The ES trainer end to end on tiny random Llamas (CPU, seconds per run): learning, resume, checkpoints, logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_model import DigitTask, make_tiny_model

from fastes.es import checkpoint as ckpt
from fastes.es.config import TrainConfig
from fastes.es.logger import read_metrics
from fastes.es.optim import AskTell, lr_at, scheduled
from fastes.es.trainer import Trainer, derive_seed, encode_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def make_config(model: Path, out: Path, **over: object) -> TrainConfig:
    """Greedy rollouts of 4 prompts by 8 members; the noise reaches lm_head so a few steps move the digit rate."""
    data: dict = dict(model=str(model), task="digits", out=str(out), device="cpu", steps=8, seed=0, prompts_per_step=4,
                      samples_per_prompt=1, eval_every=0, eval_size=4, progress=False, tensorboard=False,
                      kv_cache_tokens=4096,
                      population=dict(size=8, mode="lowrank", rank=2, sigma=0.1, perturb_lm_head=True),
                      optim=dict(lr=0.05), sampling=dict(max_tokens=6, temperature=0.0))
    for key, value in over.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return TrainConfig.from_dict(data)


def run(config: TrainConfig, max_steps: int | None = None) -> Trainer:
    trainer = Trainer(config, task=DigitTask())
    trainer.train(max_steps=max_steps)
    return trainer


LEARNING = {
    "lowrank": {},
    "lora": dict(population=dict(mode="lora"), optim=dict(lr=0.1)),
    # dense noise needs more members per dimension: a bigger population on lm_head alone
    "full": dict(steps=10, prompts_per_step=2, population=dict(mode="full", size=16, include=["lm_head.weight"])),
}


@pytest.fixture(scope="module")
def runs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Trainer]:
    return {mode: run(make_config(model_dir, tmp_path_factory.mktemp(mode) / "run", **over))
            for mode, over in LEARNING.items()}


@pytest.mark.parametrize("mode", list(LEARNING))
def test_es_raises_a_learnable_reward(runs, mode):
    records = read_metrics(runs[mode].run_dir)
    evals = [r for r in records if "eval/reward" in r]
    train = [r for r in records if "reward/mean" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == runs[mode].config.steps
    assert len(train) == runs[mode].config.steps and not all(r["skipped"] for r in train)
    assert evals[-1]["eval/reward"] > evals[0]["eval/reward"] + 0.1, [r["eval/reward"] for r in evals]


def test_run_directory_holds_metrics_curves_config_and_checkpoint(runs):
    trainer = runs["lowrank"]
    out = trainer.run_dir
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    first = records[0]
    for key in ("step", "reward/mean", "reward/std", "eval/accuracy", "eval/reward", "time/step_s", "tokens/s",
                "skipped", "reward/errors", "lr", "sigma"):
        assert key in first, key
    assert (out / "curves.png").stat().st_size > 1000
    assert TrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text())) == trainer.config
    final = out / "checkpoints" / f"step-{trainer.config.steps}"
    state = ckpt.load_state(final)
    assert state["step"] == trainer.config.steps and state["config"] == trainer.config.to_dict()
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())


def _fastes_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one prompt through a fresh paged cache (no perturbation)."""
    from fastes.engine.attention_batch import build_attention_batch
    from fastes.engine.block_manager import BlockManager
    from fastes.engine.kv_cache import KVCache

    manager = BlockManager(8, 16)
    cache = KVCache.for_model(model.config, manager.num_blocks, 16)
    manager.allocate(0, -1, len(ids))
    attn, positions = build_attention_batch(manager, [(0, 0, len(ids))])
    return model.forward(torch.tensor(ids), positions, attn, cache).float()


def test_lora_checkpoint_is_merged_and_loads_in_transformers(runs):
    import transformers

    trainer = runs["lora"]
    final = ckpt.find_checkpoint(trainer.run_dir)
    assert (final / ckpt.ADAPTER_FILE).is_file()
    saved = load_file(str(final / "model.safetensors"))
    assert not any("lora" in name for name in saved)
    assert any(trainer.engine.model.params[n].abs().max() > 0 for n in trainer.engine.model.lora_names()
               if ".lora_B." in n)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final), torch_dtype=torch.float32).eval()
    ids = trainer.engine.tokenizer.encode("12+3=ab")
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(_fastes_logits(trainer.engine.model, ids), want, atol=1e-4, rtol=1e-4)


RESUME = {
    "lowrank-adam-layerwise-cosine": dict(population=dict(layerwise_scale=True, sigma=0.5, sigma_schedule="cosine",
                                                          sigma_final=0.2),
                                          optim=dict(name="adam", lr=0.01, schedule="cosine", warmup_steps=1,
                                                     weight_decay=0.1)),
    "lora-momentum-sampled": dict(population=dict(mode="lora"), optim=dict(name="momentum", lr=0.05),
                                  sampling=dict(temperature=1.0), samples_per_prompt=2),
    "full-sgd-bf16-per-member": dict(dtype="bfloat16", same_prompts=False, population=dict(mode="full"),
                                     optim=dict(lr=0.01, weight_decay=0.5), sampling=dict(temperature=0.8)),
}


@pytest.mark.parametrize("case", list(RESUME))
def test_two_steps_resume_two_steps_is_bit_identical(model_dir, tmp_path, case):
    over = dict(RESUME[case], steps=4, prompts_per_step=2, eval_size=2, eval_every=2,
                population={"size": 4, **RESUME[case].get("population", {})})
    straight = run(make_config(model_dir, tmp_path / "straight", **over))
    run(make_config(model_dir, tmp_path / "split", **over), max_steps=2)
    assert ckpt.find_checkpoint(tmp_path / "split").name == "step-2"
    resumed = run(make_config(model_dir, tmp_path / "split", resume=str(tmp_path / "split"), **over))
    assert resumed.start_step == 2
    a, b = (ckpt.find_checkpoint(tmp_path / name) for name in ("straight", "split"))
    assert a.name == b.name == "step-4"
    for file in ("model.safetensors", ckpt.OPTIM_FILE, ckpt.ADAPTER_FILE):
        if (a / file).exists() or (b / file).exists():
            ta, tb = load_file(str(a / file)), load_file(str(b / file))
            assert ta.keys() == tb.keys()
            for name in ta:
                assert torch.equal(ta[name], tb[name]), (file, name)
    base = load_file(str(model_dir / "model.safetensors"))
    moved = load_file(str(a / "model.safetensors"))
    assert any(not torch.equal(base[n].to(moved[n].dtype), moved[n]) for n in base)  # training did something
    sa, sb = ckpt.load_state(a), ckpt.load_state(b)
    assert sa["optimizer"] == sb["optimizer"] and sa["noise_scales"] == sb["noise_scales"]
    ma, mb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in ma] == [r["step"] for r in mb]  # resumed log has no duplicate steps
    for ra, rb in zip(ma, mb, strict=True):
        assert ra.get("reward/mean") == rb.get("reward/mean") and ra.get("eval/reward") == rb.get("eval/reward")
    assert straight.es.optimizer.t == resumed.es.optimizer.t


def test_a_crash_while_checkpointing_leaves_the_previous_checkpoint(model_dir, tmp_path, monkeypatch):
    config = make_config(model_dir, tmp_path / "run", steps=3, save_every=1, eval_size=0,
                         population=dict(size=4), optim=dict(name="momentum"))
    real = ckpt._write_json
    calls = {"n": 0}

    def dying(file: Path, data: dict) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the weights of step-2 are on disk, its state file is not
            raise OSError("disk died")
        real(file, data)

    monkeypatch.setattr(ckpt, "_write_json", dying)
    with pytest.raises(ckpt.CheckpointWriteError, match="disk died"):  # one line (CLI exit 2), not a traceback
        run(config)
    monkeypatch.setattr(ckpt, "_write_json", real)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]
    # a hard kill leaves staging behind (no cleanup runs): it must never be taken for a checkpoint
    junk = root / ".step-2.tmp-killed" / "checkpoint"
    junk.mkdir(parents=True)
    (junk / "model.safetensors").write_bytes(b"\0" * 10)
    (junk / ckpt.STATE_FILE).write_text("{")
    assert ckpt.find_checkpoint(tmp_path / "run").name == "step-1"
    resumed = run(make_config(model_dir, tmp_path / "run", resume=str(tmp_path / "run"), steps=3, save_every=1,
                              eval_size=0, population=dict(size=4), optim=dict(name="momentum")))
    assert resumed.start_step == 1 and ckpt.find_checkpoint(tmp_path / "run").name == "step-3"
    straight = run(make_config(model_dir, tmp_path / "straight", steps=3, eval_size=0, population=dict(size=4),
                               optim=dict(name="momentum")))
    a = load_file(str(ckpt.find_checkpoint(straight.run_dir) / "model.safetensors"))
    b = load_file(str(root / "step-3" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_existing_run_directory_is_refused_without_resume(model_dir, runs):
    config = make_config(model_dir, runs["lowrank"].run_dir)
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(config, task=DigitTask())


def test_ask_tell_skips_a_step_without_spread(model_dir):
    from fastes.engine.engine import Engine

    engine = Engine.from_pretrained(model_dir, kv_cache_tokens=256)
    config = make_config(model_dir, Path("unused"), population=dict(size=4))
    es = AskTell(engine, config)
    before = {n: t.clone() for n, t in engine.model.params.items()}
    assert es.ask(3).size == 4 and es.ask(3).sigma == pytest.approx(0.1)
    assert es.tell(3, [0.5, 0.5, 0.5, 0.5]) is None
    assert all(torch.equal(before[n], engine.model.params[n]) for n in before)
    coeffs = es.tell(3, [1.0, 0.0, 0.0, 1.0])
    assert coeffs is not None and coeffs.shape == (4,)
    assert any(not torch.equal(before[n], engine.model.params[n]) for n in before)


def test_pass_at_k_and_member_level_fitness(model_dir, tmp_path):
    """pass@k over k samples per prompt, and a plug-in that sees all of a member's rollouts (or raises)."""
    seen: list[int] = []

    def distinct(rollouts: list[dict]) -> float:
        seen.append(len(rollouts))
        return float(len({r["completion"] for r in rollouts}))

    def broken(rollouts: list[dict]) -> float:
        raise RuntimeError("plug-in bug")

    over = dict(steps=1, eval_size=0, samples_per_prompt=3, prompts_per_step=2, population=dict(size=4),
                sampling=dict(temperature=1.0))
    trainer = Trainer(make_config(model_dir, tmp_path / "a", **over), task=DigitTask(), member_fitness=distinct)
    record = trainer.train_step(0)
    assert seen == [6, 6, 6, 6] and record["fitness/errors"] == 0 and 1 <= record["fitness/max"] <= 6
    trainer = Trainer(make_config(model_dir, tmp_path / "b", **over), task=DigitTask(), member_fitness=broken)
    record = trainer.train_step(0)
    assert record["fitness/errors"] == 4 and record["skipped"] == 1  # every member scored 0: no spread
    pass_k = make_config(model_dir, tmp_path / "c", fitness=dict(pass_at_k=2), **over)
    digit_only = [(lambda completions, **_: [float(any(ch.isdigit() for ch in c)) for c in completions], 1.0)]
    record = Trainer(pass_k, task=DigitTask(), rewards=digit_only).train_step(0)
    assert 0.0 <= record["fitness/mean"] <= 1.0 and record["reward/mean"] <= 1.0


def test_chat_prompts_carry_the_task_system_prompt(model_dir):
    from fastes.engine.engine import Engine

    engine = Engine.from_pretrained(model_dir, kv_cache_tokens=256)
    task = DigitTask()
    task.system_prompt = "sys"
    first = task.train_examples()[:1]  # "12+3="; the tiny chat template joins contents and appends "="
    assert encode_prompts(engine, task, first, True) == [engine.tokenizer.encode("sys12+3==", add_special_tokens=False)]
    assert encode_prompts(engine, task, first, False) == [engine.tokenizer.encode("12+3=")]


def test_schedules_and_seeds():
    config = make_config(Path("m"), Path("o"), optim=dict(lr=1.0, schedule="cosine", warmup_steps=2, min_lr=0.1))
    assert [round(lr_at(config.optim, s, 10), 6) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(config.optim, 2, 10) == pytest.approx(1.0) and lr_at(config.optim, 10, 10) == pytest.approx(0.1)
    assert scheduled("linear", 1.0, 0.0, 5, 10) == pytest.approx(0.5)
    assert derive_seed(0, 1, "sampling") != derive_seed(0, 2, "sampling") != derive_seed(1, 1, "sampling")
    assert derive_seed(7, 3, "data") == derive_seed(7, 3, "data") < 2**64


def test_per_member_batches_generate_only_each_members_own_prompts(model_dir, tmp_path):
    """same_prompts: false gives each antithetic pair its own batch; each member generates that batch alone,
    and its completions are the ones it gets when it generates every batch."""
    trainer = Trainer(make_config(model_dir, tmp_path / "run", same_prompts=False, steps=1), task=DigitTask())
    calls, generate = [], trainer.engine.generate

    def spy(prompts, **kwargs):  # also generates every batch for every member, before the update moves W
        outs = generate(prompts, **kwargs)
        every = generate(prompts, **{k: v for k, v in kwargs.items() if k != "member_prompts"})
        calls.append((prompts, kwargs, outs, every))
        return outs

    trainer.engine.generate = spy
    trainer.train_step(0)
    (prompts, kwargs, outs, every), = calls
    batches = trainer.batches(0)
    per = trainer.config.prompts_per_step
    assert len(batches) == 4 and len(prompts) == 4 * per  # one batch per noise index of 8 antithetic members
    for m, indices in enumerate(kwargs["member_prompts"]):
        assert [prompts[i] for i in indices] == [trainer._prompt_ids(j) for j in batches[m // 2]]
    for m in range(8):
        own = [[c.token_ids for c in per_prompt] for per_prompt in outs[m]]
        assert own == [[c.token_ids for c in every[m][(m // 2) * per + j]] for j in range(per)]
