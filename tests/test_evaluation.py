"""Named eval sets: validation, pass@k against brute force, metric names, per-sample JSONL from a real run."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from fastes.es.evaluation import EvalSpec, metric_keys, parse_eval_sets, summarize

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    """Fraction of the k-subsets of the samples holding at least one correct one."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_summarize_pass_at_k_matches_brute_force():
    rng = random.Random(5)
    rows, per_prompt = [], {}
    for index in range(7):
        correct = [rng.random() < 0.3 for _ in range(6)]
        per_prompt[index] = correct
        rows += [{"index": index, "sample": s, "correct": c, "reward": float(c) + 0.5, "tokens": 3}
                 for s, c in enumerate(correct)]
    got = summarize(rows, [1, 2, 4, 6], samples=6)
    for k in (1, 2, 4, 6):
        want = sum(brute_pass_at_k(c, k) for c in per_prompt.values()) / len(per_prompt)
        assert got[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
    flat = [c for c in per_prompt.values() for c in c]
    assert got["accuracy"] == pytest.approx(sum(flat) / len(flat))
    assert got["reward"] == pytest.approx(sum(flat) / len(flat) + 0.5)


@pytest.mark.parametrize("sets,message", [
    ([{"name": "a b"}], "name must be"), ([{"name": "a"}, {"name": "a"}], "unique"),
    ([{"name": "a", "samples": 0}], "samples must be"), ([{"name": "a", "samples": 2, "pass_k": [3]}], "pass_k"),
    ([{"name": "a", "split": "test"}], "split must be"), ([{"name": "a", "temp": 1}], "unknown keys"),
    (["a"], "must be a mapping"), ([{"name": "a", "size": -1}], "size must be"),
])
def test_bad_sets_are_one_line(sets, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_eval_sets(sets)
    assert "\n" not in str(err.value)


def test_defaults_and_metric_names():
    assert parse_eval_sets([]) == [EvalSpec("eval")]
    assert EvalSpec("x", samples=8).ks == [1, 8] and EvalSpec("x").ks == [1]
    assert metric_keys("held", {"accuracy": 0.5}, primary=True) == {"eval/held/accuracy": 0.5, "eval/accuracy": 0.5}
    assert metric_keys("other", {"accuracy": 0.1}, primary=False) == {"eval/other/accuracy": 0.1}
    assert metric_keys("eval", {"accuracy": 0.2}, primary=True) == {"eval/accuracy": 0.2}


def test_run_with_greedy_and_sampled_sets_writes_rows(tmp_path):
    from tiny_model import DigitTask, make_tiny_model

    from fastes.es.config import TrainConfig
    from fastes.es.logger import read_metrics
    from fastes.es.trainer import Trainer

    model = make_tiny_model(tmp_path / "m", seed=0)
    sets = [{"name": "held"}, {"name": "sampled", "samples": 4, "temperature": 1.0, "pass_k": [1, 2, 4]},
            {"name": "seen", "split": "train", "size": 2}]
    cfg = TrainConfig.from_dict(dict(model=str(model), task="digits", out=str(tmp_path / "run"), device="cpu",
                                     steps=2, prompts_per_step=2, eval_size=3, eval_every=0, progress=False,
                                     report_to=["jsonl"], kv_cache_tokens=2048, population=dict(size=4),
                                     sampling=dict(max_tokens=5, temperature=0.0), evaluation=dict(sets=sets)))
    task = DigitTask()
    Trainer(cfg, task=task).train()
    records = [r for r in read_metrics(tmp_path / "run") if "eval/held/accuracy" in r]
    assert [r["step"] for r in records] == [0, 2]
    for record in records:
        assert record["eval/accuracy"] == record["eval/held/accuracy"]  # the first set is the primary one
        folder = tmp_path / "run" / "evals"
        held = [json.loads(x) for x in (folder / "held" / f"step-{record['step']:06d}.jsonl").read_text().splitlines()]
        sampled = [json.loads(x) for x in
                   (folder / "sampled" / f"step-{record['step']:06d}.jsonl").read_text().splitlines()]
        seen = [json.loads(x) for x in (folder / "seen" / f"step-{record['step']:06d}.jsonl").read_text().splitlines()]
        evals, train = task.eval_examples()[:3], task.train_examples()[:2]
        assert [r["prompt"] for r in held] == [e.prompt for e in evals] and len(sampled) == 12
        assert [r["prompt"] for r in seen] == [e.prompt for e in train]
        for row in held + sampled + seen:
            assert row["reward"] == pytest.approx(task.reward([row["completion"]])[0])
            assert row["correct"] == task.is_correct(row["completion"], None)
        assert record["eval/held/accuracy"] == pytest.approx(sum(r["correct"] for r in held) / 3)
        by_prompt = [[r["correct"] for r in sampled if r["index"] == i] for i in range(3)]
        for k in (1, 2, 4):
            want = sum(brute_pass_at_k(c, k) for c in by_prompt) / 3
            assert record[f"eval/sampled/pass@{k}"] == pytest.approx(want)
        assert len({r["completion"] for r in sampled}) > 3  # sampled, not greedy
        assert "eval/seen/accuracy" in record and "eval/seen/pass@1" in record


def test_zero_steps_only_evaluates(tmp_path):
    from tiny_model import DigitTask, make_tiny_model

    from fastes.es.config import TrainConfig
    from fastes.es.logger import read_metrics
    from fastes.es.trainer import Trainer

    model = make_tiny_model(tmp_path / "m", seed=0)
    cfg = TrainConfig.from_dict(dict(model=str(model), task="digits", out=str(tmp_path / "run"), device="cpu",
                                     steps=0, eval_size=2, progress=False, report_to=["jsonl"],
                                     kv_cache_tokens=2048, population=dict(size=4), sampling=dict(max_tokens=3)))
    Trainer(cfg, task=DigitTask()).train()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0] and "eval/accuracy" in records[0] and "reward/mean" not in records[0]
    assert len((tmp_path / "run" / "evals" / "eval" / "step-000000.jsonl").read_text().splitlines()) == 2
