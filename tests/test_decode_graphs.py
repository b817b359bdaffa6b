"""Decode steps through the static, padded CUDA-graph buffers (fastes.engine.cuda_graphs).

On CPU the buffers run eagerly (``capture=False``): every padding and bookkeeping rule the GPU
captures is checked here against the engine's ordinary eager decode, which the generation tests
check against transformers. The capture itself is tested in test_engine_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
from tiny_model import random_hf_model

from fastes import Engine, Population, SamplingParams
from fastes.engine.cuda_graphs import DecodeGraphs, GraphCaptureError, graph_batch_sizes
from fastes.models import Perturbation

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-5, bos_token_id=None,
              eos_token_id=None, tie_word_embeddings=False)
PROMPTS = [[5, 17, 20, 3, 9], [42], [7, 7, 13, 44, 2, 25, 11, 9, 31], [10, 1, 33]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("graphs") / "qwen2"
    random_hf_model(transformers.Qwen2Config(**CONFIG), 3, path)
    return path


def _engine(path, max_batch: int | None = None, **kwargs: object) -> Engine:
    engine = Engine.from_pretrained(path, kv_cache_tokens=1024, block_size=4, **kwargs)
    if max_batch is not None:
        engine.decode_graphs = DecodeGraphs(engine.model, engine.kv_cache, max_batch, capture=False)
    return engine


def _tokens(outs: list) -> list:
    return [[[c.token_ids for c in per_prompt] for per_prompt in member] for member in outs]


def test_batch_sizes_cover_every_batch_with_little_padding():
    sizes = graph_batch_sizes(300)
    assert sizes[:8] == list(range(1, 9)) and sizes[-1] == 300
    assert sizes == sorted(set(sizes))
    for n in range(9, 301):
        bucket = min(s for s in sizes if s >= n)
        assert bucket <= 1.25 * n, (n, bucket)
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(12) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12]
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


POPULATIONS = [
    None,
    dict(mode="lowrank", rank=2, perturb_1d=True),
    dict(mode="full", noise="rademacher"),
    dict(mode="lowrank", perturb_embeddings=True, perturb_lm_head=True, antithetic=False),
]


@pytest.mark.parametrize("pop_kwargs", POPULATIONS, ids=["unperturbed", "lowrank-1d", "full-rad", "lowrank-embed"])
def test_padded_static_decode_equals_eager(model_dir, pop_kwargs):
    pop = Population(**{"size": 4, "sigma": 3e-2, "seed": 7, **pop_kwargs}) if pop_kwargs else None
    greedy = SamplingParams(max_tokens=9, temperature=0.0)
    prompts = PROMPTS[:3]
    want = _tokens(_engine(model_dir).generate(prompts, greedy, population=pop, step=3))
    # 3 samples: 9 / 36 sequences run in buckets 10 / 40, so padded rows sit beside real ones;
    # max_batch 6 sends the population's 12 sequences down the eager path
    for max_batch, samples in ((6, 1), (64, 3)):
        engine = _engine(model_dir, max_batch)
        outs = engine.generate(prompts, greedy, population=pop, step=3, samples_per_prompt=samples)
        assert _tokens(outs) == [[[s[0]] * samples for s in member] for member in want], (max_batch, samples)
        num_seqs = len(want) * len(prompts) * samples
        assert (engine.last_stats["graph_steps"] > 0) == (num_seqs <= max_batch)


def test_sampling_and_early_stops_shrink_the_batch(model_dir):
    """EOS at different steps shrinks the decode batch through several buckets; sampled tokens stay the same."""
    pop = Population(size=2, sigma=3e-2, seed=1)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5, stop_token_ids=[3, 9, 20])
    want = _tokens(_engine(model_dir).generate(PROMPTS, params, population=pop, samples_per_prompt=3))
    engine = _engine(model_dir, 32)
    got = _tokens(engine.generate(PROMPTS, params, population=pop, samples_per_prompt=3))
    assert got == want
    lengths = {len(s) for member in got for prompt in member for s in prompt}
    assert len(lengths) > 2, "the stop tokens should end samples at different lengths"
    graphs = engine.decode_graphs
    assert len(graphs._graphs) >= 2, "a shrinking batch should use several graph sizes"
    assert graphs.num_padded_rows > 0, "a shrinking batch should run padded"


def test_graphs_belong_to_one_perturbation_and_to_the_parameters(model_dir):
    engine = _engine(model_dir, 8)
    graphs = engine.decode_graphs
    greedy = SamplingParams(max_tokens=3, temperature=0.0)
    pop = Population(size=2, sigma=3e-2, seed=1)
    engine.generate(PROMPTS[:2], greedy)
    unperturbed = set(graphs._graphs)
    assert unperturbed and all(key[0] is None for key in unperturbed)
    engine.generate(PROMPTS[:2], greedy, population=pop, step=0)
    step0 = set(graphs._graphs) - unperturbed
    assert step0
    engine.generate(PROMPTS[:2], greedy, population=pop, step=1)  # a new step: step 0's graphs go, unperturbed stay
    assert unperturbed <= set(graphs._graphs) and not step0 & set(graphs._graphs)
    engine.update(pop, 1, torch.tensor([1.0, -1.0]), lr=1e-2)  # in place: nothing to drop
    engine.generate(PROMPTS[:2], greedy)
    assert unperturbed <= set(graphs._graphs)
    name = "model.layers.0.mlp.up_proj.weight"
    engine.model.params[name] = engine.model.params[name].clone()  # a replaced tensor: every graph goes
    graphs.begin(None)
    assert not graphs._graphs


def test_cuda_graphs_need_cuda(model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA device"):
        _engine(model_dir, cuda_graphs=True)
    with pytest.raises(ValueError, match="max_graph_batch"):
        _engine(model_dir, max_graph_batch=0)
    assert _engine(model_dir).decode_graphs is None


def test_a_failed_capture_warns_and_decodes_eagerly(model_dir):
    """A capture that fails (after its warm-up wrote the step's K/V) must not lose or change any token."""

    class Failing(DecodeGraphs):
        def _capture(self, size):
            self._forward(size)  # the warm-up
            raise GraphCaptureError("capture failed")

    pop = Population(size=2, sigma=3e-2, seed=1)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    want = _tokens(_engine(model_dir).generate(PROMPTS, greedy, population=pop))
    engine = _engine(model_dir)
    engine.decode_graphs = Failing(engine.model, engine.kv_cache, 64, capture=False)
    with pytest.warns(RuntimeWarning, match="capture failed; decoding without CUDA graphs"):
        got = _tokens(engine.generate(PROMPTS, greedy, population=pop))
    assert got == want
    assert engine.decode_graphs is None


def test_triton_engine_with_padded_buffers_equals_cpu_engine(model_dir):
    """The whole Triton path of the engine (embedding, perturbed linears, KV write, prefill and split-KV decode
    attention) run by the interpreter, with decode steps through the padded static buffers the GPU captures:
    padded rows have seq_len 0, slot -1 and member -1. Greedy tokens must equal the CPU engine's."""
    if torch.cuda.is_available():
        pytest.skip("runs the Triton interpreter on CPU tensors; test_engine_gpu.py covers CUDA")
    pop = Population(size=3, sigma=3e-2, seed=5, mode="lowrank", rank=2, perturb_1d=True, antithetic=False)
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    prompts = PROMPTS[:3]
    want = _tokens(_engine(model_dir).generate(prompts, greedy, population=pop))
    engine = _engine(model_dir, 16, backend="triton")  # 9 sequences decode in bucket 10: one padded row
    assert _tokens(engine.generate(prompts, greedy, population=pop)) == want
    assert engine.last_stats["graph_steps"] == greedy.max_tokens - 1
    want = _tokens(_engine(model_dir).generate(PROMPTS * 2 + [PROMPTS[0]], greedy))
    engine = _engine(model_dir, 16, backend="triton")  # unperturbed: 9 sequences, bucket 10
    assert _tokens(engine.generate(PROMPTS * 2 + [PROMPTS[0]], greedy)) == want


def test_a_shrinking_batch_reuses_a_bigger_graph_up_to_twice_its_size(model_dir):
    engine = _engine(model_dir, 64)
    graphs = engine.decode_graphs
    graphs.begin(None)
    assert graphs.size_for(20) == 20
    graphs._graphs[(None, 20)] = object()  # as if captured
    assert [graphs.size_for(n) for n in (19, 12, 10, 9, 21)] == [20, 20, 20, 10, 24]
    graphs.begin(Perturbation(Population(size=2, seed=0)))  # another perturbation: its own graphs only
    assert graphs.size_for(12) == 12


def test_load_packs_one_staging_buffer_with_padded_rows(model_dir):
    """DecodeGraphs.load: the S real rows' inputs, then padded rows (token 0, position 0, member -1, slot -1,
    seq_len 0) up to the graph size; the block tables of the real rows up to the step's width."""
    import numpy as np

    engine = _engine(model_dir, 16)
    graphs = engine.decode_graphs
    graphs.begin(None)
    tables = np.array([[3, 4, 9], [5, 0, 0], [7, 8, 0]], dtype=np.int32)
    size = graphs.load(np.array([11, 12, 13]), np.array([9, 2, 6]), np.array([0, 1, 1]), np.array([37, 22, 34]),
                       np.array([10, 3, 7]), tables)
    assert size == 3
    assert graphs.load(np.arange(9), np.arange(9), np.zeros(9, dtype=np.int64), np.arange(9), np.ones(9, np.int64),
                       np.zeros((9, 1), dtype=np.int32)) == 10
    assert graphs.input_ids[:10].tolist() == list(range(9)) + [0]
    assert graphs.row_member[:10].tolist() == [0] * 9 + [-1]
    assert graphs.slot_mapping[:10].tolist() == list(range(9)) + [-1]
    assert graphs.seq_lens[:10].tolist() == [1] * 9 + [0]
    size = graphs.load(np.array([11, 12, 13]), np.array([9, 2, 6]), np.array([0, 1, 1]), np.array([37, 22, 34]),
                       np.array([10, 3, 7]), tables)
    assert graphs.input_ids[:3].tolist() == [11, 12, 13] and graphs.positions[:3].tolist() == [9, 2, 6]
    assert graphs.slot_mapping[:3].tolist() == [37, 22, 34] and graphs.seq_lens[:3].tolist() == [10, 3, 7]
    assert graphs.block_tables[:3, :3].tolist() == tables.tolist()
    assert graphs.input_ids.dtype == torch.long and graphs.block_tables.dtype == torch.int32
