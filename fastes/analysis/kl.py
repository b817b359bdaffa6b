"""Off-task KL drift: how far a tuned model's next-token distributions moved from the base model's,
on text unrelated to the task.

The estimate is the mean per-token KL(base ‖ tuned) over continuations the *base* model
samples (temperature sampling, fixed seed): each continuation token's full-vocab KL is
exact at that position, and sampling the positions from the base makes the average an
unbiased per-token estimate of the sequence-level KL(base ‖ tuned). Both models are
teacher-forced through the engine's own paged forward (one full-sequence prefill per
sequence, packed under a token budget), so the numbers come from the same code path that
generated the text; log-softmax and KL are computed in fp32.

Several tuned models (e.g. ES and GRPO from one base) share one set of continuations,
which makes their drift directly comparable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastes.analysis.prompts import off_task_prompts
from fastes.engine.attention_batch import build_attention_batch
from fastes.engine.engine import Engine
from fastes.engine.sampling import SamplingParams
from fastes.models import CausalLM, load_model

Pair = tuple[list[int], list[int]]  # (prompt ids, continuation ids)
DEFAULT_KL_TOKENS = 2048  # rows of [vocab] fp32 logits per forward: bounds memory for 150k-token vocabularies
# a fixed KV pool rather than "all free memory", so the tuned models still fit on the GPU beside the base
ANALYSIS_KV_TOKENS = 65536


@dataclass
class KLResult:
    """KL(base ‖ tuned) in nats: token-weighted mean, per-prompt means and per-token values."""

    mean_kl: float
    per_prompt: list[float]
    per_token: list[list[float]]
    num_tokens: int
    sequences: list[Pair] = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def max_token_kl(self) -> float:
        return max((v for row in self.per_token for v in row), default=0.0)

    def to_dict(self, include_tokens: bool = False) -> dict[str, Any]:
        """Numbers for the JSON report (per-token values and token ids only on request: they are large)."""
        out: dict[str, Any] = {"mean_kl": self.mean_kl, "num_tokens": self.num_tokens,
                               "num_prompts": len(self.per_prompt), "max_token_kl": self.max_token_kl,
                               "per_prompt": self.per_prompt, "settings": self.settings}
        if include_tokens:
            out["per_token"] = self.per_token
            out["sequences"] = [{"prompt": p, "continuation": c} for p, c in self.sequences]
        return out


def _as_engine(model: str | Path | Engine, dtype: torch.dtype, device: str | torch.device,
               kv_cache_tokens: int | None) -> Engine:
    if isinstance(model, Engine):
        return model
    return Engine.from_pretrained(model, dtype=dtype, device=device, kv_cache_tokens=kv_cache_tokens)


def _as_model(model: str | Path | CausalLM, like: CausalLM) -> CausalLM:
    """A tuned model on the base's device and dtype, checked to be the same architecture."""
    loaded = model if isinstance(model, CausalLM) else load_model(model, dtype=like.dtype, device=like.device)
    if loaded.config.param_shapes() != like.config.param_shapes():
        raise ValueError("the tuned model's architecture (parameter names or shapes) differs from the base's")
    return loaded


def sample_continuations(engine: Engine, prompts: Sequence[str] | Sequence[Sequence[int]], max_tokens: int = 64,
                         temperature: float = 1.0, seed: int = 0, top_p: float = 1.0,
                         use_chat_template: bool = False) -> list[Pair]:
    """(prompt ids, continuation ids) sampled from the engine's unperturbed model; reproducible from ``seed``."""
    ids = engine.encode_prompts(prompts, use_chat_template)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    outs = engine.generate(ids, sampling=sampling)
    return [(list(p), list(outs[0][i][0].token_ids)) for i, p in enumerate(ids)]


def _groups(pairs: Sequence[Pair], token_budget: int, block_size: int, num_blocks: int) -> list[list[int]]:
    """Indices of sequences packed per forward: fed tokens ≤ budget (a longer sequence goes alone) and KV fits."""
    groups: list[list[int]] = []
    tokens = blocks = 0
    for i, (prompt, cont) in enumerate(pairs):
        n = len(prompt) + len(cont) - 1
        need = -(-n // block_size)
        if need > num_blocks:
            raise ValueError(f"sequence {i} has {n} tokens; the KV pool holds {num_blocks * block_size}")
        if groups and tokens + n <= token_budget and blocks + need <= num_blocks:
            groups[-1].append(i)
            tokens, blocks = tokens + n, blocks + need
        else:
            groups.append([i])
            tokens, blocks = n, need
    return groups


def continuation_logprobs(engine: Engine, model: CausalLM, pairs: Sequence[Pair]) -> torch.Tensor:
    """fp32 log-softmax [Σ len(cont), vocab] of ``model`` at the positions that predict each continuation token.

    One prefill of prompt + continuation[:-1] per sequence through the engine's paged pool
    (its block manager is reset before and after: call between generations only).
    """
    manager = engine.manager
    manager.reset()
    try:
        chunks, ids, rows = [], [], []
        offset = 0
        for seq_id, (prompt, cont) in enumerate(pairs):
            if not prompt or not cont:
                raise ValueError(f"sequence {seq_id} needs a non-empty prompt and continuation")
            fed = list(prompt) + list(cont[:-1])
            manager.allocate(seq_id, -1, len(fed))
            chunks.append((seq_id, 0, len(fed)))
            ids.extend(fed)
            rows.extend(range(offset + len(prompt) - 1, offset + len(fed)))
            offset += len(fed)
        attn, positions = build_attention_batch(manager, chunks, engine.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=engine.device)
        index = torch.tensor(rows, dtype=torch.long, device=engine.device)
        logits = model.forward(input_ids, positions, attn, engine.kv_cache, None, None, index)
        return torch.log_softmax(logits.float(), dim=-1)
    finally:
        manager.reset()


def token_kl(logp_base: torch.Tensor, logp_tuned: torch.Tensor) -> torch.Tensor:
    """Per-row KL(base ‖ tuned) = Σ_v p_base (log p_base − log p_tuned), from fp32 log-probabilities."""
    return F.kl_div(logp_tuned, logp_base, reduction="none", log_target=True).sum(-1)


def kl_on_sequences(engine: Engine, tuned: CausalLM, pairs: Sequence[Pair],
                    max_tokens_per_forward: int = DEFAULT_KL_TOKENS) -> list[list[float]]:
    """Per-token KL(engine.model ‖ tuned) of each continuation in ``pairs``."""
    out: list[list[float]] = []
    for group in _groups(pairs, max_tokens_per_forward, engine.block_size, engine.manager.num_blocks):
        chunk = [pairs[i] for i in group]
        base = continuation_logprobs(engine, engine.model, chunk)
        values = token_kl(base, continuation_logprobs(engine, tuned, chunk)).double().cpu().tolist()
        del base
        start = 0
        for _, cont in chunk:
            out.append(values[start : start + len(cont)])
            start += len(cont)
    return out


def _result(per_token: list[list[float]], pairs: list[Pair], settings: dict[str, Any]) -> KLResult:
    total = sum(len(row) for row in per_token)
    mean = sum(sum(row) for row in per_token) / total if total else 0.0
    per_prompt = [sum(row) / len(row) if row else 0.0 for row in per_token]
    return KLResult(mean, per_prompt, per_token, total, pairs, settings)


def kl_drift_many(base: str | Path | Engine, tuned: Mapping[str, str | Path | CausalLM],
                  prompts: Sequence[str] | Sequence[Sequence[int]] | None = None, num_prompts: int = 32,
                  prompt_set: str = "english", max_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                  top_p: float = 1.0, use_chat_template: bool = False, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", max_tokens_per_forward: int = DEFAULT_KL_TOKENS,
                  kv_cache_tokens: int | None = ANALYSIS_KV_TOKENS) -> dict[str, KLResult]:
    """KL(base ‖ each tuned model) on the same base continuations; tuned models are loaded one at a time.

    ``prompts`` None uses ``off_task_prompts(prompt_set, num_prompts, seed)``. ``kv_cache_tokens`` sizes the
    pool of an engine built here (None: all free GPU memory, leaving none for the tuned models).
    """
    if not tuned:
        raise ValueError("give at least one tuned model")
    engine = _as_engine(base, dtype, device, kv_cache_tokens)
    source = "given" if prompts is not None else prompt_set
    if prompts is None:
        prompts = off_task_prompts(prompt_set, num_prompts, seed, tokenizer=engine.tokenizer)
    pairs = sample_continuations(engine, prompts, max_tokens, temperature, seed, top_p, use_chat_template)
    settings = {"base": str(getattr(engine.model, "source_dir", None) or base), "num_prompts": len(pairs),
                "prompt_set": source,
                "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "use_chat_template": use_chat_template, "dtype": str(engine.model.dtype).replace("torch.", "")}
    results: dict[str, KLResult] = {}
    for label, model in tuned.items():
        loaded = _as_model(model, engine.model)
        per_token = kl_on_sequences(engine, loaded, pairs, max_tokens_per_forward)
        del loaded
        name = model.source_dir if isinstance(model, CausalLM) else model
        results[label] = _result(per_token, pairs, {**settings, "tuned": str(name)})
    return results


def kl_drift(base: str | Path | Engine, tuned: str | Path | CausalLM, **kwargs: Any) -> KLResult:
    """KL(base ‖ tuned) on off-task prompts; keyword arguments as in ``kl_drift_many``."""
    return kl_drift_many(base, {"tuned": tuned}, **kwargs)["tuned"]


__all__ = ["KLResult", "sample_continuations", "continuation_logprobs", "token_kl", "kl_on_sequences",
           "kl_drift_many", "kl_drift", "DEFAULT_KL_TOKENS", "ANALYSIS_KV_TOKENS"]
