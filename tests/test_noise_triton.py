"""Triton noise backend vs the torch reference of the noise contract (fastes/noise.py).

uint32 words and Rademacher signs must be bit-identical. Gaussians may differ by the
libm of each side (numpy/libdevice vs torch): we accept |triton - ref| <= 4 * 2**-23 * r,
with r the Box-Muller radius of the element's pair (r >= |value|), i.e. 4 ulp of the
pair's magnitude; the interpreter measures at most ~2.1 such units.
"""

from __future__ import annotations

import pytest
import torch

from fastes import _backend
from fastes import noise as ref
from fastes.noise import as_i32
from fastes.ops import noise as ops

pytestmark = pytest.mark.skipif(ops.triton is None, reason=f"triton unusable: {ops._TRITON_ERROR}")

GAUSS_ULPS = 4.0
EPS32 = 2.0**-23
U32_MAX = 0xFFFFFFFF
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _radius(seed: int, tid: int, idx: int, step: int, offset: int, n: int) -> torch.Tensor:
    """Box-Muller radius (float64) of each element offset .. offset+n-1 of a Gaussian stream."""
    first = offset // 4
    words = ref.uint32_blocks(seed, tid, idx, step, first, (offset + n - 1) // 4 - first + 1)
    u1 = ((words[:, 0::2] >> 8) + 1).double() * 2.0**-24
    r = torch.sqrt(-2.0 * torch.log(u1)).repeat_interleave(2, dim=1).reshape(-1)
    return r[offset - 4 * first : offset - 4 * first + n]


def assert_matches(out: torch.Tensor, seed: int, tid: int, idx: int, step: int, offset: int, kind: str) -> None:
    got = out.detach().reshape(-1).cpu()
    n = got.numel()
    want = ref.stream(seed, tid, idx, step, offset, n, kind)
    assert not torch.isnan(got).any(), "NaN (poison not overwritten?)"
    if kind == "rademacher":
        assert torch.equal(got, want)
        return
    tol = GAUSS_ULPS * EPS32 * _radius(seed, tid, idx, step, offset, n)
    err = (got.double() - want.double()).abs()
    worst = int(torch.argmax(err - tol))
    assert bool((err <= tol).all()), f"element {worst}: got {got[worst].item()}, want {want[worst].item()}"


def poisoned(n: int, device: str = DEVICE) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- raw words


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF, 2**32 - 1, 2**32, 2**40 + 12345, 2**63 + 7, 2**64 - 1])
def test_words_bit_identical_across_seeds(seed: int) -> None:
    got = ops.philox_blocks_triton(seed, 0x1234ABCD, 3, 11, 5, 300, device=DEVICE).cpu()
    assert torch.equal(got, ref.uint32_blocks(seed, 0x1234ABCD, 3, 11, 5, 300))


@pytest.mark.parametrize(
    ("tid", "idx", "step", "start"),
    [
        (0, 0, 0, 0),
        (U32_MAX, U32_MAX, U32_MAX, 2**32 - 257),
        (2**31, 2**31 - 1, 2**31, 2**31 - 3),
        (ref.tensor_id("x"), 7, 1, 129),
    ],
)
def test_words_bit_identical_across_counters(tid: int, idx: int, step: int, start: int) -> None:
    seed = 2**64 - 2
    got = ops.philox_blocks_triton(seed, tid, idx, step, start, 257, device=DEVICE).cpu()
    assert torch.equal(got, ref.uint32_blocks(seed, tid, idx, step, start, 257))


# --------------------------------------------------------------------------- fill


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize(("offset", "n"), [(0, 1), (3, 5), (129, 127), (3, 1000), (129, 1000), (2**33 + 3, 129)])
def test_fill_matches_reference(kind: str, elementwise: bool, offset: int, n: int) -> None:
    seed, tid, idx, step = 2**64 - 1, ref.tensor_id("model.layers.0.mlp.up_proj.weight"), 5, 17
    out = ops.noise_fill_triton(poisoned(n), seed, tid, idx, step, offset, kind, elementwise=elementwise)
    assert_matches(out, seed, tid, idx, step, offset, kind)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_end_of_counter_space(kind: str) -> None:
    per = ref.VALUES_PER_BLOCK[kind]
    offset = per * 2**32 - 37
    out = ops.noise_fill_triton(poisoned(37), 99, 1, 2, 3, offset, kind)
    assert_matches(out, 99, 1, 2, 3, offset, kind)
    with pytest.raises(ValueError, match="counter space"):
        ops.noise_fill_triton(poisoned(38), 99, 1, 2, 3, offset, kind)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_block_size_does_not_change_values(kind: str) -> None:
    n, offset = 1001, 77
    runs = [
        ops.noise_fill_triton(poisoned(n), 42, 7, 1, 0, offset, kind, block=block, elementwise=ew).cpu()
        for block in (128, 512, 4096)
        for ew in (False, True)
    ]
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    assert_matches(runs[0], 42, 7, 1, 0, offset, kind)


def test_fill_2d_out_is_read_flat(rng: torch.Generator) -> None:
    seed = int(torch.randint(0, 2**62, (1,), generator=rng)) * 3
    out = torch.full((37, 29), float("nan"), device=DEVICE)
    ops.noise_fill(out, seed, 12, 3, step=4, offset=10, backend="triton")
    assert_matches(out, seed, 12, 3, 4, 10, "gaussian")


# --------------------------------------------------------------------------- device functions on 2-D tiles

if ops.triton is not None:
    import triton
    import triton.language as tl

    from fastes.ops import philox

    @triton.jit
    def _tile_kernel(out_ptr, k0, k1, tid, idx, step, R: tl.constexpr, C: tl.constexpr, MODE: tl.constexpr):
        """A [R, C] row-major tile of one stream, the way a matmul kernel would build it."""
        rows = tl.arange(0, R)[:, None]
        cols = tl.arange(0, C)[None, :]
        e = rows.to(tl.int64) * C + cols
        if MODE == 0:
            v = philox.noise_at(e, k0, k1, tid, idx, step, philox.GAUSSIAN)
        elif MODE == 1:
            v = philox.noise_at(e, k0, k1, tid, idx, step, philox.RADEMACHER)
        elif MODE == 2:  # per-block Gaussians interleaved along the last dimension
            b = rows.to(tl.int64) * (C // 4) + tl.arange(0, C // 4)[None, :]
            v = philox.gaussian_blocks_flat(b, k0, k1, tid, idx, step)
        if MODE == 3:  # whole Rademacher blocks, flat
            v3 = philox.rademacher_blocks_flat(tl.arange(0, R * C // 128), k0, k1, tid, idx, step)
            tl.store(out_ptr + tl.arange(0, R * C), v3)
        elif MODE >= 4:  # rows of 2 Rademacher blocks expanded in-thread, as float32 (4) or bfloat16 (5)
            b = tl.arange(0, R * C // 256)[:, None] * 2 + tl.arange(0, 2)[None, :]
            v4 = philox.rademacher_blocks_2d(b, k0, k1, tid, idx, step, MODE == 5).to(tl.float32)
            tl.store(out_ptr + tl.arange(0, R * C // 256)[:, None] * 256 + tl.arange(0, 256)[None, :], v4)
        else:
            tl.store(out_ptr + rows * C + cols, v)


@pytest.mark.parametrize(("mode", "kind"), [(0, "gaussian"), (1, "rademacher"), (2, "gaussian"), (3, "rademacher"),
                                           (4, "rademacher"), (5, "rademacher")])
def test_device_functions_on_2d_tile(mode: int, kind: str) -> None:
    seed, tid, idx, step = 2**33 + 1, U32_MAX, 2**31 + 9, 3
    out = torch.full((16, 64), float("nan"), device=DEVICE)
    k0, k1 = ref.split_seed(seed)
    _tile_kernel[(1,)](
        out, as_i32(k0), as_i32(k1), as_i32(tid), as_i32(idx), step, R=16, C=64, MODE=mode
    )
    assert_matches(out, seed, tid, idx, step, 0, kind)


# --------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_dispatcher_backends(backend: str, kind: str) -> None:
    out = ops.noise_fill(poisoned(513), 5, 6, 7, step=8, offset=131, kind=kind, backend=backend)
    assert_matches(out, 5, 6, 7, 8, 131, kind)


def test_dispatcher_cpp_backend() -> None:
    out = torch.full((300,), float("nan"))
    if _backend.extension() is None:
        with pytest.raises(RuntimeError, match="extension"):
            ops.noise_fill(out, 5, 6, 7, 8, 3, backend="cpp")
        return
    for kind in ("gaussian", "rademacher"):
        ops.noise_fill(out, 5, 6, 7, 8, 3, kind=kind, backend="cpp")
        assert_matches(out, 5, 6, 7, 8, 3, kind)


def test_empty_out_is_a_no_op() -> None:
    out = torch.empty(0)
    assert ops.noise_fill(out, 1, 2, 3, backend="triton") is out


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"tensor_id": 2**32}, "tensor_id"),
        ({"noise_index": -1}, "noise_index"),
        ({"step": 2**32}, "step"),
        ({"offset": -3}, "offset"),
        ({"kind": "normal"}, "kind"),
        ({"backend": "gpu"}, "backend"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, arg: str) -> None:
    args = {"seed": 1, "tensor_id": 2, "noise_index": 3, "step": 0, "offset": 0, "kind": "gaussian"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        ops.noise_fill(poisoned(8), **args)
    if "backend" not in kwargs:
        with pytest.raises(ValueError, match=arg):
            ops.noise_fill_triton(poisoned(8), **args)


def test_bad_out_and_block_raise_value_error() -> None:
    with pytest.raises(ValueError, match="float32"):
        ops.noise_fill(torch.zeros(8, dtype=torch.float64), 1, 2, 3)
    with pytest.raises(ValueError, match="contiguous"):
        ops.noise_fill(torch.zeros(8, 8).t(), 1, 2, 3)
    with pytest.raises(ValueError, match="out"):
        ops.noise_fill([0.0] * 8, 1, 2, 3)  # type: ignore[arg-type]
    for kind, block in (("gaussian", 2), ("gaussian", 12), ("rademacher", 16), ("gaussian", True)):
        with pytest.raises(ValueError, match="block"):
            ops.noise_fill_triton(poisoned(8), 1, 2, 3, 0, 0, kind, block=block)
    with pytest.raises(ValueError, match="num_blocks"):
        ops.philox_blocks_triton(1, 2, 3, 4, 0, -1, device=DEVICE)
    with pytest.raises(ValueError, match="counter space"):
        ops.philox_blocks_triton(1, 2, 3, 4, 2**32 - 1, 2, device=DEVICE)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        ops.noise_fill_triton(torch.zeros(8), 1, 2, 3, 0, 0, "gaussian")


# --------------------------------------------------------------------------- GPU, real sizes


def _check_windows(out: torch.Tensor, seed: int, tid: int, idx: int, step: int, offset: int, kind: str) -> None:
    """Compare random 1024-element windows (plus both ends) of a big fill with the reference."""
    n = out.numel()
    assert not torch.isnan(out).any()
    starts = [0, n - 1024] + torch.randint(0, n - 1024, (14,)).tolist()
    for s in starts:
        assert_matches(out[s : s + 1024], seed, tid, idx, step, offset + s, kind)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_gpu_large_fill(kind: str) -> None:
    n, seed, tid, idx, step, offset = 2**24, 2**64 - 1, ref.tensor_id("lm_head.weight"), 9, 123, 2**31 + 5
    out = ops.noise_fill(poisoned(n, "cuda"), seed, tid, idx, step, offset, kind)
    torch.cuda.synchronize()
    _check_windows(out, seed, tid, idx, step, offset, kind)
    mean, std = out.mean().item(), out.std().item()
    assert abs(mean) < 2e-3 and abs(std - 1.0) < 2e-3
    ew = ops.noise_fill_triton(poisoned(n, "cuda"), seed, tid, idx, step, offset, kind, elementwise=True)
    tol = 0 if kind == "rademacher" else GAUSS_ULPS * EPS32 * 6.0
    assert (ew - out).abs().max().item() <= tol


@pytest.mark.gpu
def test_gpu_words_large_range() -> None:
    got = ops.philox_blocks_triton(2**64 - 1, 5, 6, 7, 2**32 - 2**20, 2**20, device="cuda").cpu()
    want = ref.uint32_blocks(2**64 - 1, 5, 6, 7, 2**32 - 2**20, 2**20)
    assert torch.equal(got, want)
