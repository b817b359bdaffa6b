"""es_update (W ← W + lr·s·Σ c_m·E_m in place): Triton and CPU paths vs es_update_ref.

Tolerances (each stated where it is used):
* fp32: |W − W_ref| ≤ 1e-5·(|W_ref| + max|ΔW_ref|), i.e. 1e-5 relative to the operands of the
  final add (pointwise relative error of a sum of signed noise terms is meaningless near 0).
* bf16/fp16: the kernel's output is bit-identical to ``stochastic_round_ref`` applied to the
  kernel's own fp32 sum (same kernel run on the upcast weight). Against ``es_update_ref``,
  whose fp32 sum differs in the last bits (other summation order, other libm for Box–Muller),
  an element can only land on the other neighbour of the same rounding interval: ≤ 1 ulp.
* statistics: 5 standard errors computed from the model, not tuned.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import pytest
import torch

from fastes import _backend
from fastes.noise import (
    SR_NOISE_INDEX,
    NoiseSpec,
    gaussian_from_words,
    materialize_lowrank,
    member_noise_tensor,
    philox4x32,
    split_seed,
    sr_tensor_id,
    tensor_id,
)
from fastes.ops.es_update import es_update, es_update_ref
from fastes.ops.stochastic_round import round_bf16, stochastic_round_ref

try:
    from fastes.ops import es_update_triton as _kernels  # noqa: F401

    TRITON = ["triton"]
except Exception:  # noqa: BLE001 - no usable Triton: its cases skip
    TRITON = [pytest.param("triton", marks=pytest.mark.skip(reason="triton unusable"))]

BACKENDS = [*TRITON, "cpu"]
LOW = (torch.bfloat16, torch.float16)
NAME = "model.layers.3.mlp.up_proj.weight"

# (mode, shape, rank, members, antithetic, kind): odd shapes so every tile edge is masked; (33, 64)
# and rank 4 hit the one-Philox-per-4 factor path, (33, 65) with rank 1 the element-wise one; Rademacher
# (33, 64) rank 1 and (33, 48) rank 2 the one-Philox-per-32-signs factor path.
CASES = [
    ("lowrank", (33, 65), 1, 8, True, "gaussian"),
    ("lowrank", (33, 65), 4, 3, False, "gaussian"),
    ("lowrank", (33, 64), 1, 1, False, "gaussian"),
    ("lowrank", (33, 65), 4, 8, True, "rademacher"),
    ("lowrank", (33, 64), 1, 8, True, "rademacher"),
    ("lowrank", (33, 48), 2, 3, False, "rademacher"),
    ("full", (33, 65), 1, 8, True, "gaussian"),
    ("full", (33, 65), 1, 3, False, "rademacher"),
    ("lowrank", (37,), 1, 8, True, "gaussian"),  # 1-D: dense noise whatever the mode
    ("full", (37,), 1, 1, False, "rademacher"),
]


def _spec(rng: torch.Generator, antithetic: bool = True, kind: str = "gaussian", step: int | None = None) -> NoiseSpec:
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3
    step = int(torch.randint(0, 2**31, (1,), generator=rng)) if step is None else step
    return NoiseSpec(seed=seed, step=step, kind=kind, antithetic=antithetic)


def _run(w0: torch.Tensor, *args: object, backend: str) -> torch.Tensor:
    w = w0.clone()
    out = es_update(w, *args, backend=backend)
    assert out is w
    return w


def _ulp_up(x: torch.Tensor) -> torch.Tensor:
    """Spacing above |x| in x's dtype, as fp64: bounds the rounding error of any result equal to x."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)).double() - a.double()).abs()


def _assert_fp32_close(got: torch.Tensor, want: torch.Tensor, w0: torch.Tensor) -> None:
    assert not torch.isnan(got).any()
    tol = 1e-5 * (want.double().abs() + (want.double() - w0.double()).abs().max())
    err = (got.double() - want.double()).abs()
    worst = int(torch.argmax(err - tol))
    assert bool((err <= tol).all()), f"element {worst}: got {got.flatten()[worst]}, want {want.flatten()[worst]}"


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("mode", "shape", "rank", "members", "antithetic", "kind"), CASES)
def test_fp32_matches_reference(rng, backend, mode, shape, rank, members, antithetic, kind):
    spec = _spec(rng, antithetic, kind)
    w0 = torch.randn(shape, generator=rng)
    coeffs = torch.randn(members, generator=rng, dtype=torch.float64)
    args = (spec, coeffs, 0.3, 0.7, mode, rank, NAME)
    want = es_update_ref(w0.clone(), *args)
    got = _run(w0, *args, backend=backend)
    # in place, so an element the kernel skips equals W0: seen wherever the update is non-zero (not all
    # of them for rank-4 Rademacher noise, whose entries (±1 ± 1 ± 1 ± 1)/2 can be 0)
    assert float((want != w0).float().mean()) > 0.5
    _assert_fp32_close(got, want, w0)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(("mode", "shape", "rank"), [("lowrank", (33, 65), 1), ("lowrank", (33, 64), 4),
                                                     ("full", (33, 65), 1), ("full", (37,), 1)])
def test_low_precision_is_stochastic_rounding_of_the_fp32_sum(rng, dtype, mode, shape, rank):
    spec = _spec(rng)
    w0 = torch.randn(shape, generator=rng).to(dtype)
    coeffs = torch.randn(8, generator=rng, dtype=torch.float64) * 0.05
    args = (spec, coeffs, 1.0, 0.5, mode, rank, NAME)
    got = _run(w0, *args, backend="triton") if TRITON == ["triton"] else None
    if got is not None:
        fp32 = _run(w0.float(), *args, backend="triton")
        want_bits = stochastic_round_ref(fp32, dtype, spec.seed, NAME, spec.step)
        assert torch.equal(got.view(torch.int16), want_bits.view(torch.int16))
    ref = es_update_ref(w0.clone(), *args)
    for out in [o for o in (got, _run(w0, *args, backend="cpu")) if o is not None]:
        assert not torch.isnan(out).any()
        diff = (out.double() - ref.double()).abs()
        assert bool((diff <= _ulp_up(ref) * 1.0001).all())  # one ulp, and only where the fp32 sums differ
        assert int((diff > 0).sum()) <= max(3, out.numel() // 100)


@pytest.mark.skipif(TRITON != ["triton"], reason="triton unusable")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter: inf − inf in masked lanes
@pytest.mark.parametrize("dtype", LOW)
def test_rounding_edges_zero_subnormal_overflow(rng, dtype):
    """Zeros, subnormals, sign changes and values past the dtype's max round as the reference does."""
    spec = _spec(rng)
    info = torch.finfo(dtype)
    tiny = info.smallest_normal
    small = (torch.rand(192, generator=rng) - 0.5) * 4 * tiny
    if dtype == torch.bfloat16 and _backend.triton_interpreted():
        # the interpreter's bf16 → fp32 load mangles subnormal inputs (a GPU converts exactly):
        # start from normals and zeros; the updates still produce subnormals, zeros and sign flips
        small = torch.where(small.abs() < tiny, torch.sign(small) * tiny, small)
    small = torch.cat([torch.zeros(64), small])
    big = (torch.rand(256, generator=rng) * 0.02 + 0.98) * info.max * torch.sign(torch.randn(256, generator=rng))
    coeffs = torch.randn(4, generator=rng, dtype=torch.float64)
    for w0, lr in ((small.to(dtype), 0.3 * tiny), (big.to(dtype), 0.02 * info.max)):
        args = (spec, coeffs, lr, 1.0, "full", 1, NAME)
        got = _run(w0, *args, backend="triton")
        fp32 = _run(w0.float(), *args, backend="triton")
        want = stochastic_round_ref(fp32, dtype, spec.seed, NAME, spec.step)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


# --------------------------------------------------------------------------- exactness, determinism


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("mode", "rank"), [("lowrank", 4), ("full", 1)])
def test_minus_coeffs_undo(rng, backend, mode, rank):
    """c then −c. The second update adds exactly −Δ (negation commutes with every rounding), so
    from W0 = 0: fl(0 + Δ) = Δ and fl(Δ − Δ) = 0 exactly. From a general W0 each add rounds once:
    W2 − W0 = δ1 + δ2 with |δi| ≤ ½ ulp(Wi), so exact restoration is not promised, 1 ulp is."""
    spec = _spec(rng)
    coeffs = torch.randn(8, generator=rng, dtype=torch.float64)
    for w0 in (torch.zeros(33, 65), torch.randn(33, 65, generator=rng)):
        w1 = _run(w0, spec, coeffs, 0.1, 1.0, mode, rank, NAME, backend=backend)
        w2 = _run(w1, spec, -coeffs, 0.1, 1.0, mode, rank, NAME, backend=backend)
        if not w0.any():
            assert bool(w1.ne(0).all()) and torch.equal(w2, w0)
        else:
            bound = 0.5 * (_ulp_up(w1) + _ulp_up(w2))
            assert bool(((w2.double() - w0.double()).abs() <= bound).all())


@pytest.mark.skipif(TRITON != ["triton"], reason="triton unusable")
@pytest.mark.parametrize(("mode", "dtype"), [("lowrank", torch.bfloat16), ("full", torch.float32)])
def test_deterministic(rng, mode, dtype):
    spec = _spec(rng)
    w0 = torch.randn(33, 65, generator=rng).to(dtype)
    coeffs = torch.randn(8, generator=rng)
    a, b = (_run(w0, spec, coeffs, 0.05, 1.0, mode, 1, NAME, backend="triton") for _ in range(2))
    assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       b.view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelling_pair_is_a_no_op(rng, backend):
    """Antithetic members with equal coefficients fold to zero: bf16 W must come back bit-identical."""
    w0 = torch.randn(9, 20, generator=rng).to(torch.bfloat16)
    w = _run(w0, _spec(rng), torch.tensor([0.5, 0.5]), 1.0, 1.0, "lowrank", 1, NAME, backend=backend)
    assert torch.equal(w.view(torch.int16), w0.view(torch.int16))


# --------------------------------------------------------------------------- stochastic rounding is unbiased


@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_rounding_is_unbiased(rng, dtype):
    """Rounded updates over T steps average to the fp32 updates.

    Given the fp32 value v in [down, up], R is up with probability p = (v − down)/gap, so E[R − v] = 0
    and Var[R − v] = (up − v)(v − down). Over n elements × T steps (independent bits), with weights
    w = 1 and w = sign(v − W0) (a function of v, so still E = 0), Z = Σ w(R − v)/sqrt(Σ(up − v)(v − down))
    is ~N(0, 1): we test |Z| ≤ 5. Updates are ~0.3 ulp, so round-to-nearest, which drops them
    (R = W0), has a signed Z far beyond 5 — checked, so the test can tell the two apart.
    """
    backend = "triton" if TRITON == ["triton"] else "cpu"
    n, steps = 1024, 16
    w0 = (torch.randn(n, generator=rng) + 3.0).to(dtype)
    lr = 0.3 * float(_ulp_up(w0).mean())
    coeffs = torch.tensor([0.5, -0.3, 0.4, 0.2], dtype=torch.float64)
    base = _spec(rng)
    z = torch.zeros(3, dtype=torch.float64)  # Σ(R − v), Σ sign·(R − v), Σ sign·(RTN − v)
    var = 0.0
    for step in range(steps):
        spec = NoiseSpec(seed=base.seed, step=step)
        v = _run(w0.float(), spec, coeffs, lr, 1.0, "full", 1, NAME, backend="cpu").double()
        r = _run(w0, spec, coeffs, lr, 1.0, "full", 1, NAME, backend=backend).double()
        near = v.to(dtype).double()
        other = torch.nextafter(v.to(dtype), torch.where(near > v, -math.inf, math.inf).to(dtype)).double()
        down, up = torch.minimum(near, other), torch.maximum(near, other)
        assert bool(((r == down) | (r == up)).all())
        sign = torch.sign(v - w0.double())
        z += torch.stack([(r - v).sum(), (sign * (r - v)).sum(), (sign * (near - v)).sum()])
        var += float(((up - v) * (v - down)).sum())
    z /= math.sqrt(var)
    assert abs(z[0]) <= 5 and abs(z[1]) <= 5, f"z = {z.tolist()}"
    assert abs(z[2]) > 5, "inputs too coarse to tell stochastic rounding from round-to-nearest"


# --------------------------------------------------------------------------- the ES gradient


OUT_F, IN_F, MEMBERS, SIGMA = 8, 12, 2048, 0.05
# See test_es_estimate_aligns_with_gradient: full M = d + 2 = 98, lowrank (r = 1) M = (m+2)(n+2) = 140.
EXPECTED_COS = {"full": 1 / math.sqrt(1 + 97 / 1024), "lowrank": 1 / math.sqrt(1 + 139 / 1024)}  # .956, .938
MIN_COS = {"full": 0.9, "lowrank": 0.88}  # simulated sd of the cosine: .006 and .009 → ≥ 6 sd margin


def _noise_bank(spec: NoiseSpec, mode: str, count: int) -> torch.Tensor:
    """E for noise indices 0..count-1 at once, [count, OUT_F, IN_F] fp64, from one broadcast Philox call
    (member_noise_tensor one member at a time costs seconds here); spot-checked against it."""
    length = OUT_F * IN_F if mode == "full" else OUT_F + IN_F
    blocks = torch.arange((length + 3) // 4)[None, :]
    words = philox4x32(blocks, tensor_id(NAME), torch.arange(count)[:, None], spec.step, *split_seed(spec.seed))
    vals = gaussian_from_words(words).reshape(count, -1)[:, :length]
    if mode == "full":
        bank = vals.reshape(count, OUT_F, IN_F)
    else:  # rank 1: B (in) first, then A (out)
        bank = vals[:, IN_F:, None] * vals[:, None, :IN_F]
    for m in (0, 1, 2 * count - 1):
        want = member_noise_tensor(spec, NAME, m, (OUT_F, IN_F), mode, rank=1)
        assert torch.equal(bank[m // 2] * (1 - 2 * (m % 2)), want)
    return bank.double()


@lru_cache(maxsize=2)
def _es_problem(seed: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, NoiseSpec]:
    """(true gradient, coefficients c_m = f(W + σE_m)/(Nσ), spec) for f(W) = −‖X Wᵀ − Y‖² in fp64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, IN_F, generator=g, dtype=torch.float64)
    y = torch.randn(16, OUT_F, generator=g, dtype=torch.float64)
    w = torch.randn(OUT_F, IN_F, generator=g, dtype=torch.float64) * 0.3
    spec = NoiseSpec(seed=seed * 7 + 1, step=3, antithetic=True)
    grad = -2.0 * (x @ w.T - y).T @ x
    bank = _noise_bank(spec, mode, MEMBERS // 2)
    signed = torch.stack([bank, -bank], 1).reshape(MEMBERS, OUT_F, IN_F)  # member m: index m // 2, sign ±
    fitness = -((x @ (w + SIGMA * signed).transpose(1, 2) - y) ** 2).sum((1, 2))
    return grad, fitness / (MEMBERS * SIGMA), spec


@pytest.fixture(scope="module")
def problem_seed() -> int:
    """One fresh problem per module run, shared by both backends (the fitness loop is the slow part)."""
    seed = int.from_bytes(os.urandom(3), "little")
    print(f"ES problem seed: {seed}")
    return seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["full", "lowrank"])
def test_es_estimate_aligns_with_gradient(problem_seed, backend, mode):
    """f is quadratic, so an antithetic pair gives f(W+σE) − f(W−σE) = 2σ⟨G, E⟩ exactly (G = ∇f) and
    ĝ = Σ c_m E_m = (1/P) Σ_p v_p, v_p = ⟨G, E_p⟩ E_p, P = N/2. E[E ⊗ E] = I (full, and lowrank with the
    1/√r normalization), so E[ĝ] = G and E‖ĝ‖² = ‖G‖²(1 + (M − 1)/P) with M = E‖v‖²/‖G‖²:
    full (Isserlis): M = d + 2; lowrank rank r, E = A Bᵀ/√r, A: m×r, B: n×r Gaussian:
    M = (m+2)(n+2)/r + (1 − 1/r)(mn + 2) (the r = 1 terms use E[(aᵀu)²‖a‖²] = (m+2)‖u‖²).
    cos ≈ E⟨ĝ,G⟩/(‖G‖ sqrt(E‖ĝ‖²)) = 1/sqrt(1 + (M − 1)/P). For 8 × 12, N = 2048: .956 (full),
    .938 (lowrank); 300 simulated draws gave means .956/.940, sd .006/.009, minima .927/.910.
    N = 512 would give only .852/.805: the brief's cos ≥ 0.9 at N = 512 needs d ≲ 40.
    """
    grad, coeffs, spec = _es_problem(problem_seed, mode)
    estimate = _run(torch.zeros(OUT_F, IN_F), spec, coeffs, 1.0, 1.0, mode, 1, NAME, backend=backend).double()
    cos = float((estimate * grad).sum() / (estimate.norm() * grad.norm()))
    assert cos >= MIN_COS[mode], f"cos {cos:.3f}, expected ≈ {EXPECTED_COS[mode]:.3f}"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "arg"), [
    ({"weight": torch.zeros(2, 3, 4)}, "weight"),
    ({"weight": torch.zeros(4, 5, dtype=torch.float64)}, "weight"),
    ({"coeffs": torch.zeros(2, 2)}, "coeffs"),
    ({"coeffs": torch.zeros(4, dtype=torch.int64)}, "coeffs"),
    ({"coeffs": torch.tensor([1.0, math.nan])}, "coeffs"),
    ({"coeffs": torch.tensor([1.0, math.inf])}, "coeffs"),
    ({"rank": 0}, "rank"),
    ({"rank": 5}, "rank"),
    ({"lr": math.nan}, "lr"),
    ({"scale": math.inf}, "scale"),
    ({"mode": "lora"}, "mode"),
    ({"noise": 3}, "noise"),
    ({"name": ""}, "name"),
    ({"backend": "gpu"}, "backend"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(kwargs, arg, backend):
    call = {"weight": torch.zeros(4, 5), "noise": NoiseSpec(seed=1), "coeffs": torch.arange(4.0), "lr": 0.1,
            "scale": 1.0, "mode": "lowrank", "rank": 1, "name": NAME, "backend": backend, **kwargs}
    with pytest.raises(ValueError, match=arg):
        es_update(**call)


@pytest.mark.skipif(TRITON != ["triton"], reason="triton unusable")
@pytest.mark.parametrize("block_k", [16, 64])
def test_triton_lowrank_sums_every_factor_chunk(rng, block_k):
    """K·r = 48 factor columns: 3 chunks of 16 per tl.dot (as on a GPU at r = 4) or one padded chunk of 64."""
    from fastes.ops.es_update_triton import es_update_triton

    spec = _spec(rng, antithetic=False)
    w0 = torch.randn(40, 72, generator=rng)
    coeffs = torch.randn(12, generator=rng, dtype=torch.float64)
    args = (spec, coeffs, 0.3, 0.7, "lowrank", 4, NAME)
    want = es_update_ref(w0.clone(), *args)
    got = w0.clone()
    es_update_triton(got, *args, block_k=block_k)
    _assert_fp32_close(got, want, w0)


@pytest.mark.skipif(TRITON != ["triton"], reason="triton unusable")
def test_triton_rejects_non_contiguous_weight():
    with pytest.raises(ValueError, match="weight"):
        es_update(torch.zeros(6, 4).T, NoiseSpec(seed=1), torch.ones(2), 0.1, backend="triton")


# --------------------------------------------------------------------------- GPU, real shapes


def _sampled_direction(spec: NoiseSpec, folded: list[tuple[int, float]], shape: tuple[int, int], mode: str,
                       rank: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Σ_k c_k E_k at (rows, cols) in fp64 from the torch reference stream, without materializing E."""
    out = torch.zeros(rows.numel(), dtype=torch.float64)
    k0, k1 = split_seed(spec.seed)
    for index, c in folded:
        if mode == "lowrank":
            a, b = materialize_lowrank(spec.seed, NAME, index, *shape, rank, spec.kind, spec.step)
            out += c * (a[rows].double() * b[cols].double()).sum(1) / math.sqrt(rank)
        else:
            e = rows * shape[1] + cols
            words = philox4x32(e // 4, tensor_id(NAME), index, spec.step, k0, k1)
            out += c * gaussian_from_words(words).gather(1, (e % 4)[:, None]).squeeze(1).double()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1536, 1536), (8960, 1536), (151936, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("mode", "members"), [("lowrank", 32), ("full", 8)])
def test_gpu_real_shapes(rng, shape, dtype, mode, members):
    from fastes.ops.es_update import fold_coefficients

    spec = _spec(rng)
    w0 = torch.randn(shape, generator=rng).to(dtype).cuda()
    coeffs = torch.randn(members, generator=rng, dtype=torch.float64) / members
    lr, scale = 0.01, 0.5
    got = _run(w0, spec, coeffs, lr, scale, mode, 1, NAME, backend="triton")
    fp32 = _run(w0.float(), spec, coeffs, lr, scale, mode, 1, NAME, backend="triton")
    rows = torch.randint(0, shape[0], (4096,), generator=rng)
    cols = torch.randint(0, shape[1], (4096,), generator=rng)
    base = w0.float().cpu()[rows, cols].double()
    want = base + lr * scale * _sampled_direction(spec, fold_coefficients(spec, coeffs), shape, mode, 1, rows, cols)
    got_s, fp32_s = got.cpu()[rows, cols], fp32.cpu()[rows, cols]
    _assert_fp32_close(fp32_s, want.float(), base.float())
    if dtype == torch.bfloat16:
        e = rows * shape[1] + cols
        k0, k1 = split_seed(spec.seed)
        words = philox4x32(e // 4, sr_tensor_id(NAME), SR_NOISE_INDEX, spec.step, k0, k1).gather(1, (e % 4)[:, None])
        assert torch.equal(got_s.view(torch.int16), round_bf16(fp32_s, words.squeeze(1)).view(torch.int16))
        slack = 1e-5 * float((want - base).abs().max())
        assert bool(((got_s.double() - want).abs() <= 1.001 * _ulp_up(got_s) + slack).all())
    else:  # the CPU path's rounding bits for 2e8 elements would take minutes in torch: fp32 only
        cpu = _run(w0, spec, coeffs, lr, scale, mode, 1, NAME, backend="cpu").cpu()[rows, cols]
        _assert_fp32_close(cpu, got_s, base.float())
