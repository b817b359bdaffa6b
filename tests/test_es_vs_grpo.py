"""bench/es_vs_grpo.py end to end in --quick mode on a tiny random model with a budget of seconds.

Checks the report's shape (keys, curves, analyses, PNGs), not who wins: at this size nothing is learned.
The GRPO side runs where TRL is installed; a second run hides TRL to check the "TRL not installed" path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
HAS_TRL = importlib.util.find_spec("trl") is not None
QUICK = ["--quick", "--budget-s", "2", "--evals", "1", "--eval-size", "6", "--kl-prompts", "3", "--kl-tokens", "6",
         "--es", "prompts_per_step=4", "--es", "population.size=4", "--es", "sampling.max_tokens=5",
         "--task-option", "partial_credit=true", "--task-option", "num_train=32", "--task-option", "num_eval=6"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("es_vs_grpo") / "tiny")


def run_bench(model: Path, out: Path, extra_path: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (extra_path, ROOT) if p is not None)
    proc = subprocess.run([sys.executable, "-m", "bench.es_vs_grpo", "--model", str(model), "--out", str(out), *QUICK],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def check_common(results: dict, out: Path) -> None:
    for key in ("device", "torch", "transformers", "trl", "budget_s", "model", "task", "eval", "es", "grpo",
                "analysis", "files"):
        assert key in results, key
    es = results["es"]
    assert es["status"] == "ok" and es["steps"] >= 1 and es["samples"] > 0
    assert es["curve"][0]["train_s"] == 0.0 and es["curve"][0]["samples"] == 0 and len(es["curve"]) >= 2
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in es["curve"])
    a = results["analysis"]
    for key in ("kl_off_task", "kl_on_task", "geometry", "interpolation"):
        assert key in a, key
    assert a["kl_off_task"]["es"]["mean_kl"] >= 0.0 and a["geometry"]["delta_norm"]["es"] > 0.0
    assert a["interpolation"]["base->es"]["alphas"] == [0.0, 0.5, 1.0]
    for png in ("curves.png", "kl.png", "interpolation_base_to_es.png"):
        assert (out / png).stat().st_size > 0, png
    assert (out / "es_metrics.jsonl").is_file() and (out / "analysis.json").is_file()
    assert not any(p.is_dir() for p in out.iterdir())  # flat: JSON, PNGs and metrics only


def test_es_vs_grpo_quick(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    results = run_bench(tiny, out)
    check_common(results, out)
    grpo = results["grpo"]
    if not HAS_TRL:
        assert grpo["status"] == "skipped" and "TRL not installed" in grpo["reason"]
        return
    assert grpo["status"] == "ok" and grpo["steps"] >= 1 and grpo["samples"] > 0
    assert grpo["settings"]["num_generations"] == int(grpo["trl_defaults"]["num_generations"])
    assert grpo["curve"][0]["accuracy"] == results["es"]["curve"][0]["accuracy"]  # one base, one eval
    assert grpo["curve"][0]["reward"] == results["es"]["curve"][0]["reward"]
    a = results["analysis"]
    assert "es|grpo" in a["geometry"]["cosine"] and "es->grpo" in a["interpolation"]
    for png in ("geometry.png", "interpolation_es_to_grpo.png", "interpolation_base_to_grpo.png"):
        assert (out / png).stat().st_size > 0, png
    assert (out / "grpo_metrics.jsonl").is_file()


@pytest.mark.skipif(not HAS_TRL, reason="TRL is absent anyway: the quick test covers the skipped GRPO side")
def test_es_vs_grpo_without_trl(tiny: Path, tmp_path: Path) -> None:
    hide = tmp_path / "hide"
    (hide / "trl").mkdir(parents=True)
    (hide / "trl" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    out = tmp_path / "report"
    results = run_bench(tiny, out, extra_path=hide)
    check_common(results, out)
    assert results["trl"] is None
    assert results["grpo"] == {"status": "skipped", "reason": results["grpo"]["reason"]}
    assert "TRL not installed" in results["grpo"]["reason"]
    assert "grpo" not in results["analysis"]["kl_off_task"] and "es->grpo" not in results["analysis"]["interpolation"]


def test_clock_excludes_paused_time() -> None:
    """Eval time is not training time, and an eval point is stamped when its pause began."""
    sys.path.insert(0, str(ROOT))
    from bench.es_vs_grpo import Clock

    clock = Clock(budget_s=2.0, evals=2)  # wide margins: the host may stall a thread for a while
    clock.start()
    assert not clock.eval_due() and not clock.done()
    with clock.paused():
        stamp = clock.train_s()
        time.sleep(0.6)
        assert clock.train_s() == stamp
    assert clock.train_s() < 0.5
    time.sleep(1.1)
    assert clock.eval_due() and not clock.eval_due()  # due once per interval
    time.sleep(1.0)
    assert clock.done()


def test_clock_runs_on_the_timer_it_is_given() -> None:
    """--clock cpu: the budget and eval points follow the given timer (CPU seconds), not the wall."""
    sys.path.insert(0, str(ROOT))
    from bench.es_vs_grpo import Clock

    now = [10.0]
    clock = Clock(budget_s=4.0, evals=2, timer=lambda: now[0])
    clock.start()
    now[0] = 11.5
    assert clock.train_s() == 1.5 and not clock.eval_due()
    with clock.paused():
        now[0] = 50.0  # an evaluation that took 38.5 s
    assert clock.train_s() == 1.5
    now[0] = 52.0
    assert clock.train_s() == 3.5 and clock.eval_due() and not clock.done()
    now[0] = 52.6
    assert clock.done()


def test_seed_summary_is_mean_and_sd_at_equal_time() -> None:
    """Accuracy at t is the eval due at t (first at or after it); mean ± sample sd; 'never reached' kept apart."""
    sys.path.insert(0, str(ROOT))
    from bench.es_vs_grpo_seeds import accuracy_at, first_reach, markdown, summarize

    def curve(accs: list[float]) -> list[dict]:
        return [{"train_s": 5.0 * i + (0.3 if i else 0.0), "samples": 100 * i, "accuracy": a}
                for i, a in enumerate(accs)]

    runs = [[0.3, 0.4, 0.5, 0.6], [0.3, 0.5, 0.5, 0.4], [0.3, 0.35, 0.45, 0.5]]
    results = [{"budget_s": 15.0, "clock": "cpu", "es": {"status": "ok", "curve": curve(r), "steps": 10 + i,
                                                          "samples": 300},
                "grpo": {"status": "skipped", "reason": "x"}} for i, r in enumerate(runs)]
    assert accuracy_at(results[0]["es"]["curve"], 5.0) == 0.4 and accuracy_at(results[0]["es"]["curve"], 5.4) == 0.5
    assert accuracy_at(results[0]["es"]["curve"], 99.0) == 0.6
    assert first_reach(results[1]["es"]["curve"], 0.5) == 100 and first_reach(results[2]["es"]["curve"], 0.55) is None
    s = summarize(results)
    assert s["times"] == [0.0, 5.0, 10.0, 15.0] and s["grpo"] == {"status": "skipped"}
    final = [0.6, 0.4, 0.5]
    mean = sum(final) / 3
    sd = (sum((x - mean) ** 2 for x in final) / 2) ** 0.5
    assert s["es"]["final"] == pytest.approx((mean, sd)) and s["es"]["best"][0] == pytest.approx((0.6 + 0.5 + 0.5) / 3)
    assert s["es"]["at_time"][2][0] == pytest.approx((0.5 + 0.5 + 0.45) / 3)  # t = 10: the evals at 10.3 s
    assert s["es"]["to_threshold"]["0.55"] == [300, None, None]
    assert "300 (1/3 seeds)" in markdown(s)


def test_es_side_keeps_a_decaying_schedule_length_and_runs_a_constant_one_to_the_budget(tmp_path):
    """A cosine config keeps its steps (stretched to the budget it would be a constant lr); constant runs on."""
    from bench.es_vs_grpo import build_config, parse_args

    decaying = build_config(parse_args(["--es", "steps=37"]))  # the demo config: cosine lr
    assert decaying.optim.schedule == "cosine" and decaying.steps == 37
    import yaml

    assert build_config(parse_args([])).steps == yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["steps"]
    constant = build_config(parse_args(["--es", "optim.schedule=constant"]))
    assert constant.steps == 10**8
