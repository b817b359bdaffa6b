"""Shared test setup: Triton runs under its interpreter when no GPU is present; `gpu` tests skip."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test tensors are tiny: one intra-op thread is faster and immune to oversubscription (tests that check
# thread-count independence pass their thread counts explicitly). OMP_NUM_THREADS=1 keeps `fastes train`
# in this process and in the subprocesses tests start at one thread too (runtime.cpu_threads_for would
# otherwise take one per idle core), so in-process and torchrun runs stay bit-comparable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a whole module, restored after it; opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")`` (tiny tensors on a loaded 2-core box: more
    threads only add wake-up latency)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng() -> torch.Generator:
    """A freshly seeded generator per test, so inputs are random but failures reproducible."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"test input seed: {seed}")
    return torch.Generator().manual_seed(seed)
