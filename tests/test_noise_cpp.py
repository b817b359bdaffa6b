"""The compiled noise kernels (fastes._C) against the noise contract's torch reference, fastes.noise."""

from __future__ import annotations

import pytest
import torch

from fastes import noise

C = pytest.importorskip("fastes._C", reason="fastes._C extension not built (pip install -e . --no-build-isolation)")

# Gaussians may differ from the reference by a few ulp (different log/sin/cos); the C++ kernel
# measured <= 3 ulp against torch over 2**23 values. CUDA's sincosf is a 2-ulp function.
CPU_ULP = 4
CUDA_ULP = 6
U32 = 2**32
SEEDS = [0, 1, 0xDEADBEEF, 2**32, 2**32 + 12345, 2**63 + 7, 2**64 - 1]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of float32 (adjacent floats are 1 apart; -0.0 and +0.0 too)."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(torch.int32)
        return (i ^ ((i >> 31) & 0x7FFFFFFF)).to(torch.int64)  # monotonic in the float's value

    return (ordered(a) - ordered(b)).abs()


def assert_close_ulp(got: torch.Tensor, want: torch.Tensor, max_ulp: int) -> None:
    assert got.shape == want.shape
    assert not torch.isnan(got).any(), "NaN in kernel output"
    dist = ulp_distance(got, want)
    worst = int(dist.argmax())
    assert dist.max() <= max_ulp, f"{int(dist.max())} ulp at {worst}: {got[worst].item()!r} vs {want[worst].item()!r}"


def poisoned(n: int, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-filled buffer and a contiguous view of n elements inside it, to catch stray writes."""
    buf = torch.full((n + 2 * pad,), float("nan"))
    return buf, buf[pad : pad + n]


def fill(n: int, seed: int, tid: int, index: int, step: int, offset: int, kind: str, **kw: int) -> torch.Tensor:
    buf, out = poisoned(n)
    result = C.noise_fill(out, seed, tid, index, step, offset, noise.KINDS.index(kind), **kw)
    assert result.data_ptr() == out.data_ptr()
    assert torch.isnan(buf[:3]).all() and torch.isnan(buf[3 + n :]).all(), "kernel wrote outside out"
    return out


def draw(rng: torch.Generator, high: int) -> int:
    return int(torch.randint(0, high, (1,), generator=rng, dtype=torch.int64))


def random_stream(rng: torch.Generator) -> tuple[int, int, int, int]:
    """(seed, tensor id, noise index, step), the seed spanning all 64 bits."""
    seed = (draw(rng, U32) << 32) | draw(rng, U32)
    return seed, draw(rng, U32), draw(rng, 1 << 16), draw(rng, 1 << 16)


# --------------------------------------------------------------------------- raw generator


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter: tuple[int, ...], key: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Random123's Philox4x32-10 known-answer vectors, through the C++ generator and the reference."""
    assert tuple(C.philox4x32_raw(*counter, *key)) == expected
    assert tuple(noise.philox4x32(*counter, *key).tolist()) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_blocks_match_reference(seed: int) -> None:
    for tid, index, step, start, count in [
        (0, 0, 0, 0, 1),
        (noise.tensor_id("model.layers.0.mlp.up_proj.weight"), 3, 7, 12345, 301),
        (U32 - 1, U32 - 1, U32 - 1, U32 - 77, 77),
        (noise.sr_tensor_id("lm_head.weight"), noise.SR_NOISE_INDEX, 2, 5, 1000),
    ]:
        got = C.philox_blocks(seed, tid, index, step, start, count)
        want = noise.uint32_blocks(seed, tid, index, step, start, count)
        assert got.dtype == torch.int64 and got.shape == (count, 4)
        assert torch.equal(got, want), (seed, tid, index, step, start, count)


def test_blocks_random_streams(rng: torch.Generator) -> None:
    for _ in range(8):
        seed, tid, index, step = random_stream(rng)
        start, count = draw(rng, U32 - 4096), 1 + draw(rng, 4096)
        want = noise.uint32_blocks(seed, tid, index, step, start, count)
        assert torch.equal(C.philox_blocks(seed, tid, index, step, start, count), want)


def test_blocks_thread_count_independent(rng: torch.Generator) -> None:
    seed, tid, index, step = random_stream(rng)
    one = C.philox_blocks(seed, tid, index, step, 11, 50_001, num_threads=1)
    two = C.philox_blocks(seed, tid, index, step, 11, 50_001, num_threads=2)
    assert torch.equal(one, two)
    assert torch.equal(one[-300:], noise.uint32_blocks(seed, tid, index, step, 11 + 50_001 - 300, 300))


# --------------------------------------------------------------------------- derived values


def test_box_muller_every_input(rng: torch.Generator) -> None:
    """Every u1 and every u2 Box-Muller can see (the top 24 bits of a word), in changing pairs."""
    half, chunk = 2**23, 2**21
    for start in range(0, half, chunk):
        j = torch.arange(start, start + chunk, dtype=torch.int64)
        low = torch.randint(0, 256, (chunk,), generator=rng, dtype=torch.int64)  # dropped by >> 8
        k = j + half
        mix = 0x9E3779  # odd: x -> x * mix + c is a bijection of the 24-bit values
        pj, pk = (j * mix + 12345) % 2**24, (k * mix + 12345) % 2**24
        words = torch.stack((j << 8 | low, pj << 8, k << 8, pk << 8 | low), dim=1)
        got = C.gaussian_from_words(words)
        assert got.shape == words.shape and got.dtype == torch.float32
        assert_close_ulp(got, noise.gaussian_from_words(words), CPU_ULP)


@pytest.mark.parametrize(("offset", "n"), [(0, 1), (0, 4), (1, 1), (3, 2), (2, 7), (5, 1001), (1021, 4099)])
def test_gaussian_matches_reference(rng: torch.Generator, offset: int, n: int) -> None:
    seed, tid, index, step = random_stream(rng)
    got = fill(n, seed, tid, index, step, offset, "gaussian")
    assert_close_ulp(got, noise.stream(seed, tid, index, step, offset, n, "gaussian"), CPU_ULP)


@pytest.mark.parametrize(("offset", "n"), [(0, 1), (0, 128), (1, 127), (127, 2), (31, 97), (200, 1001), (5, 70_001)])
def test_rademacher_matches_reference(rng: torch.Generator, offset: int, n: int) -> None:
    seed, tid, index, step = random_stream(rng)
    got = fill(n, seed, tid, index, step, offset, "rademacher")
    assert torch.equal(got, noise.stream(seed, tid, index, step, offset, n, "rademacher"))


@pytest.mark.parametrize("seed", [2**32 + 1, 2**64 - 1])
def test_gaussian_large_and_extreme(seed: int) -> None:
    """Many values (every Box-Muller branch and quadrant), far offsets, the last block of the space."""
    n = 300_007
    assert_close_ulp(fill(n, seed, 5, 1, 2, 13, "gaussian"), noise.stream(seed, 5, 1, 2, 13, n, "gaussian"), CPU_ULP)
    end = 4 * U32
    got = fill(1003, seed, 5, 1, 2, end - 1003, "gaussian")
    assert_close_ulp(got, noise.stream(seed, 5, 1, 2, end - 1003, 1003, "gaussian"), CPU_ULP)


def test_lowrank_factor_offset(rng: torch.Generator) -> None:
    """The A factor of low-rank noise starts at offset in*r: what materialize_lowrank reads."""
    seed = (draw(rng, U32) << 32) | draw(rng, U32)
    name, out_f, in_f, rank = "model.layers.3.self_attn.o_proj.weight", 37, 53, 3
    a_ref, b_ref = noise.materialize_lowrank(seed, name, 4, out_f, in_f, rank, step=9)
    tid = noise.tensor_id(name)
    b = fill(in_f * rank, seed, tid, 4, 9, 0, "gaussian").view(in_f, rank)
    a = fill(out_f * rank, seed, tid, 4, 9, in_f * rank, "gaussian").view(out_f, rank)
    assert_close_ulp(b, b_ref, CPU_ULP)
    assert_close_ulp(a, a_ref, CPU_ULP)


@pytest.mark.parametrize("kind", noise.KINDS)
def test_thread_count_independent(rng: torch.Generator, kind: str) -> None:
    seed, tid, index, step = random_stream(rng)
    n, offset = 1_000_003, 3  # large enough to use a thread team
    one = fill(n, seed, tid, index, step, offset, kind, num_threads=1)
    two = fill(n, seed, tid, index, step, offset, kind, num_threads=2)
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        default_one = fill(n, seed, tid, index, step, offset, kind)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.view(torch.int32), default_one.view(torch.int32))


def test_kind_names_and_shapes() -> None:
    """kind accepts the reference's names; any contiguous shape is filled as its flat stream."""
    out = torch.empty(6, 7)
    C.noise_fill(out, 3, 4, 5, 6, 7, "rademacher")
    assert torch.equal(out.flatten(), noise.stream(3, 4, 5, 6, 7, 42, "rademacher"))
    flat = torch.empty(42)
    C.noise_fill(flat, 3, 4, 5, 6, 7, "gaussian")
    C.noise_fill(out, 3, 4, 5, 6, 7, 0)
    assert torch.equal(out.flatten(), flat)
    C.noise_fill(torch.empty(0), 3, 4, 5, 6, 7, 0)  # nothing to do, no error


def test_module_info() -> None:
    assert isinstance(C.has_cuda(), bool)
    assert C.num_threads() == torch.get_num_threads()
    assert (C.KIND_GAUSSIAN, C.KIND_RADEMACHER) == (0, 1)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("out", "args"),
    [
        (torch.empty(8, dtype=torch.float64), (1, 2, 3, 4, 0, 0)),  # dtype
        (torch.empty(8, dtype=torch.bfloat16), (1, 2, 3, 4, 0, 0)),
        (torch.empty(4, 4).t(), (1, 2, 3, 4, 0, 0)),  # not contiguous
        (torch.empty(8, device="meta"), (1, 2, 3, 4, 0, 0)),  # device
        (torch.empty(8), (1, 2, 3, 4, 0, 2)),  # kind
        (torch.empty(8), (1, 2, 3, 4, 0, -1)),
        (torch.empty(8), (1, 2, 3, 4, 0, "normal")),
        (torch.empty(8), (1, 2, 3, 4, 0, True)),
        (torch.empty(8), (-1, 2, 3, 4, 0, 0)),  # seed range
        (torch.empty(8), (2**64, 2, 3, 4, 0, 0)),
        (torch.empty(8), (1.0, 2, 3, 4, 0, 0)),
        (torch.empty(8), (1, U32, 3, 4, 0, 0)),  # counter words are uint32
        (torch.empty(8), (1, 2, -3, 4, 0, 0)),
        (torch.empty(8), (1, 2, 3, U32, 0, 0)),
        (torch.empty(8), (1, 2, 3, 4, -1, 0)),
        (torch.empty(8), (1, 2, 3, 4, 4 * U32 - 7, 0)),  # past the 2**32-block counter space
        (torch.empty(8), (1, 2, 3, 4, 128 * U32 - 7, 1)),
    ],
)
def test_noise_fill_rejects_bad_input(out: torch.Tensor, args: tuple) -> None:
    with pytest.raises(ValueError):
        C.noise_fill(out, *args)


def test_other_bad_input() -> None:
    with pytest.raises(ValueError):
        C.noise_fill(torch.empty(8), 1, 2, 3, 4, 0, 0, num_threads=-1)
    with pytest.raises(ValueError):
        C.philox_blocks(1, 2, 3, 4, U32 - 10, 11)
    with pytest.raises(ValueError):
        C.philox_blocks(1, 2, 3, 4, 0, -1)
    with pytest.raises(ValueError):
        C.philox4x32_raw(0, 0, 0, U32, 0, 0)
    with pytest.raises(ValueError):
        C.gaussian_from_words(torch.tensor([[0, 1, 2, U32]]))
    with pytest.raises(ValueError):
        C.gaussian_from_words(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError):
        C.gaussian_from_words(torch.zeros(2, 4, dtype=torch.int32))
    C.philox_blocks(1, 2, 3, 4, U32 - 10, 10)  # exactly up to the last block is fine


# --------------------------------------------------------------------------- CUDA


def cuda_fill(n: int, seed: int, tid: int, index: int, step: int, offset: int, kind: str) -> torch.Tensor:
    if not C.has_cuda():
        pytest.skip("fastes._C was built without CUDA")
    out = torch.full((n,), float("nan"), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the NaN fill comes first
    with torch.cuda.stream(stream):  # the launch must follow torch's current stream
        C.noise_fill(out, seed, tid, index, step, offset, noise.KINDS.index(kind))
    torch.cuda.current_stream().wait_stream(stream)
    return out.cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 3, 130])
def test_cuda_rademacher_bit_exact(rng: torch.Generator, offset: int) -> None:
    """Rademacher signs are the raw bits: equality checks every uint32 word of 2**17 blocks."""
    seed, tid, index, step = random_stream(rng)
    n = 2**24 + 5
    got = cuda_fill(n, seed, tid, index, step, offset, "rademacher")
    assert torch.equal(got, fill(n, seed, tid, index, step, offset, "rademacher"))


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1, 4 * U32 - 2**24])
def test_cuda_gaussian_close(rng: torch.Generator, offset: int) -> None:
    seed, tid, index, step = random_stream(rng)
    n = 2**24 if offset % 4 == 0 else 2**24 - 3
    got = cuda_fill(n, seed, tid, index, step, offset, "gaussian")
    assert_close_ulp(got, fill(n, seed, tid, index, step, offset, "gaussian"), CUDA_ULP)
    m = 4099
    assert_close_ulp(got[:m], noise.stream(seed, tid, index, step, offset, m, "gaussian"), CUDA_ULP)
