"""The CPU attention paths (the C++ kernel and the vectorized torch fallback) against the per-sequence reference."""

from __future__ import annotations

import pytest
import torch

from fastes import _backend
from fastes.ops.attention import (
    paged_attention,
    paged_attention_cpp,
    paged_attention_ref,
    paged_attention_torch,
    write_kv,
    write_kv_ref,
    write_kv_torch,
)


def make_case(rng: torch.Generator, q_lens: list[int], ctx: list[int], block_size: int, q_heads: int, kv_heads: int,
              dim: int):
    seq_lens = [c + q for c, q in zip(ctx, q_lens, strict=True)]
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=rng).tolist()
    width = max(need)
    tables, used = [], 0
    for n in need:
        tables.append(perm[used : used + n] + [-1] * (width - n))
        used += n
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=rng)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=rng)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), q_heads, dim, generator=rng)
    return q, k_cache, v_cache, cu, torch.tensor(seq_lens, dtype=torch.int32), torch.tensor(tables, dtype=torch.int32)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (3, 3)])
@pytest.mark.parametrize("q_lens,ctx", [([1, 1, 1], [0, 7, 33]), ([5, 1, 17, 1], [0, 9, 3, 40]), ([12], [0])])
def test_torch_path_matches_reference(rng, q_lens, ctx, heads, window):
    q, k, v, cu, lens, tables = make_case(rng, q_lens, ctx, 8, heads[0], heads[1], 16)
    scale = 16**-0.5
    expected = paged_attention_ref(q, k, v, cu, lens, tables, scale, window)
    got = paged_attention_torch(q, k, v, cu, lens, tables, scale, window)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paged_attention(q, k, v, cu, lens, tables, scale, window), expected,
                               rtol=1e-5, atol=1e-5)


def test_torch_path_bf16(rng):
    q, k, v, cu, lens, tables = make_case(rng, [3, 1], [4, 20], 16, 4, 2, 32)
    expected = paged_attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, lens, tables, 0.2)
    got = paged_attention_torch(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, lens, tables, 0.2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


needs_extension = pytest.mark.skipif(_backend.extension() is None, reason="fastes._C is not built")


@needs_extension
@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("heads,dim", [((4, 2), 16), ((6, 2), 24), ((3, 3), 40), ((8, 1), 7)])
@pytest.mark.parametrize("q_lens,ctx,block", [([1, 1, 1], [0, 7, 33], 8), ([5, 1, 17, 1], [0, 9, 3, 40], 4),
                                              ([12], [0], 16), ([2, 3], [30, 1], 5)])
def test_cpp_kernel_matches_reference(rng, q_lens, ctx, block, heads, dim, window):
    q, k, v, cu, lens, tables = make_case(rng, q_lens, ctx, block, heads[0], heads[1], dim)
    scale = dim**-0.5
    expected = paged_attention_ref(q, k, v, cu, lens, tables, scale, window)
    got = paged_attention_cpp(q, k, v, cu, lens, tables, scale, window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    strided = torch.randn(q.shape[0], heads[0], dim + 3, generator=rng)[..., :dim].copy_(q)  # rows not packed
    torch.testing.assert_close(paged_attention_cpp(strided, k, v, cu, lens, tables, scale, window), expected,
                               rtol=1e-5, atol=1e-5)


@needs_extension
def test_cpp_kernel_padded_rows_and_bad_tables(rng):
    """seq_len 0 (a padded row of a captured batch) gives zeros and reads nothing; a table entry outside the
    pool is a ValueError, not a read out of bounds; bf16 is not its job (None: the torch path runs)."""
    q, k, v, cu, lens, tables = make_case(rng, [1, 1], [6, 3], 4, 4, 2, 16)
    lens[1], tables[1] = 0, -7
    got = paged_attention_cpp(q, k, v, cu, lens, tables, 0.25)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got[:1], paged_attention_ref(q[:1], k, v, cu[:2], lens[:1], tables[:1], 0.25))
    tables[0, 0] = k.shape[0]
    with pytest.raises(ValueError, match="outside the KV pool"):
        paged_attention_cpp(q, k, v, cu, lens, tables, 0.25)
    assert paged_attention_cpp(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, lens, tables, 0.25) is None


@needs_extension
def test_cpp_kernel_independent_of_threads(rng):
    q, k, v, cu, lens, tables = make_case(rng, [1] * 40 + [9], [30] * 40 + [2], 8, 4, 2, 32)
    ext = _backend.extension()
    outs = [ext.paged_attention(q, k, v, cu, lens, tables, 0.2, torch.empty_like(q), 0, t) for t in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_cpu_kv_write_matches_reference(rng, dtype, padded):
    """The index-copy write lands every row in the same slot as the reference scatter, skips −1, and
    leaves every other slot alone (bf16: the cast to the cache dtype happens on the way in)."""
    k_cache = torch.randn(6, 4, 2, 8, generator=rng).to(dtype)
    v_cache = torch.randn(6, 4, 2, 8, generator=rng).to(dtype)
    slots = torch.randperm(24, generator=rng)[:9].to(torch.int32)
    if padded:
        slots[[0, 5]] = -1
    k, v = torch.randn(9, 2, 8, generator=rng), torch.randn(9, 2, 8, generator=rng)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, k_ref, v_ref, slots)
    for write in (write_kv_torch, write_kv):
        k_got, v_got = k_cache.clone(), v_cache.clone()
        write(k, v, k_got, v_got, slots)
        assert torch.equal(k_got, k_ref) and torch.equal(v_got, v_ref)
    assert not torch.equal(k_ref, k_cache)
