"""The H100 cost model (bench/gpu_cost.py, bench/gpu_model.py) against hand-computed formulas."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_cost, gpu_model
from bench.compile.cases import DECODE_ROWS, MEMBERS, QWEN_05B, QWEN_15B
from bench.gpu_cost import H100, Kernel

ROOT = Path(__file__).resolve().parents[1]
EMPTY = gpu_model.Gate({"kernels": []})  # every launch shape from the model's documented defaults


def test_noise_instruction_counts() -> None:
    # 8 Gaussians: 2 Philox calls (66 int ops each), 4 Box-Muller pairs (56 fp ops each)
    assert gpu_cost.noise_ops(8, "gaussian") == (2 * 66, 4 * 56)
    # 256 signs: 2 Philox calls, 2 int ops per sign, no fp
    assert gpu_cost.noise_ops(256, "rademacher") == (2 * 66 + 256 * 2, 0.0)
    with pytest.raises(ValueError, match="kind"):
        gpu_cost.noise_ops(4, "uniform")


def test_cuda_core_time_takes_the_binding_pipe() -> None:
    per_s = 132 * 1.755e9
    assert gpu_cost.cuda_core_seconds(1e9, 0, 132) == pytest.approx(1e9 / (64 * per_s))      # INT32 half rate
    assert gpu_cost.cuda_core_seconds(0, 1e9, 132) == pytest.approx(1e9 / (128 * per_s))     # FP32
    assert gpu_cost.cuda_core_seconds(1e9, 3e9, 132) == pytest.approx(4e9 / (128 * per_s))  # issue-bound mix
    assert gpu_cost.cuda_core_seconds(1e9, 0, 66) == pytest.approx(2 * 1e9 / (64 * per_s))   # half the SMs


def test_memory_bound_kernel_and_small_grids() -> None:
    one_second = 3.35e12 * 0.90
    full = gpu_cost.kernel_time(Kernel("copy", bytes=one_second, programs=132 * 8))
    assert full.bound == "memory" and full.low == pytest.approx(1 + 2e-6)
    half = gpu_cost.kernel_time(Kernel("copy", bytes=one_second, programs=66))
    assert half.low == pytest.approx(2 + 2e-6)  # 66 programs reach 66 of the 132 SMs


def test_tensor_bound_and_serialised_noise() -> None:
    k = Kernel("gemm", tc_flops=989e12 * 0.8 * 1e-3, programs=264, warps=8, ctas_per_sm=2, fp_ops=128 * 132 * 1.755e9
               * 0.5e-3)
    t = gpu_cost.kernel_time(k)
    assert t.bound == "tensor"
    assert t.low == pytest.approx(1e-3 + 2e-6)
    assert t.high == pytest.approx(1e-3 + 0.5e-3 + 2e-6)  # the 0.5 ms of FP32 work after the MMAs
    # one CTA of 8 warps per SM hides half the latency (16 warps needed): the CUDA-core part doubles
    t1 = gpu_cost.kernel_time(Kernel("gemm", fp_ops=k.fp_ops, programs=132, warps=8, ctas_per_sm=1))
    assert t1.low == pytest.approx(1e-3 + 2e-6)


def test_latency_bound_small_grid() -> None:
    k = Kernel("shrink", bytes=1e3, programs=8, iters=100, stages=1)
    t = gpu_cost.kernel_time(k)
    assert t.bound == "latency" and t.low == pytest.approx(100 * 0.7e-6 + 2e-6)
    piped = gpu_cost.kernel_time(Kernel("shrink", bytes=1e3, programs=8, iters=100, stages=3))
    assert piped.low == pytest.approx(100 * 0.7e-6 / 2 + 2e-6)


def test_gemm_counts() -> None:
    k = gpu_cost.gemm("up", 512, 1536, 8960, 128, 128, 64)
    assert k.bytes == 2 * (8960 * 1536 + 512 * 1536 + 512 * 8960)
    assert k.tc_flops == 2 * 512 * 1536 * 8960
    assert k.programs == 4 * 70 and k.iters == 1536 / 64


def _per_layer(model: object, fn: object) -> float:
    return sum(fn(o, i) for _, o, i, _ in gpu_model._projections(model)) * gpu_model.LAYERS[model.name]


@pytest.mark.parametrize("model", [QWEN_05B, QWEN_15B])
def test_decode_step_generates_the_design_minimum_noise(model: object) -> None:
    n = MEMBERS
    assert gpu_model.decode_step(EMPTY, model, "unperturbed").noise_values() == 0
    full = gpu_model.decode_step(EMPTY, model, "full-gaussian").noise_values()
    assert full == _per_layer(model, lambda o, i: n * o * i)  # N·numel, nothing per row tile
    low = gpu_model.decode_step(EMPTY, model, "lowrank").noise_values()
    assert low == _per_layer(model, lambda o, i: n * (o + i))  # N·(in + out)·r, r = 1
    lora = gpu_model.decode_step(EMPTY, model, "lora").noise_values()
    assert lora == _per_layer(model, lambda o, i: n * (o + i) * 8)


def _full_gate(kind: str, bm: int, bn: int, bk: int, warps: int, programs: int) -> gpu_model.Gate:
    case = f"linear full {kind} bf16 {QWEN_15B.name} q T={DECODE_ROWS}"
    return gpu_model.Gate({"kernels": [
        {"kernel": "_full_gemm_kernel", "constexprs": {"BM": bm, "BN": bn, "BK": bk}, "num_warps": warps,
         "num_stages": 3, "ctas_per_sm": 2, "launches": [[case, [programs, 1, 1]]]}]})


def test_full_rank_runs_one_k_loop_per_member_of_each_row_tile() -> None:
    t, n = DECODE_ROWS, MEMBERS  # 16 rows per member: a 32-row tile holds 2 members, 2 K loops
    assert gpu_model._members_per_tile(32, t, n) == 2 and gpu_model._members_per_tile(16, t, n) == 1
    gate = _full_gate("gaussian", 32, 64, 64, 4, 16 * 24)
    (k,) = gpu_model.linear_kernels(gate, QWEN_15B, "full-gaussian", 1536, 1536, "q")
    assert k.tc_flops == 2 * t * 1536 * 1536 * (1 + 2)  # the base dot once, a noise dot per member
    assert k.bytes == 2 * (1536 * 1536 + 2 * t * 1536)  # W once from HBM: the row tiles share it in L2
    assert k.programs == 384 and k.ctas_per_sm == 2 and k.stages == 3 and k.iters == 1536 / 64 * 2
    assert k.noise_values == n * 1536 * 1536
    assert k.fp_ops == n * 1536 * 1536 / 2 * 56 + n * 1536 * 1536 * 2.5


def test_full_rank_rademacher_costs_the_measured_loop_instructions() -> None:
    programs = 32 * 24  # 16-row tiles x 64-column tiles of a 1536 x 1536 projection at 512 rows
    (k,) = gpu_model.linear_kernels(_full_gate("rademacher", 16, 64, 128, 4, programs), QWEN_15B, "full-rademacher",
                                    1536, 1536, "q")
    thread_iters = 4 * 32 * programs * (1536 // 128)  # one member per tile: a single K loop
    alu, other = gpu_model.FULL_RANK_LOOP_SASS[(16, 64, 4)]
    assert k.int_ops == alu * thread_iters and k.fp_ops == other * thread_iters
    assert k.noise_values == MEMBERS * 1536 * 1536 and k.iters == 1536 / 128
    # a config without a SASS count keeps the per-value formula
    (f,) = gpu_model.linear_kernels(_full_gate("rademacher", 16, 64, 64, 4, programs), QWEN_15B, "full-rademacher",
                                    1536, 1536, "q")
    assert f.int_ops == gpu_cost.noise_ops(MEMBERS * 1536 * 1536, "rademacher")[0]


def test_autotune_pick_is_the_fastest_predicted_config() -> None:
    case = f"linear plain bf16 {QWEN_15B.name} q T={DECODE_ROWS}"
    builds = [{"kernel": "_gemm_kernel", "constexprs": {"BM": bm, "BN": bn, "BK": 64}, "num_warps": w,
               "num_stages": 3, "ctas_per_sm": ctas, "launches": [[case, [p, 1, 1]]]}
              for bm, bn, p, w, ctas in ((128, 256, 24, 8, 1), (64, 64, 192, 4, 3))]
    (k,) = gpu_model.linear_kernels(gpu_model.Gate({"kernels": builds}), QWEN_15B, "unperturbed", 1536, 1536, "q")
    assert k.programs == 192  # 24 programs leave 108 SMs idle; 192 fit in one wave at 3 CTAs/SM
    one_wave = gpu_cost.kernel_time(k)
    assert one_wave.low < gpu_cost.kernel_time(dataclasses.replace(k, ctas_per_sm=1)).low  # two waves


def test_gaussian_bound_is_n_numel_values_on_the_cuda_cores() -> None:
    numel = _per_layer(QWEN_15B, lambda o, i: o * i)
    assert numel == 28 * (1536 * (1536 + 256 + 256 + 1536) + 3 * 8960 * 1536)
    values = MEMBERS * numel
    issue = (values / 4 * 66 + values / 2 * 56) / (128 * 132 * 1.755e9)
    assert gpu_model.gaussian_noise_bound(QWEN_15B) == pytest.approx(issue)
    int_pipe = values / 4 * 66 / (64 * 132 * 1.755e9)  # the Philox words alone, on the half-rate INT32 pipe
    assert gpu_model.gaussian_noise_bound(QWEN_15B, philox_only=True) == pytest.approx(int_pipe)


def test_update_bandwidth_fraction() -> None:
    k, t, frac = gpu_model.update_kernel(EMPTY, QWEN_15B)
    numel = 8960 * 1536
    assert k.bytes == 4 * numel + 4 * 16 * (8960 + 1536)  # W read and written once, the fp32 factors read once
    assert k.tc_flops == 3 * 2 * numel * 16 and k.noise_values == 0  # no factor regenerated per W tile
    assert k.programs == math.ceil(8960 / 64) * math.ceil(1536 / 64)
    # both launches: the factor launch's time (at least its launch) is added to the update's
    assert t.low >= gpu_cost.kernel_time(k).low + H100.launch_s
    assert frac == pytest.approx(4 * numel / 3.35e12 / t.low)
    assert frac <= H100.mem_eff


def test_predict_reports_ranges_and_cli(tmp_path: Path) -> None:
    result = gpu_model.predict(EMPTY)
    assert result["label"].startswith("PREDICTED")
    for entry in result["models"].values():
        for lo, hi in entry["ratio"].values():
            assert 0 < lo <= hi <= 1
    gate = tmp_path / "gate.json"
    gate.write_text(json.dumps({"kernels": []}))
    out = tmp_path / "pred.json"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_model", "--gate", str(gate), "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "PREDICTED" in done.stdout and json.loads(out.read_text())["models"].keys() == result["models"].keys()
    bad = subprocess.run([sys.executable, "-m", "bench.gpu_model", "--gate", str(tmp_path / "none.json")], cwd=ROOT,
                         capture_output=True, text=True, check=False, timeout=120)
    assert bad.returncode == 2 and "compile-gate JSON" in bad.stderr


def test_lowrank_step_launches_one_shrink_per_group_of_projections_reading_the_same_x() -> None:
    """q/k/v share one shrink launch and gate/up another (fastes/models/decoder.py): 4 per layer, not 7, each
    group's launch with the names' programs and noise side by side and x from HBM once."""
    m, t, n = QWEN_15B, DECODE_ROWS, MEMBERS
    step = gpu_model.decode_step(EMPTY, m, "lowrank")
    shrinks = [(k, launches) for k, _, launches in step.kernels if k.name == "lowrank shrink"]
    assert len(shrinks) == 4 and all(launches == gpu_model.LAYERS[m.name] for _, launches in shrinks)
    (qkv, _), (o, _), (gate_up, _), (down, _) = shrinks
    assert qkv.programs == 3 * o.programs and qkv.iters == o.iters  # same shapes: q/k/v read hidden, o reads q
    assert qkv.noise_values == 3 * n * m.hidden and gate_up.noise_values == 2 * n * m.hidden
    assert qkv.bytes == 2 * t * m.hidden + 4 * t * 3 and down.noise_values == n * m.inter
    gemms = [k for k, _, _ in step.kernels if k.name == "gemm lowrank"]
    assert len(gemms) == 7  # every projection keeps its own GEMM with the low-rank epilogue


def _lora_gate(antithetic: bool) -> gpu_model.Gate:
    case = f"lora r=8 gaussian bf16 {QWEN_15B.name} q T={DECODE_ROWS}"
    return gpu_model.Gate({"kernels": [
        {"kernel": "_shrink_kernel",
         "constexprs": {"BLOCK_M": 32, "BLOCK_K": 32, "R_PAD": 16, "ANTITHETIC": antithetic},
         "num_warps": 4, "num_stages": 3, "ctas_per_sm": 3, "launches": [[case, [16, 24, 1]]]},
        {"kernel": "_expand_kernel", "constexprs": {"BLOCK_M": 32, "BLOCK_N": 128, "R_PAD": 16, "S_CHUNK": 8},
         "num_warps": 8, "num_stages": 3, "ctas_per_sm": 3, "launches": [[case, [16, 12, 1]]]}]})


def test_lora_programs_per_row_tile_and_split_one_pass_per_noise_index() -> None:
    """Shrink: 16 row tiles x 24 K splits of 2 steps (32 columns), one pass per noise index of a 32-row tile (the
    antithetic pair: 1, else its 2 members), after the row members' load; expand: 24 partials in 3 loads of 8."""
    t, n = DECODE_ROWS, MEMBERS
    for antithetic, passes in ((True, 1), (False, 2)):
        shrink, expand = gpu_model.linear_kernels(_lora_gate(antithetic), QWEN_15B, "lora", 1536, 1536, "q")[1:]
        assert shrink.programs == 384 and shrink.iters == 1 + 2 * passes and shrink.stages == 1
        assert shrink.bytes == 2 * t * 1536 + 2 * 8 * 1536 + 4 * 24 * t * 8  # x, A, the 24 partials written
        assert shrink.tc_flops == 2 * 2.0 * t * 1536 * 16 * passes and shrink.noise_values == n * 1536 * 8
        assert expand.programs == 192 and expand.iters == 3 and expand.stages == 1 and expand.ctas_per_sm == 3
        assert expand.bytes == 4 * t * 1536 + 4 * 24 * t * 8 + 2 * 1536 * 8 and expand.noise_values == n * 1536 * 8


def test_lora_step_launches_one_shrink_per_group_and_expands_read_the_groups_splits() -> None:
    """LoRA q/k/v share one shrink launch and gate/up another (decoder ``_lora_linears``): 4 per layer, 7 expands.
    The q/k/v launch (16 row tiles x 8 K splits x 3 adapters, the gate's grid) reads x once and each adapter's A,
    writes 3 x 8 partials, generates 3 adapters' E_A; k's and v's expands sum the group's 8 splits in one load."""
    m, t, n = QWEN_15B, DECODE_ROWS, MEMBERS
    step = gpu_model.decode_step(EMPTY, m, "lora")
    shrinks = [(k, launches) for k, _, launches in step.kernels if k.name == "lora shrink"]
    assert len(shrinks) == 4 and all(launches == gpu_model.LAYERS[m.name] for _, launches in shrinks)
    (qkv, _), (o, _), (gate_up, _), (down, _) = shrinks
    assert qkv.programs == 3 * 16 * 8 and o.programs == 16 * 24  # the names share one wave of 396 programs
    assert qkv.noise_values == 3 * n * m.hidden * 8 and gate_up.noise_values == 2 * n * m.hidden * 8
    assert down.noise_values == n * m.inter * 8
    assert len([k for k, _, _ in step.kernels if k.name == "lora expand"]) == 7
    case = f"lora shrink qkv r=8 gaussian bf16 {m.name} T={t}"
    gate = gpu_model.Gate({"kernels": [
        {"kernel": "_shrink_kernel", "constexprs": {"BLOCK_M": 32, "BLOCK_K": 32, "R_PAD": 16, "ANTITHETIC": True},
         "num_warps": 4, "num_stages": 3, "ctas_per_sm": 3, "launches": [[case, [16, 8, 3]]]}]})
    shrink, expand = gpu_model.linear_kernels(gate, m, "lora", 1536, 1536, "q", shrink=("qkv", 3))[1:]
    assert shrink.programs == 384 and shrink.iters == 1 + 48 // 8  # one pass (an antithetic pair per tile)
    assert shrink.bytes == 2 * t * 1536 + 3 * (2 * 8 * 1536 + 4 * 8 * t * 8)
    assert shrink.tc_flops == 3 * 2 * 2.0 * t * 1536 * 16
    k_only = gpu_model.linear_kernels(gate, m, "lora", 256, 1536, "k", shrink=None, group=("qkv", 3))
    assert [k.name for k in k_only] == ["gemm lora", "lora expand"] and k_only[1].iters == 1  # 8 splits, 1 load
    assert k_only[1].bytes == 4 * t * 256 + 4 * 8 * t * 8 + 2 * 256 * 8
    assert expand.iters == 1
