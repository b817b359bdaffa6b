"""The engine on CUDA: Triton kernels end to end, and decode steps replayed from CUDA graphs.

Greedy tokens of the CUDA engine (graphs on) must equal those of the same engine run eagerly and
those of the CPU engine, which test_generate.py checks against transformers; fp32 throughout so
that the comparison is exact. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from tiny_model import random_hf_model

from fastes import Engine, Population, SamplingParams

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu

CONFIG = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=None,
              eos_token_id=None, tie_word_embeddings=False)
PROMPTS = [[5, 17, 20, 3, 9], [42], [7, 7, 13, 44, 2, 25, 11, 9, 31], [10, 1, 33], [60, 61]]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
POPULATIONS = [
    None,
    dict(mode="lowrank", rank=2, perturb_1d=True),
    dict(mode="full", noise="gaussian"),
    dict(mode="full", noise="rademacher", perturb_embeddings=True, perturb_lm_head=True),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("gpu") / "qwen2"
    random_hf_model(transformers.Qwen2Config(**CONFIG), 3, path)
    return path


def _engine(path, device: str, **kwargs: object) -> Engine:
    return Engine.from_pretrained(path, device=device, kv_cache_tokens=4096, block_size=16, **kwargs)


def _tokens(outs: list) -> list:
    return [[[c.token_ids for c in per_prompt] for per_prompt in member] for member in outs]


@pytest.mark.parametrize("pop_kwargs", POPULATIONS, ids=["unperturbed", "lowrank-1d", "full-gauss", "full-rad-embed"])
def test_cuda_graph_decode_equals_eager_and_cpu(model_dir, pop_kwargs):
    pop = Population(**{"size": 6, "sigma": 2e-2, "seed": 7, **pop_kwargs}) if pop_kwargs else None
    cpu = _tokens(_engine(model_dir, "cpu").generate(PROMPTS, GREEDY, population=pop, step=2))
    eager = _tokens(_engine(model_dir, "cuda", cuda_graphs=False).generate(PROMPTS, GREEDY, population=pop, step=2))
    engine = _engine(model_dir, "cuda")
    assert engine.decode_graphs is not None, "CUDA graphs should be on by default on CUDA"
    graphed = _tokens(engine.generate(PROMPTS, GREEDY, population=pop, step=2))
    assert engine.last_stats["graph_steps"] >= GREEDY.max_tokens - 1
    assert engine.decode_graphs.num_captures >= 1
    assert eager == cpu
    assert graphed == eager


def test_graphs_recaptured_for_each_es_step(model_dir):
    """Noise keys are baked into a capture: step 1 must not replay step 0's graphs."""
    pop = Population(size=4, sigma=3e-2, seed=1)
    eager = _engine(model_dir, "cuda", cuda_graphs=False)
    engine = _engine(model_dir, "cuda")
    for step in range(3):
        want = _tokens(eager.generate(PROMPTS, GREEDY, population=pop, step=step))
        assert _tokens(engine.generate(PROMPTS, GREEDY, population=pop, step=step)) == want, step
        coeffs = torch.tensor([1.0, -1.0, 0.5, -0.5])
        eager.update(pop, step, coeffs, lr=1e-2)
        engine.update(pop, step, coeffs, lr=1e-2)


def test_sampled_and_stopped_sequences_match_eager(model_dir):
    """Temperature sampling with stop tokens: the batch shrinks through several graph sizes."""
    pop = Population(size=4, sigma=3e-2, seed=2)
    params = SamplingParams(max_tokens=32, temperature=1.0, seed=9, stop_token_ids=[3, 9, 20, 42])
    want = _tokens(_engine(model_dir, "cuda", cuda_graphs=False).generate(PROMPTS, params, population=pop,
                                                                          samples_per_prompt=4))
    engine = _engine(model_dir, "cuda")
    assert _tokens(engine.generate(PROMPTS, params, population=pop, samples_per_prompt=4)) == want
    assert engine.decode_graphs.num_captures >= 2 and engine.decode_graphs.num_padded_rows > 0


def test_bf16_graph_decode_runs_and_mostly_agrees(model_dir):
    """bf16: graphs and eager may pick different GEMM tiles (padding changes T), so near-ties can flip;
    the first tokens, decided before any divergence can compound, must agree."""
    pop = Population(size=4, sigma=1e-2, seed=3)
    eager = _tokens(_engine(model_dir, "cuda", dtype=torch.bfloat16, cuda_graphs=False).generate(
        PROMPTS, GREEDY, population=pop))
    engine = _engine(model_dir, "cuda", dtype=torch.bfloat16)
    graphed = _tokens(engine.generate(PROMPTS, GREEDY, population=pop))
    firsts = [(g[0][:2], e[0][:2]) for gm, em in zip(graphed, eager, strict=True) for g, e in zip(gm, em, strict=True)]
    assert sum(g == e for g, e in firsts) >= 0.9 * len(firsts)
    assert engine.last_stats["graph_steps"] > 0
