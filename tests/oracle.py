"""Helpers that compare fastes' decoder with a transformers model (the oracle) through the paged KV cache."""

from __future__ import annotations

import torch

from fastes.engine.attention_batch import build_attention_batch
from fastes.engine.block_manager import BlockManager
from fastes.engine.kv_cache import KVCache
from fastes.models import CausalLM, Perturbation


def random_ids(seed: int, lengths: list[int], vocab: int = 256) -> list[torch.Tensor]:
    """Token sequences of the given lengths, ids uniform in [0, vocab), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of every position of one sequence through the transformers model."""
    with torch.no_grad():
        return hf(ids.unsqueeze(0)).logits[0].float()


def packed_prefill(model: CausalLM, seqs: list[torch.Tensor], members: list[int] | None = None,
                   pert: Perturbation | None = None, block: int = 4, pool_factor: int = 2) -> list[torch.Tensor]:
    """All sequences in one forward through a fresh paged cache; per-sequence logits of every row.

    The pool holds ``pool_factor · tokens // block + 2 · sequences`` blocks of ``block`` tokens.
    """
    total = sum(len(s) for s in seqs)
    bm = BlockManager(pool_factor * total // block + 2 * len(seqs), block)
    cache = KVCache.for_model(model.config, bm.num_blocks, block)
    members = members or [-1] * len(seqs)
    for i, s in enumerate(seqs):
        bm.allocate(i, members[i], len(s))
    attn, positions = build_attention_batch(bm, [(i, 0, len(s)) for i, s in enumerate(seqs)])
    row_member = torch.cat([torch.full((len(s),), m, dtype=torch.int64) for s, m in zip(seqs, members, strict=True)])
    logits = model.forward(torch.cat(seqs), positions, attn, cache, row_member if pert else None, pert)
    return list(logits.split([len(s) for s in seqs]))


def check_chunked_prefill_then_decode(model: CausalLM, hf: torch.nn.Module, seqs: list[torch.Tensor],
                                      prompt_lens: list[int], chunk: int, num_blocks: int, block: int = 4,
                                      atol: float = 1e-4) -> None:
    """Sequences in different phases share each forward (prompts in chunks of ``chunk`` tokens, then one
    teacher-forced token per step); every row's logits must match transformers' on the whole sequence."""
    want = [hf_logits(hf, s) for s in seqs]
    bm = BlockManager(num_blocks, block)
    cache = KVCache.for_model(model.config, num_blocks, block)
    done = [0] * len(seqs)
    for i, n in enumerate(prompt_lens):
        bm.allocate(i, -1, n)
    while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
        chunks = []
        for i, s in enumerate(seqs):
            if done[i] >= len(s):
                continue
            if done[i] < prompt_lens[i]:  # prefill, chunk by chunk
                end = min(done[i] + chunk, prompt_lens[i])
            else:  # decode: teacher-forced next token
                bm.append_slot(i)
                end = done[i] + 1
            chunks.append((i, done[i], end))
        attn, positions = build_attention_batch(bm, chunks)
        logits = model.forward(torch.cat([seqs[i][a:b] for i, a, b in chunks]), positions, attn, cache)
        for (i, a, b), got in zip(chunks, logits.split([b - a for _, a, b in chunks]), strict=True):
            torch.testing.assert_close(got, want[i][a:b], atol=atol, rtol=0)
            done[i] = b
    bm.check()
