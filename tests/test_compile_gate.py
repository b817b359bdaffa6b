"""The sm_90 compile gate (bench/compile): occupancy arithmetic, the spill/smem policy, and one real
compile of a kernel through the stand-in driver, checked against numbers derived from the shapes."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compile import cases, policy, stats

ROOT = Path(__file__).resolve().parents[1]


def _record(kernel: str = "_gemm_kernel", spill: int = 0, smem: int = 4096, **constexprs: object) -> dict:
    return {"kernel": kernel, "constexprs": constexprs, "spill_stores": spill, "spill_loads": spill, "smem": smem}


def test_occupancy_matches_the_sm90_rules_by_hand() -> None:
    # 106 regs x 32 threads = 3392 -> 3584 per warp (unit 256); 65536 // 3584 = 18 warps; 8 warps per CTA -> 2.
    assert stats.occupancy(106, 8, 0) == (2, "regs")
    # 204 regs -> 6656 per warp -> 9 warps -> 1 CTA of 8 warps
    assert stats.occupancy(204, 8, 32768) == (1, "regs")
    # shared memory: 233472 // (98304 + 1024) = 2; registers (120 -> 3840/warp -> 17 warps -> 4 CTAs of 4) allow more
    assert stats.occupancy(120, 4, 98304) == (2, "smem")
    # 32 registers, 4 warps: registers allow 16 CTAs, warps 64 // 4 = 16: the first limiter found wins the tie
    ctas, _ = stats.occupancy(32, 4, 2048)
    assert ctas == 16
    assert stats.occupancy(None, 1, 0) == (32, "ctas")
    # allocation granularity: 65 regs x 32 = 2080 -> 2304 per warp -> 28 one-warp CTAs (31 without rounding)
    assert stats.occupancy(65, 1, 0) == (28, "regs")


def test_parse_ptxas_log() -> None:
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    48 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads\n"
           "ptxas info    : Used 255 registers, 560 bytes cmem[0]\n")
    use = stats.parse_ptxas(log, "triton")
    assert (use.regs, use.stack, use.spill_stores, use.spill_loads, use.source) == (255, 48, 24, 20, "triton")
    assert stats.parse_ptxas("", "rerun").regs is None


def test_mma_kind() -> None:
    ptx = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...}"
    assert stats.mma_kind(ptx) == "wgmma f32.bf16.bf16"
    assert stats.mma_kind("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32") == "mma.sync f32.tf32.tf32"
    assert stats.mma_kind("add.f32") == "-"


def test_policy_fails_smem_over_one_cta_and_unlisted_hot_spills() -> None:
    hot = frozenset({"_gemm_kernel", "_noise_fill_kernel"})
    assert policy.verdict(_record(smem=stats.SMEM_PER_BLOCK), hot)[0] == "ok"
    assert policy.verdict(_record(smem=stats.SMEM_PER_BLOCK + 1), hot)[0] == "FAIL"
    assert policy.verdict(_record(kernel="_write_kv_kernel", spill=400), hot)[0] == "ok"  # not hot
    assert policy.verdict(_record(spill=4, MODE=0, KIND=0), hot)[0] == "FAIL"  # plain GEMM: not allowed


def test_policy_allowlist_has_a_reason_and_a_ceiling() -> None:
    hot = frozenset({"_gemm_kernel"})
    entry = next(a for a in policy.ALLOWED_SPILLS if a.kernel == "_gemm_kernel")
    where = dict(entry.where)
    half = entry.max_bytes // 2  # stores + loads, each half the ceiling: exactly at it
    assert policy.verdict(_record(spill=half, **where), hot)[0] == "allowed"
    assert policy.verdict(_record(spill=half + 1, **where), hot)[0] == "FAIL"
    other = {k: (v + 1 if isinstance(v, int) else f"not {v}") for k, v in where.items()}
    assert policy.verdict(_record(spill=2, **other), hot)[0] == "FAIL"
    assert all(a.reason and a.max_bytes > 0 and a.kernel in cases.HOT_KERNELS for a in policy.ALLOWED_SPILLS)


def test_stale_allowances_are_reported() -> None:
    entry = policy.ALLOWED_SPILLS[0]
    clean = _record(kernel=entry.kernel, spill=0, **dict(entry.where))
    assert any(entry.kernel in line for line in policy.stale_allowances([clean]))
    spilling = _record(kernel=entry.kernel, spill=4, **dict(entry.where))
    assert policy.stale_allowances([spilling]) == []  # entries that match no build are not judged


def test_every_launcher_and_device_check_named_by_the_case_list_exists() -> None:
    for name, target in {**cases.LAUNCHERS, **dict.fromkeys(cases.DEVICE_CHECKS)}.items():
        module, attr = (target or name).split(":")
        assert hasattr(importlib.import_module(module), attr), f"{target or name} (bench/compile/cases.py)"


def test_shards_partition_the_selection() -> None:
    from bench.compile.runner import select

    items = [cases.Case(f"c{i}", lambda: None, subset=i % 3 == 0) for i in range(10)]
    shards = [select(items, False, None, (i, 3)) for i in range(3)]
    assert [c.name for s in shards for c in s] == [c.name for c in items]
    assert [c.name for c in select(items, True, "c[0-6]", None)] == ["c0", "c3", "c6"]


def _gate(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.compile", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.parametrize("args", [["--jobs", "0"], ["--shard", "3/3"], ["--only", "("], ["--arch", "75"]])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    done = _gate(*args)
    assert done.returncode == 2, done.stderr
    assert "error" in done.stderr.splitlines()[-1]


def test_no_matching_case_exits_2() -> None:
    assert _gate("--only", "no such case at all").returncode == 2


def test_list_marks_the_subset() -> None:
    done = _gate("--list")
    assert done.returncode == 0
    names = done.stdout.splitlines()
    assert len(names) == len(cases.build_cases())
    assert sum(line.startswith("* ") for line in names) == sum(c.subset for c in cases.build_cases())


def test_noise_fill_compiles_for_sm90_with_the_launchers_grid(tmp_path: Path) -> None:
    out = tmp_path / "gate.json"
    cache = str(tmp_path / "cache")
    done = _gate("--only", "^noise_fill gaussian$", "--json", str(out), "--cache-dir", cache)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    # a second run hits Triton's cache (no ptxas runs) and still reports the first run's ptxas figures
    assert _gate("--only", "^noise_fill gaussian$", "--json", str(tmp_path / "again.json"), "--cache-dir",
                 cache).returncode == 0
    again = json.loads((tmp_path / "again.json").read_text())["kernels"][0]
    assert (again["regs"], again["spill_stores"], again["ptxas_source"]) == (
        data["kernels"][0]["regs"], data["kernels"][0]["spill_stores"], "triton")
    (kernel,) = data["kernels"]
    assert kernel["kernel"] == "_noise_fill_kernel" and data["versions"]["arch"] == 90
    # the case fills inter x hidden Gaussian values, 4 per Philox call, GROUPS calls per program
    n = cases.QWEN_15B.inter * cases.QWEN_15B.hidden
    assert kernel["programs"] == math.ceil(n / 4 / kernel["constexprs"]["GROUPS"])
    assert kernel["regs"] and 0 < kernel["regs"] <= 255 and kernel["ptxas_source"] == "triton"
    assert kernel["ctas_per_sm"] == stats.occupancy(kernel["regs"], kernel["num_warps"], kernel["smem"])[0]
    assert "_noise_fill_kernel" in done.stdout and "1 distinct builds" in done.stdout
