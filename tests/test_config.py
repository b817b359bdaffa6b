"""TrainConfig: YAML loading, command-line overrides with type conversion, and one-line errors."""

from __future__ import annotations

import pytest
import yaml

from fastes.es.config import TrainConfig, apply_overrides, parse_overrides, resolve_key

BASE = {"model": "m", "task": "countdown"}


def build(**data: object) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, **data})


def one_line_error(data: dict | None = None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(apply_overrides({**BASE, **(data or {})}, overrides or []))
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_yaml_load_with_sections_and_scientific_floats(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("model: some/dir\ntask: arithmetic\ntask_options: {digits: 3}\nsteps: 7\n"
                    "population: {size: 30, antithetic: false, mode: full, sigma: 1e-3, include: ['*.mlp.*']}\n"
                    "optim: {name: adam, lr: 5e-7, betas: [0.8, 0.99]}\nsampling: {stop: [\"\\n\\n\"]}\n"
                    "rewards: ['mod:f', {func: 'file.py:g', weight: 0.5}]\n")
    config = TrainConfig.from_yaml(file)
    assert config.population.sigma == 1e-3 and isinstance(config.population.sigma, float)  # PyYAML reads a str
    assert config.optim.lr == 5e-7 and config.optim.betas == [0.8, 0.99]
    assert config.population.size == 30 and config.population.antithetic is False
    assert config.population.include == ["*.mlp.*"] and config.sampling.stop == ["\n\n"]
    assert config.task_options == {"digits": 3} and config.steps == 7
    assert config.rewards == [{"func": "mod:f", "weight": 1.0}, {"func": "file.py:g", "weight": 0.5}]
    assert config.lora.rank == 8 and config.optim.eps == 1e-8  # untouched defaults


def test_to_yaml_round_trips(tmp_path):
    config = build(population={"mode": "lora", "sigma": 0.1}, lora={"alpha": 16}, use_chat_template=True)
    assert TrainConfig.from_dict(yaml.safe_load(config.to_yaml())) == config
    config.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == config


def test_overrides_convert_by_field_type():
    config = TrainConfig.from_dict(apply_overrides(dict(BASE), [
        "--steps", "12", "--optim.lr", "1e-3", "--population.antithetic", "false", "--population.include",
        "a.*,b.*", "--sampling.stop", '["\\n", "END"]', "--kv_cache_tokens=4096", "--resume", "none",
        "--task_options.digits", "4", "--progress", "--population.sigma", "0.5", "--seed", "3",
        "--population.size", "5", "--max-tokens", "33", "--optim.betas", "0.5,0.6", "--rewards", "m:f"]))
    assert config.steps == 12 and config.optim.lr == 1e-3 and config.population.antithetic is False
    assert config.population.include == ["a.*", "b.*"] and config.sampling.stop == ["\n", "END"]
    assert config.kv_cache_tokens == 4096 and config.resume is None and config.task_options == {"digits": 4}
    assert config.progress is True and config.population.sigma == 0.5 and config.seed == 3
    assert config.sampling.max_tokens == 33  # unique section key without its section, dashes allowed
    assert config.optim.betas == [0.5, 0.6] and config.rewards == [{"func": "m:f", "weight": 1.0}]
    assert config.cuda_graphs is None and build().replace(["--cuda_graphs", "false"]).cuda_graphs is False


def test_override_beats_yaml_and_keeps_the_rest(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("model: a\ntask: countdown\noptim: {lr: 0.5, name: momentum}\n")
    config = TrainConfig.from_yaml(file, ["--lr", "0.25", "--model", "b"])
    assert config.optim.lr == 0.25 and config.optim.name == "momentum" and config.model == "b"
    assert build().replace(["--steps", "3"]).steps == 3


def test_key_resolution():
    assert resolve_key("steps") == ("steps",)
    assert resolve_key("optim.lr") == ("optim", "lr") and resolve_key("lr") == ("optim", "lr")
    assert parse_overrides(["--a", "1", "--b=2", "--c"]) == [("a", "1"), ("b", "2"), ("c", None)]


@pytest.mark.parametrize("data, overrides, expected", [
    ({"stepz": 3}, [], "unknown config key 'stepz' (did you mean 'steps'?)"),
    ({"population": {"sizee": 4}}, [], "unknown config key 'population.sizee'"),
    ({}, ["--populaton.size", "4"], "unknown config key"),
    ({}, ["--rank", "4"], "ambiguous option --rank"),
    ({}, ["--steps"], "--steps needs a value"),
    ({}, ["steps", "3"], "expected --key value"),
    ({"population": 3}, [], "population must be a mapping"),
])
def test_unknown_and_malformed_keys(data, overrides, expected):
    assert expected in one_line_error(data, overrides)


@pytest.mark.parametrize("data, overrides, expected", [
    ({"steps": "abc"}, [], "steps must be an int"),
    ({"steps": 1.5}, [], "steps must be an int"),
    ({}, ["--steps", "2.5"], "steps must be an int"),
    ({"population": {"antithetic": "maybe"}}, [], "population.antithetic must be a bool"),
    ({"optim": {"lr": True}}, [], "optim.lr must be a float"),
    ({}, ["--optim.lr", "fast"], "optim.lr must be a float"),
    ({}, ["--optim.lr", "nan"], "optim.lr must be a float"),
    ({"model": 7}, [], "model must be a str"),
    ({"sampling": {"stop": 5}}, [], "sampling.stop must be a list"),
    ({"population": {"include": [1]}}, [], "population.include[0] must be a str"),
    ({"kv_cache_tokens": "x"}, [], "kv_cache_tokens must be an int or null"),
    ({"task_options": [1]}, [], "task_options must be a dict"),
])
def test_type_errors(data, overrides, expected):
    assert expected in one_line_error(data, overrides)


@pytest.mark.parametrize("data, expected", [
    ({"population": {"size": 3}}, "population.size must be even with antithetic sampling"),
    ({"population": {"mode": "dense"}}, "population.mode must be one of lowrank, full, lora"),
    ({"population": {"sigma": 0.0}}, "population.sigma must be > 0"),
    ({"fitness": {"shaping": "rank"}}, "fitness.shaping must be one of"),
    ({"fitness": {"pass_at_k": 4}}, "fitness.pass_at_k must be null or in [1, samples_per_prompt]"),
    ({"optim": {"name": "lion"}}, "optim.name must be one of sgd, momentum, adam"),
    ({"optim": {"betas": [0.9]}}, "optim.betas must be two numbers in [0, 1)"),
    ({"optim": {"schedule": "step"}}, "optim.schedule must be one of constant, linear, cosine"),
    ({"steps": -1}, "steps must be >= 0"),
    ({"prompts_per_step": 0}, "prompts_per_step must be >= 1"),
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"device": "tpu"}, "device must be auto, cpu or cuda"),
    ({"device": "cpu", "cuda_graphs": True}, "cuda_graphs must be false or null on device cpu"),
    ({"sampling": {"top_p": 0.0}}, "sampling: top_p"),
    ({"rewards": [{"func": "nocolon"}]}, "rewards[0].func must be 'module:function'"),
    ({"rewards": [{"func": "m:f", "wieght": 2}]}, "rewards[0] must be"),
    ({"model": ""}, "model is required"),
])
def test_invalid_values(data, expected):
    assert expected in one_line_error(data)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML") as info:
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        TrainConfig.from_yaml(tmp_path / "list.yaml")
