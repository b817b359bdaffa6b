"""report_to: metrics.jsonl always, TensorBoard event files read back, wandb offline, one-line errors, samples."""

from __future__ import annotations

import sys

import pytest

from fastes.es.logger import RunLogger, check_report_to, read_metrics

RECORDS = [{"step": 0, "reward/mean": 0.25, "eval/accuracy": 0.5},
           {"step": 1, "reward/mean": 0.75, "skipped": 0, "note": "text is not a scalar",
            "samples": [{"prompt": "2+2=", "completion": "4 because\nreasons", "reward": 1.0}]}]


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_tensorboard_event_file_holds_the_logged_scalars_and_samples(tmp_path, capsys):
    logger = RunLogger(tmp_path, total_steps=2, progress=False, report_to=["tensorboard", "jsonl"])
    assert logger.report_to == ["jsonl", "tensorboard"]
    for record in RECORDS:
        logger.log(dict(record))
    logger.close(plot=False)
    scalars, acc = _scalars(tmp_path / "tensorboard")
    assert scalars["reward/mean"] == [(0, pytest.approx(0.25)), (1, pytest.approx(0.75))]
    assert scalars["eval/accuracy"] == [(0, pytest.approx(0.5))] and scalars["skipped"] == [(1, 0.0)]
    assert "note" not in scalars and "step" not in scalars
    texts = acc.Tags()["tensors"]
    assert any("samples" in t for t in texts)  # the completions as text
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]  # jsonl is always written
    assert read_metrics(tmp_path)[1]["samples"][0]["completion"] == "4 because\nreasons"
    assert "step 1 sample 0 (reward 1): 4 because reasons" in capsys.readouterr().err


def test_jsonl_only_writes_no_event_files(tmp_path):
    logger = RunLogger(tmp_path, total_steps=1, progress=False, report_to=["jsonl"])
    logger.log({"step": 0, "reward/mean": 1.0})
    logger.close(plot=False)
    assert not (tmp_path / "tensorboard").exists() and len(read_metrics(tmp_path)) == 1
    (tmp_path / "b").mkdir()
    old_flag = RunLogger(tmp_path / "b", total_steps=1, progress=False, tensorboard=False)  # the older switch
    assert old_flag.report_to == ["jsonl"]
    old_flag.close(plot=False)


@pytest.mark.parametrize("names,message", [
    (["mlflow"], "unknown ['mlflow']"),
    (["wandb"], "the wandb package is not installed (pip install wandb)"),
])
def test_bad_or_missing_sinks_are_one_line(monkeypatch, names, message):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises ImportError
    with pytest.raises(ValueError) as err:
        check_report_to(names)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert check_report_to(["none"]) == ["jsonl"]


def test_wandb_offline_run_gets_the_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "fastes-test")
    logger = RunLogger(tmp_path, total_steps=2, progress=False, report_to=["wandb"], config={"seed": 3})
    run = logger._wandb
    assert run is not None and run.project == "fastes-test" and run.config["seed"] == 3
    calls = []
    real_log = run.log
    monkeypatch.setattr(run, "log", lambda data, step: (calls.append((step, dict(data))), real_log(data, step=step)))
    for record in RECORDS:
        logger.log(dict(record))
    assert calls == [(0, {"reward/mean": 0.25, "eval/accuracy": 0.5}), (1, {"reward/mean": 0.75, "skipped": 0})]
    assert run.summary["eval/accuracy"] == pytest.approx(0.5)  # the real run received step 0
    logger.close(plot=False)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # the offline run file, for wandb sync
    assert wandb.run is None  # finished on close


def test_trainer_logs_sample_completions_every_n_steps(tmp_path, capsys):
    from tiny_model import DigitTask, make_tiny_model

    from fastes.es.config import TrainConfig
    from fastes.es.trainer import Trainer

    model = make_tiny_model(tmp_path / "m", seed=0)
    cfg = TrainConfig.from_dict(dict(model=str(model), task="digits", out=str(tmp_path / "run"), device="cpu",
                                     steps=3, prompts_per_step=2, eval_size=0, progress=False,
                                     report_to=["tensorboard"], kv_cache_tokens=2048, population=dict(size=4),
                                     sampling=dict(max_tokens=3, temperature=0.0),
                                     evaluation=dict(log_completions_every=2, log_completions=3)))
    Trainer(cfg, task=DigitTask()).train()
    records = read_metrics(tmp_path / "run")
    with_samples = [r["step"] for r in records if "samples" in r]
    assert with_samples == [0, 2]
    sample = records[0]["samples"][0]
    assert len(records[0]["samples"]) == 3 and set(sample) == {"prompt", "completion", "reward"}
    assert sample["prompt"] in [e.prompt for e in DigitTask().train_examples()]
    assert sample["reward"] == pytest.approx(DigitTask().reward([sample["completion"]])[0])
    assert "step 2 sample 2" in capsys.readouterr().err
    scalars, _ = _scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in scalars["reward/mean"]] == [0, 1, 2]
