"""What fails the gate: a compile error, shared memory over one CTA's limit, spills in a hot kernel.

Spills in the hot kernels (``cases.HOT_KERNELS``) fail unless ``ALLOWED_SPILLS`` lists the kernel
with a reason and a byte ceiling: a known finding being fixed, never a silent exemption. Each entry
should be deleted when its fix lands; a listed kernel that spills more than its ceiling still fails,
and an entry that no longer matches any spilling build is reported as stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.compile.stats import SMEM_PER_BLOCK


@dataclass(frozen=True)
class Allowed:
    """Spills tolerated for now in builds of ``kernel`` whose constexprs include ``where``."""

    kernel: str
    where: tuple[tuple[str, Any], ...]
    max_bytes: int
    reason: str

    def matches(self, build: dict[str, Any]) -> bool:
        c = build.get("constexprs", {})
        return build["kernel"] == self.kernel and all(c.get(k) == v for k, v in self.where)


# Known spills at the time the gate was written (issue 15 findings; being fixed in fastes/ops).
ALLOWED_SPILLS: tuple[Allowed, ...] = (
    Allowed("_noise_fill_kernel", (("KIND", 0),), 16, "Gaussian fill: a few bytes around the Box-Muller call"),
    Allowed("_prefill_kernel", (("IEEE", True),), 16, "fp32 prefill at head_dim 64 on Triton 3.6: 4 B"),
    Allowed("_gemm_kernel", (("PREC", "ieee"),), 96,
            "fp32 GEMM configs (ieee dots on the CUDA cores, BK = 32): 4-44 B; the bf16 path does not spill"),
)


def spill_bytes(build: dict[str, Any]) -> int:
    return int(build.get("spill_stores") or 0) + int(build.get("spill_loads") or 0)


def verdict(build: dict[str, Any], hot: frozenset[str]) -> tuple[str, str]:
    """("ok" | "allowed" | "FAIL", why) for one compiled kernel record."""
    if build["smem"] > SMEM_PER_BLOCK:
        return "FAIL", f"shared memory {build['smem']} B > {SMEM_PER_BLOCK} B per CTA"
    spilled = int(build.get("spill_stores") or 0)
    if build["kernel"] not in hot or not spilled:
        return "ok", ""
    for entry in ALLOWED_SPILLS:
        if entry.matches(build):
            if spill_bytes(build) <= entry.max_bytes:
                return "allowed", f"spills {spilled} B (allowed: {entry.reason})"
            return "FAIL", f"spills {spill_bytes(build)} B st+ld > the {entry.max_bytes} B allowed ({entry.reason})"
    return "FAIL", f"hot kernel spills {spilled} B"


def stale_allowances(builds: list[dict[str, Any]]) -> list[str]:
    """Allowlist entries that match no spilling build of this run (candidates for deletion)."""
    stale = []
    for entry in ALLOWED_SPILLS:
        seen = [b for b in builds if entry.matches(b)]
        if seen and not any(b.get("spill_stores") for b in seen):
            stale.append(f"{entry.kernel} {dict(entry.where)}: no longer spills; delete its ALLOWED_SPILLS entry")
    return stale
