"""Paged attention benchmark: decode vs the bandwidth roofline, prefill vs torch SDPA on dense tensors.

    python -m bench.attention [--quick]

GPU: per-layer timings (triton.testing.do_bench, median) at Qwen2.5-1.5B attention shapes (12 q / 2 kv
heads, head_dim 128, bf16, block 16). Decode reports bytes of KV read, achieved bandwidth and the ratio to
the floor bytes / measured copy bandwidth (DESIGN §7 target ≤ 1.5); prefill reports TFLOP/s and the ratio
to SDPA (flash) on the same causal problem stored densely. Writes JSON with the device, versions, git
commit and raw timings to bench/results/. CPU: a tiny interpreter smoke only; its times mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from bench.common import device_name, git_commit, write_result

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 12, 2, 128, 16
NOMINAL_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, SXM parts


def build_case(q_lens: list[int], seq_lens: list[int], device: str, dtype: torch.dtype,
               gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Packed queries and a filled paged cache whose physical blocks are shuffled."""
    n_blocks = [math.ceil(n / BLOCK) for n in seq_lens]
    perm = torch.randperm(sum(n_blocks), generator=gen).int()
    tables = torch.zeros(len(seq_lens), max(n_blocks), dtype=torch.int32)
    used = 0
    for s, n in enumerate(n_blocks):
        tables[s, :n] = perm[used : used + n]
        used += n
    shape = (used, BLOCK, KV_HEADS, HEAD_DIM)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return dict(q=torch.randn(int(cu[-1]), Q_HEADS, HEAD_DIM, device=device, dtype=dtype),
                k_cache=torch.randn(shape, device=device, dtype=dtype),
                v_cache=torch.randn(shape, device=device, dtype=dtype),
                cu_seqlens_q=cu.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                block_tables=tables.to(device))


def kv_bytes(seq_lens: list[int], dtype: torch.dtype) -> int:
    """Bytes of K and V one pass over the contexts reads (the decode floor, q/out excluded)."""
    return sum(seq_lens) * 2 * KV_HEADS * HEAD_DIM * torch.finfo(dtype).bits // 8


def causal_flops(q_lens: list[int], seq_lens: list[int]) -> float:
    """4·H·D per (query, visible key) pair: QKᵀ and PV."""
    pairs = sum(q * (n - q) + q * (q + 1) / 2 for q, n in zip(q_lens, seq_lens, strict=True))
    return 4.0 * Q_HEADS * HEAD_DIM * pairs


def smoke_cpu() -> None:
    """Run both kernels once under the interpreter against the reference; report no timings."""
    os.environ["TRITON_INTERPRET"] = "1"  # before fastes.ops.attention_triton defines its kernels
    from fastes.ops.attention import paged_attention_ref
    from fastes.ops.attention_triton import paged_attention_triton

    gen = torch.Generator().manual_seed(0)
    for q_lens, seq_lens in (([1, 1], [20, 45]), ([3, 5], [20, 5])):
        case = build_case(q_lens, seq_lens, "cpu", torch.float32, gen)
        ref = paged_attention_ref(**case, scale=HEAD_DIM**-0.5)
        out = paged_attention_triton(**case, scale=HEAD_DIM**-0.5, max_q_len=max(q_lens))
        err = (out - ref).abs().max().item()
        print(f"interpreter smoke q_lens={q_lens} seq_lens={seq_lens}: max |err| = {err:.2e}")
        assert err < 1e-4, err
    print("no CUDA device: interpreter smoke only, absolute times would be meaningless; no JSON written")


def copy_bandwidth(do_bench) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time): the practical roofline."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench_gpu(quick: bool) -> dict[str, object]:
    import triton
    from triton.testing import do_bench

    from fastes.ops.attention_triton import default_num_splits, paged_attention_triton

    dtype, gen = torch.bfloat16, torch.Generator().manual_seed(0)
    name = device_name("cuda")
    bw = copy_bandwidth(do_bench)
    nominal = next((v for k, v in NOMINAL_BW.items() if k in name), None)
    print(f"{name}: copy bandwidth {bw / 1e12:.2f} TB/s (nominal {nominal and nominal / 1e12} TB/s)")
    rows: list[dict[str, object]] = []
    scale = HEAD_DIM**-0.5
    decode_shapes = [(256, 1024)] if quick else [(64, 1024), (64, 4096), (256, 1024), (256, 4096)]
    for batch, ctx in decode_shapes:
        case = build_case([1] * batch, [ctx] * batch, "cuda", dtype, gen)
        default = default_num_splits(batch, KV_HEADS, ctx, case["q"].device)
        nbytes = kv_bytes([ctx] * batch, dtype)
        for splits in sorted({1, default, 2 * default}):
            ms = do_bench(lambda c=case, n=splits: paged_attention_triton(**c, scale=scale, max_q_len=1, num_splits=n),
                          return_mode="median")
            floor_ms = nbytes / bw * 1e3
            row = dict(kind="decode", batch=batch, context=ctx, num_splits=splits, default_splits=default, ms=ms,
                       kv_bytes=nbytes, achieved_bytes_per_s=nbytes / (ms * 1e-3), floor_ms=floor_ms,
                       ratio_to_floor=ms / floor_ms, flops=causal_flops([1] * batch, [ctx] * batch))
            rows.append(row)
            print(f"decode  B={batch:4d} ctx={ctx:5d} splits={splits:2d}: {ms * 1e3:8.1f} µs/layer  "
                  f"{row['achieved_bytes_per_s'] / 1e12:.2f} TB/s  {row['ratio_to_floor']:.2f}× floor")
        del case
    prefill_shapes = [(4, 1024, 1024)] if quick else [(4, 1024, 1024), (2, 4096, 4096), (8, 512, 4096)]
    for batch, q_len, ctx in prefill_shapes:
        case = build_case([q_len] * batch, [ctx] * batch, "cuda", dtype, gen)
        flops = causal_flops([q_len] * batch, [ctx] * batch)
        ms = do_bench(lambda c=case, m=q_len: paged_attention_triton(**c, scale=scale, max_q_len=m),
                      return_mode="median")
        row = dict(kind="prefill", batch=batch, q_len=q_len, context=ctx, ms=ms, flops=flops,
                   tflops=flops / (ms * 1e-3) / 1e12, sdpa_ms=sdpa_ms(batch, q_len, ctx, dtype, do_bench))
        rows.append(row)
        ratio = f"{row['sdpa_ms'] / ms:.2f}× SDPA speed" if row["sdpa_ms"] else "SDPA n/a"
        print(f"prefill B={batch} q={q_len} ctx={ctx}: {ms:.3f} ms  {row['tflops']:.0f} TFLOP/s  {ratio}")
        del case
    return dict(device=name, torch=torch.__version__, triton=triton.__version__, git_commit=git_commit(dirty=False),
                copy_bandwidth_bytes_per_s=bw, nominal_bandwidth_bytes_per_s=nominal,
                shape=dict(q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK, dtype=str(dtype)),
                quick=quick, timings=rows)


def sdpa_ms(batch: int, q_len: int, ctx: int, dtype: torch.dtype, do_bench) -> float | None:
    """torch SDPA on the same problem with dense, contiguous K/V (causal, bottom-right aligned)."""
    f = torch.nn.functional
    q = torch.randn(batch, Q_HEADS, q_len, HEAD_DIM, device="cuda", dtype=dtype)
    k = torch.randn(batch, Q_HEADS, ctx, HEAD_DIM, device="cuda", dtype=dtype)  # GQA expanded beforehand
    v = torch.randn_like(k)
    if q_len == ctx:
        fn = lambda: f.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        mask = torch.ones(q_len, ctx, dtype=torch.bool, device="cuda").tril(ctx - q_len)
        fn = lambda: f.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    try:
        return do_bench(fn, return_mode="median")
    except RuntimeError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one decode and one prefill shape")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        smoke_cpu()
        return
    result = bench_gpu(args.quick)
    print(f"wrote {write_result('attention', result, str(result['device']))}")


if __name__ == "__main__":
    main()
