"""Compile every fastes Triton kernel for sm_90 on this machine (no GPU needed) and gate on the result.

    python -m bench.compile                  # every case; writes bench/results/compile-sm90-<triton>.json
    python -m bench.compile --subset         # the quick representative subset (make test)
    python -m bench.compile --only 'lora|attn decode' --jobs 2 --json out.json
    python -m bench.compile --list           # case names (* marks the subset)

Exit status: 0 when every case compiled and no kernel breaks the policy (bench/compile/policy.py),
1 otherwise, 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _pattern(text: str) -> str:
    try:
        re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"--only is not a regular expression: {err}") from None
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.splitlines()[0])
    ap.add_argument("--subset", action="store_true", help="only the representative subset (make test)")
    ap.add_argument("--only", type=_pattern, help="regular expression: only the cases whose name matches")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--jobs", type=_positive, default=1, help="compile in this many processes (default 1)")
    ap.add_argument("--arch", type=int, default=90, choices=(80, 89, 90), help="CUDA capability (default 90)")
    ap.add_argument("--json", help="write the report here (default for a full run: "
                                   "bench/results/compile-sm90-<triton>.json; none for --subset/--only)")
    ap.add_argument("--cache-dir", help="Triton cache to fill and keep (default: a fresh temporary one)")
    ap.add_argument("--shard", type=_shard, help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)  # a child process writes its records here
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failing cases")
    return ap.parse_args(argv)


def _children(args: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    """Run ``--jobs`` shard processes and merge their records (builds deduplicated by compile hash)."""
    procs, parts = [], []
    tmp = tempfile.mkdtemp(prefix="fastes-compile-")
    for i in range(args.jobs):
        part = os.path.join(tmp, f"part{i}.json")
        cmd = [sys.executable, "-m", "bench.compile", "--shard", f"{i}/{args.jobs}", "--part", part,
               "--arch", str(args.arch), "--cache-dir", cache_dir]  # one cache: Triton writes it atomically
        cmd += (["--subset"] if args.subset else []) + (["--only", args.only] if args.only else [])
        cmd += ["-v"] if args.verbose else []
        procs.append(subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2]))
        parts.append(part)
    codes = [p.wait() for p in procs]
    merged: dict[str, Any] = {"cases": [], "kernels": [], "patch_warnings": []}
    seen: dict[str, dict[str, Any]] = {}
    for i, (part, code) in enumerate(zip(parts, codes, strict=True)):
        if not os.path.exists(part):
            merged["cases"].append({"name": f"(shard {i} crashed, exit {code})", "ok": False,
                                    "error": f"shard {i} exited {code} without a report", "seconds": 0,
                                    "builds": 0, "launches": []})
            continue
        with open(part, encoding="utf-8") as f:
            data = json.load(f)
        merged["versions"] = data["versions"]
        merged["cases"] += data["cases"]
        merged["patch_warnings"] = sorted(set(merged["patch_warnings"]) | set(data["patch_warnings"]))
        for row in data["kernels"]:
            if row["hash"] in seen:
                seen[row["hash"]]["launches"] += row["launches"]
            else:
                seen[row["hash"]] = row
                merged["kernels"].append(row)
    return merged


def _table(kernels: list[dict[str, Any]]) -> str:
    keys = ("MODE", "KIND", "BM", "BN", "BK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "R_PAD", "RP", "R", "KC",
            "IEEE", "PREC", "PRECISION", "NUM_SPLITS", "GROUPS", "BLOCK", "BLOCK_H", "TOK", "RB", "LOWRANK", "OUT",
            "ELEMENTWISE", "HAS_NOISE")
    head = f"{'kernel':<20} {'config':<44} {'w/s':>5} {'regs':>4} {'spill st/ld':>11} {'smem':>6} " \
           f"{'CTA/SM':>11} {'programs':>8} {'mma':<6} verdict"
    lines = [head, "-" * len(head)]
    for k in kernels:
        cfg = " ".join(f"{n}={k['constexprs'][n]}" for n in keys if n in k["constexprs"])
        spill = f"{k['spill_stores']}/{k['spill_loads']}" if k["spill_stores"] is not None else "?"
        occ = f"{k['ctas_per_sm']} ({k['occupancy_limiter']})"
        mma = "wgmma" if k["mma"].startswith("wgmma") else "mma" if k["mma"].startswith("mma") else "-"
        verdict = k["verdict"] + (f": {k['why']}" if k["why"] else "")
        lines.append(f"{k['kernel'][:20]:<20} {cfg[:44]:<44} {k['num_warps']:>2}/{k['num_stages']:<2} "
                     f"{k['regs'] if k['regs'] is not None else '?':>4} {spill:>11} {k['smem']:>6} {occ:>11} "
                     f"{k['programs'] if k['programs'] is not None else '-':>8} {mma:<6} {verdict[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.compile import cases as case_list
    from bench.compile import policy, runner

    if args.list:
        os.environ.setdefault("FASTES_DISABLE_EXTENSION", "1")
        for case in runner.select(case_list.build_cases(), args.subset, args.only, None):
            print(("* " if case.subset else "  ") + case.name)
        return 0
    start = time.perf_counter()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="fastes-triton-cache-")
    if args.part:
        data = runner.run(args.arch, args.subset, args.only, args.shard, cache_dir, args.verbose)
        with open(args.part, "w", encoding="utf-8") as f:
            json.dump(data, f)
        return 0
    if args.jobs > 1:
        data = _children(args, cache_dir)
    else:
        data = runner.run(args.arch, args.subset, args.only, None, cache_dir, args.verbose)
    if not data["cases"]:
        print("no case matches", file=sys.stderr)
        return 2
    for k in data["kernels"]:
        k["verdict"], k["why"] = policy.verdict(k, case_list.HOT_KERNELS)
        k["hot"] = k["kernel"] in case_list.HOT_KERNELS
    failed = [c for c in data["cases"] if not c["ok"]]
    bad = [k for k in data["kernels"] if k["verdict"] == "FAIL"]
    allowed = [k for k in data["kernels"] if k["verdict"] == "allowed"]
    stale = policy.stale_allowances(data["kernels"]) if not (args.subset or args.only) else []
    versions = data.get("versions", {})
    print(f"triton {versions.get('triton')}, torch {versions.get('torch')}, sm_{args.arch}, "
          f"ptxas {versions.get('ptxas')}")
    print(_table(data["kernels"]))
    for c in failed:
        print(f"COMPILE FAILED  {c['name']}: {c['error'][:400]}")
    for line in data.get("patch_warnings", []) + stale:
        print(f"note: {line}")
    summary = {"cases": len(data["cases"]), "failed_cases": len(failed), "builds": len(data["kernels"]),
               "policy_failures": len(bad), "allowed_spills": len(allowed),
               "spilling_builds": sum(1 for k in data["kernels"] if k["spill_stores"]),
               "max_smem": max((k["smem"] for k in data["kernels"]), default=0),
               "wall_s": round(time.perf_counter() - start, 1)}
    print(f"\n{summary['builds']} distinct builds in {summary['cases']} cases: {len(failed)} case(s) failed to "
          f"compile, {len(bad)} build(s) break the policy, {len(allowed)} allowed spill(s) "
          f"(bench/compile/policy.py), max smem {summary['max_smem']} B; {summary['wall_s']} s")
    out = args.json or (None if (args.subset or args.only) else
                        str(RESULTS / f"compile-sm{args.arch}-{versions.get('triton')}.json"))
    if out:
        data.update(summary=summary, arch=args.arch, allowed_spills=[
            {"kernel": a.kernel, "where": dict(a.where), "max_bytes": a.max_bytes, "reason": a.reason}
            for a in policy.ALLOWED_SPILLS])
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        print(f"wrote {out}")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
