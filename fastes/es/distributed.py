"""Multi-process ES over torch.distributed: seeds and scalars cross the network, never weights.

Every rank holds the whole model and the same (seed, step), so every rank can regenerate
every member's noise. A step is then: each rank generates and scores only its share of
the population, the N member fitnesses are all-gathered (N floats), and every rank shapes
them and applies the identical update from the seeds. Traffic is O(N) floats per step,
independent of the model size; the model must fit on one device (no tensor parallelism).

Dealing: antithetic pairs (or single members without antithetic sampling) are dealt in
contiguous blocks, so a pair is never split and rank r's members precede rank r+1's.
Every member generates the same number of rollouts, so equal pairs mean equal work; when
the number of pairs is not a multiple of the world size, the first ``pairs % world``
ranks get one more pair.

Drift guard: ranks run the same kernels on the same inputs, but a flaky GPU, a
non-deterministic kernel or different model files on two nodes would make them part
silently. Every ``distributed.check_every`` steps (and once at start) the ranks compare
an exact checksum of their weights and optimizer state: per tensor, the wrapping int64 sum
of a position-keyed integer hash of its bytes read as int64 words (exact, sees changed and
permuted elements, computed where the tensor lives; a float64 sum rounds and is blind to
permutations, a full-bytes blake2b needs the bytes on the host).
On a mismatch rank 0 broadcasts its state, the check is repeated, and the event is
logged (stderr and metrics.jsonl).

Launch with ``torchrun --nproc_per_node G -m fastes train ...``: the process group is
initialised from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) with NCCL on CUDA and gloo on CPU, and a timeout so that a dead or hung peer
ends the run with an error instead of a hang.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
FAULT_ENV = "FASTES_DIST_FAULT"  # test hook: "corrupt:RANK:STEP", "kill:RANK:STEP" or "hang:RANK:STEP"
_CHUNK = 1 << 22  # words per partial sum: bounds the int64 temporaries of one reduction
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_COUNTERS = ("errors", "invalid", "none", "retried")  # stats that add up across ranks; the others are means


class DistributedError(RuntimeError):
    """A collective failed or timed out: a peer died, hung or drifted beyond repair."""


def deal(population_size: int, world_size: int, antithetic: bool) -> list[list[int]]:
    """Members of each rank: contiguous blocks of whole pairs, sizes differing by at most one pair."""
    unit = 2 if antithetic else 1
    units = population_size // unit
    if units < world_size:
        what = f"{units} antithetic pair{'s' * (units != 1)}" if antithetic else f"{units} member{'s' * (units != 1)}"
        raise ValueError(f"population.size {population_size} ({what}) cannot be split over {world_size} ranks: "
                         "every rank needs at least one; raise population.size or use fewer processes")
    base, extra = divmod(units, world_size)
    out, start = [], 0
    for rank in range(world_size):
        count = (base + (rank < extra)) * unit
        out.append(list(range(start, start + count)))
        start += count
    return out


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_K1, _K2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9)  # odd 64-bit multipliers (splitmix64)
_LOW33 = (1 << 33) - 1


def tensor_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Wrapping int64 sum over words w_i of ``tensor``'s bits of h(w_i, i), a bijection of w_i keyed by i (0-d).

    h(w, i) = y ^ (y >>> 31) with y = (w ^ i·K1)·K2 (odd K1, K2; >>> logical): a changed element changes
    one term, so the sum (mod 2**64); a moved one changes two terms by amounts that depend on where it
    sits, so permuted rows are seen too, which a plain sum of the words is blind to. Exact and the
    same on every device (integer ops only). The bytes are read 8 at a time as int64 where the size
    allows (about 13x faster on CPU than widening narrower words, see bench/distributed.py).
    """
    flat = tensor.detach().reshape(-1)
    if flat.numel() * flat.element_size() % 8 == 0:
        if flat.storage_offset() * flat.element_size() % 8:
            flat = flat.clone()  # an unaligned view: a fresh, aligned copy
        bits = flat.view(torch.int64)
    else:
        bits = flat.view(_INT_VIEW[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHUNK):
        words = bits[start : start + _CHUNK].to(torch.int64)
        index = torch.arange(start, start + words.numel(), dtype=torch.int64, device=flat.device)
        y = (words ^ index.mul_(_K1)).mul_(_K2)
        y ^= (y >> 31) & _LOW33  # a logical shift: invertible, unlike the arithmetic one
        total += y.sum(dtype=torch.int64)
    return total


def checksums(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-tensor checksums in sorted-name order, int64 [T]."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([tensor_checksum(tensors[name]) for name in sorted(tensors)])


def digest(sums: torch.Tensor) -> str:
    """A short hex digest of a checksum vector, for logs."""
    return hashlib.blake2b(sums.cpu().numpy().tobytes(), digest_size=8).hexdigest()


def training_state(engine: Any, es: Any) -> dict[str, torch.Tensor]:
    """Everything that must be identical across ranks: parameters (LoRA adapters too) and optimizer buffers."""
    state = {f"param/{name}": t for name, t in engine.model.params.items()}
    for slot, buffers in es.optimizer.state.items():
        state.update({f"optim/{slot}/{name}": t for name, t in buffers.items()})
    return state


class NullLogger:
    """What ranks other than 0 log with: nothing (only rank 0 writes metrics.jsonl)."""

    last: dict[str, Any] = {}

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self, plot: bool = True) -> None:
        pass


class Distributed:
    """This process's place in a torchrun job and the few collectives an ES step needs."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: str, check_every: int,
                 timeout_s: float) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device  # where the model lives; collectives run there (NCCL) or on the CPU (gloo)
        self.check_every, self.timeout_s = check_every, timeout_s
        self.comm_device = torch.device(device if device.startswith("cuda") else "cpu")
        self.fault = _parse_fault(os.environ.get(FAULT_ENV, ""))

    @classmethod
    def from_env(cls, config: Any, device: str) -> Distributed | None:
        """Join the torchrun job described by the environment; None in a single process (WORLD_SIZE unset or 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        opts = config.distributed
        if device.startswith("cuda"):
            device = f"cuda:{local}" if device == "cuda" else device
            torch.cuda.set_device(torch.device(device))
        deal(config.population.size, world, config.population.antithetic)  # a bad split fails before any loading
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=opts.timeout_s))
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise DistributedError("the initialised process group does not match RANK / WORLD_SIZE")
        return cls(rank, world, local, device, opts.check_every, opts.timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """Run a collective; a dead or hung peer becomes one DistributedError saying so."""
        try:
            return fn(*args)
        except (RuntimeError, OSError) as err:  # DistBackendError, gloo/NCCL timeouts, closed connections
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed: a peer died, hung or was killed "
                f"(collective timeout {self.timeout_s:g}s): {first}"
            ) from err

    def barrier(self) -> None:
        self._call("barrier", dist.barrier)

    def gather_objects(self, what: str, obj: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        self._call(what, dist.all_gather_object, out, obj)
        return out

    def _gather_tensor(self, what: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        tensor = tensor.to(self.comm_device)
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._call(what, dist.all_gather, out, tensor)
        return out

    # ------------------------------------------------------------------ one ES step

    def members(self, population: Any) -> list[int]:
        """The members this rank generates and scores."""
        return deal(population.size, self.world_size, population.antithetic)[self.rank]

    def gather_fitness(self, local: torch.Tensor, population: Any) -> torch.Tensor:
        """All N fitnesses (float64, CPU, member order) from each rank's share: all the update needs."""
        shares = deal(population.size, self.world_size, population.antithetic)
        width = max(len(s) for s in shares)
        buf = torch.full((width,), float("nan"), dtype=torch.float64)
        buf[: local.numel()] = local.to(torch.float64).cpu()
        parts = self._gather_tensor("all-gather of fitness", buf)
        return torch.cat([p.cpu()[: len(s)] for p, s in zip(parts, shares, strict=True)])

    def gather_rollouts(self, scores: list[float], tokens: int, stats: dict[str, float]
                        ) -> tuple[list[float], int, dict[str, float]]:
        """Every rank's rewards (member order), token count and reward stats, for metrics only."""
        parts = self.gather_objects("all-gather of rollout stats", (scores, tokens, stats))
        all_scores = [s for part in parts for s in part[0]]
        merged: dict[str, float] = {}
        for key in {k for part in parts for k in part[2]}:
            have = [(len(p[0]), p[2][key]) for p in parts if key in p[2]]
            if key.rsplit("/", 1)[-1] in _COUNTERS:
                merged[key] = float(sum(v for _, v in have))
            else:  # a mean over this rank's completions: weight by their number
                weight = sum(n for n, _ in have)
                merged[key] = sum(n * v for n, v in have) / weight if weight else have[0][1]
        return all_scores, sum(p[1] for p in parts), merged

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's slice of a list (evaluation is split across ranks, then merged)."""
        return list(items[self.rank :: self.world_size])

    def merge_eval(self, result: dict[str, Any] | None, count: int) -> dict[str, Any]:
        """Held-out metrics of the whole set from each rank's (result, number of examples)."""
        parts = [(r, n) for r, n in self.gather_objects("all-gather of eval", (result, count)) if r]
        total = sum(n for _, n in parts)
        if not total:
            return {}
        return {"eval/accuracy": sum(r["eval/accuracy"] * n for r, n in parts) / total,
                "eval/reward": sum(r["eval/reward"] * n for r, n in parts) / total,
                "eval/errors": sum(r["eval/errors"] for r, _ in parts),
                "eval/time_s": max(r["eval/time_s"] for r, _ in parts)}

    # ------------------------------------------------------------------ drift guard

    def after_step(self, engine: Any, es: Any, done: int) -> dict[str, Any]:
        """After ``done`` completed steps: test faults, then the checksum guard when it is due."""
        self._inject(engine, done)
        if self.check_every and done % self.check_every == 0:
            return self.check(engine, es, done)
        return {}

    def check(self, engine: Any, es: Any, done: int) -> dict[str, Any]:
        """Compare the ranks' checksums; on mismatch rank 0 broadcasts its state, and the repair is verified."""
        t0 = time.perf_counter()
        state = training_state(engine, es)
        names = sorted(state)
        sums = self._gather_tensor("all-gather of weight checksums", checksums(state))
        bad = [r for r in range(self.world_size) if not torch.equal(sums[r], sums[0])]
        record: dict[str, Any] = {"dist/checked_step": done, "dist/mismatch": int(bool(bad)),
                                  "dist/checksum": digest(sums[0])}
        if bad:
            drifted = sorted({names[i] for r in bad for i in torch.nonzero(sums[r] != sums[0]).flatten().tolist()})
            if self.is_main:
                print(f"fastes: warning: after step {done} the weights of rank(s) {bad} differ from rank 0 in "
                      f"{len(drifted)} tensor(s) ({', '.join(drifted[:3])}{', ...' if len(drifted) > 3 else ''}); "
                      "rank 0 broadcasts its weights", file=sys.stderr, flush=True)
            self._broadcast(state, engine, es)
            again = self._gather_tensor("all-gather of weight checksums", checksums(training_state(engine, es)))
            if any(not torch.equal(s, again[0]) for s in again):
                raise DistributedError(f"rank {self.rank}: weights still differ after rank 0's broadcast")
            record.update({"dist/repaired_ranks": bad, "dist/drifted_tensors": drifted[:16], "dist/repaired": 1})
        record["time/check_s"] = time.perf_counter() - t0
        return record

    def _broadcast(self, state: dict[str, torch.Tensor], engine: Any, es: Any) -> None:
        """Rank 0's tensors (as raw bytes, whatever the dtype) and noise scales overwrite everyone's."""
        with torch.no_grad():
            for name in sorted(state):
                tensor = state[name]
                buf = tensor if tensor.is_contiguous() else tensor.contiguous()
                self._call(f"broadcast of {name}", dist.broadcast, buf.view(-1).view(torch.uint8), 0)
                if buf is not tensor:
                    tensor.copy_(buf)
        scales = [es.noise_scales()]
        self._call("broadcast of noise scales", dist.broadcast_object_list, scales, 0)
        if scales[0] is not None and not self.is_main:
            engine.model.set_noise_scales(scales[0])

    def _inject(self, engine: Any, done: int) -> None:
        """The FASTES_DIST_FAULT test hook: this rank drifts, dies or hangs after ``done`` steps."""
        if self.fault is None or self.fault[1] != self.rank or self.fault[2] != done:
            return
        kind = self.fault[0]
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            time.sleep(10 * self.timeout_s)
        if kind == "corrupt":
            name = sorted(engine.model.params)[0]
            with torch.no_grad():
                flat = engine.model.params[name].view(-1)
                flat[0] = flat[0] * 1.5 + 0.01

    def close(self) -> None:
        """Leave the group together: a rank that tears its gloo threads down while a peer still talks to it
        can abort() (exit -6) in their C++ destructors, which torchrun reports as a failed node."""
        if dist.is_initialized():
            try:
                self.barrier()
            except DistributedError:
                pass  # a peer is already gone: nothing left to wait for
            dist.destroy_process_group()


def _parse_fault(spec: str) -> tuple[str, int, int] | None:
    if not spec:
        return None
    kind, rank, step = spec.split(":")
    if kind not in ("corrupt", "kill", "hang"):
        raise ValueError(f"{FAULT_ENV} must be corrupt|kill|hang:RANK:STEP, got {spec!r}")
    return kind, int(rank), int(step)


__all__ = ["Distributed", "DistributedError", "NullLogger", "deal", "checksums", "tensor_checksum", "training_state"]
