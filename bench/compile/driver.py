"""A stand-in Triton driver that reports an sm_90 GPU, records every compile and every launch.

Triton compiles for whatever target its active driver reports; nothing in the compiler needs a
device. This driver reports CUDA capability ``arch``; ``triton.compiler.compile`` is wrapped so each
compile runs for real and is recorded with its ptxas log, and the launch that would follow records
its grid instead. Autotuned kernels compile every config: the benchmarker runs each candidate once
(compiling it) and reports a zero time, so the gate sees exactly the configs the autotuner would time.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Build:
    """One compiled kernel: what Triton built, how, and where it was launched."""

    case: str
    kernel: str
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    shared: int
    compile_s: float
    ptx: str = ""
    ptxas_log: str = ""
    launches: list[tuple[str, tuple[int, int, int]]] = field(default_factory=list)
    scratch: int = 0
    hash: str = ""  # Triton's compile key: equal in every process that builds the same kernel


@dataclass
class Recorder:
    """What the driver saw while one case ran (``case`` names the case being driven)."""

    case: str = ""
    builds: list[Build] = field(default_factory=list)
    launches: list[tuple[str, str, tuple[int, int, int], str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ptxas_logs: list[str] = field(default_factory=list)


REC = Recorder()


def _benchmarker(kernel_call: Callable[[], None], quantiles: Any = None, **_: Any) -> list[float]:
    """Autotuner stand-in: compile the candidate by calling it once; every config 'takes' 0 ms.

    A compile error is recorded before it is re-raised (the autotuner would silently drop the config).
    """
    try:
        kernel_call()
    except Exception as err:  # noqa: BLE001 - recorded, then raised to the autotuner as it expects
        REC.errors.append(f"autotune config: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
        raise
    return [0.0] * (len(quantiles) if quantiles else 1)


def _make_driver(arch: int) -> Any:
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)

    class Sm90Driver:
        """Reports one CUDA device of capability ``arch``; launches nothing (duck-typed: DriverBase
        differs between Triton versions and its constructor probes a real device)."""

        def is_active(self) -> bool:
            return True

        def get_current_target(self) -> Any:
            return target

        def get_current_device(self) -> int:
            return 0

        def set_current_device(self, device: int) -> None:
            pass

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

        def get_active_torch_device(self) -> Any:
            import torch
            return torch.device("meta")

        def get_device_interface(self) -> Any:
            import torch
            return torch.cuda

        def get_benchmarker(self) -> Callable[..., list[float]]:
            return _benchmarker

        def get_empty_cache_for_benchmark(self) -> Any:
            import torch
            return torch.empty(0, device="meta")

        def clear_cache(self, cache: Any) -> None:
            pass

        def map_python_to_cpp_type(self, ty: str) -> str:
            from triton.backends.nvidia.driver import ty_to_cpp
            return ty_to_cpp(ty)

    return Sm90Driver()


class _Recorded:
    """Takes a CompiledKernel's place after compilation: metadata passes through, launches are noted."""

    def __init__(self, real: Any, build: Build) -> None:
        self._real = real
        self._build = build
        self.function = None
        self.packed_metadata = None

    def launch_metadata(self, *args: Any, **kwargs: Any) -> None:
        return None

    def run(self, *args: Any, **kwargs: Any) -> None:
        grid = (int(args[0]), int(args[1]), int(args[2]))
        REC.launches.append((REC.case, self._build.kernel, grid, self._build.hash))
        self._build.launches.append((REC.case, grid))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _meta(md: Any, key: str, default: Any = None) -> Any:
    return md.get(key, default) if isinstance(md, dict) else getattr(md, key, default)


def _constexprs(src: Any) -> dict[str, Any]:
    names = list(src.fn.arg_names)
    out: dict[str, Any] = {}
    for key, value in src.constants.items():
        idx = key[0] if isinstance(key, tuple) else key
        name = names[idx] if isinstance(idx, int) and idx < len(names) else str(key)
        v = getattr(value, "value", value)
        out[name] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return out


def _keep_log(key: str, log: str) -> str:
    """Store a fresh ptxas log beside the Triton cache, or fetch the stored one on a cache hit (no ptxas ran)."""
    cache = os.environ.get("TRITON_CACHE_DIR")
    if not cache or not key:
        return log
    path = os.path.join(cache, "fastes-ptxas-logs", f"{key}.txt")
    if log:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(log)
        os.replace(path + ".tmp", path)
        return log
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return ""


def _wrap_compile() -> None:
    import triton.compiler as tc

    real = tc.compile

    @functools.wraps(real)
    def compile_and_record(src: Any, *args: Any, **kwargs: Any) -> Any:
        REC.ptxas_logs = []
        start = time.perf_counter()
        kernel = real(src, *args, **kwargs)
        md = kernel.metadata
        build = Build(case=REC.case, kernel=str(_meta(md, "name", src.fn.__name__)), constexprs=_constexprs(src),
                      num_warps=int(_meta(md, "num_warps", 0)), num_stages=int(_meta(md, "num_stages", 0)),
                      shared=int(_meta(md, "shared", 0) or 0), compile_s=time.perf_counter() - start,
                      ptx=kernel.asm.get("ptx", ""), scratch=int(_meta(md, "global_scratch_size", 0) or 0),
                      hash=str(_meta(md, "hash", "")))
        build.ptxas_log = _keep_log(build.hash, next((log for log in reversed(REC.ptxas_logs) if log.strip()), ""))
        REC.builds.append(build)
        return _Recorded(kernel, build)

    tc.compile = compile_and_record
    try:
        import triton.compiler.compiler as tcc
        tcc.compile = compile_and_record
    except ImportError:
        pass


def _capture_ptxas_log() -> None:
    """Keep the ``ptxas -v`` log Triton writes to a temporary file (and deletes) for each cubin."""
    import triton.backends.nvidia.compiler as nvc

    real = nvc.subprocess

    class Subprocess:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def run(cmd: Any, *args: Any, **kwargs: Any) -> Any:
            result = real.run(cmd, *args, **kwargs)
            exe = os.path.basename(str(cmd[0])) if isinstance(cmd, (list, tuple)) and cmd else ""
            if exe.startswith("ptxas"):
                err = kwargs.get("stderr")
                name = getattr(err, "name", None)
                if isinstance(name, str) and os.path.exists(name):
                    if hasattr(err, "flush"):
                        err.flush()
                    with open(name, encoding="utf-8", errors="replace") as f:
                        REC.ptxas_logs.append(f.read())
            return result

    nvc.subprocess = Subprocess()


def install(arch: int) -> Any:
    """Make ``arch`` the current Triton target and start recording; returns the triton module."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.runtime.driver import driver

    driver.set_active(_make_driver(arch))
    _wrap_compile()
    _capture_ptxas_log()
    return triton
