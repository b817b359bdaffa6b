"""Decode steps replayed from CUDA graphs: one captured forward per padded batch size.

A decode step launches ~15 kernels per layer, and for S sequences of a small model the GPU
waits on Python and the driver to enqueue them. A CUDA graph captured once per batch-size
bucket replays the whole forward (embedding to last layer) in one launch. Inputs live in
static device buffers padded up to the bucket: padded rows get seq_len 0 (attention skips
them), slot −1 (no KV write) and member −1, and their outputs are dropped. The final norm
and LM head run outside the graph on the S real rows, so no graph holds a [bucket, vocab]
logits buffer (vLLM splits it the same way).

Noise keys (seed, step), σ and per-tensor scales are kernel arguments baked into a capture,
so graphs belong to one Perturbation: a generate with a new one (every ES step) captures
again, lazily, only the sizes it uses (one warm-up forward and one capture each; a shrinking
batch reuses a captured size up to twice its own before capturing a smaller one). The
unperturbed model's graphs are kept across calls while the parameter tensors stay the same
(``engine.update`` writes in place; replaced tensors or new adapters drop every graph).

``capture=False`` runs the same padded static-buffer forward eagerly: the CPU tests use it to
check the padding and buffer logic that the GPU then captures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastes.engine.config import DEFAULT_MAX_GRAPH_BATCH
from fastes.models.batch import AttentionBatch

if TYPE_CHECKING:
    from fastes.engine.kv_cache import KVCache
    from fastes.models import CausalLM, Perturbation



def graph_batch_sizes(max_batch: int) -> list[int]:
    """Captured batch sizes: 1..8, then four per doubling (10, 12, 14, 16, 20, ...), then ``max_batch``.

    A batch runs in the smallest size that holds it, so padding wastes under 25% of a step.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = list(range(1, 9))
    base = 8
    while sizes[-1] < max_batch:
        sizes += [base + k * base // 4 for k in range(1, 5)]
        base *= 2
    return [s for s in sizes if s < max_batch] + [max_batch]


def _host_buffer(numel: int, device: torch.device) -> torch.Tensor:
    """int32 host staging memory: pinned when the graphs live on CUDA, so the copy to the device is async."""
    return torch.empty(numel, dtype=torch.int32, pin_memory=device.type == "cuda")


class GraphCaptureError(RuntimeError):
    """A decode step could not be captured; the engine warns and decodes eagerly from then on."""


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None: eager replay (capture=False)
    hidden: torch.Tensor | None  # the captured forward's output [size, hidden]


class DecodeGraphs:
    """Static decode buffers of one engine and the graphs captured over them."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, max_batch: int = DEFAULT_MAX_GRAPH_BATCH,
                 capture: bool = True) -> None:
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {model.device}")
        self.model, self.kv_cache, self.capture = model, kv_cache, capture
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        block_size = kv_cache.block_size
        width = min(kv_cache.num_blocks, -(-model.config.max_position_embeddings // block_size))
        dev, b = model.device, self.max_batch
        self.input_ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.row_member = torch.full((b,), -1, dtype=torch.int32, device=dev)
        self.slot_mapping = torch.full((b,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(b, width, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self._staging = _host_buffer(0, dev)
        self._landing = torch.empty(0, dtype=torch.int32, device=dev)
        self._graphs: dict[tuple[int | None, int], _Graph] = {}  # (id of the perturbation, size)
        self._ptrs: tuple[int, ...] = ()
        self._pert: Perturbation | None = None
        self._pool: object | None = None
        self.num_captures = 0
        self.num_replays = 0
        self.num_padded_rows = 0

    @property
    def max_blocks_per_seq(self) -> int:
        return int(self.block_tables.shape[1])

    def bucket(self, num_seqs: int) -> int:
        """The captured size a batch of ``num_seqs`` decodes runs in."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        raise ValueError(f"{num_seqs} sequences exceed the largest graph batch {self.max_batch}")

    def size_for(self, num_seqs: int) -> int:
        """The graph size a batch runs in: its bucket, or a bigger graph already captured for this perturbation
        if it is at most twice the batch. A batch shrinking as sequences stop then captures ~log2 sizes, not
        every bucket on the way down (each capture costs a warm-up forward and the capture itself)."""
        size = self.bucket(num_seqs)
        pid = self._pert_id()
        if (pid, size) in self._graphs:
            return size
        bigger = [s for p, s in self._graphs if p == pid and size < s <= 2 * num_seqs]
        return min(bigger, default=size)

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        return 0 < num_seqs <= self.max_batch and max_blocks <= self.max_blocks_per_seq

    def begin(self, pert: Perturbation | None) -> None:
        """Bind to a generate call; graphs of another perturbation, or of replaced parameter tensors, go."""
        ptrs = tuple(t.data_ptr() for t in self.model.params.values())  # new adapters add entries
        if ptrs != self._ptrs:
            self._graphs.clear()
            self._ptrs = ptrs
        if pert is not self._pert:  # the reference kept in self._pert means a new one never reuses its id
            self._graphs = {key: g for key, g in self._graphs.items() if key[0] is None}
        self._pert = pert

    def run(self, input_ids: np.ndarray, positions: np.ndarray, members: np.ndarray, slots: np.ndarray,
            seq_lens: np.ndarray, block_tables: np.ndarray) -> torch.Tensor:
        """Residual stream [S, hidden] of S single-token decodes (one per sequence), from a graph replay."""
        num_seqs = len(input_ids)
        size = self.load(input_ids, positions, members, slots, seq_lens, block_tables)
        key = (self._pert_id(), size)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(size)
        self.num_replays += 1
        self.num_padded_rows += size - num_seqs
        if entry.graph is None:
            return self._forward(size)[:num_seqs]
        entry.graph.replay()
        assert entry.hidden is not None
        return entry.hidden[:num_seqs]

    def load(self, input_ids: np.ndarray, positions: np.ndarray, members: np.ndarray, slots: np.ndarray,
             seq_lens: np.ndarray, block_tables: np.ndarray) -> int:
        """Fill the static inputs for S decodes (padded up to the graph size, which it returns).

        The host arrays ([S] each, ``block_tables`` [S, width]) are packed into one pinned staging buffer and
        reach the device in one non-blocking copy; device-side copies then fill the graph's static inputs.
        The staging buffer is reused by the next step, which is safe because every step reads its sampled
        tokens back (a sync) before the next one prepares.
        """
        num_seqs = len(input_ids)
        size = self.size_for(num_seqs)
        width = block_tables.shape[1]
        head = 5 * size
        total = head + num_seqs * width
        if total > self._staging.numel():
            self._staging = _host_buffer(total, self.model.device)
            self._landing = torch.empty(total, dtype=torch.int32, device=self.model.device)
        host = self._staging.numpy()
        fields = host[:head].reshape(5, size)
        fields[:, num_seqs:] = np.array([[0], [0], [-1], [-1], [0]], dtype=np.int32)  # padded rows
        for i, values in enumerate((input_ids, positions, members, slots, seq_lens)):
            fields[i, :num_seqs] = values
        host[head:total].reshape(num_seqs, width)[:] = block_tables
        landing = self._landing[:total]
        landing.copy_(self._staging[:total], non_blocking=True)
        packed = landing[:head].view(5, size)
        self.input_ids[:size].copy_(packed[0])
        self.positions[:size].copy_(packed[1])
        self.row_member[:size].copy_(packed[2])
        self.slot_mapping[:size].copy_(packed[3])
        self.seq_lens[:size].copy_(packed[4])
        self.block_tables[:num_seqs, :width].copy_(landing[head:].view(num_seqs, width))
        return size

    def _pert_id(self) -> int | None:
        """The graphs' key for the bound perturbation (its id is not reused while ``_pert`` holds it)."""
        return id(self._pert) if self._pert is not None else None

    def _forward(self, size: int) -> torch.Tensor:
        attn = AttentionBatch(self.cu_seqlens_q[: size + 1], self.seq_lens[:size], self.block_tables[:size],
                              self.slot_mapping[:size], 1, self.max_blocks_per_seq * self.kv_cache.block_size)
        pert = self._pert
        return self.model.hidden_states(self.input_ids[:size], self.positions[:size], attn, self.kv_cache,
                                        self.row_member[:size] if pert is not None else None, pert)

    def _capture(self, size: int) -> _Graph:
        if not self.capture:
            return _Graph(None, None)
        device = self.model.device
        # Warm-up outside the capture on a side stream: Triton compiles and autotunes, the step's 1-D noise
        # tables fill, cuBLAS sets up. It runs this step's real inputs, so its K/V writes are the replay's own.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._forward(size)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a background thread's CUDA call (e.g. the NCCL watchdog in a distributed run) must
            # not invalidate this capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                hidden = self._forward(size)
        except RuntimeError as err:  # the warm-up ran: this step's K/V are written and eager decode can go on
            raise GraphCaptureError(f"CUDA-graph capture of a {size}-sequence decode step failed: {err}") from err
        self.num_captures += 1
        return _Graph(graph, hidden)


__all__ = ["DEFAULT_MAX_GRAPH_BATCH", "DecodeGraphs", "GraphCaptureError", "graph_batch_sizes"]
