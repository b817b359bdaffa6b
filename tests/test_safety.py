"""Nothing lost, nothing run that the user did not ask for (issue 16): run directories, checkpoints, resume.

Each test reproduces one failure a new user or a hostile reviewer hit, through the `fastes` command line.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from tiny_model import DIGIT_TASK, make_tiny_model

from fastes import cli
from fastes.es import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("safety-model") / "tiny", seed=2)


def write_config(path: Path, model: Path, out: Path, **over: object) -> Path:
    data = {"model": str(model), "task": DIGIT_TASK, "out": str(out), "device": "cpu", "steps": 2,
            "prompts_per_step": 2, "eval_size": 2, "eval_every": 1, "progress": False, "tensorboard": False,
            "kv_cache_tokens": 512, "population": {"size": 4, "sigma": 0.1, "perturb_lm_head": True},
            "optim": {"lr": 0.05}, "sampling": {"max_tokens": 4, "temperature": 0.0}, **over}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def config_file(model_dir: Path, tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", model_dir, tmp_path / "run")


def one_line(capsys: pytest.CaptureFixture[str], code: int, rc: int, *expected: str) -> str:
    """The command exited ``rc`` with exactly one ``fastes...error`` line on stderr, holding every ``expected``."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert code == rc and len(lines) == 1, err
    assert all(e in lines[0] for e in expected), lines[0]
    return lines[0]


def plugin(path: Path, body: str) -> Path:
    """A user plug-in module that leaves ``path.with_suffix('.ran')`` behind when it is imported."""
    path.write_text(f"from pathlib import Path\nPath({str(path.with_suffix('.ran'))!r}).write_text('x')\n{body}")
    return path


# ---------------------------------------------------------------------- data loss


def test_out_at_a_user_directory_is_refused(config_file, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own")
    (mine / "curves.png").write_bytes(b"png")
    code = cli.main(["train", "--config", str(config_file), "--out", str(mine)])
    one_line(capsys, code, 2, "not a fastes run")
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml", "curves.png"]
    assert (mine / "config.yaml").read_text() == "my own"


def test_a_failed_start_leaves_nothing_and_can_be_rerun(config_file, tmp_path, capsys):
    long = plugin(tmp_path / "longtask.py", (
        "from tiny_model import DigitTask\n"
        "class Long(DigitTask):\n"
        "    def train_examples(self):\n"
        "        from fastes.es.tasks.base import Example\n"
        "        return [Example('1' * 200, '', {})]\n"))  # beyond the tiny model's 128-token context
    code = cli.main(["train", "--config", str(config_file), "--task", f"{long}:Long", "--eval_size", "0"])
    one_line(capsys, code, 2, "context")
    assert not (tmp_path / "run").exists()
    assert cli.main(["train", "--config", str(config_file)]) == 0  # the same --out, fixed: runs
    assert ckpt.find_checkpoint(tmp_path / "run").name == "step-2"


def test_a_run_that_never_saved_a_checkpoint_can_be_started_over(config_file, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".fastes-run").write_text("")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')  # a crashed run: metrics, no checkpoint to resume
    assert cli.main(["train", "--config", str(config_file)]) == 0
    assert ckpt.find_checkpoint(run).name == "step-2"
    code = cli.main(["train", "--config", str(config_file)])  # now it holds a checkpoint: resume or elsewhere
    one_line(capsys, code, 2, "already holds a run", "--resume")


def test_a_moved_run_resumes_where_it_now_is(config_file, tmp_path, capsys):
    assert cli.main(["train", "--config", str(config_file)]) == 0
    moved = tmp_path / "moved"
    os.replace(tmp_path / "run", moved)
    assert cli.main(["train", "--resume", str(moved), "--steps", "3", "--task", DIGIT_TASK]) == 0
    assert (moved / "checkpoints" / "step-3" / ckpt.STATE_FILE).is_file()
    assert not (tmp_path / "run").exists()


def test_checkpoints_are_pruned_to_keep_last_and_the_best(model_dir, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", model_dir, tmp_path / "run", steps=5, save_every=1, eval_every=1,
                          checkpoint={"keep_last": 2})
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / ".step-1.tmp-abcd1234").mkdir()  # a killed save's staging directory
    (tmp_path / "run" / ".fastes-run").write_text("")
    assert cli.main(["train", "--config", str(config)]) == 0
    state = ckpt.load_state(root / "step-5")
    history = {int(k): v for k, v in state["eval_history"].items()}
    assert sorted(history) == [0, 1, 2, 3, 4, 5]
    best = max(range(1, 6), key=lambda s: (history[s], s))  # step 0 has no checkpoint
    assert sorted(ckpt.complete_checkpoints(tmp_path / "run")) == sorted({4, 5, best})
    assert not any(p.name.startswith(".") for p in root.iterdir())
    # the rule: the last K by step, plus the best score (ties: the later one); K = 0 keeps all
    unit = tmp_path / "unit"
    for step in (1, 2, 3, 4, 5):
        (unit / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (unit / "checkpoints" / f"step-{step}" / ckpt.STATE_FILE).write_text("{}")
    assert ckpt.prune_checkpoints(unit, 0, {}) == []
    assert ckpt.prune_checkpoints(unit, 2, {1: 0.9, 2: 0.9, 3: 0.1}) == [1, 3]
    assert sorted(ckpt.complete_checkpoints(unit)) == [2, 4, 5]


def test_run_files_have_the_modes_the_umask_gives(config_file, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli.main(["train", "--config", str(config_file)]) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "run").rglob("*"):
        want = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_disk_full_while_checkpointing_is_one_line(config_file, tmp_path, capsys, monkeypatch):
    import errno

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fastes.models.loader.save_file", full)
    code = cli.main(["train", "--config", str(config_file)])
    one_line(capsys, code, 2, "cannot write checkpoint", "No space left on device")
    assert not ckpt.complete_checkpoints(tmp_path / "run")


# ---------------------------------------------------------------------- code execution from data


def test_resume_runs_no_code_the_checkpoint_names(config_file, tmp_path, capsys):
    assert cli.main(["train", "--config", str(config_file)]) == 0
    capsys.readouterr()
    evil = plugin(tmp_path / "evil.py", "def score(completions, **kw):\n    return [1.0] * len(completions)\n")
    state_file = ckpt.find_checkpoint(tmp_path / "run") / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    state["config"]["rewards"] = [{"func": "subprocess:getoutput", "weight": 1.0}, {"func": f"{evil}:score",
                                                                                   "weight": 1.0}]
    state_file.write_text(json.dumps(state))
    for extra in ([], ["--task", DIGIT_TASK]):  # naming the task again does not vouch for the rewards
        code = cli.main(["train", "--resume", str(tmp_path / "run"), "--steps", "3", *extra])
        one_line(capsys, code, 2, "subprocess:getoutput", "--trust-checkpoint-code")
    assert not evil.with_suffix(".ran").exists()
    assert not (tmp_path / "run" / "checkpoints" / "step-3").exists()
    rewards = f"[{evil}:score]"  # named again by the user: allowed, and it runs
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--steps", "3", "--task", DIGIT_TASK,
                     "--rewards", rewards]) == 0
    assert evil.with_suffix(".ran").exists()
    config, _ = cli.load_train_config(None, ["--resume", str(tmp_path / "run")], trust_checkpoint=True)
    assert config.task == DIGIT_TASK  # the explicit trust flag takes the checkpoint's plug-ins as they are


def test_dry_run_imports_and_calls_nothing_of_the_users(config_file, tmp_path, capsys):
    task = plugin(tmp_path / "usertask.py", "def make(**kw):\n    raise SystemExit('called')\n")
    reward = plugin(tmp_path / "userreward.py", "def r(completions, **kw):\n    return [0.0] * len(completions)\n")
    code = cli.main(["train", "--config", str(config_file), "--dry-run", "--task", f"{task}:make",
                     "--rewards", f"{reward}:r"])
    out = capsys.readouterr().out
    assert code == 0 and "not imported in a dry run" in out and "memory plan" in out
    assert not task.with_suffix(".ran").exists() and not reward.with_suffix(".ran").exists()


def test_generate_on_a_checkpoint_reads_only_tensors_and_json(config_file, tmp_path, capsys):
    assert cli.main(["train", "--config", str(config_file)]) == 0
    last = ckpt.find_checkpoint(tmp_path / "run")
    evil = plugin(last / "evil.py", "")
    state = json.loads((last / ckpt.STATE_FILE).read_text())
    state["config"]["task"] = f"{evil}:make"
    (last / ckpt.STATE_FILE).write_text(json.dumps(state))
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(last), "--prompt", "12+", "--max-tokens", "3"]) == 0
    assert not evil.with_suffix(".ran").exists()
    # a tokenizer config that asks for custom code (auto_map) gets a one-line refusal, not an import
    tok = json.loads((last / "tokenizer_config.json").read_text())
    (last / "tokenizer_config.json").write_text(json.dumps({**tok, "auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    code = cli.main(["generate", "--model", str(last), "--prompt", "12+", "--max-tokens", "3"])
    assert code in (0, 2) and not evil.with_suffix(".ran").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == (code == 2)


# ---------------------------------------------------------------------- bad input: one line, exit 2


def test_bad_devices_and_non_task_factories(config_file, model_dir, tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        code = cli.main(["train", "--config", str(config_file), "--device", "cuda"])
        one_line(capsys, code, 2, "no usable CUDA GPU")
        code = cli.main(["generate", "--model", str(model_dir), "--prompt", "1", "--device", "cuda"])
        one_line(capsys, code, 2, "no usable CUDA GPU")
    code = cli.main(["train", "--config", str(config_file), "--device", "tpu"])
    one_line(capsys, code, 2, "device must be")
    code = cli.main(["generate", "--model", str(model_dir), "--prompt", "1", "--device", "tpu"])
    one_line(capsys, code, 2, "device must be")
    factory = tmp_path / "factory.py"
    factory.write_text("def make(**kw):\n    return 42\n")
    code = cli.main(["train", "--config", str(config_file), "--task", f"{factory}:make"])
    one_line(capsys, code, 2, "not a task", "int")
    assert not (tmp_path / "run").exists()


def test_a_kv_pool_too_small_for_prompt_plus_max_tokens_is_found_at_start(config_file, tmp_path, capsys):
    code = cli.main(["train", "--config", str(config_file), "--kv_cache_tokens", "16", "--max_tokens", "40"])
    one_line(capsys, code, 2, "KV cache too small", "max_tokens is 40", "holds 16 tokens")
    assert not (tmp_path / "run").exists()
