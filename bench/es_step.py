"""The demo ES step against the member-by-member HF loop users run today, side by side in one run.

    python -m bench.es_step [--prompts 64 16] [--members 32] [--rank 4] [--reps 3]

1. ``fastes``: one ``Trainer.train_step`` of the shipped ``configs/demo.yaml`` (greedy, 6 new tokens,
   digit-wise partial credit, z-score, its optimizer) with the population pinned to the shape of issue 19
   (N = 32 lowrank rank-4 members, whatever the shipped config's own) and ``prompts_per_step`` P:
   generation of all members in one continuous batch, rewards, fitness, the update and the metrics.
2. ``hf_loop``: the perturb / generate / restore loop of Qiu et al. (2025), ported to this model: for each
   member, seed a generator, add σ·ε to every parameter in place (full-rank Gaussian, one randn per
   tensor), ``generate`` the same P prompts as one batch with transformers (greedy, 6 new tokens, EOS),
   decode, score with the same reward, regenerate ε and subtract it; then z-score the rewards and add
   lr/N·z_m·ε_m for every member, regenerating each ε once more.

Both run with one torch thread on the same prompts (the trainer's batch of each step), alternating, and
are timed in wall-clock and in this process's CPU time (``time.process_time``). On a shared host the CPU
time is the steadier of the two; the ratios of both are printed. JSON goes to
bench/results/es_step-<device>-<timestamp>.json. Targets on the project's 2-core CPU (issue 19):
fastes ≥ 2.5× the loop at 64 prompts per member, ≥ 4× at 16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import device_name, git_commit, positive_int, versions, write_result

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class HFLoop:
    """Qiu et al.'s loop on an HF transformers model: perturb, generate, restore, member after member."""

    def __init__(self, model_dir: Path, members: int, sigma: float, lr: float, max_tokens: int) -> None:
        import transformers

        self.hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        self.params = [p for p in self.hf.parameters()]
        self.members, self.sigma, self.lr, self.max_tokens = members, sigma, lr, max_tokens

    def _noise(self, seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(p.shape, generator=gen) for p in self.params]

    @torch.no_grad()
    def step(self, step: int, prompts: list[str], reward: object) -> tuple[float, float]:
        """One ES step; returns (seconds in HF generate, total seconds) of wall-clock."""
        ids = self.tok(prompts, return_tensors="pt", padding=True)
        seeds = [step * 1_000_003 + m for m in range(self.members)]
        fitness, gen_s, start = [], 0.0, time.perf_counter()
        for seed in seeds:
            for p, e in zip(self.params, self._noise(seed), strict=True):
                p.add_(e, alpha=self.sigma)
            t = time.perf_counter()
            out = self.hf.generate(**ids, max_new_tokens=self.max_tokens, do_sample=False,
                                   eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
            texts = self.tok.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            gen_s += time.perf_counter() - t
            fitness.append(sum(reward(texts)) / len(texts))  # type: ignore[operator]
            for p, e in zip(self.params, self._noise(seed), strict=True):
                p.sub_(e, alpha=self.sigma)
        f = torch.tensor(fitness, dtype=torch.float64)
        z = (f - f.mean()) / f.std() if f.std() > 0 else torch.zeros_like(f)
        for seed, zm in zip(seeds, z.tolist(), strict=True):
            for p, e in zip(self.params, self._noise(seed), strict=True):
                p.add_(e, alpha=self.lr / self.members * zm)
        return gen_s, time.perf_counter() - start


def measure(prompts: int, members: int, rank: int, reps: int) -> dict[str, object]:
    from fastes.es.config import TrainConfig
    from fastes.es.trainer import Trainer

    out = tempfile.mkdtemp(prefix="fastes-es-step-")
    cfg = TrainConfig.from_yaml(DEMO_CONFIG, ["--prompts_per_step", str(prompts), "--out", out, "--population.size",
                                              str(members), "--population.rank", str(rank)])
    trainer = Trainer(cfg)
    model_dir = Path(cfg.model) if Path(cfg.model).is_absolute() else ROOT / cfg.model
    loop = HFLoop(model_dir, cfg.population.size, cfg.population.sigma, cfg.optim.lr, cfg.sampling.max_tokens)
    task = trainer.task

    def batch(step: int) -> tuple[list[str], object]:
        examples = [trainer.train_set[i] for i in trainer.batches(step)[0]]
        answers = [e.answer for e in examples]
        return [e.prompt for e in examples], lambda texts: task.reward(texts, answer=answers)

    trainer.train_step(0)  # warm-up: first-call allocations, the C++ paths
    loop.step(0, *batch(0))
    times: dict[str, list[float]] = {"fastes_wall": [], "fastes_cpu": [], "hf_wall": [], "hf_cpu": [],
                                     "hf_generate_wall": []}
    for step in range(1, reps + 1):
        wall, cpu = _clock()
        trainer.train_step(step)
        times["fastes_wall"].append(time.perf_counter() - wall)
        times["fastes_cpu"].append(time.process_time() - cpu)
        wall, cpu = _clock()
        gen_s, _ = loop.step(step, *batch(step))
        times["hf_wall"].append(time.perf_counter() - wall)
        times["hf_cpu"].append(time.process_time() - cpu)
        times["hf_generate_wall"].append(gen_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(prompts_per_member=prompts, members=cfg.population.size, rank=cfg.population.rank, reps=reps,
                times_s=times, median_s=med, ratio_wall=med["hf_wall"] / med["fastes_wall"],
                ratio_cpu=med["hf_cpu"] / med["fastes_cpu"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=positive_int, nargs="+", default=[64, 16], help="prompts per member")
    parser.add_argument("--members", type=positive_int, default=32, help="population size N (even)")
    parser.add_argument("--rank", type=positive_int, default=4, help="lowrank rank of the fastes population")
    parser.add_argument("--reps", type=positive_int, default=3, help="timed steps of each")
    args = parser.parse_args(argv)
    if args.members % 2:
        parser.error(f"--members must be even (the population is antithetic), got {args.members}")
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    print(f"{device_name('cpu')}, 1 torch thread, load average {load:.2f}: configs/demo.yaml step (N = {args.members}, "
          f"lowrank rank {args.rank}) vs the HF loop, median of {args.reps}")
    results = []
    for prompts in args.prompts:
        res = measure(prompts, args.members, args.rank, args.reps)
        m = res["median_s"]
        print(f"  P = {prompts:3d}: fastes {m['fastes_wall']:6.3f} s wall / {m['fastes_cpu']:6.3f} s cpu; HF loop "
              f"{m['hf_wall']:6.3f} / {m['hf_cpu']:6.3f} (generate {m['hf_generate_wall']:.3f} s wall); "
              f"fastes is {res['ratio_wall']:.2f}x (wall), {res['ratio_cpu']:.2f}x (cpu)", flush=True)
        results.append(res)
    payload = dict(bench="es_step", device=device_name("cpu"), **versions(), git_commit=git_commit(), threads=1,
                   load_average_start=load, load_average_end=os.getloadavg()[0],
                   targets={"64": 2.5, "16": 4.0}, results=results)
    print(f"wrote {write_result('es_step', payload, 'cpu')}")


if __name__ == "__main__":
    main()
