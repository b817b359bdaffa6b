"""What common random numbers do to ES fitness under sampling: how much of a member's score is weights, not dice.

    python -m bench.crn_effect [--population 32] [--prompts 32] [--temperature 1.0] [--repeats 4] [--steps 3]

For each ES step (fixed weights = the demo model, the demo's task and partial-credit reward) the population is
scored ``repeats`` times with different sampling seeds, with and without ``sampling.common_random_numbers``.
Reported per setting: the mean over pairs of repeats of the correlation between the fitness vectors (1: the
ranking is reproducible, it comes from the weights; 0: it is noise), the share of the fitness variance that
is between members rather than between repeats, and the std of the antithetic-pair differences f₊ − f₋ that
the ES step is made of. JSON into bench/results/crn_effect-<device>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def fitness_of(engine: Any, task: Any, examples: list[Any], pop: Any, step: int, seed: int, crn: bool,
               temperature: float, max_tokens: int) -> torch.Tensor:
    """Mean partial-credit reward per member on ``examples`` at ES step ``step`` with sampling seed ``seed``."""
    from fastes.engine.sampling import SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, common_random_numbers=crn)
    outs = engine.generate([e.prompt for e in examples], sampling, pop, step=step)
    rows = []
    for member in outs:
        texts = [p[0].text for p in member]
        rows.append(statistics.fmean(task.reward(texts, [e.prompt for e in examples],
                                                 answer=[e.columns["answer"] for e in examples])))
    return torch.tensor(rows, dtype=torch.float64)


def stats(repeats: list[torch.Tensor]) -> dict[str, float]:
    """Between-repeat correlation, share of variance between members, antithetic-difference std."""
    f = torch.stack(repeats)  # [repeats, members]
    corr = [float(torch.corrcoef(torch.stack([f[i], f[j]]))[0, 1])
            for i in range(len(repeats)) for j in range(i + 1, len(repeats))]
    between = float(f.mean(dim=0).var(unbiased=True))
    within = float(f.var(dim=0, unbiased=True).mean())
    diffs = f[:, 0::2] - f[:, 1::2]
    return {"fitness_correlation": statistics.fmean(corr), "member_share_of_variance": between / (between + within),
            "pair_diff_std": float(diffs.std(unbiased=True)), "repeat_noise_std": within ** 0.5}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--population", type=int, default=32)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--sigma", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.population < 2 or args.population % 2 or args.repeats < 2 or args.prompts < 1 or args.steps < 1:
        p.error("--population even >= 2, --repeats >= 2, --prompts and --steps >= 1")
    torch.set_num_threads(1)
    from bench.common import RESULTS, device_name, slug
    from fastes.cli import demo_config, load_train_config
    from fastes.engine.engine import Engine
    from fastes.es.runtime import resolve_task
    from fastes.population import Population

    cfg, _ = load_train_config(None, [])
    task = resolve_task(cfg.task, cfg.task_options)
    engine = Engine.from_pretrained(cfg.model, dtype=torch.float32, device="cpu", kv_cache_tokens=16384)
    train = task.train_examples()
    pop = Population(size=args.population, sigma=args.sigma, mode="lowrank", rank=1, seed=0)
    result: dict[str, Any] = {"bench": "crn_effect", "device": device_name("cpu"), "config": str(demo_config()),
                              "args": vars(args) | {"out": None}, "steps": {}}
    for step in range(args.steps):
        examples = train[step * args.prompts : (step + 1) * args.prompts]
        result["steps"][step] = {
            name: stats([fitness_of(engine, task, examples, pop, step, 1000 * step + r, crn, args.temperature,
                                    cfg.sampling.max_tokens) for r in range(args.repeats)])
            for name, crn in (("independent", False), ("crn", True))}
    for name in ("independent", "crn"):
        result[name] = {k: statistics.fmean(s[name][k] for s in result["steps"].values())
                        for k in result["steps"][0][name]}
        print(f"{name:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in result[name].items()))
    out = args.out or RESULTS / f"crn_effect-{slug(result['device'])}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
