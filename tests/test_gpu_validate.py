"""scripts/gpu_validate.sh: a plan that fits the device budget, bad arguments refused, phases logged."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_validate.sh"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, check=False)


def test_plan_fits_eight_minutes_in_two_calls_of_five() -> None:
    done = _run("--plan")
    assert done.returncode == 0, done.stderr
    calls = [int(s) for s in re.findall(r"budget (\d+) s", done.stdout)]
    assert len(calls) == 2 and all(c <= 300 for c in calls)
    start, first, second, total = map(int, re.search(r"total: (\d+) s start-up \+ (\d+) s \+ (\d+) s = (\d+) s",
                                                     done.stdout).groups())
    assert (first, second) == tuple(calls) and total == start + first + second <= 480
    phases = re.findall(r"^  (\S+)\s+(\d+) s  ", done.stdout, re.M)
    assert sum(int(s) for _, s in phases) == first + second  # the calls' budgets are their phases'
    assert [p for p, _ in phases][:2] == ["device", "warm"] and "bench.compile --jobs 16" in done.stdout


def test_plan_names_only_test_files_that_exist() -> None:
    out = _run("--plan").stdout
    for path in re.findall(r"tests/\S+\.py", out):
        assert (ROOT / path).is_file(), path
    assert "-m gpu" in out and "tests/test_engine_gpu.py" in out  # graph capture end to end


def test_plan_runs_every_test_file_with_gpu_tests() -> None:
    """A `gpu` test in a file the check does not name would never run on the lent GPU."""
    named = set(re.findall(r"tests/\S+\.py", _run("--plan").stdout))
    with_gpu = {f"tests/{f.name}" for f in (ROOT / "tests").glob("test_*.py")
                if re.search(r"pytest\.mark\.gpu|mark\.gpu\b", f.read_text(encoding="utf-8"))}
    assert with_gpu and with_gpu <= named, sorted(with_gpu - named)


@pytest.mark.parametrize("args", [[], ["tests"], ["check", "measure"], ["--plan", "x"]])
def test_bad_arguments_exit_2_before_doing_anything(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run(*args, env={"OUT": str(out)})
    assert done.returncode == 2 and done.stderr.startswith("usage:")
    assert not out.exists()


def test_dry_check_logs_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run("check", env={"OUT": str(out), "GPU_VALIDATE_DRY": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    plan = _run("--plan").stdout
    names = [n for n in re.findall(r"^  (\S+)\s+\d+ s  ", plan, re.M)][:4]
    for name in names:
        assert (out / f"{name}.log").read_text().startswith("would run: ")
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[1].rstrip(":") for line in summary] == names
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files
    assert (out / "install.log").read_text().startswith("would run: pip install")  # nothing built here
    warm = (out / "warm.log").read_text()
    assert shlex.split(warm.removeprefix("would run: "))[0].startswith("python")
