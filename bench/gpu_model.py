"""PREDICTED H100 decode-step times and ES generation ratios of fastes, from counted work (no GPU).

    python -m bench.gpu_model [--gate bench/results/compile-sm90-3.9.0.json] [--json out.json]

One decode step of N = 32 members x 16 prompts (512 rows) at Qwen2.5-0.5B / 1.5B shapes, in the
modes of bench/generate.py plus LoRA rank 8: every projection's kernels with their design-minimum
noise (DESIGN.md §3: full-rank N·numel values per launch, low-rank N·(in + out)·r), FLOPs and bytes,
on the grids, tiles and occupancy that the sm_90 compile gate recorded (bench.compile); the
autotuned GEMM takes the config the model predicts fastest. Attention, norms, activations and
sampling are shared by every mode. Costs per kernel: bench/gpu_cost.py. Predictions, not
measurements: scripts/gpu_validate.sh measures the same ratios on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.compile.cases import DECODE_ROWS, MEMBERS, QWEN_05B, QWEN_15B, Model
from bench.gpu_cost import H100, Hardware, Kernel, Time, cuda_core_seconds, gemm, kernel_time, noise_ops

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = {QWEN_05B.name: 24, QWEN_15B.name: 28}
PROMPT_LEN, NEW_TOKENS = 32, 256   # bench/generate.py on a GPU: mean context 32 + 256/2
SMALL_OPS_PER_LAYER = 20           # unfused torch launches per layer (norms, rope, activation, residuals)
MODES = ("unperturbed", "lowrank", "full-gaussian", "full-rademacher", "lora")
TARGETS = {"lowrank": 0.95, "full-gaussian": 0.15, "full-rademacher": 0.30, "lora": 0.70, "update_bw": 0.70}


class Gate:
    """The builds the compile gate recorded, looked up by case name and kernel."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.triton = data.get("versions", {}).get("triton", "?")
        self._by_case: dict[str, list[tuple[dict[str, Any], int]]] = {}
        for k in data["kernels"]:
            for case, grid in k["launches"]:
                entry = (k, math.prod(grid))
                if entry[0] not in [b for b, _ in self._by_case.get(case, [])]:
                    self._by_case.setdefault(case, []).append(entry)

    def builds(self, case: str, kernel: str) -> list[tuple[dict[str, Any], int]]:
        """(build record, programs of its launch in ``case``) of ``kernel``; several = autotune configs."""
        return [(b, p) for b, p in self._by_case.get(case, []) if b["kernel"] == kernel]


def _shape_of(b: dict[str, Any]) -> dict[str, int]:
    return {"warps": b["num_warps"], "ctas_per_sm": b["ctas_per_sm"], "stages": max(b["num_stages"], 1)}


@dataclass
class Step:
    """One decode step: its kernels (counted once per launch) with their predicted times."""

    kernels: list[tuple[Kernel, Time, int]]  # kernel, time of one launch, launches per step

    def seconds(self, which: str = "low") -> float:
        return sum(getattr(t, which) * n for _, t, n in self.kernels)

    def noise_values(self) -> float:
        return sum(k.noise_values * n for k, _, n in self.kernels)

    def breakdown(self) -> dict[str, list[Any]]:
        """kernel name -> [low ms, high ms, launches, {bound: launches}] summed over the step."""
        out: dict[str, list[Any]] = {}
        for k, t, n in self.kernels:
            row = out.setdefault(k.name, [0.0, 0.0, 0, {}])
            row[0] += t.low * n * 1e3
            row[1] += t.high * n * 1e3
            row[2] += n
            row[3][t.bound] = row[3].get(t.bound, 0) + n
        return {name: [round(r[0], 3), round(r[1], 3), r[2], r[3]] for name, r in out.items()}


def _projections(m: Model) -> list[tuple[str, int, int, str]]:
    """(name, out, in, gate case name) of one layer's projections; v shares k's shape, gate up's."""
    q, kv = m.q_heads * m.head_dim, m.kv_heads * m.head_dim
    return [("q", q, m.hidden, "q"), ("k", kv, m.hidden, "k"), ("v", kv, m.hidden, "k"), ("o", m.hidden, q, "o"),
            ("gate", m.inter, m.hidden, "up"), ("up", m.inter, m.hidden, "up"), ("down", m.hidden, m.inter, "down")]


def _members_per_tile(bm: int, t: int, n: int) -> int:
    """Members whose rows meet one row tile of ``bm`` rows (rows sorted by member, t/n rows each)."""
    return max(1, math.ceil(bm / max(t // n, 1)))


def _fastest(options: list[list[Kernel]], hw: Hardware) -> list[Kernel]:
    """The autotuner's choice, as predicted: the config whose kernels take least time together."""
    return min(options, key=lambda ks: sum(kernel_time(k, hw).low for k in ks))


# lowrank: the decoder's grouped shrinks (fastes/models/decoder.py ``_linears``): q's launch serves q/k/v, gate's
# gate/up (a (row tile, K split, name) grid); k, v and up launch none of their own; o and down their own.
SHRINK_GROUPS: dict[str, tuple[str, int] | None] = {"q": ("qkv", 3), "k": None, "v": None, "gate": ("gate+up", 2),
                                                    "up": None}
# LoRA groups the same way (decoder ``_lora_linears``); k, v and up's expands read the partials of their group's
# launch (its K splits)
GROUP_OWNER = {"k": "q", "v": "q", "up": "gate"}


def linear_kernels(gate: Gate, m: Model, mode: str, n_out: int, n_in: int, case_shape: str, t: int = DECODE_ROWS,
                   n: int = MEMBERS, rank: int = 1, hw: Hardware = H100,
                   shrink: tuple[str, int] | None = ("", 1), group: tuple[str, int] | None = None) -> list[Kernel]:
    """The kernels of one projection in ``mode`` at decode, on the gate's tiles for that shape.

    ``shrink`` (lowrank, LoRA): ("", 1) its own shrink launch, (group, names) the group's launch, None none;
    ``group`` (LoRA, with ``shrink`` None): the group whose launch wrote this projection's partials."""
    gate_mode = {"unperturbed": "plain", "lora": "plain"}.get(mode, mode.split("-")[0])
    kind = "rademacher" if mode == "full-rademacher" else "gaussian"
    label = f"{gate_mode} {kind} " if gate_mode != "plain" else "plain "
    case = f"linear {label}bf16 {m.name} {case_shape} T={t}"
    if gate_mode == "full":
        return [_fastest([[k] for k in _full_rank(gate, case, t, n_in, n_out, n, kind)], hw)[0]]
    options = []
    for b, programs in gate.builds(case, "_gemm_kernel") or [({"constexprs": {"BM": 128, "BN": 128, "BK": 64},
                                                               "num_warps": 8, "ctas_per_sm": 1, "num_stages": 3},
                                                              0)]:
        c = b["constexprs"]
        main = gemm(f"gemm {mode}", t, n_in, n_out, c["BM"], c["BN"], c["BK"], programs or None, **_shape_of(b))
        if gate_mode == "lowrank":  # epilogue: the A rows of the members present in each tile, T·out·r FMAs
            main.add_noise(math.ceil(t / c["BM"]) * _members_per_tile(c["BM"], t, n) * n_out * rank, kind)
            main.fp_ops += t * n_out * rank
        options.append([main])
    chosen = _fastest(options, hw)
    if gate_mode == "lowrank" and shrink is not None:
        group, names = shrink
        shrink_case = f"lowrank shrink {group} {kind} bf16 {m.name} T={t}" if group else case
        chosen = _lowrank_shrink(gate, shrink_case, t, n_in, n, rank, kind, names) + chosen
    if mode == "lora":
        chosen = chosen + _lora(gate, m, case_shape, t, n_in, n_out, n, group=shrink or group or ("", 1),
                                launch=shrink is not None)
    return chosen


# SASS instructions per thread in one iteration of the full-rank kernel's first K loop (base dot, noise tile,
# noise dot), Rademacher at BK = 128: (BM, BN, warps) -> (INT32-pipe ALU ops: LOP3, SEL, SHF, ISETP, IADD3,
# PRMT, ...; everything else: IMAD, LDS/STS, LDSM, HMMA, branches), by ``python -m bench.compile.sass`` in the
# sm_90 cubins of the compile gate (Triton 3.9, 1.5B up_proj, T = 512; Triton 3.6's within 1%). A further
# member's loop (no W, one mma) is priced like the first (it measures ~72% of it). Per value 6.2 /
# 9.5 / 6.4 / 8.4 instructions against the 5.0 that noise_ops + APPLY_FP_OPS count (address arithmetic,
# operand staging through shared memory and register moves of the mask constant come on top of Philox and
# the bit expansion, one shift and one and/xor per two bf16 signs).
FULL_RANK_LOOP_SASS = {(16, 64, 4): (112, 284), (16, 32, 4): (97, 208), (16, 128, 8): (130, 281),
                       (32, 64, 4): (153, 385)}
FULL_RANK_DEFAULT = {"rademacher": ({"BM": 16, "BN": 64, "BK": 128}, 4, 3),
                     "gaussian": ({"BM": 32, "BN": 64, "BK": 64}, 4, 2)}  # (tiles, warps, CTAs/SM) without a gate


def _full_rank(gate: Gate, case: str, t: int, n_in: int, n_out: int, n: int, kind: str) -> list[Kernel]:
    """One option per autotune config of ``_full_gemm_kernel``: a program per (row tile, column tile) whose
    first K loop gives the base dot and run 0's noise dot, then one K loop per further run (member) of the
    tile; W comes from HBM once (the row tiles of a column tile share it in L2)."""
    c0, w0, ctas0 = FULL_RANK_DEFAULT[kind]
    found = gate.builds(case, "_full_gemm_kernel") or [({"constexprs": c0, "num_warps": w0, "ctas_per_sm": ctas0,
                                                         "num_stages": 3}, 0)]
    out = []
    for b, programs in found:
        c = b["constexprs"]
        bm, bn, bk, warps = c["BM"], c["BN"], c["BK"], b["num_warps"]
        runs = _members_per_tile(bm, t, n)
        programs = programs or math.ceil(t / bm) * math.ceil(n_out / bn)
        k_iters = math.ceil(n_in / bk)
        k = Kernel(f"full-rank gemm {kind}", bytes=2 * (n_out * n_in + t * n_in + t * n_out),
                   tc_flops=2.0 * t * n_in * n_out * (1 + runs), programs=programs, iters=k_iters * runs,
                   **_shape_of(b))
        k.add_noise(n * n_in * n_out, kind, apply=True)
        sass = FULL_RANK_LOOP_SASS.get((bm, bn, warps)) if kind == "rademacher" and bk == 128 else None
        if sass is not None:  # measured loop instructions replace the per-value estimate
            thread_iters = 32 * warps * programs * k_iters * runs
            k.int_ops, k.fp_ops = sass[0] * thread_iters, sass[1] * thread_iters
        out.append(k)
    return out


def _lowrank_shrink(gate: Gate, case: str, t: int, n_in: int, n: int, rank: int, kind: str,
                    names: int = 1) -> list[Kernel]:
    """h = x·B_m for every row of ``names`` projections that read x, in one launch: x from HBM once (the
    names' programs share it in L2), each name's B_m (in × r) generated once per member, names × the programs."""
    found = gate.builds(case, "_shrink_kernel")
    b, programs = found[0] if found else ({"constexprs": {"BM": 16, "BK": 256}, "num_warps": 4, "ctas_per_sm": 4,
                                           "num_stages": 3}, names * math.ceil(t / 16))
    c = b["constexprs"]
    tiles = names * math.ceil(t / c["BM"]) * math.ceil(n_in / c["BK"])
    k = Kernel("lowrank shrink", bytes=2 * t * n_in + 4 * t * rank * names, fp_ops=names * t * n_in * rank,
               programs=programs, iters=tiles / programs, **_shape_of(b))
    return [k.add_noise(names * n * n_in * rank, kind)]


def _lora(gate: Gate, m: Model, case_shape: str, t: int, n_in: int, n_out: int, n: int, rank: int = 8,
          group: tuple[str, int] = ("", 1), launch: bool = True) -> list[Kernel]:
    """Rank-8 LoRA on the shared base GEMM, noise on A and B (fastes/ops/lora_linear_triton.py).

    ``group`` (name, adapters): the shrink launch that writes this projection's partials, ("", 1) its own;
    ``launch``: whether this projection issues it (q for q/k/v, gate for gate/up; x read once, each adapter's
    A and E_A once, the adapters' programs sharing one wave: fewer K splits each).
    Shrink: a program per (row tile, K split, adapter), one pass over its split per noise index the tile holds (the
    gate's builds are antithetic, as bench.generate runs: a 32-row tile holds one pair), each K step one load
    of x and A and the index's E_A tile. Expand: a program per (row tile, column tile) that issues its base
    tile, row members and B first, then waits on its partials, S_CHUNK splits per load. Neither loop is
    software-pipelined (no cp.async in their sm_90 PTX): stages = 1 whatever the launch asked for. Noise
    counted at N members all the same (the design minimum without antithetic pairs)."""
    case = f"lora r={rank} gaussian bf16 {m.name} {case_shape} T={t}"
    name, names = group
    shrink_case = f"lora shrink {name} r={rank} gaussian bf16 {m.name} T={t}" if name else case
    defaults = {"_shrink_kernel": ({"BLOCK_M": 32, "BLOCK_K": 32, "R_PAD": 16}, 4, 3),
                "_expand_kernel": ({"BLOCK_M": 32, "BLOCK_N": 128, "R_PAD": 16, "S_CHUNK": 8}, 8, 3)}
    builds = {}
    for kernel, (constexprs, warps, ctas) in defaults.items():
        found = gate.builds(shrink_case if kernel == "_shrink_kernel" else case, kernel)
        b, programs = found[0] if found else ({"constexprs": constexprs, "num_warps": warps, "ctas_per_sm": ctas}, 0)
        builds[kernel] = (b, programs, {**_shape_of({**b, "num_stages": 1})})
    b, programs, shape = builds["_shrink_kernel"]
    c = b["constexprs"]
    row_tiles = math.ceil(t / c["BLOCK_M"])
    members = _members_per_tile(c["BLOCK_M"], t, n)  # an antithetic pair shares one noise index, one pass
    passes = math.ceil(members / 2) if c.get("ANTITHETIC") else members
    k_steps = math.ceil(n_in / c["BLOCK_K"])
    # the launcher's K splits (lora_linear_triton._splits): the names share one wave of 396 programs, ≤ 32 splits
    programs = programs or names * row_tiles * max(1, min(32, 396 // (names * row_tiles), k_steps))
    splits = max(1, programs // (names * row_tiles))
    shrink = Kernel("lora shrink", bytes=2 * t * n_in + names * (2 * rank * n_in + 4 * splits * t * rank),
                    tc_flops=names * 2 * 2.0 * t * n_in * c["R_PAD"] * passes, tc="tf32", programs=programs,
                    iters=1 + math.ceil(k_steps / splits) * passes, **shape)  # the row members, then x/A loads
    b, programs, shape = builds["_expand_kernel"]
    c = b["constexprs"]
    programs = programs or row_tiles * math.ceil(n_out / c["BLOCK_N"])
    # partials from HBM once (the other column tiles' reads of them hit L2), base read and y written
    expand = Kernel("lora expand", bytes=4 * t * n_out + 4 * splits * t * rank + 2 * n_out * rank,
                    tc_flops=2.0 * t * n_out * c["R_PAD"] * (1 + passes), tc="tf32", programs=programs,
                    iters=math.ceil(splits / c.get("S_CHUNK", 1)), **shape)  # base, members, B in flight meanwhile
    expand.add_noise(n * n_out * rank, "gaussian")
    return [shrink.add_noise(names * n * n_in * rank, "gaussian"), expand] if launch else [expand]


def shared_kernels(gate: Gate, m: Model, t: int = DECODE_ROWS, ctx: int = PROMPT_LEN + NEW_TOKENS // 2,
                   hw: Hardware = H100) -> list[tuple[Kernel, int]]:
    """Per-step kernels every mode runs the same: attention, small ops, LM head, sampling (kernel, launches)."""
    layers = LAYERS[m.name]
    kv_bytes = t * ctx * m.kv_heads * m.head_dim * 2 * 2
    found = gate.builds(f"attn decode bf16 {m.name} seqs={t} ctx=1024 window=None", "_decode_kernel")
    b, programs = found[0] if found else ({"num_warps": 4, "ctas_per_sm": 2, "num_stages": 3}, t * m.kv_heads)
    attn = Kernel("attention decode", bytes=kv_bytes + 4 * t * m.q_heads * m.head_dim, programs=programs,
                  iters=math.ceil(ctx / 64), **_shape_of(b))
    small = Kernel("small ops", bytes=(24 * t * m.hidden * 2 + 5 * t * m.inter * 2 + 16 * t * (m.q_heads + m.kv_heads)
                                       * m.head_dim) / SMALL_OPS_PER_LAYER)
    head_builds = [(bb, 0) for bb, _ in gate.builds("linear plain bf16 lm_head", "_gemm_kernel")]
    head = _fastest([[gemm("lm head", t, m.hidden, m.vocab, bb["constexprs"]["BM"], bb["constexprs"]["BN"],
                           bb["constexprs"]["BK"], None, **_shape_of(bb))] for bb, _ in head_builds]
                    or [[gemm("lm head", t, m.hidden, m.vocab, 128, 256, 64)]], hw)[0]
    sampling = Kernel("logits to fp32 + sampling", bytes=t * m.vocab * (2 + 4 + 4))
    return [(attn, layers), (small, layers * SMALL_OPS_PER_LAYER), (head, 1), (sampling, 2)]


def decode_step(gate: Gate, m: Model, mode: str, hw: Hardware = H100) -> Step:
    """Every kernel of one decode step of ``m`` in ``mode``, with its predicted time."""
    rows: list[tuple[Kernel, Time, int]] = []
    for name, n_out, n_in, shape in _projections(m):
        group = SHRINK_GROUPS[GROUP_OWNER[name]] if name in GROUP_OWNER else None
        for k in linear_kernels(gate, m, mode, n_out, n_in, shape, hw=hw, shrink=SHRINK_GROUPS.get(name, ("", 1)),
                                group=group):
            rows.append((k, kernel_time(k, hw), LAYERS[m.name]))
    rows += [(k, kernel_time(k, hw), n) for k, n in shared_kernels(gate, m, hw=hw)]
    return Step(rows)


def update_kernel(gate: Gate, m: Model, n: int = MEMBERS, hw: Hardware = H100) -> tuple[Kernel, Time, float]:
    """The lowrank ES update of one [inter, hidden] bf16 matrix, r = 1: (update kernel, time of both launches,
    fraction of HBM bandwidth). Launch 1 generates the K folded indices' factors once (K·r·(out + in) values,
    written fp32); launch 2 reads W once, adds the tf32x3 GEMM of the factors (L2-resident after their first
    read), rounds with one Philox word per element and writes W once."""
    out_f, in_f = m.inter, m.hidden
    folded = n // 2  # antithetic pairs fold into one index each
    case = f"es_update lowrank gaussian r=1 bf16 {out_f}x{in_f}"
    found = gate.builds(case, "_lowrank_kernel")
    b, programs = found[0] if found else ({"constexprs": {"BM": 64, "BN": 64, "KC": 16}, "num_warps": 4,
                                           "ctas_per_sm": 4, "num_stages": 1}, 0)
    bm, bn, kc = b["constexprs"]["BM"], b["constexprs"]["BN"], b["constexprs"].get("KC", 16)
    programs = programs or math.ceil(out_f / bm) * math.ceil(in_f / bn)
    numel, factor_bytes = out_f * in_f, 4 * folded * (out_f + in_f)
    padded = math.ceil(folded / kc) * kc  # K·r columns padded to the dot's K with zeros
    k = Kernel("lowrank update", bytes=2 * 2 * numel + factor_bytes, tc_flops=3 * 2.0 * numel * padded, tc="tf32",
               programs=programs, iters=1, **_shape_of(b))
    sr_int, _ = noise_ops(numel, "gaussian")  # one Philox word per element for stochastic rounding
    k.int_ops += sr_int
    k.fp_ops += 4 * numel
    f_found = gate.builds(case, "_lowrank_factors_kernel")
    fb, f_programs = f_found[0] if f_found else ({"constexprs": {"GROUPS": 128, "PER": 4}, "num_warps": 4,
                                                  "ctas_per_sm": 16, "num_stages": 1}, 0)
    per_program = fb["constexprs"]["GROUPS"] * fb["constexprs"]["PER"]
    f_programs = f_programs or math.ceil((out_f + in_f) / per_program) * folded
    f = Kernel("lowrank update factors", bytes=factor_bytes, programs=f_programs, iters=1, **_shape_of(fb))
    f.add_noise(folded * (out_f + in_f), "gaussian")  # the design minimum, nothing per W tile
    t, tf = kernel_time(k, hw), kernel_time(f, hw)
    total = Time(t.low + tf.low, t.high + tf.high, t.bound)
    ideal = 2 * 2 * numel / hw.hbm_bytes_s  # W read and written once: what the update cannot avoid
    return k, total, ideal / total.low


def gaussian_noise_bound(m: Model, hw: Hardware = H100, n: int = MEMBERS, philox_only: bool = False) -> float:
    """Seconds of CUDA-core time per decode step just to generate full-rank Gaussian noise: N·numel values
    (``philox_only``: only the contract's Philox words, on the INT32 pipe, without Box-Muller)."""
    numel = sum(o * i for _, o, i, _ in _projections(m)) * LAYERS[m.name]
    int_ops, fp_ops = noise_ops(n * numel, "gaussian")
    return cuda_core_seconds(int_ops, 0.0 if philox_only else fp_ops, hw.sms, hw)


def predict(gate: Gate, hw: Hardware = H100) -> dict[str, Any]:
    """Step times, generation ratios (ranges) and the update's bandwidth fraction at both shapes."""
    out: dict[str, Any] = {"label": "PREDICTED by bench/gpu_model.py (no GPU measurement)", "triton": gate.triton,
                           "models": {}}
    for m in (QWEN_05B, QWEN_15B):
        steps = {mode: decode_step(gate, m, mode, hw) for mode in MODES}
        base_low, base_high = steps["unperturbed"].seconds("low"), steps["unperturbed"].seconds("high")
        entry: dict[str, Any] = {"step_ms": {}, "ratio": {}, "noise_values_per_step": {}}
        for mode, step in steps.items():
            entry["step_ms"][mode] = [round(step.seconds("low") * 1e3, 3), round(step.seconds("high") * 1e3, 3)]
            entry["noise_values_per_step"][mode] = step.noise_values()
            if mode != "unperturbed":  # best case: everything overlaps in both; worst: serialised in both
                both = (base_high / step.seconds("high"), base_low / step.seconds("low"))
                entry["ratio"][mode] = [round(min(both), 3), round(max(both), 3)]
        bound = gaussian_noise_bound(m, hw)
        entry["gaussian_noise_bound_ms"] = round(bound * 1e3, 3)
        entry["gaussian_ratio_bound"] = round(base_low / max(base_low, bound), 3)
        philox = gaussian_noise_bound(m, hw, philox_only=True)
        entry["philox_bound_ms"] = round(philox * 1e3, 3)
        entry["philox_ratio_bound"] = round(base_low / max(base_low, philox), 3)
        entry["breakdown_ms"] = {mode: step.breakdown() for mode, step in steps.items()}
        _, t, frac = update_kernel(gate, m, hw=hw)
        entry["update"] = {"us": round(t.low * 1e6, 1), "bound": t.bound, "bandwidth_fraction": round(frac, 3)}
        out["models"][m.name] = entry
    return out


def _latest_gate() -> Path | None:
    found = sorted(RESULTS.glob("compile-sm90-*.json"))
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_model", description=__doc__.splitlines()[0])
    ap.add_argument("--gate", help="compile-gate JSON (default: the newest bench/results/compile-sm90-*.json)")
    ap.add_argument("--json", help="write the predictions here")
    ap.add_argument("--breakdown", action="store_true", help="print each mode's time per kernel")
    args = ap.parse_args(argv)
    path = Path(args.gate) if args.gate else _latest_gate()
    if path is None or not path.is_file():
        ap.error(f"no compile-gate JSON at {path or 'bench/results/compile-sm90-*.json'}: run python -m bench.compile")
    try:
        gate = Gate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        ap.error(f"{path} is not a compile-gate report: {err}")
    result = predict(gate)
    result["gate"] = str(path)
    print(f"{result['label']}; tiles/occupancy from {path.name}")
    for name, e in result["models"].items():
        print(f"{name}: unperturbed step {e['step_ms']['unperturbed'][0]:.2f}-{e['step_ms']['unperturbed'][1]:.2f} ms")
        for mode, (lo, hi) in e["ratio"].items():
            verdict = "meets" if lo >= TARGETS[mode] else "range spans" if hi >= TARGETS[mode] else "MISSES"
            print(f"  {mode:16s} ratio {lo:.3f}-{hi:.3f} (target >= {TARGETS[mode]:.2f}: {verdict}); step "
                  f"{e['step_ms'][mode][0]:.2f}-{e['step_ms'][mode][1]:.2f} ms, "
                  f"{e['noise_values_per_step'][mode]:.3g} noise values")
        print(f"  full-rank Gaussian noise bound: {e['gaussian_noise_bound_ms']:.1f} ms of CUDA-core time per step "
              f"-> ratio <= {e['gaussian_ratio_bound']:.3f} (Philox words alone: {e['philox_bound_ms']:.1f} ms, "
              f"<= {e['philox_ratio_bound']:.3f})")
        if args.breakdown:
            for mode, rows in e["breakdown_ms"].items():
                print(f"    {mode}: " + "; ".join(f"{k} {lo:.2f}-{hi:.2f} ms x{n} {b}" for k, (lo, hi, n, b)
                                                  in rows.items()))
        u = e["update"]
        print(f"  lowrank update [inter x hidden]: {u['us']:.1f} us ({u['bound']}-bound), "
              f"{u['bandwidth_fraction']:.0%} of HBM bandwidth (target >= 70%)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
