"""Instructions per loop iteration in the sm_90 SASS of compiled kernels (bench/gpu_model.py's loop counts).

    python -m bench.compile --only 'linear full rademacher bf16 qwen2.5-1.5b up T=512' --cache-dir /tmp/tc
    python -m bench.compile.sass /tmp/tc _full_gemm_kernel

Disassembles every ``<kernel>.cubin`` of a Triton cache with the bundled ``nvdisasm`` and prints, per
build (its tiles read from the TTGIR, its warps and stages from the metadata), each loop that holds an
MMA: its instruction count per thread and iteration, split into the INT32 ALU pipe (``ALU``) and the rest,
and the most frequent opcodes. A loop is a backward branch to a label; the listing is static, so
nothing here is a timing.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ALU = frozenset({"LOP3", "SEL", "ISETP", "SHF", "IADD3", "LEA", "PLOP3", "VIADD", "SGXT", "PRMT", "FSEL", "IABS",
                 "BMSK", "SHL", "SHR", "IMNMX", "VIMNMX"})


@dataclass
class Loop:
    """One loop of a SASS listing: its instruction range and the count of each opcode in it."""

    start: int
    end: int
    opcodes: collections.Counter[str]

    @property
    def size(self) -> int:
        return sum(self.opcodes.values())

    @property
    def alu(self) -> int:
        return sum(n for op, n in self.opcodes.items() if op.split(".")[0] in ALU)

    @property
    def mma(self) -> int:
        return sum(n for op, n in self.opcodes.items() if "MMA" in op)


def loops(listing: str) -> list[Loop]:
    """The loops (backward branches to a label) of an ``nvdisasm -c`` listing, innermost not merged."""
    ops: list[str] = []
    labels: dict[str, int] = {}
    for line in listing.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
        ins = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if ins:
            ops.append(re.sub(r"^@!?U?P[T\d]\s+", "", ins.group(1)))
    out = []
    for i, op in enumerate(ops):
        target = re.search(r"BRA\s+`?\((\.L_x_\d+)\)", op)
        if target and labels.get(target.group(1), len(ops)) < i:
            start = labels[target.group(1)]
            out.append(Loop(start, i, collections.Counter(o.split()[0] for o in ops[start : i + 1])))
    return out


def _tiles(ttgir: str) -> str:
    acc = re.search(r"dense<0.000000e\+00> : tensor<(\d+)x(\d+)xf32, #mma", ttgir)
    return f"{acc.group(1)}x{acc.group(2)} acc" if acc else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile.sass", description=__doc__.splitlines()[0])
    ap.add_argument("cache", help="a Triton cache directory filled by python -m bench.compile --cache-dir")
    ap.add_argument("kernel", help="kernel name, e.g. _full_gemm_kernel")
    args = ap.parse_args(argv)
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    cubins = sorted(Path(args.cache).glob(f"*/{args.kernel}.cubin"))
    if not cubins:
        ap.error(f"no {args.kernel}.cubin under {args.cache}")
    for cubin in cubins:
        meta = json.loads(cubin.with_suffix(".json").read_text(encoding="utf-8"))
        ttgir = cubin.with_suffix(".ttgir")
        listing = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        print(f"{cubin.parent.name[:8]} {_tiles(ttgir.read_text(encoding='utf-8')) if ttgir.exists() else '?'} "
              f"warps {meta['num_warps']} stages {meta['num_stages']}")
        for lp in loops(listing):
            if lp.mma:
                top = ", ".join(f"{op} {n}" for op, n in lp.opcodes.most_common(8))
                print(f"  loop {lp.start}-{lp.end}: {lp.size} instructions ({lp.alu} ALU, {lp.size - lp.alu} other), "
                      f"{lp.mma} mma | {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
