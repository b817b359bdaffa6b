"""Benchmark of es_update (W ← W + lr·s·Σ c_m·E_m in place) at Qwen2.5-1.5B shapes.

``python -m bench.ops_update [--quick]``. On a GPU: the Triton kernel alone (``plan_es_update``,
host-side folding excluded) and the whole op, timed with ``triton.testing.do_bench``; lowrank is
reported as achieved bandwidth (W read + written once) next to the device's measured copy
bandwidth (DESIGN.md section 7 anchor), full as noise values per second (K distinct indices ×
numel / time). On CPU: the CPU path (torch + C++ noise fill when built), wall-clock medians.
Raw timings, device, versions and git commit go to bench/results/ops_update-<device>-<timestamp>.json.

On CPU it also compares, on one core at 1536 × 1536 with N = 8 and 32, the fused C++ full-rank update
(``fastes._C.es_update_full``) with the unfused path it replaced (each index's noise materialized by
the C++ fill, torch adds, torch reference rounding) and with that path using the C++ rounding; the
three run side by side in one process (``--cpu-update`` runs only this comparison).

Two numbers at the headline case (8960 × 1536 bf16, N = 32 antithetic, r = 1; derivation in
fastes/ops/es_update_triton.py): 55.1 MB of W moved (16.4 µs at 3.35 TB/s) + 0.67 MB of factors
written and read once; 1.68e5 factor Gaussians (one launch), a tf32x3 GEMM of K·r = 16 columns
(1.3e9 tensor-core FLOP) and 3.44e6 Philox calls for the rounding bits. Predicted H100 (no GPU
run yet): ≈ 23 µs for both launches, 71 % of 3.35 TB/s.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from bench.common import device_name, git_commit, time_cpu, time_gpu, triton_version, write_result
from fastes.noise import NoiseSpec, tensor_id
from fastes.ops.es_update import es_update, fold_coefficients
from fastes.ops.noise import noise_fill
from fastes.ops.stochastic_round import stochastic_round, stochastic_round_ref

# Qwen2.5-1.5B: hidden 1536, intermediate 8960, 2 KV heads of 128, vocab 151936.
SHAPES = {"q_proj/o_proj": (1536, 1536), "k_proj/v_proj": (256, 1536), "gate/up_proj": (8960, 1536),
          "down_proj": (1536, 8960), "embed/lm_head": (151936, 1536)}
QUICK_SHAPES = {"k_proj/v_proj (quick)": (256, 1536), "small (quick)": (128, 256)}
MEMBERS = (8, 32, 128)
# Lowrank tile / GEMM-precision variants timed once on GPU (the interpreter cannot tell them apart).
VARIANTS = [{"precision": "ieee"}, {"precision": "tf32"}, {"block_m": 64, "block_n": 64, "num_warps": 8},
            {"block_m": 128, "block_n": 64, "num_warps": 8}, {"block_m": 32, "block_n": 64}]


def _environment(device: str) -> dict[str, object]:
    env: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                              "platform": platform.platform(), "git_commit": git_commit(),
                              "triton": triton_version(), "device": device_name(device)}
    if device == "cuda":
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def _case(shape: tuple[int, int], dtype: torch.dtype, mode: str, members: int, device: str, repeats: int,
          variant: dict[str, object] | None = None) -> dict[str, object]:
    weight = (torch.randn(shape, device=device) * 0.02).to(dtype)
    spec = NoiseSpec(seed=1234, step=7, antithetic=True)
    coeffs = torch.randn(members, dtype=torch.float64) / members
    indices = members // 2
    row: dict[str, object] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "mode": mode,
                              "members": members, "noise_indices": indices, "rank": 1}
    bytes_moved = 2 * weight.numel() * weight.element_size()
    if device == "cuda":
        from fastes.ops.es_update_triton import plan_es_update

        launch = plan_es_update(weight, spec, coeffs, 1e-3, 1.0, mode, 1, "bench.weight", **(variant or {}))
        row["variant"] = variant or "default"
        row["kernel_ms_all"] = time_gpu(launch)
        if variant is None:  # the whole op once per case: host folding + upload + launch
            row["op_ms_all"] = time_gpu(lambda: es_update(weight, spec, coeffs, 1e-3, 1.0, mode, 1, "bench.weight"))
        ms = statistics.median(row["kernel_ms_all"])
    else:
        row["op_ms_all"] = time_cpu(
            lambda: es_update(weight, spec, coeffs, 1e-3, 1.0, mode, 1, "bench.weight", backend="cpu"), repeats)
        ms = statistics.median(row["op_ms_all"])
    row["median_ms"] = ms
    row["bandwidth_GBps"] = bytes_moved / (ms * 1e-3) / 1e9
    row["noise_values_per_s"] = indices * weight.numel() / (ms * 1e-3) if mode == "full" else None
    return row


def _unfused_full_update(weight: torch.Tensor, spec: NoiseSpec, coeffs: torch.Tensor, lr: float, name: str,
                         cpp_round: bool) -> None:
    """The CPU full-rank path before the fused kernel: K noise tensors materialized, torch adds, then rounding."""
    total = torch.zeros(weight.shape)
    buf = torch.empty(weight.shape)
    for index, c in fold_coefficients(spec, coeffs):
        total.add_(noise_fill(buf, spec.seed, tensor_id(name), index, spec.step, 0, spec.kind), alpha=c)
    updated = weight.float() + lr * total
    if cpp_round:
        stochastic_round(updated, weight, spec.seed, name, spec.step)
    else:
        weight.copy_(stochastic_round_ref(updated, weight.dtype, spec.seed, name, spec.step))


def cpu_update_comparison(repeats: int = 5) -> list[dict[str, object]]:
    """Fused C++ full-rank update vs the unfused torch path, one core, 1536 × 1536, values/s = K·numel/time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the C++ kernels follow torch's setting
    rows: list[dict[str, object]] = []
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for members in (8, 32):
                weight = (torch.randn(1536, 1536) * 0.02).to(dtype)
                spec = NoiseSpec(seed=1234, step=7, antithetic=True)
                coeffs = torch.randn(members, dtype=torch.float64) / members
                args = (weight, spec, coeffs, 1e-3)
                paths: dict[str, Callable[[], None]] = {
                    "fused_cpp": partial(es_update, *args, 1.0, "full", 1, "bench.weight", backend="cpu"),
                    "unfused_torch_round": partial(_unfused_full_update, *args, "bench.weight", False)}
                if dtype != torch.float32:
                    paths["unfused_cpp_round"] = partial(_unfused_full_update, *args, "bench.weight", True)
                row: dict[str, object] = {"label": "cpu fused vs unfused (1 thread)", "shape": [1536, 1536],
                                          "dtype": str(dtype).removeprefix("torch."), "mode": "full",
                                          "members": members, "noise_indices": members // 2}
                values = members // 2 * weight.numel()
                times: dict[str, list[float]] = {path: [] for path in paths}
                for _ in range(repeats):  # round-robin, so load from other processes hits every path alike
                    for path, fn in paths.items():
                        times[path].extend(time_cpu(fn, 1))
                for path, ms_all in times.items():
                    row[f"{path}_ms_all"] = ms_all
                    row[f"{path}_values_per_s"] = values / (statistics.median(ms_all) * 1e-3)
                row["speedup_vs_unfused_torch_round"] = (row["fused_cpp_values_per_s"]
                                                         / row["unfused_torch_round_values_per_s"])
                rows.append(row)
                print(f"cpu 1 thread full (1536, 1536) {row['dtype']:9s} N={members:<3d} "
                      + "  ".join(f"{p} {row[f'{p}_values_per_s'] / 1e6:7.1f} Mvalues/s" for p in paths)
                      + f"  fused/unfused {row['speedup_vs_unfused_torch_round']:.1f}x")
    finally:
        torch.set_num_threads(threads)
    return rows


def _copy_bandwidth(numel: int, dtype: torch.dtype) -> float:
    """GB/s of a device-to-device copy (read + write) of ``numel`` elements: the roofline we compare to."""
    src = torch.empty(numel, dtype=dtype, device="cuda")
    dst = torch.empty_like(src)
    ms = statistics.median(time_gpu(lambda: dst.copy_(src)))
    return 2 * numel * src.element_size() / (ms * 1e-3) / 1e9


def run(quick: bool, cpu_update_only: bool = False) -> dict[str, object]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cpu_update_only:
        return {"benchmark": "ops_update", "quick": quick, "environment": _environment("cpu"),
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": cpu_update_comparison()}
    if device == "cpu":  # the torch CPU path would take minutes per call at the vocabulary shape
        shapes = QUICK_SHAPES if quick else {k: v for k, v in SHAPES.items() if k != "embed/lm_head"}
    else:
        shapes = {k: v for k, v in SHAPES.items() if not quick or k != "embed/lm_head"}
    members_list = (8, 32) if quick and device == "cpu" else MEMBERS
    rows: list[dict[str, object]] = []
    for label, shape in shapes.items():
        for dtype in (torch.bfloat16, torch.float32):
            copy_bw = _copy_bandwidth(shape[0] * shape[1], dtype) if device == "cuda" else None
            for mode in ("lowrank", "full"):
                for members in members_list:
                    row = _case(shape, dtype, mode, members, device, repeats=3 if quick else 5)
                    row["label"], row["copy_bandwidth_GBps"] = label, copy_bw
                    if copy_bw:
                        row["fraction_of_copy_bandwidth"] = row["bandwidth_GBps"] / copy_bw
                    rows.append(row)
                    _print(row)
    if device == "cuda":  # tile / precision variants at the headline case
        copy_bw = _copy_bandwidth(8960 * 1536, torch.bfloat16)
        for variant in VARIANTS:
            try:
                row = _case((8960, 1536), torch.bfloat16, "lowrank", 32, device, 0, variant)
                row["fraction_of_copy_bandwidth"] = row["bandwidth_GBps"] / copy_bw
            except Exception as err:  # noqa: BLE001 - a variant that does not compile is data too
                row = {"variant": variant, "error": repr(err)}
            rows.append(row)
            _print(row)
    if device == "cpu":
        rows.extend(cpu_update_comparison())
    return {"benchmark": "ops_update", "quick": quick, "environment": _environment(device),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": rows}


def _print(row: dict[str, object]) -> None:
    if "error" in row:
        print(f"variant {row['variant']}: {row['error']}")
        return
    extra = ""
    if row.get("fraction_of_copy_bandwidth") is not None:
        extra = f"  {100 * row['fraction_of_copy_bandwidth']:5.1f}% of copy"
    if row["noise_values_per_s"]:
        extra += f"  {row['noise_values_per_s'] / 1e9:8.2f} Gvalues/s"
    print(f"{row['mode']:8s} {str(tuple(row['shape'])):15s} {row['dtype']:9s} N={row['members']:<4d} "
          f"{row['median_ms']:9.3f} ms  {row['bandwidth_GBps']:8.1f} GB/s{extra}  {row.get('variant', '')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes on CPU, no vocabulary shape on GPU")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    parser.add_argument("--cpu-update", action="store_true",
                        help="only the one-core comparison of the fused C++ update with the unfused torch path")
    args = parser.parse_args()
    result = run(args.quick, args.cpu_update)
    print(f"wrote {write_result('ops_update', result, str(result['environment']['device']), args.out)}")


if __name__ == "__main__":
    main()
