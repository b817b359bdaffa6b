"""The `datasets` task source: every local format, splits and slices, columns to rewards, chat prompts, hub errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from tiny_model import make_tiny_model  # noqa: E402

from fastes import cli  # noqa: E402
from fastes.es.evaluation import encode_prompts  # noqa: E402
from fastes.es.logger import read_metrics  # noqa: E402
from fastes.es.tasks import DatasetsTask, get_task  # noqa: E402
from fastes.es.tasks.base import collate_columns  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"question": f"{a}+{a}=", "answer": str(2 * a), "level": a % 3} for a in range(1, 7)]


def _write(fmt: str, folder: Path) -> Path:
    ds = datasets.Dataset.from_list(ROWS)
    if fmt == "jsonl":
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path = folder / "data.json"
        path.write_text(json.dumps(ROWS))  # a JSON list of objects
    elif fmt == "parquet":
        path = folder / "data.parquet"
        ds.to_parquet(str(path))
    elif fmt == "csv":
        path = folder / "data.csv"
        ds.to_csv(str(path), index=False)
    elif fmt == "arrow":
        import pyarrow as pa

        path = folder / "data.arrow"
        table = pa.Table.from_pylist(ROWS)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif fmt == "save_to_disk":
        path = folder / "saved"
        datasets.DatasetDict({"train": ds.select(range(4)), "test": ds.select(range(4, 6))}).save_to_disk(str(path))
    else:  # a folder of data files
        path = folder / "files"
        path.mkdir()
        (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
        (path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[4:]))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "arrow", "save_to_disk", "folder"])
def test_every_local_format(fmt, tmp_path):
    path = _write(fmt, tmp_path)
    split = {"save_to_disk": "test", "folder": "test"}.get(fmt)
    task = get_task("datasets", path=str(path), prompt_column="question", eval_split=split)
    train = task.train_examples()
    want = ROWS[:4] if split else ROWS
    assert [e.prompt for e in train] == [r["question"] for r in want]
    assert [e.answer for e in train] == [r["answer"] for r in want]  # csv reads "2" as 2: str() makes it "2"
    assert collate_columns(train)["level"] == [r["level"] for r in want]  # extra columns reach rewards
    assert "question" not in train[0].columns
    held = task.eval_examples()
    assert [e.prompt for e in held] == ([r["question"] for r in ROWS[4:]] if split else [])
    scores = task.reward(["<answer>2</answer>", "4", "7"], None, **collate_columns(train[:3]))
    assert scores == [1.0, 1.0, 0.0]


def test_split_slices_separate_eval_file_limits_and_template(tmp_path):
    path = _write("jsonl", tmp_path)
    task = DatasetsTask(str(path), split="train[1:4]", eval_path=str(path), eval_split="train[-2:]",
                        template="Q: {question} (level {level})", num_eval=1)
    assert [e.prompt for e in task.train_examples()] == [f"Q: {r['question']} (level {r['level']})" for r in ROWS[1:4]]
    assert [e.answer for e in task.eval_examples()] == [ROWS[4]["answer"]]
    other = DatasetsTask(str(path), eval_path=str(path), prompt_column="question")  # eval file: its "train" split
    assert len(other.eval_examples()) == len(ROWS)


def test_messages_prompts_use_the_chat_template(tmp_path):
    model = make_tiny_model(tmp_path / "m", seed=0)
    rows = [{"prompt": [{"role": "user", "content": "1+1"}], "answer": "2"},
            {"prompt": [{"role": "system", "content": "be brief "}, {"role": "user", "content": "2+2"}], "answer": "4"}]
    conv = [{"messages": [{"role": "user", "content": "3+3"}, {"role": "assistant", "content": "6"}], "level": 1}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conv))
    from fastes.models.tokenizer import Tokenizer

    tok = Tokenizer(model)
    engine = type("E", (), {"tokenizer": tok})()
    task = DatasetsTask(str(tmp_path / "p.jsonl"), system_prompt="sys ")
    examples = task.train_examples()
    assert examples[0].prompt == rows[0]["prompt"]
    ids = encode_prompts(engine, task, examples, use_chat_template=False)  # messages are rendered regardless
    hf = tok.hf
    assert ids[0] == hf.encode(hf.apply_chat_template([{"role": "system", "content": "sys "}, *rows[0]["prompt"]],
                                                      tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)
    assert tok.decode(ids[0]) == "sys 1+1=" and tok.decode(ids[1]) == "be brief 2+2="  # own system kept
    chat = DatasetsTask(str(tmp_path / "c.jsonl"), messages_column="messages", answer_column=None)
    ex = chat.train_examples()[0]
    assert ex.prompt == [{"role": "user", "content": "3+3"}] and ex.answer == "6" and ex.columns["level"] == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"path": "/no/such/file.jsonl"}, "not found"),
    ({"path": "{dir}/data.txt"}, "unknown extension"),
    ({"path": "{dir}/data.jsonl", "split": "validation"}, "no split 'validation'"),
    ({"path": "{dir}/data.jsonl", "split": "train[x]"}, "expected a name"),
    ({"path": "{dir}/data.jsonl", "prompt_column": "nope"}, "no prompt column 'nope'"),
    ({"path": "{dir}/data.jsonl", "prompt_column": "question", "answer_column": "nope"}, "no answer column"),
    ({"path": "{dir}/data.jsonl", "match": "fuzzy"}, "match must be one of"),
])
def test_bad_input_is_one_line(tmp_path, kwargs, message):
    _write("jsonl", tmp_path)
    (tmp_path / "data.txt").write_text("x")
    kwargs = {k: v.format(dir=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message) as err:
        DatasetsTask(**kwargs).train_examples()
    assert "\n" not in str(err.value)


def test_unreachable_hub_name_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="cannot load dataset 'fastes-test/no-such-dataset'") as err:
        DatasetsTask("fastes-test/no-such-dataset").train_examples()
    assert "\n" not in str(err.value) and "hub" in str(err.value)
    assert time.perf_counter() - t0 < 30


TRL_REWARD = '''
def chat_digits(prompts, completions, completion_ids, trainer_state, level, **kwargs):
    assert isinstance(prompts[0], list) and completions[0][0]["role"] == "assistant"
    assert len(completion_ids) == len(completions) and trainer_state.max_steps == 2
    return [sum(ch.isdigit() for ch in c[0]["content"]) / max(1, len(c[0]["content"])) + 0 * lv
            for c, lv in zip(completions, level)]
'''


def test_cli_run_with_datasets_messages_and_a_trl_reward(tmp_path, capsys):
    """A conversational dataset and a reward written for TRL, end to end through the CLI."""
    model = make_tiny_model(tmp_path / "m", seed=0)
    rows = [{"prompt": [{"role": "user", "content": f"{a}+{a}"}], "answer": str(2 * a), "level": a % 3}
            for a in range(1, 7)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.py").write_text(TRL_REWARD)
    config = {"model": str(model), "task": "datasets", "device": "cpu", "steps": 2, "prompts_per_step": 2,
              "task_options": {"path": str(tmp_path / "d.jsonl"), "eval_path": str(tmp_path / "d.jsonl")},
              "rewards": [{"func": f"{tmp_path / 'r.py'}:chat_digits", "weight": 1.0}], "eval_size": 2,
              "eval_every": 1, "progress": False, "report_to": ["jsonl"], "kv_cache_tokens": 2048,
              "population": {"size": 4}, "sampling": {"max_tokens": 4}}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    argv = ["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if "reward/mean" in r]
    assert len(train) == 2 and all(r["reward/errors"] == 0 and "reward/chat_digits" in r for r in train)
    assert (tmp_path / "run" / "evals" / "eval" / "step-000002.jsonl").is_file()
