"""A kernel cost model for the H100: how long one launch should take, from its counted work.

Every number this produces is a PREDICTION (docs/design.md, "Kernels and their cost"): a kernel's
time is bounded below by its HBM traffic, its tensor-core FLOPs, its CUDA-core instructions (noise
generation above all) and, for grids too small to fill the GPU, by each program's serial chain of
loads. Occupancy (CTAs per SM, from the sm_90 compile gate) scales how well CUDA-core latency is
hidden; the grid (programs, also from the gate) scales how much of the GPU a launch can use.

Two bounds per kernel: ``low`` overlaps everything (memory, tensor cores and CUDA cores run
concurrently), ``high`` serialises the CUDA-core work after the memory/tensor-core time, as a
K loop that generates noise between loads does when nothing else is resident to hide it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """H100 SXM5 (sm_90) datasheet rates and the fractions of them a good kernel reaches."""

    sms: int = 132
    clock_hz: float = 1.755e9       # sustained SM clock under load (1.98 GHz boost)
    hbm_bytes_s: float = 3.35e12
    bf16_flops: float = 989e12      # dense tensor-core peak
    tf32_flops: float = 494.5e12
    issue_per_sm: int = 128         # thread-instructions per clock: 4 schedulers x 32 lanes
    fp32_per_sm: int = 128          # FP32 lanes per SM
    int32_per_sm: int = 64          # INT32 lanes per SM (IMAD, LOP3, shifts)
    mem_eff: float = 0.90           # a device-to-device copy reaches ~90% of the HBM peak
    mma_eff: float = 0.80           # a large bf16 GEMM reaches ~80% of the dense peak
    mem_latency_s: float = 0.7e-6   # one dependent global load under load
    warps_to_hide: int = 16         # resident warps per SM that hide ALU/MUFU latency (4 per scheduler)
    dep_cpi: float = 2.0            # clocks per instruction of one warp's dependent chain (ILP ~2)
    launch_s: float = 2e-6          # the smallest kernel, replayed from a CUDA graph


H100 = Hardware()

# Instruction counts of the noise contract (DESIGN.md §2) per generated value, hand-counted from the
# Philox4x32-10 and Box-Muller device functions in fastes/ops/philox.py:
PHILOX_INT_OPS = 66          # per call (4 words): 10 rounds x (2 IMAD.WIDE.U32 at 2 slots + 2 LOP3) + 6 setup
BOX_MULLER_FP_OPS = 56       # per pair: 2 I2F+scale, logf ~20, sqrt ~4, sinf+cosf ~24, 4 mul (libdevice, not approx)
RADEMACHER_INT_OPS = 2       # per sign beyond Philox: shift/and, then a LOP3 onto sigma's sign bit
APPLY_FP_OPS = 2.5           # per full-rank value applied: FMA into the W tile, half a bf16 pack, a shared store
SR_ROUND_OPS = 4             # per stochastically rounded element, beyond its Philox word


def noise_ops(values: float, kind: str) -> tuple[float, float]:
    """(INT32-pipe, FP32-pipe) instructions to generate ``values`` noise values of ``kind``."""
    if kind == "gaussian":  # one Philox call -> 4 uniforms -> 2 Box-Muller pairs -> 4 normals
        return values / 4 * PHILOX_INT_OPS, values / 2 * BOX_MULLER_FP_OPS
    if kind == "rademacher":  # one Philox call -> 128 signs
        return values / 128 * PHILOX_INT_OPS + values * RADEMACHER_INT_OPS, 0.0
    raise ValueError(f"kind must be 'gaussian' or 'rademacher', got {kind!r}")


@dataclass
class Kernel:
    """One launch's counted work and launch shape (from the compile gate where it knows them)."""

    name: str
    bytes: float = 0.0
    tc_flops: float = 0.0
    tc: str = "bf16"        # tensor-core rate: bf16 | tf32
    int_ops: float = 0.0    # CUDA-core INT32 instructions (thread level)
    fp_ops: float = 0.0     # CUDA-core FP32/MUFU instructions (thread level)
    programs: int = 132
    warps: int = 4
    ctas_per_sm: int = 1
    iters: float = 1.0      # serial loop iterations of one program (each waits on its loads)
    stages: int = 1         # software-pipelining depth of that loop
    noise_values: float = 0.0

    def add_noise(self, values: float, kind: str, apply: bool = False) -> Kernel:
        """Count ``values`` generated noise values (plus applying each to a W tile when ``apply``)."""
        i, f = noise_ops(values, kind)
        self.int_ops += i
        self.fp_ops += f + (values * APPLY_FP_OPS if apply else 0.0)
        self.noise_values += values
        return self


@dataclass(frozen=True)
class Time:
    """Predicted seconds of one launch (low: all units overlap; high: CUDA-core work serialised) and its bound."""

    low: float
    high: float
    bound: str


def cuda_core_seconds(int_ops: float, fp_ops: float, sms: float, hw: Hardware = H100) -> float:
    """The CUDA-core time of that many instructions on ``sms`` SMs: issue, INT32 and FP32 limits."""
    if sms <= 0:
        return 0.0
    per_s = sms * hw.clock_hz
    return max((int_ops + fp_ops) / (hw.issue_per_sm * per_s), int_ops / (hw.int32_per_sm * per_s),
               fp_ops / (hw.fp32_per_sm * per_s))


def kernel_time(k: Kernel, hw: Hardware = H100) -> Time:
    """Predicted time of one launch of ``k``."""
    programs = max(k.programs, 1)
    used = min(programs, hw.sms)                 # SMs the grid can occupy
    u = used / hw.sms
    t_mem = k.bytes / (hw.hbm_bytes_s * hw.mem_eff) / u
    rate = hw.bf16_flops if k.tc == "bf16" else hw.tf32_flops
    t_tc = k.tc_flops / (rate * hw.mma_eff) / u
    resident = min(k.ctas_per_sm, math.ceil(programs / hw.sms)) * k.warps
    hide = min(1.0, resident / hw.warps_to_hide)
    t_cuda = cuda_core_seconds(k.int_ops, k.fp_ops, used, hw) / hide
    # latency: each program runs its loop serially; waves of programs follow one another
    waves = math.ceil(programs / (hw.sms * max(k.ctas_per_sm, 1)))
    per_program_ops = (k.int_ops + k.fp_ops) / programs
    chain = per_program_ops / (32 * k.warps) * hw.dep_cpi / hw.clock_hz  # each warp's dependent chain
    t_lat = waves * (k.iters * hw.mem_latency_s / max(1, k.stages - 1) + chain)
    parts = {"memory": t_mem, "tensor": t_tc, "cuda-core": t_cuda, "latency": t_lat}
    bound = max(parts, key=lambda p: parts[p])
    low = max(parts.values()) + hw.launch_s
    high = max(max(t_mem, t_tc) + t_cuda, t_lat) + hw.launch_s
    return Time(low, high, bound)


def gemm(name: str, t: int, n_in: int, n_out: int, bm: int, bn: int, bk: int, programs: int | None = None,
         warps: int = 8, ctas_per_sm: int = 1, stages: int = 3, dtype_bytes: int = 2) -> Kernel:
    """A [t, in] x [in, out] GEMM reading W once: bytes, FLOPs, grid and K-loop length."""
    tiles = math.ceil(t / bm) * math.ceil(n_out / bn)
    return Kernel(name, bytes=dtype_bytes * (n_out * n_in + t * n_in + t * n_out), tc_flops=2.0 * t * n_in * n_out,
                  programs=programs or tiles, warps=warps, ctas_per_sm=ctas_per_sm,
                  iters=tiles * math.ceil(n_in / bk) / (programs or tiles), stages=stages)
