"""Drive the selected cases in this process and return JSON-ready records of cases and builds."""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
import warnings
from typing import Any

from bench.compile import cases as case_list
from bench.compile import driver, patches, stats


def select(all_cases: list[case_list.Case], subset: bool, only: str | None,
           shard: tuple[int, int] | None) -> list[case_list.Case]:
    """The cases to run: the subset and/or those matching ``only``, then this shard's contiguous slice.

    Contiguous slices keep cases that share kernels (one op, dtype and mode) in one process.
    """
    chosen = [c for c in all_cases if (not subset or c.subset) and (not only or re.search(only, c.name))]
    if shard is None:
        return chosen
    index, count = shard
    per = -(-len(chosen) // count)
    return chosen[index * per:(index + 1) * per]


def run(arch: int, subset: bool, only: str | None, shard: tuple[int, int] | None, cache_dir: str,
        verbose: bool) -> dict[str, Any]:
    """Compile the selected cases for ``arch``; {"cases": [...], "kernels": [...], "versions": {...}}."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    # Triton 3.9 warns that its FP-fusion default will change; setting the variable would change the
    # cache key that the real launches (which do not set it) look up, so only the warning is silenced.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    os.environ.setdefault("FASTES_DISABLE_EXTENSION", "1")  # the C++ extension plays no part here
    triton = driver.install(arch)
    import torch

    patch_notes = patches.apply(case_list.DEVICE_CHECKS)
    selected = select(case_list.build_cases(), subset, only, shard)
    rec = driver.REC
    case_rows = []
    for case in selected:
        rec.case, rec.errors = case.name, []
        first_build, first_launch = len(rec.builds), len(rec.launches)
        start = time.perf_counter()
        error = ""
        try:
            case.run()
        except Exception as err:  # noqa: BLE001 - every failure is a row of the report
            error = f"{type(err).__name__}: {err}".strip()
            if verbose:
                traceback.print_exc()
        error = "; ".join([error] + rec.errors if error else rec.errors)
        seconds = time.perf_counter() - start
        launches = rec.launches[first_launch:]
        case_rows.append({"name": case.name, "ok": not error, "error": error, "seconds": round(seconds, 2),
                          "builds": len(rec.builds) - first_build,
                          "launches": [[kernel, list(grid), build] for _, kernel, grid, build in launches]})
        status = "ok" if not error else "FAIL"
        print(f"[{status:4}] {seconds:6.1f}s {case.name} (+{len(rec.builds) - first_build} builds)",
              file=sys.stderr, flush=True)
        if error:
            print(f"       {error.splitlines()[0][:300]}", file=sys.stderr, flush=True)
    kernels = []
    for build in rec.builds:
        row = stats.describe(build)
        row["hash"] = build.hash
        kernels.append(row)
    return {"versions": {"triton": triton.__version__, "torch": torch.__version__, "arch": arch,
                         "ptxas": stats.find_ptxas()},
            "patch_warnings": patch_notes, "cases": case_rows, "kernels": kernels}
