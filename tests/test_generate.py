"""Engine.generate against transformers (the oracle), and the engine's own invariances.

Tiny random Llama / Qwen2 / Qwen3 models and a char-level tokenizer (one character per
token, so text positions are token positions) are built here and saved to a temporary
directory; nothing is downloaded. Perturbed members are checked against a transformers
model whose weights were set to W + σ·s·E_m with ``engine.perturbation``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_model import char_tokenizer, random_hf_model

from fastes import Engine, Population, SamplingParams
from fastes.models.lora import merged_weight

transformers = pytest.importorskip("transformers")

VOCAB = 256
CHARS = [chr(0x100 + i) for i in range(VOCAB)]  # Latin Extended letters: one printable char per token
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=None,
              eos_token_id=None, tie_word_embeddings=False)
FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
PROMPTS = [[5, 17, 200, 3, 9], [42], [7, 7, 130, 64, 2, 250, 11, 90, 31], [100, 1, 33]]
BLOCK = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def _build(cls_name: str, path: Path, seed: int, tokenizer: bool = True, **overrides: object) -> torch.nn.Module:
    hf = random_hf_model(getattr(transformers, cls_name)(**{**COMMON, **overrides}), seed, path)
    if tokenizer:
        char_tokenizer(CHARS, CHARS[0]).save_pretrained(str(path))
    return hf


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("gen")
    # no tokenizer for qwen2: transformers 5 maps model_type qwen2 to Qwen2Tokenizer, whose byte-level
    # decoder would replace the char-level one of tokenizer.json
    out = {f: (root / f, _build(cls, root / f, i, tokenizer=f != "qwen2"))
           for i, (f, cls) in enumerate(FAMILIES.items())}
    out["tiny_vocab"] = (root / "tiny", _build("LlamaConfig", root / "tiny", 9, tokenizer=False, vocab_size=12))
    return out


def _engine(path: Path, **kwargs: object) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 2048)
    return Engine.from_pretrained(path, block_size=BLOCK, **kwargs)


def _hf_greedy(hf: torch.nn.Module, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _ids(outs: list, member: int = 0) -> list[list[list[int]]]:
    return [[c.token_ids for c in per_prompt] for per_prompt in outs[member]]


GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


# --------------------------------------------------------------------------- unperturbed greedy


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(models, family):
    path, hf = models[family]
    outs = _engine(path).generate(PROMPTS, GREEDY)
    assert len(outs) == 1 and [len(p) for p in outs[0]] == [1] * len(PROMPTS)
    for prompt, (done,) in zip(PROMPTS, outs[0], strict=True):
        assert done.token_ids == _hf_greedy(hf, prompt, 10)
        assert done.finish_reason == "length"
        assert done.text == ("".join(CHARS[t] for t in done.token_ids) if family != "qwen2" else "")


def test_eos_from_generation_config(models, tmp_path):
    """EOS listed only in generation_config.json (no tokenizer) stops generation as in HF, EOS included."""
    path, hf = models["qwen2"]
    full = [_hf_greedy(hf, p, 10) for p in PROMPTS]
    eos = full[0][3]  # a token the model emits: prompt 0 stops at its 4th token or earlier
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    engine = _engine(tmp_path)
    assert engine.tokenizer is None and eos in engine.eos_token_ids
    stopped = 0
    for prompt, (done,) in zip(PROMPTS, engine.generate(PROMPTS, GREEDY)[0], strict=True):
        want = _hf_greedy(hf, prompt, 10, eos=eos)
        assert done.token_ids == want
        assert done.finish_reason == ("stop" if eos in want else "length")
        stopped += eos in want
    assert stopped >= 1
    ignored = engine.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert _ids(ignored) == [[f] for f in full]
    by_id = _engine(path).generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[eos]))
    assert _ids(by_id) == [[_hf_greedy(hf, p, 10, eos=eos)] for p in PROMPTS]
    (edge,) = engine.generate([list(range(125))], GREEDY)[0][0]  # the context (128) ends generation
    assert (len(edge.token_ids), edge.finish_reason) == (3, "length")


def test_stop_strings(models):
    path, _ = models["llama"]
    engine = _engine(path)
    (full,) = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0.0))[0][0]
    text = full.text
    assert len(text) == 12
    stop = text[5:7]
    pos = text.find(stop)
    params = dict(max_tokens=12, temperature=0.0)
    (cut,) = engine.generate([PROMPTS[2]], SamplingParams(stop=[stop, "never"], **params))[0][0]
    assert (cut.text, cut.finish_reason) == (text[:pos], "stop")
    assert cut.token_ids == full.token_ids[: pos + 2]  # the token completing the stop string is kept
    (kept,) = engine.generate([PROMPTS[2]], SamplingParams(stop=stop, include_stop_str_in_output=True,
                                                           **params))[0][0]
    assert kept.text == text[: pos + 2] and kept.finish_reason == "stop"
    (none,) = engine.generate([PROMPTS[2]], SamplingParams(stop="never", **params))[0][0]
    assert (none.text, none.finish_reason) == (text, "length")
    # a text prompt goes through the tokenizer: the same as its ids
    (as_text,) = engine.generate(["".join(CHARS[t] for t in PROMPTS[2])], SamplingParams(**params))[0][0]
    assert as_text.token_ids == full.token_ids


# --------------------------------------------------------------------------- perturbed members


def _member_weights(engine: Engine, pop: Population, member: int, step: int) -> dict[str, torch.Tensor]:
    """HF-layout weights of member m: every parameter plus engine.perturbation, LoRA adapters merged."""
    model = engine.model
    params = {n: t.float() + engine.perturbation(n, member, pop, step) for n, t in model.params.items()}
    out = {n: params[n] for n in model.config.param_shapes()}
    for base, (name_a, name_b) in model.lora.items():
        out[base] = merged_weight(out[base], params[name_a], params[name_b], model.lora_scaling)
    return out


def _twin(hf: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    twin = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(weights[name])
    return twin


PERTURBED = [
    ("llama", dict(mode="lowrank", rank=1)),
    ("qwen3", dict(mode="lowrank", rank=2, perturb_1d=True)),
    ("qwen2", dict(mode="full", noise="gaussian", layerwise_scale=True)),
    ("llama", dict(mode="full", noise="rademacher", sigma=1e-2)),
    ("qwen3", dict(mode="lora", rank=2, sigma=5e-2)),
]


@pytest.mark.parametrize("family,kwargs", PERTURBED, ids=["lowrank-r1", "lowrank-r2", "full-gauss", "full-rad",
                                                          "lora"])
def test_perturbed_members_match_transformers(models, family, kwargs):
    path, hf = models[family]
    engine = _engine(path)
    if kwargs["mode"] == "lora":
        engine.model.add_lora(rank=2, targets=("q_proj", "v_proj", "down_proj"), alpha=4.0, seed=1)
        g = torch.Generator().manual_seed(0)
        for _, name_b in engine.model.lora.values():  # B = 0 at init; make the adapters matter
            engine.model.params[name_b].copy_(0.2 * torch.randn(engine.model.params[name_b].shape, generator=g))
    pop = Population(**{"size": 4, "sigma": 3e-2, "seed": 11, **kwargs})
    step, prompts = 2, PROMPTS[:3]
    outs = engine.generate(prompts, GREEDY, population=pop, step=step)
    assert len(outs) == pop.size
    base = _twin(hf, engine.model.hf_state_dict())
    unperturbed = [_hf_greedy(base, p, 10) for p in prompts]
    assert _ids(engine.generate(prompts, GREEDY)) == [[u] for u in unperturbed]
    for m in (0, 1, 3):
        twin = _twin(hf, _member_weights(engine, pop, m, step))
        assert _ids(outs, m) == [[_hf_greedy(twin, p, 10)] for p in prompts], f"member {m}"
    distinct = {str(_ids(outs, m)) for m in range(pop.size)} | {str([[u] for u in unperturbed])}
    assert len(distinct) >= 3, "sigma too small: members do not differ"


# --------------------------------------------------------------------------- invariances


def test_sampling_invariant_to_kv_budget_chunks_and_prompt_order(models):
    path, _ = models["qwen2"]
    pop = Population(size=2, sigma=3e-2, mode="lowrank", seed=4)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=1234)
    prompts = PROMPTS[:3]

    def run(order: list[int], **kwargs: object) -> tuple[list, Engine]:
        engine = _engine(path, **kwargs)
        outs = engine.generate([prompts[i] for i in order], params, population=pop, samples_per_prompt=3)
        back = [[[c.token_ids for c in outs[m][order.index(p)]] for p in range(len(prompts))] for m in range(2)]
        return back, engine

    want, _ = run([0, 1, 2])
    for per_prompt in want[0]:
        assert len({tuple(s) for s in per_prompt}) > 1, "samples of one prompt should differ"
    small, engine = run([0, 1, 2], kv_cache_tokens=24)  # 6 blocks: one sequence fits, the population does not
    assert engine.last_stats["preemptions"] > 0
    assert small == want
    chunked, engine = run([2, 0, 1], max_num_batched_tokens=3, max_num_seqs=2)
    assert chunked == want
    both, engine = run([1, 2, 0], kv_cache_tokens=24, max_num_batched_tokens=3)
    assert engine.last_stats["preemptions"] > 0 and both == want


def test_sampling_seed_reproducible_and_progress_bar(models):
    path, _ = models["llama"]
    engine = _engine(path)

    def run(seed: int, progress: bool = False) -> list:
        params = SamplingParams(max_tokens=6, temperature=0.9, seed=seed)
        return _ids(engine.generate(PROMPTS[:2], params, samples_per_prompt=2, progress=progress))

    first = run(5)
    assert run(5, progress=True) == first
    assert run(6) != first


def test_member_prompts_generate_each_members_own_batch(models):
    """A member given its own prompt indices samples what it samples when it generates every prompt."""
    path, _ = models["qwen3"]
    engine = _engine(path)
    pop = Population(size=4, sigma=3e-2, seed=2)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=8)
    every = engine.generate(PROMPTS, params, population=pop, samples_per_prompt=2)
    every_tokens = engine.last_stats["tokens"]
    chosen = [[0, 1], [0, 1], [3, 2], [2]]
    own = engine.generate(PROMPTS, params, population=pop, samples_per_prompt=2, member_prompts=chosen)
    assert [len(per_member) for per_member in own] == [2, 2, 2, 1]
    for m, indices in enumerate(chosen):
        assert _ids(own, m) == [_ids(every, m)[p] for p in indices]
    assert engine.last_stats["tokens"] < 0.6 * every_tokens  # 7 of the 16 (member, prompt) pairs ran
    share = engine.generate(PROMPTS, params, population=pop, samples_per_prompt=2, members=[3, 1],
                            member_prompts=[[2], [0, 1]])
    assert _ids(share, 0) == [_ids(every, 3)[2]] and _ids(share, 1) == _ids(every, 1)[:2]
    for bad in ([[0]] * 3, [[0], [1], [], [2]], [[0], [1], [9], [2]], "0123", [[0], [1], [0.5], [2]]):
        with pytest.raises(ValueError, match="member_prompts"):
            engine.generate(PROMPTS, params, population=pop, member_prompts=bad)


def _next_token_probs(hf: torch.nn.Module, prompt: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].double()
    return torch.softmax(logits / temperature, dim=-1)


def _chi_square_ok(counts: torch.Tensor, probs: torch.Tensor, alpha_z: float = 3.09) -> tuple[bool, float]:
    """Pearson chi-square at significance 1e-3 (Wilson-Hilferty quantile); bins with expectation < 5 merged."""
    n = int(counts.sum())
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    critical = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat < critical, stat


def test_sampling_matches_softmax_distribution(models):
    path, hf = models["tiny_vocab"]
    engine = _engine(path)
    prompt, temperature, n = [3, 1, 4, 1, 5], 0.8, 3000
    probs = _next_token_probs(hf, prompt, temperature)
    assert probs.max() < 0.6, "the test model should have a spread-out next-token distribution"

    def draw(**kwargs: object) -> torch.Tensor:
        params = SamplingParams(max_tokens=1, temperature=temperature, seed=77, **kwargs)
        outs = engine.generate([prompt], params, samples_per_prompt=n)
        tokens = torch.tensor([c.token_ids[0] for c in outs[0][0]])
        return torch.bincount(tokens, minlength=probs.numel())

    ok, stat = _chi_square_ok(draw(), probs)
    assert ok, f"chi-square {stat:.1f}: frequencies do not match the softmax"
    order = probs.argsort(descending=True)
    counts = draw(top_k=3)
    assert set(counts.nonzero().flatten().tolist()) <= set(order[:3].tolist())
    assert _chi_square_ok(counts, torch.zeros_like(probs).index_copy(0, order[:3], probs[order[:3]]) /
                          probs[order[:3]].sum())[0]
    top_p = 0.5
    support = order[: int((probs[order].cumsum(0) - probs[order] < top_p).sum())]
    counts = draw(top_p=top_p)
    assert set(counts.nonzero().flatten().tolist()) <= set(support.tolist()) and len(support) >= 2


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1.0), dict(temperature=float("nan")),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(min_p=2.0),
                                    dict(stop=[""]), dict(seed=-1), dict(top_p="x"), dict(stop_token_ids=[-3]),
                                    dict(temperature=True)])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_bad_input(models, tmp_path):
    path, _ = models["llama"]
    engine = _engine(path)
    for prompts in ([], [[]], [[1, VOCAB]], [[-1, 2]], [[1] * 128], "abc", [[1.5]]):
        with pytest.raises(ValueError):
            engine.generate(prompts, GREEDY)
    with pytest.raises(ValueError):
        engine.generate([[1]], GREEDY, samples_per_prompt=0)
    pop = Population(size=4, sigma=1e-2)
    for coeffs in ([1.0, 2.0], torch.zeros(5), [float("nan")] * 4):
        with pytest.raises(ValueError):
            engine.update(pop, 0, coeffs, lr=1.0)
    with pytest.raises(ValueError):
        engine.update(pop, 0, torch.zeros(4), lr=float("inf"))
    for kwargs in (dict(backend="gpu"), dict(max_graph_batch=0), dict(max_graph_batch=True)):
        with pytest.raises(ValueError, match="backend|max_graph_batch"):
            _engine(path, **kwargs)
    no_tok = _engine(models["tiny_vocab"][0])
    with pytest.raises(ValueError, match="tokenizer"):
        no_tok.generate([[1, 2]], SamplingParams(stop=["a"]))


@pytest.mark.parametrize("chunk", [None, 3])
def test_kv_pool_too_small_is_an_error_not_a_hang(models, chunk):
    path, _ = models["llama"]
    engine = _engine(path, kv_cache_tokens=8, max_num_batched_tokens=chunk)  # 2 blocks of 4
    with pytest.raises((ValueError, RuntimeError), match="KV cache too small"):
        engine.generate([list(range(1, 13))], GREEDY)  # the prompt alone needs 3 blocks
    with pytest.raises((ValueError, RuntimeError), match="KV cache too small"):
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    (ok,) = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=6, temperature=0.0))[0][0]
    assert len(ok.token_ids) == 6  # 3 + 5 tokens of KV fit in 8 slots; the engine is still usable


# --------------------------------------------------------------------------- update


@pytest.mark.parametrize("mode,noise", [("lowrank", "gaussian"), ("full", "rademacher")])
def test_update_moves_the_model_onto_a_member(models, tmp_path, mode, noise):
    """coeffs = (σ/lr)·e_m makes W + lr·s·Σ c·E = W + σ·s·E_m: the model becomes member m."""
    path, _ = models["qwen3"]
    engine = _engine(path)
    pop = Population(size=4, sigma=3e-2, mode=mode, noise=noise, rank=2, seed=8)
    step, lr, member, prompts = 5, 1e-3, 1, PROMPTS[:3]
    before = engine.generate(prompts, GREEDY, population=pop, step=step)
    coeffs = torch.zeros(pop.size, dtype=torch.float64)
    coeffs[member] = pop.sigma / lr
    engine.update(pop, step, coeffs, lr)
    after = engine.generate(prompts, GREEDY)
    assert _ids(after) == _ids(before, member) != _ids(before, 0)
    saved = transformers.AutoModelForCausalLM.from_pretrained(str(engine.save_pretrained(tmp_path / "out")),
                                                              dtype=torch.float32).eval()
    assert [_hf_greedy(saved, p, 10) for p in prompts] == [ids[0] for ids in _ids(after)]
