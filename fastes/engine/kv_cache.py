"""The paged KV pool: per layer, K and V tensors [num_blocks, block_size, kv_heads, head_dim].

Sizing: on CPU the pool holds a configured number of tokens; on CUDA it takes what
is left of ``gpu_memory_utilization`` × total memory after the weights and the peak
activations of a warm-up forward at the largest batch the scheduler will run
(measured, not estimated, so that the pool never pushes a later forward out of memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from fastes.engine.config import DEFAULT_BLOCK_SIZE
from fastes.models.batch import AttentionBatch

if TYPE_CHECKING:
    from fastes.models.config import ModelConfig
    from fastes.models.decoder import CausalLM
    from fastes.models.perturbation import Perturbation



def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token across all layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element


def blocks_for_bytes(config: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    return max(0, int(budget_bytes) // (kv_bytes_per_token(config, dtype) * block_size))


class KVCache:
    """K/V block pools of every layer; ``cache[layer]`` is the (k, v) pair the forward takes."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) < 1:
            raise ValueError("KV cache dimensions must all be >= 1")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size

    @classmethod
    def for_model(cls, config: ModelConfig, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        return cls(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype, device)

    @classmethod
    def for_tokens(cls, config: ModelConfig, num_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE,
                   dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        """A pool holding at least ``num_tokens`` tokens (the CPU sizing)."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        return cls.for_model(config, -(-num_tokens // block_size), block_size, dtype, device)

    def __len__(self) -> int:
        return len(self.k)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(zip(self.k, self.v, strict=True))

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (the BlockManager's copy-on-write queue)."""
        if not pairs:
            return
        device = self.k[0].device
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=device)
        for cache in self.k + self.v:
            cache.index_copy_(0, dst, cache.index_select(0, src))


def profile_num_blocks(model: CausalLM, max_num_batched_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE,
                       gpu_memory_utilization: float = 0.9, kv_dtype: torch.dtype | None = None,
                       min_blocks: int = 1, perturbation: Perturbation | None = None) -> int:
    """KV blocks that fit on the model's CUDA device after a warm-up forward of ``max_num_batched_tokens`` rows.

    budget = utilization · total − peak torch memory of the warm-up (weights included, warm-up
    KV excluded) − memory outside torch's allocator (CUDA context, other processes). Pass the
    ``perturbation`` the engine will run so the warm-up includes the population ops' workspace
    (rows are spread over all members). Raises ValueError when fewer than ``min_blocks`` fit.
    """
    device = model.device
    if device.type != "cuda":
        raise ValueError("profile_num_blocks needs a model on a CUDA device; size CPU pools with KVCache.for_tokens")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    kv_dtype = kv_dtype or model.dtype
    cfg = model.config
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    warm_blocks = -(-max_num_batched_tokens // block_size)
    warm = KVCache.for_model(cfg, warm_blocks, block_size, kv_dtype, device)
    tokens = max_num_batched_tokens
    attn = AttentionBatch(
        cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(warm_blocks, dtype=torch.int32, device=device).unsqueeze(0),
        slot_mapping=torch.arange(tokens, dtype=torch.int64, device=device),
        max_q_len=tokens, max_seq_len=tokens)
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    positions = torch.arange(tokens, dtype=torch.long, device=device) % cfg.max_position_embeddings
    row_member = None
    if perturbation is not None:
        row_member = (torch.arange(tokens, device=device) * perturbation.num_members // tokens).to(torch.int32)
    model.forward(ids, positions, attn, warm, row_member, perturbation)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - warm.nbytes
    del warm
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = (total - free) - torch.cuda.memory_reserved(device)
    budget = int(total * gpu_memory_utilization) - peak - max(0, outside_torch)
    blocks = blocks_for_bytes(cfg, budget, block_size, kv_dtype)
    if blocks < min_blocks:
        raise ValueError(f"only {blocks} KV blocks fit in {budget / 2**30:.2f} GiB left on {device} "
                         f"(need {min_blocks}); lower max_num_batched_tokens or raise gpu_memory_utilization")
    return blocks


__all__ = ["KVCache", "kv_bytes_per_token", "blocks_for_bytes", "profile_num_blocks", "DEFAULT_BLOCK_SIZE"]
