"""`make demo`: show fastes doing its job on this machine, no GPU and no download needed.

Until the bundled ES demo model lands, this runs the population machinery end to
end on a tiny layer: regenerate noise from counters, evaluate a population of
perturbed linears in one batch, and apply the ES update from seeds alone.
"""

from __future__ import annotations

import time

import torch

import fastes
from fastes.noise import NoiseSpec
from fastes.ops.es_update import es_update
from fastes.ops.perturbed_linear import perturbed_linear


def main() -> None:
    print(f"fastes {fastes.__version__}; backends: {fastes.backends()}")
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, members, rows = 64, 96, 8, 4
    target = torch.randn(out_f, in_f, generator=gen)
    weight = torch.zeros(out_f, in_f)
    x = torch.randn(members * rows, in_f, generator=gen)
    row_member = torch.arange(members).repeat_interleave(rows)
    sigma, lr = 0.05, 0.2
    print("ES on a linear regression toward a random target (population 8, lowrank rank 4):")
    start = time.perf_counter()
    for step in range(60):
        spec = NoiseSpec(seed=1234, step=step, antithetic=True)
        y = perturbed_linear(x, weight, None, row_member, spec, sigma, 1.0, "lowrank", 4, "demo.weight")
        err = ((y - x @ target.T) ** 2).reshape(members, rows, out_f).mean(dim=(1, 2))
        fitness = -err
        z = (fitness - fitness.mean()) / (fitness.std() + 1e-12)
        es_update(weight, spec, z / (members * sigma), lr * sigma, 1.0, "lowrank", 4, "demo.weight")
        if step % 10 == 0 or step == 59:
            loss = ((x @ weight.T - x @ target.T) ** 2).mean().item()
            print(f"  step {step:3d}  loss {loss:8.4f}")
    print(f"done in {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()
