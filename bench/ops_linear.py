"""perturbed_linear throughput relative to the unperturbed matmul at the same total rows.

    python -m bench.ops_linear [--quick]

For Qwen2.5-1.5B layer shapes (out x in: 1536x1536 q/o, 8960x1536 gate/up, 1536x8960 down),
populations N in {8, 32, 128} and R rows per member in {1, 16, 64} (T = N·R rows, sorted by
member), times perturbed_linear in lowrank (r = 1, Gaussian; expand fused in the Triton GEMM,
and with a cuBLAS base GEMM), full-gaussian and full-rademacher, divided into the time of
``x @ W.T`` (torch.matmul). A ratio of 1.0 means perturbation is free.

GPU: Triton kernels, bf16, triton.testing.do_bench medians; each row also prints the ratio the
cost model in fastes/ops/perturbed_linear_triton.py predicts (H100 numbers), so that measured
and counted can be compared. Triton's own unperturbed GEMM ("plain") is timed too: lowrank
cannot beat it, so plain/matmul separates GEMM quality from the cost of the noise.
CPU: the torch/C++ CPU path (``backend="cpu"``), fp32, wall-clock medians, shapes scaled down
(/8, or /16 with --quick); only the ratios mean something there.
Writes JSON (device, versions, git commit, raw timings) to bench/results/.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from bench.common import device_name, git_commit, time_cpu, time_gpu, triton_version, write_result
from fastes.noise import NoiseSpec
from fastes.ops.perturbed_linear import perturbed_linear

SHAPES = [(1536, 1536), (8960, 1536), (1536, 8960)]
NAME = "model.layers.0.mlp.up_proj.weight"
# H100 SXM figures of the cost model: HBM bytes/s, dense bf16 FLOP/s, CUDA-core ops/s, ops per value.
BW, TC, CORE, OPS = 3.3e12, 800e12, 22e12, {"gaussian": 60, "rademacher": 6}


def predicted_us(variant: str, out_f: int, in_f: int, n: int, rows: int, rank: int = 1, bm: int = 64) -> float:
    """Roofline time (us) of one call: max(bytes/BW, FLOPs/TC) + noise ops on the CUDA cores."""
    t = n * rows
    base = max(2 * (out_f * in_f + t * in_f + t * out_f) / BW, 2 * t * in_f * out_f / TC)
    if variant in ("matmul", "plain"):
        return base * 1e6
    if variant.startswith("lowrank"):
        extra = (2 * t * in_f + 8 * t * rank) / BW + (2 * t * in_f * rank + 32 * t * out_f) / TC
        if variant == "lowrank-cublas":
            extra += 4 * t * out_f / BW  # the epilogue kernel reads and writes Y again
        return (base + extra + n * rank * (in_f + out_f) * OPS["gaussian"] / CORE) * 1e6
    kind = variant.split("-")[1]
    dots = 2 * (n + t // bm) * bm * out_f * in_f / TC  # one masked dot per run and tile
    return (base + dots + n * out_f * in_f * OPS[kind] / CORE) * 1e6


def variants(x: torch.Tensor, w: torch.Tensor, rm: torch.Tensor, gpu: bool) -> dict[str, Callable[[], object]]:
    """Thunks of everything timed for one (shape, N, R); all share the same inputs."""
    from fastes.ops.perturbed_linear_triton import perturbed_linear_triton

    backend = "triton" if gpu else "cpu"
    gauss, rad = NoiseSpec(seed=7, step=1), NoiseSpec(seed=7, step=1, kind="rademacher")

    def call(mode: str, noise: NoiseSpec, **kw: object) -> Callable[[], object]:
        if kw:
            return lambda: perturbed_linear_triton(x, w, None, rm, noise, 1e-3, 1.0, mode, 1, NAME, **kw)
        return lambda: perturbed_linear(x, w, None, rm, noise, 1e-3, 1.0, mode, 1, NAME, backend=backend)

    thunks = {"matmul": lambda: torch.matmul(x, w.T), "lowrank": call("lowrank", gauss)}
    if gpu:
        thunks["plain"] = lambda: perturbed_linear_triton(x, w, None, None, None, 0.0, 1.0, "lowrank", 1, NAME)
        thunks["lowrank-cublas"] = call("lowrank", gauss, base="torch")
    thunks["full-gaussian"] = call("full", gauss)
    thunks["full-rademacher"] = call("full", rad)
    return thunks


def run(quick: bool) -> dict[str, object]:
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    div = 1 if gpu else (16 if quick else 8)
    pops = [8, 32] if quick else [8, 32, 128]
    per_member = [1, 16] if quick else [1, 16, 64]
    timer = time_gpu if gpu else (lambda fn: time_cpu(fn, 3 if quick else 5, budget_s=0.5 if quick else 2.0))
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    names = ["lowrank", "lowrank-cublas", "plain", "full-gaussian", "full-rademacher"]
    shown = [v for v in names if gpu or v not in ("lowrank-cublas", "plain")]
    note = "; [model] = predicted on H100" if gpu else "; CPU path, shapes / " + str(div)
    print(f"{device_name(device)} ({dtype}); ratio = t(matmul) / t(variant) at the same T{note}")
    print(f"{'out x in':>11s} {'N':>4s} {'R':>3s} {'matmul ms':>10s} " + " ".join(f"{v:>22s}" for v in shown))
    for out_f, in_f in SHAPES:
        out_f, in_f = out_f // div, in_f // div
        w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(device=device, dtype=dtype)
        for n in pops:
            for r in per_member:
                x = torch.randn(n * r, in_f, generator=gen).to(device=device, dtype=dtype)
                rm = torch.arange(n, device=device).repeat_interleave(r)
                times = {v: timer(fn) for v, fn in variants(x, w, rm, gpu).items()}
                med = {v: statistics.median(ts) for v, ts in times.items()}
                cells = []
                for v in shown:
                    model = predicted_us("matmul", out_f, in_f, n, r) / predicted_us(v, out_f, in_f, n, r)
                    cells.append((f"{med['matmul'] / med[v]:6.3f}" + (f" [{model:5.3f}]" if gpu else "")).rjust(22))
                print(f"{out_f:>5d}x{in_f:<5d} {n:4d} {r:3d} {med['matmul']:10.4f} " + " ".join(cells), flush=True)
                rows_out.append(dict(out=out_f, in_=in_f, members=n, rows_per_member=r, median_ms=med,
                                     ratio={v: med["matmul"] / med[v] for v in med},
                                     predicted_h100_us={v: predicted_us(v, out_f, in_f, n, r) for v in med},
                                     times_ms=times))
    return dict(bench="ops_linear", device=device_name(device), device_type=device, dtype=str(dtype),
                torch=torch.__version__, triton=triton_version(), git_commit=git_commit(dirty=False), quick=quick,
                threads=torch.get_num_threads(), sigma=1e-3, rank=1, timings=rows_out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer populations and row counts (smaller on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a busy host)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.quick)
    print(f"wrote {write_result('ops_linear', result, str(result['device']))}")


if __name__ == "__main__":
    main()
