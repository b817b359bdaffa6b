"""Noise generation throughput (values/s) of every backend of the noise op.

    python -m bench.noise [--quick]

GPU: Triton (per-block kernel, and its element-wise variant that later kernels reuse), the CUDA
extension when built, and as speed references torch.randn / bernoulli_ (not our stream) and a
plain ``fill_`` (the write-only memory floor), timed with triton.testing.do_bench (median).
CPU: the torch reference vs the C++ extension when built (wall clock, median); only their ratio
means something. Writes JSON (device, versions, git commit, raw timings) to
bench/results/noise-<device>-<timestamp>.json.

Two numbers (H100 SXM: ~3.3 TB/s HBM, ~60 TFLOP/s fp32 on CUDA cores, int32 ops at about half):

* bytes: the fill writes 4 B/value and reads nothing: 2**24 values = 64 MiB -> ~20 us, i.e. a
  memory floor of ~825 Gvalues/s.
* ops: a Philox4x32-10 call is ~100 int ops (20 mul.hi/mul.lo pairs, 40 xor, key adds).
  Gaussian per block (4 values): ~25 int ops/value + Box-Muller ~40 fp ops/value (log,
  sqrt_rn, sin or cos, scaling) ~= 65 ops -> ~1.1-2 ps/value at 60 TFLOP/s (int at half rate):
  ~20-35 us per 2**24, about the memory time, so Gaussians sit at the ridge: expect
  0.5-0.8x the fill floor. Element-wise Gaussians (~140 ops/value) are compute-bound, ~2-3x
  slower. Rademacher: one Philox call per 32-bit word, ~6 ops/value -> ~0.1 ps/value:
  memory-bound, expect ~the fill floor.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from bench.common import current_device, device_name, git_commit, time_cpu, time_gpu, triton_version, write_result
from fastes import _backend
from fastes.noise import tensor_id
from fastes.ops import noise as ops

SEED, STEP, INDEX = 2**64 - 1, 3, 7
TID = tensor_id("model.layers.0.mlp.up_proj.weight")


def cases(device: str, n: int) -> list[tuple[str, str, Callable[[], object]]]:
    """(backend, kind, thunk) for everything that can run here; all fill one preallocated buffer."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    ext = _backend.extension()
    rows: list[tuple[str, str, Callable[[], object]]] = []
    for kind in ("gaussian", "rademacher"):
        args = (SEED, TID, INDEX, STEP, 0, kind)
        if device == "cuda":
            if ops.triton is not None:
                rows.append(("triton", kind, lambda a=args: ops.noise_fill_triton(out, *a)))
                rows.append(
                    ("triton-elementwise", kind, lambda a=args: ops.noise_fill_triton(out, *a, elementwise=True))
                )
            if _backend.extension_has_cuda():
                rows.append(("cuda-ext", kind, lambda a=args: ops.noise_fill(out, *a, backend="cuda")))
            if kind == "gaussian":
                rows.append(("torch.randn (other stream)", kind, lambda: torch.randn(n, out=out)))
            else:
                rows.append(("bernoulli_ (other stream)", kind, lambda: out.bernoulli_(0.5)))
        else:
            rows.append(("torch-reference", kind, lambda a=args: ops.noise_fill(out, *a, backend="torch")))
            if ext is not None:
                rows.append(("cpp-ext", kind, lambda a=args: ops.noise_fill(out, *a, backend="cpp")))
    rows.append(("fill_ (write floor)", "-", lambda: out.fill_(1.0)))
    return rows


def check_once(device: str) -> None:
    """Refuse to time a backend that disagrees with the reference (small window, far into the stream)."""
    n, offset = 4096, 2**31 + 3
    for kind in ("gaussian", "rademacher"):
        want = ops.noise_fill(torch.empty(n), SEED, TID, INDEX, STEP, offset, kind, backend="torch")
        backends = ["auto"] + (["cuda"] if device == "cuda" and _backend.extension_has_cuda() else [])
        for backend in backends:
            out = torch.full((n,), float("nan"), device=device)
            got = ops.noise_fill(out, SEED, TID, INDEX, STEP, offset, kind, backend=backend).cpu()
            err = (got - want).abs().max().item()
            if not err <= 1e-5:  # NaN fails too
                raise SystemExit(f"{device} {kind} backend {backend!r} disagrees with the reference: max |err| = {err}")


def run(quick: bool) -> dict[str, object]:
    device = current_device()
    check_once(device)
    if device == "cuda":
        n = 2**24 if quick else 2**26
        timer = time_gpu
    else:
        n = 2**18 if quick else 2**20
        timer = lambda fn: time_cpu(fn, 3 if quick else 10)
    rows = []
    floor_ms = None
    measured = [(b, k, timer(fn)) for b, k, fn in cases(device, n)]
    for _, kind, times in measured:
        if kind == "-":
            floor_ms = statistics.median(times)
    print(f"{device_name(device)}: {n} values per call, median of {len(measured[0][2])}+ timings")
    print(f"{'backend':28s} {'kind':11s} {'ms':>9s} {'Mvalues/s':>10s} {'GB/s':>8s} {'x fill_':>9s}")
    for backend, kind, times in measured:
        ms = statistics.median(times)
        mvals = n / (ms * 1e-3) / 1e6
        ratio = (floor_ms / ms) if floor_ms else float("nan")
        print(f"{backend:28s} {kind:11s} {ms:9.4f} {mvals:10.1f} {4e-3 * mvals:8.2f} {ratio:9.2f}")
        rows.append(dict(backend=backend, kind=kind, n=n, median_ms=ms, values_per_s=mvals * 1e6, times_ms=times))
    return dict(
        bench="noise",
        device=device_name(device),
        device_type=device,
        torch=torch.__version__,
        triton=triton_version(),
        extension=_backend.extension() is not None,
        extension_cuda=_backend.extension_has_cuda(),
        git_commit=git_commit(dirty=False),
        quick=quick,
        threads=torch.get_num_threads(),
        timings=rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print(f"wrote {write_result('noise', result, str(result['device']))}")


if __name__ == "__main__":
    main()
