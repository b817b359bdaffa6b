"""The peers' Countdown (countdown.json): their reward against an eval-based oracle, their split, the Qiu config."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from fastes.es import fitness as F
from fastes.es.config import TrainConfig
from fastes.es.tasks import CountdownPeersTask, CountdownTask, countdown_peers, get_task

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "fastes" / "data" / "countdown_tiny.json"


def oracle(completion: str, numbers: list[int], target: str) -> float:
    """The issue's definition, written with re and Python eval (test-controlled strings only)."""
    text = "<think>" + completion
    if re.match(r"^<think>.*?</think>\n<answer>.*?</answer>$", text, re.DOTALL):
        fmt = 1.0
    else:
        fmt = (0.1 if re.search(r"<think>.*?</think>", text, re.DOTALL) else 0.0) + (
            0.5 if re.search(r"<answer>.*?</answer>", text, re.DOTALL) else 0.0)
    ans = 0.0
    found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if found and re.match(r"^[0-9+\-*/() ]+$", found[-1]):
        if sorted(int(d) for d in re.findall(r"\d+", found[-1])) == sorted(numbers):
            try:
                if abs(float(eval(found[-1], {"__builtins__": None}, {})) - float(target)) < 1e-5:  # noqa: S307
                    ans = 1.0
            except Exception:  # noqa: BLE001 - the oracle scores any failure 0, as the definition says
                pass
    return 0.1 * fmt + ans


TABLE = [
    (" 3 + 5 = 8</think>\n<answer>3 + 5</answer>", [3, 5], "8", 1.1),
    (" hmm</think>\n<answer>3 + 5</answer>\n", [3, 5], "8", 1.1),  # one trailing newline still full format
    (" hmm</think> <answer>3 + 5</answer>", [3, 5], "8", 0.06 + 1.0),  # no newline between blocks
    (" hmm</think>\n<answer>3 * 5</answer>", [3, 5], "8", 0.1),
    (" hmm</think>\n<answer>5 + 3 + 3</answer>", [3, 5], "11", 0.1),  # 3 used twice
    (" hmm</think>\n<answer>8</answer>", [3, 5], "8", 0.1),
    (" hmm</think>\n<answer>3 + 5 = 8</answer>", [3, 5], "8", 0.1),  # '=' is not an allowed character
    ("no tags at all", [3, 5], "8", 0.0),
    (" x</think>", [3, 5], "8", 0.01),
    ("<answer>3 + 5</answer>", [3, 5], "8", 0.05 + 1.0),  # answer right, think never closed
    (" a</think>\n<answer>9 / 3 / 1</answer>", [9, 3, 1], "3", 1.1),
    (" a</think>\n<answer>7 / 2 * 2</answer>", [7, 2, 2], "7", 1.1),  # true division
    (" a</think>\n<answer>1 / (2 - 2)</answer>", [1, 2, 2], "0", 0.1),  # division by zero
    (" a</think>\n<answer>2 ** 3</answer>", [2, 3], "8", 1.1),  # Python's power, as eval gives it
    (" a</think>\n<answer>05 + 3</answer>", [5, 3], "8", 0.1),  # leading zero: a syntax error in Python
    (" a</think>\n<answer>1</answer> then <answer>2 + 6</answer>", [2, 6], "8", 1.1),  # regex .*? spans both
    (" a</think>\n<answer>(4 + 4) / 1</answer>", [4, 4, 1], "8.0", 1.1),
]


@pytest.mark.parametrize("completion,numbers,target,expected", TABLE)
def test_reward_table(completion, numbers, target, expected):
    got = countdown_peers.reward([completion], numbers=[numbers], target=[target])[0]
    assert got == pytest.approx(expected)
    assert got == pytest.approx(oracle(completion, numbers, target))


def _random_expression(rng: random.Random, numbers: list[int]) -> str:
    parts = [str(n) for n in rng.sample(numbers, len(numbers))]
    while len(parts) > 1:
        i = rng.randrange(len(parts) - 1)
        op = rng.choice(["+", "-", "*", "/", "**" if rng.random() < 0.05 else "+"])
        joined = f"({parts[i]} {op} {parts[i + 1]})" if rng.random() < 0.6 else f"{parts[i]}{op}{parts[i + 1]}"
        parts[i : i + 2] = [joined]
    return parts[0]


def test_reward_matches_oracle_on_random_completions():
    rng = random.Random(17)
    wrappers = [" t</think>\n<answer>{}</answer>", " t</think><answer>{}</answer>", "<answer>{}</answer>",
                " t</think>\n<answer>{}</answer>\n", " t</think>\n<answer>{}</answer> extra", "{}"]
    checked = right = 0
    for _ in range(400):
        numbers = [rng.randint(1, 12) for _ in range(rng.randint(2, 4))]
        expr = _random_expression(rng, numbers)
        if rng.random() < 0.2:
            expr = expr.replace(str(numbers[0]), str(numbers[0] + 1), 1)  # a wrong number
        try:
            value = eval(expr, {"__builtins__": None}, {})  # noqa: S307 - test-built expression
        except (ZeroDivisionError, OverflowError):
            value = 0
        target = str(round(float(value))) if rng.random() < 0.5 else str(value)
        completion = rng.choice(wrappers).format(expr)
        got = countdown_peers.reward([completion], numbers=[numbers], target=[target])[0]
        assert got == pytest.approx(oracle(completion, numbers, target)), (completion, numbers, target)
        checked += 1
        right += got >= 1.0
    assert checked == 400 and 50 < right < 400  # both outcomes are exercised


def test_tiny_file_schema_and_solutions():
    rows = json.loads(TINY.read_text())
    assert len(rows) >= 10
    for row in rows:
        assert set(row) == {"id", "context", "numbers", "target", "solution"}
        assert isinstance(row["target"], str) and row["context"].endswith("<think>")
        good = " x</think>\n<answer>" + row["solution"] + "</answer>"
        assert oracle(good, row["numbers"], row["target"]) == pytest.approx(1.1)
        assert countdown_peers.reward([good], numbers=[row["numbers"]], target=[row["target"]]) == [pytest.approx(1.1)]


def test_task_split_raw_prompts_and_registry():
    rows = json.loads(TINY.read_text())
    task = get_task("countdown", data_file=str(TINY), num_train=8)
    assert isinstance(task, CountdownPeersTask) and task.use_chat_template is False
    train, held = task.train_examples(), task.eval_examples()
    assert [e.prompt for e in train] == [r["context"] for r in rows[:8]]
    assert [e.columns["id"] for e in held] == [r["id"] for r in rows[8:]]
    assert held[0].columns["target"] == rows[8]["target"]
    assert len(get_task("countdown", data_file=str(TINY), num_train=8, num_eval=2).eval_examples()) == 2
    default = CountdownPeersTask.__init__.__defaults__
    assert default[0] == 200  # their split: the first 200 rows train
    assert isinstance(get_task("countdown", num_train=3, num_eval=2), CountdownTask)  # generated mode stays
    ex = held[0]
    solved = " x</think>\n<answer>" + ex.answer + "</answer>"
    assert task.is_correct(solved, ex) and not task.is_correct(" x</think>\n<answer>1</answer>", ex)


@pytest.mark.parametrize("content,message", [
    (None, "not found"), ("{", "not valid JSON"), ('{"a": 1}', "JSON list"),
    ('[{"context": "x", "numbers": [1]}]', "lacks"), ('[{"context": 1, "numbers": [1], "target": "1"}]', "string"),
])
def test_bad_files_one_line(tmp_path, content, message):
    path = tmp_path / "countdown.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        get_task("countdown", data_file=str(path))
    assert "\n" not in str(err.value)


def test_too_few_rows_for_the_split():
    with pytest.raises(ValueError, match="none left to evaluate"):
        get_task("countdown", data_file=str(TINY))  # 12 rows < 200


def test_qiu_config_mirrors_the_paper():
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "countdown_qiu.yaml")
    assert cfg.population.size == 30 and not cfg.population.antithetic and cfg.population.mode == "full"
    assert cfg.population.noise == "gaussian" and cfg.population.sigma == 1e-3
    assert cfg.population.perturb_embeddings and cfg.population.perturb_lm_head and cfg.population.perturb_1d
    assert cfg.sampling.temperature == 0.0 and cfg.sampling.max_tokens == 1024
    assert cfg.prompts_per_step == 200 and cfg.eval_size == 2000 and cfg.use_chat_template is False
    assert cfg.task_options["num_train"] == 200 and cfg.fitness.shaping == "zscore"
    assert cfg.optim.lr == pytest.approx(F.lr_from_alpha(5e-4, 1e-3))
    qwen = TrainConfig.from_yaml(ROOT / "configs" / "countdown_qwen.yaml")
    assert qwen.eval_size == 2000 and qwen.task_options["num_eval"] == 2000


def test_qiu_alpha_maps_to_the_configs_lr():
    """Their step (α/N)·Σ z_m ε_m equals fastes' lr·Σ c_m E_m with the config's lr, on random noise."""
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "countdown_qiu.yaml")
    n, sigma, alpha = cfg.population.size, cfg.population.sigma, 5e-4
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(n, 64, generator=gen, dtype=torch.float64)  # E_m = ε_m when antithetic is off
    rewards = torch.rand(n, generator=gen, dtype=torch.float64)
    z = (rewards - rewards.mean()) / rewards.std(unbiased=False)
    theirs = alpha / n * (z[:, None] * eps).sum(0)
    coeffs = F.coefficients(F.shape(rewards, "zscore"), sigma, n).double()
    ours = cfg.optim.lr * (coeffs[:, None] * eps).sum(0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    assert not torch.allclose(cfg.optim.lr / sigma * (coeffs[:, None] * eps).sum(0), theirs, rtol=1e-2)
