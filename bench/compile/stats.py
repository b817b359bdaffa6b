"""What a compiled kernel costs on an H100: registers, spills, shared memory, occupancy, MMA kind.

Registers and spills come from ptxas's own ``-v`` log (the one Triton produced the cubin with); if
that was not seen (a Triton cache hit), ptxas -v runs again on the kernel's PTX. Occupancy follows
the CUDA occupancy rules for compute capability 9.0.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

# H100 SXM (sm_90) per-SM limits
SMS = 132
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 233472          # 228 KB
SMEM_PER_BLOCK = 232448       # 227 KB, the opt-in maximum for one CTA
SMEM_RESERVED_PER_CTA = 1024
REG_ALLOC_UNIT = 256          # registers are allocated per warp in units of 256


@dataclass
class Usage:
    regs: int | None
    spill_stores: int | None
    spill_loads: int | None
    stack: int | None
    source: str  # "triton" (Triton's ptxas log), "rerun" (ptxas -v again: Triton's extra options missing) or "none"


def parse_ptxas(log: str, source: str) -> Usage:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack, st, ld = (int(g) for g in spills.groups()) if spills else (None, None, None)
    return Usage(int(regs.group(1)) if regs else None, st, ld, stack, source if regs else "none")


def find_ptxas(arch: int = 90) -> str | None:
    """The ptxas Triton itself uses for ``arch`` (3.9 picks its newer bundled ptxas-blackwell even for
    sm_90, and a PTX it wrote may need that version), else the bundled ptxas, $TRITON_PTXAS_PATH or PATH."""
    import triton
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        own = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - another Triton layout: fall back to the usual places
        own = None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    for cand in (own, os.environ.get("TRITON_PTXAS_PATH"), bundled, shutil.which("ptxas")):
        if cand and os.path.exists(cand):
            return cand
    return None


def usage(ptxas_log: str, ptx: str) -> Usage:
    """Register and spill counts of one kernel, from its ptxas log or a fresh ``ptxas -v``."""
    if ptxas_log:
        found = parse_ptxas(ptxas_log, "triton")
        if found.regs is not None:
            return found
    ptxas = find_ptxas()
    if not ptx or ptxas is None:
        return Usage(None, None, None, None, "none")
    target = re.search(r"^\s*\.target\s+(\S+)", ptx, re.M)
    arch = target.group(1).rstrip(",") if target else "sm_90a"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w", encoding="utf-8") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=False)
    return parse_ptxas(done.stderr, "rerun")


def occupancy(regs: int | None, num_warps: int, shared: int) -> tuple[int, str]:
    """(resident CTAs per SM, the limiting resource) for one kernel."""
    limits = {"warps": MAX_WARPS_PER_SM // max(num_warps, 1), "ctas": MAX_CTAS_PER_SM}
    if regs:
        per_warp = math.ceil(regs * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        limits["regs"] = (REGS_PER_SM // per_warp) // max(num_warps, 1)
    if shared:
        limits["smem"] = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA)
    limiter = min(limits, key=lambda k: limits[k])
    return limits[limiter], limiter


def mma_kind(ptx: str) -> str:
    """Which matrix instructions the kernel uses: wgmma (Hopper tensor cores), mma.sync, or none."""
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.(\w+)\.(\w+)\.(\w+)", ptx)))
    mma = sorted(set(re.findall(r"mma\.sync\.aligned\.m\d+n\d+k\d+\.row\.col\.(\w+)\.(\w+)\.(\w+)", ptx)))
    kinds = []
    if wgmma:
        kinds.append("wgmma " + ",".join(".".join(t) for t in wgmma))
    if mma:
        kinds.append("mma.sync " + ",".join(".".join(t) for t in mma))
    return "; ".join(kinds) or "-"


def describe(build: Any) -> dict[str, Any]:
    """The JSON record of one build (a driver.Build)."""
    use = usage(build.ptxas_log, build.ptx)
    ctas, limiter = occupancy(use.regs, build.num_warps, build.shared)
    grids = [list(g) for _, g in build.launches]
    return {
        "kernel": build.kernel, "case": build.case, "constexprs": build.constexprs,
        "num_warps": build.num_warps, "num_stages": build.num_stages, "regs": use.regs,
        "spill_stores": use.spill_stores, "spill_loads": use.spill_loads, "stack": use.stack,
        "ptxas_source": use.source, "smem": build.shared, "ctas_per_sm": ctas, "occupancy_limiter": limiter,
        "grid": grids[0] if grids else None, "programs": math.prod(grids[0]) if grids else None,
        "launches": [[case, list(g)] for case, g in build.launches], "mma": mma_kind(build.ptx),
        "global_scratch": build.scratch, "compile_s": round(build.compile_s, 2),
    }
