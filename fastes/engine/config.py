"""EngineConfig: the engine's tuning knobs in one place (docs/design.md, "The engine").

None means "pick for the device": the defaults differ between CPU and CUDA, and the
engine resolves them once when it is built (``resolve``), so every later reader sees
plain numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_GRAPH_BATCH = 512
CPU_KV_TOKENS = 65536
CPU_ACTIVATION_BYTES = 256 << 20  # the widest activation of a CPU forward at the default token budget


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """``kv_cache_tokens`` None: sized from free memory on CUDA, CPU_KV_TOKENS on CPU. ``cuda_graphs`` None: on
    with CUDA and the auto / triton backend. ``max_graph_batch``: the largest decode batch a graph replays."""

    kv_cache_tokens: int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    backend: str = "auto"
    cuda_graphs: bool | None = None
    max_graph_batch: int = DEFAULT_MAX_GRAPH_BATCH

    def __post_init__(self) -> None:
        if self.kv_cache_tokens is not None and (isinstance(self.kv_cache_tokens, bool)
                                                 or not isinstance(self.kv_cache_tokens, int)
                                                 or self.kv_cache_tokens < 1):
            raise ValueError(f"kv_cache_tokens must be a positive integer or None, got {self.kv_cache_tokens!r}")
        if isinstance(self.max_graph_batch, bool) or not isinstance(self.max_graph_batch, int) \
                or self.max_graph_batch < 1:
            raise ValueError(f"max_graph_batch must be a positive integer, got {self.max_graph_batch!r}")
        _positive_int("block_size", self.block_size)
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)

    def resolve(self, on_gpu: bool, activation_bytes_per_token: int = 0) -> EngineConfig:
        """The same config with the device-dependent None fields filled in (kv_cache_tokens stays as given).

        ``activation_bytes_per_token``: the widest activation row of the model (intermediate size × element
        size), which sizes the CPU token budget (``cpu_token_budget``).
        """
        cuda_graphs = self.cuda_graphs
        if cuda_graphs is None:
            cuda_graphs = on_gpu and self.backend in ("auto", "triton")
        tokens = self.max_num_batched_tokens or (8192 if on_gpu else cpu_token_budget(activation_bytes_per_token))
        return dataclasses.replace(self, max_num_seqs=self.max_num_seqs or (1024 if on_gpu else 4096),
                                   max_num_batched_tokens=tokens, cuda_graphs=cuda_graphs)


def cpu_token_budget(activation_bytes_per_token: int) -> int:
    """Tokens per CPU forward: as many as keep the widest activation under CPU_ACTIVATION_BYTES, a power of two in
    [8192, 65536].

    A bigger budget lets a whole ES prefill (e.g. the demo's 32 members × 64 prompts × 8 tokens) run as one
    step instead of several steps that mix decodes with prefill chunks. Mixed steps give members unequal row
    counts, which the CPU lowrank op serves member by member instead of in one batched product (~8% of a
    demo step, docs/design.md "The host path"); a small model's activations cost little memory either way.
    """
    if activation_bytes_per_token <= 0:
        return 8192
    tokens = 8192
    while tokens < 65536 and 2 * tokens * activation_bytes_per_token <= CPU_ACTIVATION_BYTES:
        tokens *= 2
    return tokens


__all__ = ["EngineConfig", "DEFAULT_BLOCK_SIZE", "DEFAULT_MAX_GRAPH_BATCH", "CPU_KV_TOKENS", "cpu_token_budget"]
