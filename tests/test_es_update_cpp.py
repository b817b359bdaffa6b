"""The CPU fast path of the update (fastes._C): fused full-rank es_update, stochastic rounding and
noise_fill_many, against the torch references.

Tolerances (each stated where used):
* fp32 update: 1e-5 relative to the operands of the final add (as in test_es_update.py).
* bf16/fp16 update: bit-identical to ``stochastic_round_ref`` applied to the kernel's own fp32 sums
  (the same kernel run on the upcast weight); within 1 ulp of ``es_update_ref``, whose fp32 sums
  differ in the last bits (other summation order, other libm for Box–Muller).
* rounding and noise_fill_many: bit-identical (same uint32 stream, same integer/IEEE ops).
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from fastes import _backend
from fastes.noise import NoiseSpec, sr_tensor_id, stochastic_rounding_bits, stream, tensor_id
from fastes.ops import member_noise
from fastes.ops.es_update import es_update, es_update_ref, fold_coefficients
from fastes.ops.stochastic_round import round_bf16, round_fp16, stochastic_round, stochastic_round_ref

C = pytest.importorskip("fastes._C", reason="fastes._C extension not built (pip install -e . --no-build-isolation)")
if not all(hasattr(C, f) for f in ("es_update_full", "stochastic_round", "noise_fill_many")):
    pytest.skip("fastes._C is an older build without the update kernels: rebuild it", allow_module_level=True)

NAME = "model.layers.0.self_attn.o_proj.weight"
LOW = (torch.bfloat16, torch.float16)
I16 = torch.int16


def _spec(rng: torch.Generator, antithetic: bool = True, kind: str = "gaussian") -> NoiseSpec:
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3
    return NoiseSpec(seed=seed, step=int(torch.randint(0, 2**31, (1,), generator=rng)), kind=kind,
                     antithetic=antithetic)


def _cpu_update(w0: torch.Tensor, *args: object) -> torch.Tensor:
    w = w0.clone()
    assert es_update(w, *args, backend="cpu") is w
    return w


def _ulp_up(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)).double() - a.double()).abs()


def _fused(w: torch.Tensor, spec: NoiseSpec, coeffs: torch.Tensor, threads: int) -> torch.Tensor:
    """The raw kernel on a copy of ``w`` with lr = s = 1 and an explicit thread count."""
    folded = fold_coefficients(spec, coeffs)
    out = w.clone()
    C.es_update_full(out, spec.seed, tensor_id(NAME), [i for i, _ in folded], [c for _, c in folded], spec.step,
                     spec.kind, sr_tensor_id(NAME), num_threads=threads)
    return out


# --------------------------------------------------------------------------- fused full-rank update

# (shape, members, antithetic, kind): odd sizes end mid-tile and mid-block; 3000 > one 1024-element tile.
FULL_CASES = [((33, 65), 8, True, "gaussian"), ((37,), 3, False, "gaussian"), ((3, 1001), 8, True, "gaussian"),
              ((33, 65), 5, False, "rademacher"), ((3000,), 8, True, "rademacher")]


@pytest.mark.parametrize(("shape", "members", "antithetic", "kind"), FULL_CASES)
def test_fused_fp32_matches_reference(rng, shape, members, antithetic, kind):
    spec = _spec(rng, antithetic, kind)
    w0 = torch.randn(shape, generator=rng)
    coeffs = torch.randn(members, generator=rng, dtype=torch.float64)
    args = (spec, coeffs, 0.3, 0.7, "full", 1, NAME)
    want = es_update_ref(w0.clone(), *args)
    got = _cpu_update(w0, *args)
    assert not torch.isnan(got).any() and float((got != w0).float().mean()) > 0.5
    tol = 1e-5 * (want.double().abs() + (want.double() - w0.double()).abs().max())
    assert bool(((got.double() - want.double()).abs() <= tol).all())


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(("shape", "kind"), [((33, 65), "gaussian"), ((3, 1001), "gaussian"), ((37,), "rademacher")])
def test_fused_low_precision_is_rounding_of_its_fp32_sum(rng, dtype, shape, kind):
    spec = _spec(rng, kind=kind)
    w0 = torch.randn(shape, generator=rng).to(dtype)
    coeffs = torch.randn(8, generator=rng, dtype=torch.float64) * 0.05
    args = (spec, coeffs, 1.0, 0.5, "full", 1, NAME)
    got = _cpu_update(w0, *args)
    fp32 = _cpu_update(w0.float(), *args)
    want = stochastic_round_ref(fp32, dtype, spec.seed, NAME, spec.step)
    assert torch.equal(got.view(I16), want.view(I16))
    ref = es_update_ref(w0.clone(), *args)
    diff = (got.double() - ref.double()).abs()
    assert bool((diff <= _ulp_up(ref) * 1.0001).all())  # one ulp, only where the fp32 sums differ
    assert int((diff > 0).sum()) <= max(3, got.numel() // 100)


@pytest.mark.parametrize(("dtype", "kind"), [(torch.float32, "gaussian"), (torch.bfloat16, "gaussian"),
                                             (torch.float16, "rademacher")])
def test_fused_thread_count_independent(rng, dtype, kind):
    """Above the serial threshold (n·K ≥ 2**15) with many tiles: 1, 2 and 3 threads give the same bits."""
    spec = _spec(rng, kind=kind)
    w0 = torch.randn(70001, generator=rng).to(dtype)
    coeffs = torch.randn(6, generator=rng, dtype=torch.float64) * 0.01
    one = _fused(w0, spec, coeffs, 1)
    view = I16 if dtype != torch.float32 else torch.int32
    assert not torch.equal(one.view(view), w0.view(view))
    for threads in (2, 3):
        assert torch.equal(_fused(w0, spec, coeffs, threads).view(view), one.view(view))


def test_fused_non_contiguous_weight_and_bad_input(rng):
    spec = _spec(rng)
    base = torch.randn(40, 30, generator=rng).to(torch.bfloat16)
    coeffs = torch.randn(4, generator=rng)
    strided = base.clone().T  # logical row-major order of the transposed view is what the noise indexes
    want = _cpu_update(strided.contiguous(), spec, coeffs, 0.1, 1.0, "full", 1, NAME)
    es_update(strided, spec, coeffs, 0.1, 1.0, "full", 1, NAME, backend="cpu")
    assert torch.equal(strided.view(I16), want.view(I16))
    with pytest.raises(ValueError, match="contiguous"):
        C.es_update_full(base.T, 1, 2, [0], [1.0], 0, 0, 3)
    with pytest.raises(ValueError, match="coeffs"):
        C.es_update_full(base, 1, 2, [0, 1], [1.0], 0, 0, 3)
    with pytest.raises(ValueError, match="weight"):
        C.es_update_full(base.double(), 1, 2, [0], [1.0], 0, 0, 3)
    with pytest.raises(ValueError, match="noise_indices"):
        C.es_update_full(base, 1, 2, [-1], [1.0], 0, 0, 3)


# --------------------------------------------------------------------------- stochastic rounding


def _edge_values(rng: torch.Generator, n: int) -> torch.Tensor:
    """Random magnitudes over the whole fp32 range, plus zeros, fp16/bf16 subnormals, fp16 overflow, inf."""
    mags = torch.exp2(torch.rand(n, generator=rng) * 280 - 150)  # fp32 subnormals .. ~2**130 (→ inf)
    vals = mags * torch.sign(torch.randn(n, generator=rng))
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 65504.0, 65519.99, 65520.0, -65510.0, 2.0**-24,
                            2.0**-25, -(2.0**-25) * 3, 6.1e-5, 3.4e38, -3.4e38, 1.0, -1.0])
    near = (torch.randn(n, generator=rng) * 4).to(torch.float16).float() * (1 + 1e-4 * torch.randn(n, generator=rng))
    return torch.cat([special, vals, near])


@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_round_bit_identical(rng, dtype):
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3
    step = int(torch.randint(0, 2**32, (1,), generator=rng))
    value = _edge_values(rng, 20000).reshape(-1, 8)
    want = stochastic_round_ref(value, dtype, seed, NAME, step)
    for backend in ("cpp", "auto"):
        out = torch.full(value.shape, math.nan, dtype=dtype)
        assert stochastic_round(value, out, seed, NAME, step, backend=backend) is out
        assert torch.equal(out.view(I16), want.view(I16)), backend
    # several threads, and an offset that starts mid-block: element i takes the word of element offset + i
    big = _edge_values(rng, 70000)
    offset = 4 * 1024 + 3
    bits = stochastic_rounding_bits(seed, NAME, step, big.numel(), offset)
    ref = round_bf16(big, bits) if dtype == torch.bfloat16 else round_fp16(big, bits)
    for threads in (1, 2):
        out = torch.empty(big.shape, dtype=dtype)
        C.stochastic_round(big, out, seed, sr_tensor_id(NAME), step, offset, threads)
        assert torch.equal(out.view(I16), ref.view(I16))


def test_stochastic_round_dispatch(rng):
    value = torch.randn(6, 10, generator=rng)
    out = torch.empty(10, 6, dtype=torch.float16).T  # non-contiguous target
    stochastic_round(value, out, 5, NAME, 2)
    assert torch.equal(out.contiguous().view(I16), stochastic_round_ref(value, torch.float16, 5, NAME, 2).view(I16))
    fp32 = torch.empty(6, 10)
    assert torch.equal(stochastic_round(value, fp32, 5, NAME, 2), value)
    with pytest.raises(ValueError, match="shape"):
        stochastic_round(value, torch.empty(60, dtype=torch.bfloat16), 5, NAME, 2)
    with pytest.raises(ValueError, match="overlap"):
        buf = torch.zeros(8)
        C.stochastic_round(buf, buf[:4].view(torch.bfloat16), 1, 2, 3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter: inf − inf on the edge values
def test_stochastic_round_triton(rng):
    """The small Triton rounding kernel (used on CUDA; under the interpreter on CPU-only machines)."""
    from fastes.ops import stochastic_round as sr

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if sr.triton is None or (device == "cpu" and not _backend.triton_interpreted()):
        pytest.skip("triton unusable here")
    value = _edge_values(rng, 500)
    for dtype in LOW:
        out = torch.empty(value.shape, dtype=dtype, device=device)
        stochastic_round(value.to(device), out, 11, NAME, 4, backend="triton")
        want = stochastic_round_ref(value, dtype, 11, NAME, 4)
        assert torch.equal(out.cpu().view(I16), want.view(I16))


# --------------------------------------------------------------------------- noise_fill_many


@pytest.mark.parametrize(("kind", "n", "offset"), [("gaussian", 1001, 6), ("gaussian", 20000, 0),
                                                   ("rademacher", 5000, 130), ("rademacher", 64, 0)])
def test_noise_fill_many_equals_rows(rng, kind, n, offset):
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3
    indices = [0, 7, 2**32 - 1, 7]
    for threads in (1, 2):
        out = torch.full((len(indices), n), math.nan)
        assert C.noise_fill_many(out, seed, 123, indices, 9, offset, kind, threads) is out
        for row, index in enumerate(indices):
            one = torch.empty(n)
            C.noise_fill(one, seed, 123, index, 9, offset, kind)
            assert torch.equal(out[row], one)
    ref = stream(seed, 123, 0, 9, offset, n, kind)  # the contract: signs exact, Gaussians to a few ulp
    assert bool(((out[0].double() - ref.double()).abs() <= 4 * _ulp_up(ref)).all())
    C.noise_fill_many(torch.empty(0, n), seed, 1, [], 0, 0, kind)  # no rows: a no-op
    with pytest.raises(ValueError, match="noise_indices"):
        C.noise_fill_many(torch.empty(3, n), seed, 1, [1, 2], 0, 0, kind)


def test_stream_tensors_mixes_cache_and_fill(rng):
    spec = _spec(rng)
    member_noise.clear_cache()
    cached = member_noise.stream_tensor(spec, NAME, 3, 500)
    rows = member_noise.stream_tensors(spec, NAME, [1, 3, 4], 500)
    assert torch.equal(rows[1], cached)
    for row, index in ((0, 1), (2, 4)):
        assert torch.equal(rows[row], member_noise.stream_tensor(spec, NAME, index, 500))


# --------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("ext", [None, types.SimpleNamespace(noise_fill=C.noise_fill)], ids=["missing", "stale"])
@pytest.mark.parametrize(("mode", "dtype"), [("full", torch.bfloat16), ("lowrank", torch.float16),
                                             ("full", torch.float32)])
def test_without_update_kernels_the_torch_path_agrees(rng, monkeypatch, ext, mode, dtype):
    """No extension (or one built before these kernels): the torch path runs and agrees with the C++ path."""
    spec = _spec(rng)
    w0 = torch.randn(17, 24, generator=rng).to(dtype)
    coeffs = torch.randn(6, generator=rng, dtype=torch.float64) * 0.1
    args = (spec, coeffs, 0.5, 1.0, mode, 2, NAME)
    fast = _cpu_update(w0, *args)
    monkeypatch.setattr(_backend, "extension", lambda: ext)
    member_noise.clear_cache()
    slow = _cpu_update(w0, *args)
    member_noise.clear_cache()
    if mode == "lowrank" and ext is not None:  # same C++ factors, same GEMM, same rounding: the same bits
        assert torch.equal(slow.view(I16), fast.view(I16))
    elif dtype == torch.float32:
        tol = 1e-5 * (fast.double().abs() + (fast.double() - w0.double()).abs().max())
        assert bool(((slow.double() - fast.double()).abs() <= tol).all())
    else:  # torch noise differs from C++ by a few ulp: at most the other neighbour of the rounding interval
        assert bool(((slow.double() - fast.double()).abs() <= _ulp_up(fast) * 1.0001).all())
