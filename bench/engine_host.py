"""The engine's host time per decode step, outside the forward and the sampler (docs/design.md, "The host path").

    python -m bench.engine_host [--seqs 512 2048] [--members 32] [--new-tokens 32] [--reps 3]

The bundled demo model generates S = members × (S / members) sequences (N = 32 lowrank members,
3-digit additions, greedy, ``ignore_eos``, every sequence ``--new-tokens`` long). Every forward
and every sampler call is timed, and so is the whole step; a decode step's host time is its wall
time minus the two (and the same in this process's CPU time, steadier on a shared host). It is
split into the scheduler's plan (``schedule``), the runner's input preparation (``prepare``), the
rest of the runner (KV copies, logits rows, the token read-back) and the scheduler's bookkeeping
(``postprocess``). Reported: means over the decode steps of all reps (so that the parts add up),
and the host time's median. ``graph inputs``: the decode-graph input preparation alone (rows ->
arrays -> the static buffers a CUDA graph replays, through
``DecodeGraphs.load`` with eager buffers on CPU), per step.

Targets on the project's 2-core CPU (issue 19): host ≤ 2 ms per decode step at 512 sequences and
≤ 6 ms at 2048. JSON goes to bench/results/engine_host-<device>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import device_name, git_commit, positive_int, versions, write_result

DEMO = Path(__file__).resolve().parents[1] / "fastes" / "data" / "demo-model"


class _Clock:
    """Per-step accumulated time of the wrapped callables, keyed by phase."""

    def __init__(self) -> None:
        self.step: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args: object, **kwargs: object) -> object:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.step[phase] += time.perf_counter() - start
                self.step["cpu_" + phase] += time.process_time() - cpu
        return timed

    def close_step(self) -> None:
        self.steps.append(dict(self.step))
        self.step.clear()


def _instrument(engine: object, clock: _Clock) -> None:
    """Time the forward, the sampler and the host phases of every step of ``engine.generate``."""
    import fastes.engine.model_runner as runner_mod
    from fastes.engine.scheduler import Scheduler

    model, runner = engine.model, engine.runner  # type: ignore[attr-defined]
    model.hidden_states = clock.wrap("forward", model.hidden_states)  # model.forward calls both
    model.logits = clock.wrap("forward", model.logits)
    runner.sample = clock.wrap("sampler", runner.sample)
    runner_mod.prepare_inputs = clock.wrap("prepare", runner_mod.prepare_inputs)
    plain_schedule, plain_post = Scheduler.schedule, Scheduler.postprocess
    plain_run = runner.run

    def schedule(self: Scheduler) -> object:
        clock.step["t0"], clock.step["c0"] = time.perf_counter(), time.process_time()
        return clock.wrap("schedule", plain_schedule)(self)

    def postprocess(self: Scheduler, plan: object, tokens: list[int]) -> object:
        out = clock.wrap("postprocess", plain_post)(self, plan, tokens)
        clock.step["wall"] = time.perf_counter() - clock.step.pop("t0")
        clock.step["cpu_wall"] = time.process_time() - clock.step.pop("c0")
        clock.step["decode"] = float(plan.decode_only)  # type: ignore[attr-defined]
        clock.close_step()
        return out

    Scheduler.schedule, Scheduler.postprocess = schedule, postprocess  # type: ignore[method-assign]
    runner.run = clock.wrap("run", plain_run)


def _graph_inputs(engine: object, prompts: list[list[int]], pop: object, steps: int) -> float:
    """Median seconds of rows -> decode-graph static inputs (prepare_inputs + DecodeGraphs.load) on a live batch."""
    from fastes.engine.cuda_graphs import DecodeGraphs
    from fastes.engine.model_runner import prepare_inputs

    engine.decode_graphs = None  # type: ignore[attr-defined]
    graphs = DecodeGraphs(engine.model, engine.kv_cache, max(4096, engine.max_num_seqs),  # type: ignore[attr-defined]
                          capture=False)
    times: list[float] = []
    plain = engine.runner.forward  # type: ignore[attr-defined]

    def forward(plan: object, state: object, pert: object) -> torch.Tensor:
        if plan.decode_only and len(times) < steps:  # type: ignore[attr-defined]
            start = time.perf_counter()
            inputs = prepare_inputs(plan, state, engine.block_size)  # type: ignore[arg-type, attr-defined]
            graphs.load(inputs.input_ids, inputs.positions, inputs.row_member, inputs.slot_mapping,
                        inputs.seq_lens, inputs.block_tables)
            times.append(time.perf_counter() - start)
        return plain(plan, state, pert)

    engine.runner.forward = forward  # type: ignore[attr-defined]
    from fastes import SamplingParams

    engine.generate(prompts, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True),  # type: ignore
                    population=pop, step=0)
    engine.runner.forward = plain  # type: ignore[attr-defined]
    return statistics.median(times)


def measure(seqs: int, members: int, new_tokens: int, reps: int) -> dict[str, object]:
    from bench.generate import demo_prompts
    from fastes import Engine, Population, SamplingParams

    per_member = seqs // members
    engine = Engine.from_pretrained(DEMO, kv_cache_tokens=seqs * (8 + new_tokens + 16))
    prompts = demo_prompts(engine, per_member).tolist()
    pop = Population(size=members, sigma=1e-2, mode="lowrank", rank=4, seed=0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), population=pop)
    clock = _Clock()
    _instrument(engine, clock)
    for _ in range(reps):
        engine.generate(prompts, params, population=pop, step=0)
    decode = [s for s in clock.steps if s.get("decode")]
    split: dict[str, float] = {}  # means over decode steps, so that the parts add up to the step
    for phase in ("wall", "forward", "sampler", "schedule", "prepare", "postprocess"):
        split[phase] = statistics.fmean(s.get(phase, 0.0) for s in decode)
    host = [s["wall"] - s.get("forward", 0.0) - s.get("sampler", 0.0) for s in decode]
    split["host"] = statistics.fmean(host)
    split["host_median"] = statistics.median(host)
    split["host_cpu"] = statistics.fmean(s["cpu_wall"] - s.get("cpu_forward", 0.0) - s.get("cpu_sampler", 0.0)
                                         for s in decode)
    split["runner_other"] = statistics.fmean(
        s.get("run", 0.0) - s.get("forward", 0.0) - s.get("sampler", 0.0) - s.get("prepare", 0.0) for s in decode)
    split["graph_inputs"] = _graph_inputs(engine, prompts, pop, min(new_tokens - 1, 16))
    return dict(seqs=per_member * members, members=members, per_member=per_member, new_tokens=new_tokens,
                reps=reps, decode_steps=len(decode), mean_s=split)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=positive_int, nargs="+", default=[512, 2048], help="sequences per step")
    parser.add_argument("--members", type=positive_int, default=32, help="population size N")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated per sequence (>= 3)")
    parser.add_argument("--reps", type=positive_int, default=3, help="generate calls per size")
    args = parser.parse_args(argv)
    if args.new_tokens < 3:
        parser.error(f"--new-tokens must be at least 3 (a prefill and two decode steps), got {args.new_tokens}")
    if any(s % args.members for s in args.seqs):
        parser.error(f"--seqs must be multiples of --members ({args.members}), got {args.seqs}")
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    print(f"{device_name('cpu')}, 1 torch thread, load average {load:.2f}: demo model, N = {args.members}, "
          f"{args.new_tokens} new tokens, mean over decode steps of {args.reps} generates")
    results = []
    for seqs in args.seqs:
        res = measure(seqs, args.members, args.new_tokens, args.reps)
        ms = {k: 1e3 * v for k, v in res["mean_s"].items()}  # type: ignore[union-attr]
        print(f"  {seqs:5d} seqs: step {ms['wall']:7.2f} ms = forward {ms['forward']:7.2f} + sampler "
              f"{ms['sampler']:5.2f} + host {ms['host']:5.2f} (cpu {ms['host_cpu']:.2f}, "
              f"median {ms['host_median']:.2f}; schedule "
              f"{ms['schedule']:.2f}, prepare {ms['prepare']:.2f}, runner other {ms['runner_other']:.2f}, "
              f"postprocess {ms['postprocess']:.2f}); "
              f"graph inputs alone {ms['graph_inputs']:.2f} ms", flush=True)
        results.append(res)
    payload = dict(bench="engine_host", device=device_name("cpu"), **versions(), git_commit=git_commit(),
                   threads=1, load_average_start=load, load_average_end=os.getloadavg()[0],
                   targets_ms={"512": 2.0, "2048": 6.0}, results=results)
    print(f"wrote {write_result('engine_host', payload, 'cpu')}")


if __name__ == "__main__":
    main()
