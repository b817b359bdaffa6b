"""The bundled demo: its model is a real HF directory, weak as documented, and `fastes train` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastes import Engine, SamplingParams
from fastes.cli import demo_config, main

DEMO_MODEL = Path(__file__).resolve().parent.parent / "fastes" / "data" / "demo-model"


def test_demo_model_is_a_small_hf_directory():
    files = {p.name for p in DEMO_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in DEMO_MODEL.iterdir()) < 10 * 2**20


def test_demo_model_matches_transformers_and_is_weak():
    """Greedy answers equal transformers' on a few prompts; held-out-style accuracy sits in the documented band."""
    transformers = pytest.importorskip("transformers")
    engine = Engine.from_pretrained(DEMO_MODEL, kv_cache_tokens=4096)
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()
    tok = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL)
    prompts = ["123+456=", "905+17=", "500+500="]
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))
    for prompt, out in zip(prompts, outs[0], strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        ref = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert out[0].token_ids == ref
    card = json.loads((DEMO_MODEL / "training_log.json").read_text())
    assert 0.15 <= card["heldout_accuracy"] <= 0.45


def test_demo_config_runs_two_steps(tmp_path, capsys):
    """`fastes train` with the demo config writes the run directory a user expects."""
    assert demo_config() is not None
    out = tmp_path / "run"
    code = main(["train", "--steps", "2", "--eval_every", "1", "--eval_size", "8", "--prompts_per_step", "4",
                 "--population.size", "4", "--save_every", "1", "--out", str(out), "--progress", "false"])
    assert code == 0
    shown = capsys.readouterr().out
    assert "held-out answers before and after ES" in shown and "step 0" in shown and "step 2" in shown
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in line for line in lines) and any("reward/mean" in line for line in lines)
    assert (out / "config.yaml").is_file() and (out / "curves.png").is_file()
    checkpoint = out / "checkpoints" / "step-2"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()


def test_answers_table_puts_the_problems_es_changed_first(tmp_path):
    """Before/after answers come from the run's saved evaluations: fixed and broken problems lead."""
    from fastes.demo import answers_table

    folder = tmp_path / "evals" / "eval"
    folder.mkdir(parents=True)
    rows = {0: [("1+1=", "2", "2", True), ("2+2=", "4", "5", False), ("3+3=", "6", "6", True)],
            40: [("1+1=", "2", "2", True), ("2+2=", "4", "4", True), ("3+3=", "6", "7", False)]}
    for step, problems in rows.items():
        lines = [json.dumps({"step": step, "index": i, "sample": 0, "prompt": p, "answer": a, "completion": c,
                             "correct": ok}) for i, (p, a, c, ok) in enumerate(problems)]
        (folder / f"step-{step:06d}.jsonl").write_text("\n".join(lines) + "\n")
    table = answers_table(tmp_path, count=2).splitlines()
    assert "step 0" in table[0] and "step 40" in table[0]
    assert table[1].split()[:4] == ["2+2=", "4", "5", "✗"] and table[1].split()[4:] == ["4", "✓"]
    assert table[2].split()[0] == "3+3=" and len(table) == 3
    assert answers_table(tmp_path / "nothing") == ""
