"""Triton paged attention and KV write vs the torch references (interpreter on CPU, real shapes on GPU).

Tolerances: fp32 rtol = atol = 1e-5 (outputs are convex mixes of N(0, 1) values, so |out| ≲ 3 and the
absolute term is ~1e-5 relative at worst); bf16/fp16 2e-2 (the kernel rounds P to the input dtype before
P·V, as FlashAttention does). Outputs are poisoned with NaN before the kernel writes them, cache slots
no sequence owns hold NaN, and every result is checked NaN-free.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastes.ops.attention import paged_attention, paged_attention_ref, write_kv, write_kv_ref
from fastes.ops.attention_triton import paged_attention_triton, write_kv_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def make_case(rng: torch.Generator, q_lens: list[int], seq_lens: list[int], q_heads: int, kv_heads: int,
              head_dim: int, block_size: int, dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random packed queries and a paged cache with shuffled physical blocks; unused slots hold NaN."""
    n_blocks = [math.ceil(n / block_size) for n in seq_lens]
    total = sum(n_blocks) + 3
    perm = torch.randperm(total, generator=rng).int()
    tables = torch.full((len(seq_lens), max(n_blocks) + 1), -1, dtype=torch.int32)
    k_cache = torch.full((total, block_size, kv_heads, head_dim), math.nan, dtype=dtype)
    v_cache = k_cache.clone()
    used = 0
    for s, n in enumerate(seq_lens):
        tables[s, : n_blocks[s]] = perm[used : used + n_blocks[s]]
        used += n_blocks[s]
        pos = torch.arange(n)
        slots = tables[s][pos // block_size].long() * block_size + pos % block_size
        k = torch.randn(n, kv_heads, head_dim, generator=rng)
        v = torch.randn(n, kv_heads, head_dim, generator=rng)
        write_kv_ref(k, v, k_cache, v_cache, slots)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), q_heads, head_dim, generator=rng).to(dtype)
    case = dict(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables)
    return {k: v.to(device) for k, v in case.items()}


def reference(case: dict[str, torch.Tensor], scale: float, window: int | None = None) -> torch.Tensor:
    """The torch reference, run on CPU: its position masks are built on the CPU, so it expects CPU tensors."""
    cpu = {k: v.cpu() for k, v in case.items()}
    return paged_attention_ref(**cpu, scale=scale, sliding_window=window).to(case["q"].device)


def check(case: dict[str, torch.Tensor], scale: float, window: int | None, max_q_len: int | None, dtype: torch.dtype,
          **kwargs: object) -> None:
    q = case["q"]
    expected = reference(case, scale, window)
    out = torch.full_like(q, math.nan)
    got = paged_attention_triton(**case, scale=scale, sliding_window=window, max_q_len=max_q_len, out=out, **kwargs)
    assert got is out
    assert not expected.isnan().any()
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])


Q_LENS = [1, 3, 17, 17, 3, 0, 1]
SEQ_LENS = [1, 5, 33, 17, 70, 9, 70]  # q_len 0 (an idle slot) is skipped by the kernel and the reference


@pytest.mark.parametrize(("block_size", "q_heads", "kv_heads", "head_dim", "window"), [
    (16, 4, 2, 16, None),
    (16, 4, 1, 32, 7),
    (8, 4, 2, 64, None),
    (8, 4, 1, 16, 20),
    (16, 6, 2, 32, None),  # GROUP 3: not a power of two
    (16, 4, 2, 24, 7),  # head_dim 24: masked to 32
    (16, 4, 2, 128, None),  # fp32 head_dim > 64: the score summed over head_dim chunks
    (8, 4, 1, 96, 20),  # chunked and masked to 128
])
def test_prefill_matches_reference(rng: torch.Generator, block_size: int, q_heads: int, kv_heads: int, head_dim: int,
                                   window: int | None) -> None:
    case = make_case(rng, Q_LENS, SEQ_LENS, q_heads, kv_heads, head_dim, block_size)
    check(case, 1 / math.sqrt(head_dim), window, max(Q_LENS), torch.float32)


def test_prefill_without_max_q_len(rng: torch.Generator) -> None:
    """max_q_len=None falls back to the token count: more programs, same result."""
    case = make_case(rng, [3, 5], [3, 40], 4, 2, 16, 16)
    check(case, 0.25, None, None, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_half_precision(rng: torch.Generator, dtype: torch.dtype) -> None:
    case = make_case(rng, [3, 17], [5, 33], 4, 2, 32, 16, dtype=dtype)
    check(case, 1 / math.sqrt(32), None, 17, dtype)


@pytest.mark.parametrize(("block_size", "kv_heads", "head_dim", "window", "num_splits"), [
    (16, 2, 32, None, 1),
    (16, 2, 32, None, 2),
    (8, 1, 16, None, 3),
    (16, 2, 64, 20, 8),  # more splits than some contexts have columns: empty splits must weigh 0
    (8, 2, 24, 7, 2),
])
def test_decode_split_kv(rng: torch.Generator, block_size: int, kv_heads: int, head_dim: int, window: int | None,
                         num_splits: int) -> None:
    seq_lens = [1, 5, 33, 70, 129]
    case = make_case(rng, [1] * len(seq_lens), seq_lens, 4, kv_heads, head_dim, block_size)
    check(case, 1 / math.sqrt(head_dim), window, 1, torch.float32, num_splits=num_splits)


def test_decode_idle_slots_and_bf16(rng: torch.Generator) -> None:
    """Padded decode batches (q_len 0 entries, as in a captured graph) and bf16 inputs."""
    case = make_case(rng, [1, 0, 1], [40, 7, 3], 4, 2, 32, 16, dtype=torch.bfloat16)
    expected = paged_attention_ref(**case, scale=0.2)
    got = paged_attention_triton(**case, scale=0.2, max_q_len=1, num_splits=2,
                                 out=torch.full_like(case["q"], math.nan))
    rows = torch.tensor([0, 1])  # token rows of the two live sequences
    assert not got[rows].isnan().any()
    torch.testing.assert_close(got[rows].float(), expected[rows].float(), rtol=2e-2, atol=2e-2)


def test_dispatcher_triton_backend(rng: torch.Generator) -> None:
    case = make_case(rng, [3, 1], [20, 9], 4, 2, 16, 8)
    expected = paged_attention_ref(**case, scale=0.25, sliding_window=5)
    got = paged_attention(**case, scale=0.25, sliding_window=5, max_q_len=3, backend="triton")
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    decode = make_case(rng, [1, 1], [20, 9], 4, 2, 16, 8)
    got = paged_attention(**decode, scale=0.25, max_q_len=1, backend="triton")
    torch.testing.assert_close(got, paged_attention_ref(**decode, scale=0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("cache_dtype", "kv_heads", "head_dim", "block_size"), [
    (torch.float32, 2, 16, 16), (torch.bfloat16, 1, 24, 8), (torch.float16, 3, 32, 8)])
def test_write_kv_matches_reference(rng: torch.Generator, cache_dtype: torch.dtype, kv_heads: int, head_dim: int,
                                    block_size: int) -> None:
    n_blocks, n_tokens = 4, 11
    slots = torch.randperm(n_blocks * block_size, generator=rng)[:n_tokens].int()
    slots[torch.tensor([0, 4, 10])] = -1
    k = torch.randn(n_tokens, kv_heads, head_dim, generator=rng)
    v = torch.randn(n_tokens, kv_heads, head_dim, generator=rng)
    k_cache = torch.randn(n_blocks, block_size, kv_heads, head_dim, generator=rng).to(cache_dtype)
    v_cache = torch.randn(n_blocks, block_size, kv_heads, head_dim, generator=rng).to(cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, k_ref, v_ref, slots)
    write_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    k_disp, v_disp = k_ref.clone(), v_ref.clone()
    write_kv(k * 2, v * 2, k_disp, v_disp, slots, backend="triton")
    write_kv_ref(k * 2, v * 2, k_ref, v_ref, slots)
    assert torch.equal(k_disp, k_ref) and torch.equal(v_disp, v_ref)


# --------------------------------------------------------------------------- real shapes, GPU only

GPU_SHAPE = dict(q_heads=12, kv_heads=2, head_dim=128, block_size=16, dtype=torch.bfloat16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 1024])
def test_gpu_decode_real_shape(rng: torch.Generator, window: int | None) -> None:
    seq_lens = torch.randint(1, 4097, (64,), generator=rng).tolist()
    case = make_case(rng, [1] * 64, seq_lens, **GPU_SHAPE)
    for num_splits in (None, 1, 4):
        check(case, 1 / math.sqrt(128), window, 1, torch.bfloat16, num_splits=num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 512])
def test_gpu_prefill_real_shape(rng: torch.Generator, window: int | None) -> None:
    q_lens = torch.randint(1, 257, (64,), generator=rng)
    seq_lens = (q_lens + torch.randint(0, 3841, (64,), generator=rng)).tolist()
    case = make_case(rng, q_lens.tolist(), seq_lens, **GPU_SHAPE)
    check(case, 1 / math.sqrt(128), window, int(q_lens.max()), torch.bfloat16)
    fp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in case.items()}
    check(fp32, 1 / math.sqrt(128), window, int(q_lens.max()), torch.float32)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph(rng: torch.Generator) -> None:
    """A captured decode step replays correctly after the context lengths change in place."""
    case = make_case(rng, [1] * 64, [4096] * 64, **GPU_SHAPE)
    seq_lens = case["seq_lens"]
    seq_lens.copy_(torch.randint(1, 2049, (64,), generator=rng, dtype=torch.int32))
    out = torch.empty_like(case["q"])
    paged_attention_triton(**case, scale=0.1, max_q_len=1, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention_triton(**case, scale=0.1, max_q_len=1, out=out)
    seq_lens.copy_(torch.randint(2049, 4097, (64,), generator=rng, dtype=torch.int32))
    out.fill_(math.nan)
    graph.replay()
    torch.cuda.synchronize()
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), reference(case, 0.1).float(), rtol=2e-2, atol=2e-2)
