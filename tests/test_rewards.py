"""Reward plug-ins: loading by spec, isolation of failing completions, weighted combination."""

from __future__ import annotations

import math
import textwrap

import pytest

from fastes.es.rewards import WeightedReward, load_reward, score_completions
from fastes.es.tasks import countdown

PLUGIN = textwrap.dedent(
    """
    from dataclasses import dataclass

    @dataclass
    class Box:  # dataclasses need the module registered in sys.modules
        value: float

    def length_reward(completions, prompts=None, **kwargs):
        return [Box(float(len(c))).value for c in completions]

    def echo_column(completions, prompts=None, *, bonus, **kwargs):
        return [float(b) for b in bonus]

    NOT_CALLABLE = 3
    """
)


def test_load_from_module_and_file(tmp_path, monkeypatch):
    assert load_reward("fastes.es.tasks.countdown:reward") is countdown.reward
    assert load_reward("countdown") is countdown.reward  # built-in task name
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    fn = load_reward(f"{path}:length_reward")
    assert fn(completions=["ab", "abcd"]) == [2.0, 4.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:echo_column")(completions=["x"], bonus=[0.5]) == [0.5]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_such_module_xyz:f", "cannot import"),
        ("fastes.es.tasks.countdown:nope", "no attribute"),
        ("fastes.es.tasks.countdown:FORMAT_SCORE", "not callable"),
        ("/no/such/file.py:f", "not found"),
        ("justaname", "expected"),
        ("fastes.es.tasks.countdown:not-a-name", "not a function name"),
        ("", "non-empty"),
    ],
)
def test_load_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward(spec)


def test_load_file_errors(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('import-time failure')\n")
    with pytest.raises(ValueError, match="importing"):
        load_reward(f"{broken}:f")
    good = tmp_path / "good.py"
    good.write_text(PLUGIN)
    with pytest.raises(ValueError, match="not callable"):
        load_reward(f"{good}:NOT_CALLABLE")


def picky(completions, prompts=None, **kwargs):
    """Raises on the whole batch whenever a completion contains 'boom'."""
    if any("boom" in c for c in completions):
        raise RuntimeError("boom")
    return [1.0 for _ in completions]


def weird_values(completions, prompts=None, **kwargs):
    table = {"nan": float("nan"), "inf": float("inf"), "none": None, "str": "high", "bool": True}
    return [table.get(c, 0.5) for c in completions]


def wrong_length(completions, prompts=None, **kwargs):
    return [1.0] * (len(completions) + 1) if len(completions) > 1 else [2.0]


def test_raising_reward_is_isolated_per_completion():
    scores, stats = score_completions([(picky, 1.0)], ["ok", "boom!", "fine"], on_error=-1.0)
    assert scores == [1.0, -1.0, 1.0]
    assert stats["reward/errors"] == 1 and stats["reward/retried"] == 1 and stats["reward/picky"] == 1.0


def test_invalid_values_counted():
    completions = ["nan", "inf", "none", "str", "bool", "plain"]
    scores, stats = score_completions(weird_values, completions, on_error=0.0)
    assert scores == [0.0, 0.0, 0.0, 0.0, 1.0, 0.5]
    assert stats["reward/invalid"] == 3 and stats["reward/none"] == 1 and stats["reward/errors"] == 0
    assert all(math.isfinite(s) for s in scores)


def test_wrong_length_falls_back_to_single_calls():
    scores, stats = score_completions([(wrong_length, 1.0)], ["a", "b", "c"])
    assert scores == [2.0, 2.0, 2.0] and stats["reward/retried"] == 1 and stats["reward/errors"] == 0


def test_columns_are_sliced_on_retry():
    def by_target(completions, prompts=None, *, target, **kwargs):
        if len(completions) > 1:
            raise ValueError("only one at a time")
        return [float(target[0])]

    scores, _ = score_completions([(by_target, 1.0)], ["a", "b"], ["p", "q"], {"target": [3, 4]})
    assert scores == [3.0, 4.0]


def test_weighted_combination():
    def half(completions, prompts=None, **kwargs):
        return [0.5] * len(completions)

    def maybe(completions, prompts=None, **kwargs):
        return [None if c == "skip" else 2.0 for c in completions]

    combo = WeightedReward([half, maybe], [2.0, 0.25])
    assert combo(["x", "skip"]) == [1.5, 1.0]
    scores, stats = score_completions(combo, ["x", "skip"])
    assert scores == [1.5, 1.0] and stats["reward/none"] == 0
    scores, stats = score_completions([(half, 1.0), (picky, 3.0)], ["x", "boom"], on_error=-0.5)
    assert scores == [3.5, -0.5] and stats["reward/errors"] == 1
    named = WeightedReward(["countdown"], [1.0])
    assert named(["<answer>1+2</answer>"], None, numbers=[[1, 2]], target=[3]) == [1.0]
    with pytest.raises(ValueError):
        WeightedReward([half], [1.0, 2.0])
    with pytest.raises(ValueError):
        WeightedReward([])


def test_task_reward_through_score_completions():
    completions = ["<answer>7*5-3*2</answer>", "<answer>oops</answer>", None]
    cols = {"numbers": [[3, 5, 7, 2]] * 3, "target": [29] * 3}
    scores, stats = score_completions([(countdown.reward, 1.0)], completions, None, cols)
    assert scores == [1.0, 0.0, 0.0] and stats["reward/errors"] == 0
