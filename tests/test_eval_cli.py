"""`fastes eval`: greedy and sampled evaluation with pass@k, a config's named sets, vLLM sampling flags, and
per-sample JSONL that never replaces what fastes did not write. On the bundled demo model, a few problems each."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from fastes import cli
from fastes.cli_eval import EVAL_MARKER

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "fastes" / "data" / "demo-model"
TASK = ["--task", "arithmetic", "--option", "digits=3", "--option", "op=add", "--option", "template={a}+{b}=",
        "--device", "cpu", "--max-tokens", "6"]
pytestmark = pytest.mark.usefixtures("one_thread")


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], expected: str) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastes: error:"), captured.err
    assert expected in lines[0], lines[0]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics_line(out: str, name: str) -> dict[str, float]:
    """The printed numbers of one set's line: accuracy, reward, pass@k."""
    line = next(li for li in out.splitlines() if li.startswith(f"{name}: "))
    return {k: float(v) for k, v in re.findall(r"(accuracy|reward|pass@\d+) ([0-9.]+)", line)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples drawn without replacement include a correct one."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_greedy_rows_are_the_engine_greedy_completions_scored_by_exact_match(tmp_path, capsys):
    out = tmp_path / "greedy.jsonl"
    assert cli.main(["eval", "--model", str(DEMO), *TASK, "--size", "8", "--out", str(out)]) == 0
    printed = metrics_line(capsys.readouterr().out, "eval")
    rows = rows_of(out)
    assert [(r["index"], r["sample"], r["set"]) for r in rows] == [(i, 0, "eval") for i in range(8)]
    from fastes.engine.engine import Engine
    from fastes.engine.sampling import SamplingParams

    engine = Engine.from_pretrained(str(DEMO), dtype=torch.float32, device="cpu")
    greedy = engine.generate([r["prompt"] for r in rows], SamplingParams(max_tokens=6, temperature=0.0))
    assert [r["completion"] for r in rows] == [c[0].text for c in greedy[0]]
    for r in rows:  # exact match, from the prompt's own numbers
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", r["prompt"]).groups())
        digits = re.search(r"\d+", r["completion"])
        assert r["correct"] == (digits is not None and int(digits.group()) == a + b) and r["answer"] == str(a + b)
        assert r["reward"] == float(r["correct"])
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    assert printed["accuracy"] == pytest.approx(accuracy, abs=5e-5) == printed["pass@1"]


def test_sampled_pass_at_k_is_the_unbiased_estimate_over_the_rows(tmp_path, capsys):
    argv = ["eval", "--model", str(DEMO), *TASK, "--size", "6", "-k", "4", "--temperature", "1.0",
            "--pass-k", "1", "--pass-k", "2", "--pass-k", "4"]
    assert cli.main([*argv, "--out", str(tmp_path / "a.jsonl")]) == 0
    printed = metrics_line(capsys.readouterr().out, "eval")
    rows = rows_of(tmp_path / "a.jsonl")
    assert sorted((r["index"], r["sample"]) for r in rows) == [(i, s) for i in range(6) for s in range(4)]
    correct = [sum(r["correct"] for r in rows if r["index"] == i) for i in range(6)]
    assert 0 < sum(correct) < 24, "the check needs some correct and some wrong samples"
    for k in (1, 2, 4):
        expected = sum(pass_at_k(4, c, k) for c in correct) / 6
        assert printed[f"pass@{k}"] == pytest.approx(expected, abs=5e-5), k
    assert cli.main([*argv, "--out", str(tmp_path / "b.jsonl")]) == 0  # the same seed draws the same samples
    assert rows_of(tmp_path / "b.jsonl") == rows
    assert cli.main([*argv, "--seed", "1", "--out", str(tmp_path / "c.jsonl")]) == 0
    assert [r["completion"] for r in rows_of(tmp_path / "c.jsonl")] != [r["completion"] for r in rows]


def test_config_sets_flags_and_out_directory(tmp_path, capsys):
    config = tmp_path / "x.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(DEMO), "device": "cpu", "task": "arithmetic", "eval_size": 4,
        "task_options": {"digits": 3, "op": "add", "template": "{a}+{b}="}, "sampling": {"max_tokens": 6},
        "evaluation": {"sets": [{"name": "greedy"}, {"name": "sampled", "samples": 3, "temperature": 1.0},
                                {"name": "train3", "split": "train", "size": 3}]}}))
    out = tmp_path / "outs"
    assert cli.main(["eval", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines()] == ["greedy", "sampled", "train3"]
    assert "pass@3" in printed and "x 3 samples, sampled" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted([EVAL_MARKER, "greedy.jsonl", "sampled.jsonl",
                                                            "train3.jsonl"])
    assert [len(rows_of(out / f"{n}.jsonl")) for n in ("greedy", "sampled", "train3")] == [4, 12, 3]
    sampled = rows_of(out / "sampled.jsonl")
    greedy_prompts = [r["prompt"] for r in rows_of(out / "greedy.jsonl")]
    assert [r["prompt"] for r in sampled[::3]] == greedy_prompts  # both are the task's eval split
    assert [r["prompt"] for r in rows_of(out / "train3.jsonl")] != greedy_prompts[:3]

    (out / "greedy.jsonl").write_text("kept\n")  # --set: only that set is evaluated and rewritten
    assert cli.main(["eval", "--config", str(config), "--set", "sampled", "--out", str(out)]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["sampled"]
    assert (out / "greedy.jsonl").read_text() == "kept\n" and rows_of(out / "sampled.jsonl") == sampled

    # flags override every set: two samples each at the config's seed, min_tokens forces every token
    assert cli.main(["eval", "--config", str(config), "--samples", "2", "--temperature", "0.7", "--min-tokens", "6",
                     "--out", str(tmp_path / "all.jsonl")]) == 0
    rows = rows_of(tmp_path / "all.jsonl")
    assert [sum(r["set"] == n for r in rows) for n in ("greedy", "sampled", "train3")] == [8, 8, 6]
    assert all(r["tokens"] == 6 and r["finish_reason"] == "length" for r in rows)


def test_sampling_flags_reach_the_eval_sampling(tmp_path):
    from fastes.es.evaluation import parse_eval_sets, sampling_for

    args = cli._parser().parse_args(["eval", "--model", str(DEMO), *TASK, "-k", "3", "--top-p", "0.9",
                                     "--top-k", "5", "--min-p", "0.1", "--repetition-penalty", "1.3",
                                     "--presence-penalty", "0.2", "--frequency-penalty", "0.4", "--min-tokens", "2",
                                     "--stop", "\n", "--seed", "7"])
    from fastes.cli_eval import eval_config

    config = eval_config(args)
    (spec,) = parse_eval_sets(config.evaluation.sets)
    params = sampling_for(spec, config, 0)
    assert (spec.samples, spec.ks, config.seed, config.eval_size) == (3, [1, 3], 7, 64)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.max_tokens) == (1.0, 0.9, 5, 0.1, 6)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.3, 0.2, 0.4)
    assert (params.min_tokens, tuple(params.stop)) == (2, ("\n",))


def test_out_never_replaces_what_fastes_did_not_write(tmp_path, capsys):
    base = ["eval", "--model", str(DEMO), *TASK, "--size", "2"]
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "data"}\n')
    text = tmp_path / "notes.txt"
    text.write_text("mine\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "mine.jsonl").write_text("x\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "elsewhere.jsonl")
    fails([*base, "--out", str(notes)], capsys, "not a fastes eval output")
    fails([*base, "--out", str(text)], capsys, "did not write")
    fails([*base, "--out", str(folder)], capsys, EVAL_MARKER)
    fails([*base, "--out", str(link)], capsys, "symbolic link")
    assert notes.read_text() == '{"my": "data"}\n' and text.read_text() == "mine\n"
    assert [p.name for p in folder.iterdir()] == ["mine.jsonl"] and not (tmp_path / "elsewhere.jsonl").exists()

    own = tmp_path / "own.jsonl"  # a file fastes wrote (or an empty one) is replaced
    assert cli.main([*base, "--out", str(own)]) == 0
    own.write_text(own.read_text() * 2)
    assert cli.main([*base, "--out", str(own)]) == 0
    assert len(rows_of(own)) == 2
    capsys.readouterr()


def test_bad_eval_input_is_one_line_exit_2(tmp_path, capsys):
    base = ["eval", "--model", str(DEMO), *TASK]
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text(yaml.safe_dump({"task": "arithmetic"}))
    fails(["eval", "--model", str(DEMO)], capsys, "--task NAME or --config FILE")
    fails([*base, "--samples", "0"], capsys, "--samples must be >= 1")
    fails([*base, "--size", "0"], capsys, "--size must be >= 1")
    fails([*base, "-k", "2", "--pass-k", "3"], capsys, "pass_k must list integers in [1, samples=2]")
    fails([*base, "--temperature", "-1"], capsys, "temperature")
    fails([*base, "-k", "2", "--top-p", "0"], capsys, "top_p")
    fails([*base, "--repetition-penalty", "0"], capsys, "repetition_penalty")
    fails([*base, "--set", "nope"], capsys, "no such evaluation set")
    fails(["eval", "--config", str(tmp_path / "missing.yaml")], capsys, "not found")
    fails(["eval", "--config", str(no_model)], capsys, "model is required")
    fails([*base, "--samples", "two"], capsys, "invalid int value")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_model.yaml"]


def test_eval_of_a_checkpoint_reproduces_the_runs_sampled_evaluation(tmp_path, capsys):
    """With the run's config, `fastes eval` on a checkpoint draws the samples the run drew at that step."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(DEMO), "device": "cpu", "task": "arithmetic", "steps": 2, "prompts_per_step": 4,
        "task_options": {"digits": 3, "op": "add", "template": "{a}+{b}=", "num_train": 50, "num_eval": 20},
        "eval_every": 2, "eval_size": 5, "save_every": 2, "progress": False, "tensorboard": False,
        "population": {"size": 4, "sigma": 0.05}, "optim": {"lr": 0.01},
        "sampling": {"max_tokens": 6, "temperature": 1.0},
        "evaluation": {"sets": [{"name": "sampled", "samples": 3, "temperature": 1.0}]}}))
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--out", str(run)]) == 0
    assert cli.main(["eval", "--config", str(config), "--model", str(run / "checkpoints" / "step-2"),
                     "--out", str(tmp_path / "ev.jsonl")]) == 0
    printed = metrics_line(capsys.readouterr().out, "sampled")
    saved = rows_of(run / "evals" / "sampled" / "step-000002.jsonl")
    in_run = [{k: v for k, v in r.items() if k != "step"} for r in saved]
    assert rows_of(tmp_path / "ev.jsonl") == in_run and len(in_run) == 15
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    at_2 = next(m for m in logged if m.get("step") == 2 and "eval/accuracy" in m)
    assert printed["accuracy"] == pytest.approx(at_2["eval/accuracy"], abs=5e-5)
