"""Multi-process ES step time: 1 process vs 2 processes (torchrun, gloo) on CPU, and the cost of the drift guard.

    python -m bench.distributed [--quick]

Runs ``fastes train`` on the bundled demo model (``fastes/data/demo-model``, 3-digit addition)
or, without it, a tiny random Llama, three ways with the same config and seed:

1. ``1proc-1thread``: one process, one thread: the per-device baseline;
2. ``1proc-2threads``: one process, two threads: the same cores as (3);
3. ``2proc-1thread``: ``torchrun --nproc_per_node 2``, one thread each: every process generates
   half of the population, the N fitnesses are all-gathered, both apply the same update.

Reported per run: ES step times from metrics.jsonl (``time/step_s``: generate + score + gather +
update; the first step is warm-up and left out of the medians), generation time, the checksum
guard's time, and whether the final weights are bit-identical across the runs. Also the cost of
the checksum itself (int64 sum of bit patterns) against a float64 sum and a full-bytes blake2b.
On a shared CPU only the ratios mean something. JSON with the device, versions, git commit and raw
timings goes to bench/results/distributed-<machine>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.common import ROOT, device_name, git_commit, timed, write_result

DEMO = ROOT / "fastes" / "data" / "demo-model"
RUNS = {"1proc-1thread": (1, 1), "1proc-2threads": (1, 2), "2proc-1thread": (2, 1)}


def model_and_task(tmp: Path) -> tuple[Path, dict]:
    """The demo model with its arithmetic task, or a tiny random Llama with the test suite's digit task."""
    if (DEMO / "config.json").is_file():
        options = {"digits": 3, "op": "add", "template": "{a}+{b}=", "num_train": 2000, "num_eval": 50}
        return DEMO, {"task": "arithmetic", "task_options": options}
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import DIGIT_TASK, make_tiny_model

    return make_tiny_model(tmp / "tiny", seed=0), {"task": DIGIT_TASK}


def run(name: str, config: Path, out: Path) -> dict:
    """One ``fastes train`` (under torchrun for several processes); its timings from metrics.jsonl."""
    from fastes.es.logger import read_metrics

    procs, threads = RUNS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(procs)]
    cmd = launch + ["-m", "fastes", "train", "--config", str(config), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    steps = [r for r in read_metrics(out) if "reward/mean" in r]
    weights = out / "checkpoints" / f"step-{len(steps)}" / "model.safetensors"
    return {"processes": procs, "threads_per_process": threads, "wall_s": wall,
            "step_s": [r["time/step_s"] for r in steps], "generate_s": [r["time/generate_s"] for r in steps],
            "check_s": [r["time/check_s"] for r in steps if "time/check_s" in r],
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


def checksum_cost(elements: int, reps: int) -> dict:
    """Seconds per GB of the guard's checksum vs alternatives, on one fp32 tensor (single thread)."""
    from fastes.es.distributed import tensor_checksum

    t = torch.randn(elements)
    gb = t.numel() * t.element_size() / 1e9

    cost = {"bitsum_int64": min(timed(lambda: tensor_checksum(t), reps)),
            "float64_sum": min(timed(lambda: t.sum(dtype=torch.float64), reps)),
            "blake2b_bytes": min(timed(lambda: hashlib.blake2b(t.numpy().tobytes()).digest(), reps))}
    return {"elements": elements, "gb": gb, "s": cost, "gb_per_s": {k: gb / v for k, v in cost.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and prompts (about a minute)")
    args = parser.parse_args(argv)
    steps, prompts, size = (3, 8, 8) if args.quick else (6, 32, 16)
    torch.set_num_threads(1)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="fastes-bench-dist-") as tmp_name:
        tmp = Path(tmp_name)
        model, task = model_and_task(tmp)
        config = dict(model=str(model), device="cpu", dtype="float32", steps=steps, seed=0, prompts_per_step=prompts,
                      eval_every=0, eval_size=0, progress=False, tensorboard=False, kv_cache_tokens=8192,
                      population=dict(size=size, mode="lowrank", rank=4, sigma=0.01),
                      optim=dict(lr=1e-4), sampling=dict(max_tokens=6, temperature=0.0),
                      distributed=dict(check_every=1), **task)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        for name in RUNS:
            print(f"--- {name}", flush=True)
            results[name] = run(name, tmp / "config.yaml", tmp / name)
    shas = {r["weights_sha256"] for r in results.values()}
    cost = checksum_cost(1 << 22 if args.quick else 1 << 25, 3)
    med = {k: statistics.median(r["step_s"][1:] or r["step_s"]) for k, r in results.items()}
    gen = {k: statistics.median(r["generate_s"][1:] or r["generate_s"]) for k, r in results.items()}
    base = "1proc-1thread"
    rest = med[base] - gen[base]  # score + update (+ gathers): every rank does it in full, whatever G
    projected = {g: gen[base] / g + rest for g in (1, 2, 4, 8)}
    report = {
        "benchmark": "distributed", "device": device_name("cpu"), "cpus": os.cpu_count(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "git_commit": git_commit(), "quick": args.quick, "model": str(model), "config": config,
        "runs": results, "median_step_s": med, "median_generate_s": gen,
        "bit_identical_weights": len(shas) == 1, "checksum_cost": cost,
        "projected_step_s_for_g_devices": projected,
        "traffic_per_step": f"{size} float64 fitnesses (+ the rewards for metrics) per step; "
                            "a checksum of one int64 per tensor every check_every steps",
    }
    path = write_result("distributed", report, platform.machine())

    print(f"\nmodel {model.name}, population {size}, {prompts} prompts/step, {steps} steps (first is warm-up)")
    for name in RUNS:
        checks = results[name]["check_s"]
        check = f"check {statistics.median(checks) * 1e3:6.2f} ms" if checks else "(no check: one process)"
        print(f"  {name:15s} step {med[name] * 1e3:8.1f} ms  generate {gen[name] * 1e3:8.1f} ms  {check}")
    print(f"  2 processes vs 1 process, 1 thread each:  {med[base] / med['2proc-1thread']:.2f}x")
    print(f"  2 processes vs 1 process, same 2 cores:   {med['1proc-2threads'] / med['2proc-1thread']:.2f}x")
    print(f"  final weights bit-identical across runs:  {len(shas) == 1}")
    rate = cost["gb_per_s"]
    print(f"  checksum of {cost['gb']:.2f} GB fp32: bit-sum {rate['bitsum_int64']:.1f} GB/s, float64 sum "
          f"{rate['float64_sum']:.1f} GB/s, blake2b {rate['blake2b_bytes']:.2f} GB/s (1 thread)")
    print("\nWhat one device implies for G devices: each rank generates N/G members and all ranks exchange N "
          "fitness floats per step (O(N), independent of the model size), so the generation time divides by G "
          "while scoring and the update (every rank applies the full update from the seeds) do not:")
    print("  " + ", ".join(f"G={g}: ~{t * 1e3:.0f} ms" for g, t in projected.items())
          + f" (Amdahl from the 1-thread run: generate {gen[base] * 1e3:.0f} ms, the rest {rest * 1e3:.0f} ms)")
    print("  On GPUs generation dominates (and splits only as long as N/G members still fill a GPU batch); the "
          "model must fit on one GPU. Absolute CPU times here mean nothing on a shared host.")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
