"""Reward plug-ins: loading by spec, isolation of failing completions, weighted combination."""

from __future__ import annotations

import math
import re
import textwrap
import threading
import time

import pytest

from fastes.es.rewards import TrainerState, WeightedReward, load_reward, score_completions, score_rewards
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


# ---------------------------------------------------------------- TRL-style reward functions, as TRL users write them

def trl_format_reward(completions, **kwargs):
    """Standard format: a completion is a string; 1 when it is a think block then an answer block."""
    return [1.0 if re.match(r"^<think>.*?</think>\s*<answer>.*?</answer>$", c, re.DOTALL) else 0.0
            for c in completions]


def trl_chat_length_reward(completions, **kwargs):
    """Conversational format: each completion is a list holding one assistant message."""
    return [-abs(20 - len(c[0]["content"])) / 20 for c in completions]


def trl_exact_answer(prompts, completions, completion_ids, ground_truth, **kwargs):
    """A dataset column as a keyword list; completion_ids as token id lists."""
    return [1.0 + 0.01 * len(ids) if c.strip() == gt else 0.0
            for c, ids, gt in zip(completions, completion_ids, ground_truth, strict=True)]


def trl_curriculum(completions, trainer_state, **kwargs):
    """trainer_state: weight the reward by training progress."""
    return [trainer_state.global_step / trainer_state.max_steps for _ in completions]


def trl_code_only(completions, task_type, **kwargs):
    """None where the reward does not apply (a multi-task dataset)."""
    return [None if t != "code" else float("def " in c) for c, t in zip(completions, task_type, strict=True)]


def no_kwargs_reward(completions, answer):
    """Written without **kwargs: gets only the arguments it names."""
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


def test_trl_standard_format_with_columns_ids_and_state():
    completions = ["<think>x</think><answer>4</answer>", "4", "5"]
    ids = [[1, 2, 3], [7], [8, 9]]
    state = TrainerState(global_step=3, max_steps=12, epoch=0.5)
    columns = {"ground_truth": ["9", "4", "4"], "task_type": ["math", "code", "math"], "answer": ["4", "4", "5"]}
    pairs = [(trl_format_reward, 1.0), (trl_exact_answer, 2.0), (trl_curriculum, 4.0), (no_kwargs_reward, 0.5)]
    report = score_rewards(pairs, completions, ["p1", "p2", "p3"], columns, completion_ids=ids, trainer_state=state)
    expected = [1.0 + 0 + 1.0 + 0.0, 0 + 2 * 1.01 + 1.0 + 0.5, 0 + 0 + 1.0 + 0.5]
    assert report.scores == pytest.approx(expected)
    assert report.errors == {} and report.stats["reward/errors"] == 0
    assert report.stats["reward/trl_exact_answer"] == pytest.approx(1.01 / 3)


def test_trl_conversational_format_and_none():
    prompts = [[{"role": "user", "content": "Write code"}], [{"role": "user", "content": "Add"}]]
    completions = ["def f(): return 1", "x" * 30]
    report = score_rewards([(trl_chat_length_reward, 1.0), (countdown.reward, 0.0)], completions, prompts,
                           {"numbers": [[1, 2], [1, 2]], "target": [3, 3]})
    assert report.scores == pytest.approx([-3 / 20, -10 / 20])  # content was read from the message
    assert report.errors == {}
    plain = score_rewards(trl_chat_length_reward, completions, ["a", "b"], warn=False)
    assert plain.stats["reward/errors"] == 2 and "TypeError" in plain.errors["trl_chat_length_reward"]
    none = score_rewards(trl_code_only, ["def g", "no", "def h"], None, {"task_type": ["code", "math", "code"]})
    assert none.scores == [1.0, 0.0, 1.0] and none.stats["reward/none"] == 1


def test_failure_report_names_the_plugin_and_first_error(capsys):
    def broken_reward(completions, **kwargs):
        raise KeyError("ground_truth")

    report = score_rewards([(broken_reward, 1.0), (trl_format_reward, 1.0)], ["a", "b"], ["p", "q"])
    assert report.errors == {"broken_reward": "raised KeyError: 'ground_truth'"}
    assert report.all_failed and report.stats["reward/errors"] == 2
    assert "reward 'broken_reward' failed: raised KeyError" in capsys.readouterr().err
    scores, stats = score_completions([(trl_format_reward, 1.0)], ["a"], ["p"])  # the old interface
    assert scores == [0.0] and stats["reward/errors"] == 0


def test_timeout_counts_as_failure_without_hanging():
    release = threading.Event()

    def hangs_on_bad(completions, **kwargs):
        if any(c == "bad" for c in completions):
            release.wait(30)
        return [1.0 for _ in completions]

    t0 = time.perf_counter()
    report = score_rewards([(hangs_on_bad, 1.0), (trl_format_reward, 1.0)], ["ok", "bad", "ok"], None,
                           timeout_s=0.2, warn=False)
    elapsed = time.perf_counter() - t0
    release.set()
    assert report.scores == [0.0, 0.0, 0.0] and report.stats["reward/timeouts"] == 1
    assert report.stats["reward/errors"] == 3 and "timed out after 0.2 s" in report.errors["hangs_on_bad"]
    assert elapsed < 1.0 and report.stats["reward/retried"] == 0  # a timed-out batch is not retried per item
    assert score_rewards(hangs_on_bad, ["ok"], timeout_s=0.2).scores == [1.0]
    with pytest.raises(ValueError, match="timeout_s"):
        score_rewards(hangs_on_bad, ["ok"], timeout_s=-1)


def test_timeout_zero_runs_in_the_callers_thread():
    seen = []

    def where(completions, **kwargs):
        seen.append(threading.current_thread())
        return [0.0 for _ in completions]

    score_rewards(where, ["a"], timeout_s=0)
    score_rewards(where, ["a"])
    assert seen[0] is threading.main_thread() and seen[1] is not threading.main_thread()
