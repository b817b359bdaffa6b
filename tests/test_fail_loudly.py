"""Nothing that fails silently (issue 16): broken plug-ins stop the run, non-finite weights are never saved or
loaded, and the GPU memory plan counts optimizer state before the KV pool takes the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny_model import DIGIT_TASK, make_tiny_model

from fastes import cli
from fastes.es import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("loud-model") / "tiny", seed=3)


@pytest.fixture
def config_file(model_dir: Path, tmp_path: Path) -> Path:
    data = {"model": str(model_dir), "task": DIGIT_TASK, "out": str(tmp_path / "run"), "device": "cpu", "steps": 5,
            "prompts_per_step": 2, "eval_size": 0, "progress": False, "tensorboard": False, "kv_cache_tokens": 512,
            "population": {"size": 4, "sigma": 0.1, "perturb_lm_head": True}, "optim": {"lr": 0.05},
            "sampling": {"max_tokens": 3, "temperature": 0.0}}
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(data))
    return file


REWARDS = {
    "raises": ("def bad(completions, **kw):\n    raise KeyError('answer')\n", "raised KeyError"),
    "nan": ("def bad(completions, **kw):\n    return [float('nan')] * len(completions)\n", "returned nan"),
    "nan-no-kwargs": ("def bad(completions):\n    return [float('nan')] * len(completions)\n", "returned nan"),
    "none": ("def bad(completions, **kw):\n    return [None] * len(completions)\n", "returned None"),
    "short": ("def bad(completions, **kw):\n    return [1.0, 2.0]\n", "returned 2 values"),
    "column": ("def bad(completions, answerr, **kw):\n    return [1.0] * len(completions)\n", "answerr"),
}


@pytest.mark.parametrize("case", sorted(REWARDS))
def test_a_reward_failing_on_every_rollout_stops_the_run(case, config_file, tmp_path, capsys):
    body, expected = REWARDS[case]
    file = tmp_path / "reward.py"
    file.write_text(body)
    code = cli.main(["train", "--config", str(config_file), "--rewards", f"{file}:bad"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastes: error:")]
    assert code == 1 and len(errors) == 1, err
    assert "'bad'" in errors[0] and expected in errors[0] and "3 consecutive steps" in errors[0], errors[0]
    warnings = [line for line in err.splitlines() if "skipped" in line and line.startswith("fastes: warning:")]
    assert len(warnings) == 2, err  # steps 0 and 1 warn; step 2 ends the run
    assert not ckpt.complete_checkpoints(tmp_path / "run")


def test_a_failing_member_fitness_stops_the_run(config_file, tmp_path, capsys):
    file = tmp_path / "fit.py"
    file.write_text("def fit(rollouts):\n    return rollouts[0]['columns']['missing']\n")
    code = cli.main(["train", "--config", str(config_file), "--fitness.member_fitness", f"{file}:fit",
                     "--max_failed_steps", "2"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastes: error:")]
    assert code == 1 and len(errors) == 1 and "'fit'" in errors[0] and "KeyError" in errors[0], err


def test_a_skipped_step_warns(config_file, tmp_path, capsys):
    file = tmp_path / "flat.py"
    file.write_text("def flat(completions, **kw):\n    return [0.5] * len(completions)\n")  # valid, no spread
    assert cli.main(["train", "--config", str(config_file), "--rewards", f"{file}:flat", "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped, the 4 member fitnesses are all equal") == 2, err


def test_a_non_finite_update_is_refused_and_nothing_saved(config_file, tmp_path, capsys):
    code = cli.main(["train", "--config", str(config_file), "--optim.lr", "1e38"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "non-finite" in lines[0] and "refused" in lines[0], err
    assert not ckpt.complete_checkpoints(tmp_path / "run")
    for file in (tmp_path / "run").rglob("*.safetensors") if (tmp_path / "run").exists() else []:
        assert all(torch.isfinite(t).all() for t in load_file(str(file)).values())


def test_a_nan_weight_in_the_input_model_is_one_line(model_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["lm_head.weight"][1, 2] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"))
    assert cli.main(["generate", "--model", str(bad), "--prompt", "12+"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lm_head.weight" in err[0] and "NaN or inf" in err[0]


# ---------------------------------------------------------------------- the GPU memory plan


def test_dry_run_plans_the_kv_pool_after_optimizer_state(config_file, model_dir, capsys, monkeypatch):
    """A CUDA run planned on this CPU machine with a fake 8 GB GPU: the pool is what is left after weights,
    Adam's two fp32 slots per perturbed element and the update workspace (all counted here)."""
    import json
    import math

    from fastes.models import perturbed_names
    from fastes.models.config import ModelConfig
    from fastes.population import Population

    free, total = 6 * 10**9, 8 * 10**9
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    assert cli.main(["train", "--config", str(config_file), "--device", "cuda", "--dtype", "bfloat16",
                     "--kv_cache_tokens", "null", "--optim.name", "adam", "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = json.loads((model_dir / "config.json").read_text())
    mc = ModelConfig.from_dict(cfg)
    shapes = {n: s for n, (s, _) in mc.param_shapes().items()}
    pert = perturbed_names(mc.param_shapes(), Population(size=4, sigma=0.1, perturb_lm_head=True), {})
    numel = {n: math.prod(s) for n, s in shapes.items()}
    weights = 2 * sum(numel.values())
    adam = 2 * 4 * sum(numel[n] for n in pert)
    workspace = 6 * 4 * max(numel[n] for n in pert)
    workspace += 4 * 2 * 1 * max(sum(shapes[n]) for n in pert if len(shapes[n]) == 2)  # lowrank factors, K = 2, r = 1
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (cfg["hidden_size"] //
                                                                             cfg["num_attention_heads"]) * 2
    tokens = (int(0.9 * total) - (total - free) - weights - adam - workspace) // per_token
    kv = next(line for line in out.splitlines() if "KV pool" in line)
    assert f"({tokens} tokens, predicted" in kv, kv
    assert f"{adam / 1e3:.2f} kB (adam)" in out or f"{adam / 1e6:.2f} MB (adam)" in out


def test_kv_tokens_after_reserve():
    from fastes.es.memory_plan import kv_tokens_after_reserve

    assert kv_tokens_after_reserve(10_000, 0, 100, 16, 64) == 10_000 // 16 * 16
    assert kv_tokens_after_reserve(10_000, 100 * 5_000, 100, 16, 64) == 5_000 // 16 * 16
    with pytest.raises(ValueError, match="fewer than the 4096 one sequence needs"):
        kv_tokens_after_reserve(10_000, 100 * 9_000, 100, 16, 4096)


def test_training_engine_on_cuda_gets_the_pool_left_after_the_reserve(model_dir, monkeypatch):
    """The CUDA branch of load_engine on this CPU machine: profiling and the device are stand-ins, the
    arithmetic and the Engine construction are real."""
    import fastes.engine.kv_cache as kv_cache
    import fastes.models as models
    from fastes.es.config import TrainConfig
    from fastes.es.memory_plan import load_engine, reserve_bytes, training_reserve

    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda path, dtype, device: real_load(path, dtype=dtype))
    monkeypatch.setattr(kv_cache, "profile_num_blocks", lambda model, tokens, block: 4096)  # 65,536 tokens
    config = TrainConfig.from_dict({"model": str(model_dir), "task": DIGIT_TASK, "optim": {"name": "adam"},
                                    "population": {"mode": "full", "perturb_lm_head": True}})
    engine = load_engine(config, model_dir, "cuda", torch.float32)
    per_token = 2 * engine.model.config.num_layers * engine.model.config.num_kv_heads * \
        engine.model.config.head_dim * 4
    reserve = reserve_bytes(training_reserve(config, engine.model.config, torch.float32))
    assert reserve > 100 * per_token  # Adam's state is not negligible next to the pool here
    want = (4096 * 16 - -(-reserve // per_token)) // 16 * 16
    assert engine.manager.num_blocks * engine.block_size == want
