"""Run every benchmark of bench/ that applies to this device, each in its own process.

    python -m bench [--quick] [--only NAME ...]

Each module runs as ``python -m bench.<name> [--quick]``, in a subprocess so that one crash, a
CUDA error or leaked memory cannot spoil the next measurement. Missing modules are skipped; a
module that declares ``DEVICES = ("cuda",)`` (a literal tuple at top level) is skipped on other
devices. A failing benchmark does not stop the others; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
MODULES = ("noise", "attention", "ops_linear", "ops_update", "generate", "distributed")


def declared_devices(path: Path) -> tuple[str, ...] | None:
    """The module's top-level ``DEVICES`` literal, read without importing it (None: every device)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None  # let the run report the problem
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DEVICES" for t in node.targets):
            try:
                return tuple(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="passed through to every benchmark")
    parser.add_argument("--only", nargs="+", choices=MODULES, help="run only these benchmarks")
    args = parser.parse_args(argv)
    from bench.common import current_device  # lazily: it imports torch

    device = current_device()
    status: dict[str, str] = {}
    for name in args.only or MODULES:
        path = BENCH_DIR / f"{name}.py"
        if not path.is_file():
            status[name] = "skipped (missing)"
            continue
        devices = declared_devices(path)
        if devices is not None and device not in devices:
            status[name] = f"skipped (needs {', '.join(devices)})"
            continue
        command = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if args.quick else [])
        print(f"=== {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(command, cwd=BENCH_DIR.parent).returncode
        elapsed = time.perf_counter() - start
        status[name] = f"ok ({elapsed:.0f} s)" if code == 0 else f"FAILED (exit {code}, {elapsed:.0f} s)"
    print(f"=== summary ({device})")
    for name, line in status.items():
        print(f"  {name:12s} {line}")
    return 1 if any(line.startswith("FAILED") for line in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
