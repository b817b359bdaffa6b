"""vLLM's extra sampling fields: n, logprobs, repetition / presence / frequency penalties, min_tokens.

Every check compares the engine with a reference computed here from transformers' logits of
the same tiny random checkpoint, with the formula written out token by token:

* repetition penalty r (tokens of prompt + output so far): l / r if l > 0 else l · r;
* frequency f and presence p (output tokens only): l − f·count(t) − p·[count(t) > 0];
* min_tokens m: stop ids get −inf while fewer than m tokens were generated; a stop string
  counts only when it completes at an output length > m (the text is cut there);
* logprobs k: log_softmax of the raw logits (before penalties and temperature), the sampled
  token and the k most likely ones, rank 1 = most likely.

Sampled tokens are reproduced exactly from the engine's counter-based uniforms
(fastes.engine.sampling.row_uniforms; the counter contract, not the code under test).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_model import char_tokenizer, random_hf_model

from fastes import Engine, SamplingParams, cli
from fastes.engine.sampling import prompt_keys, row_uniforms

transformers = pytest.importorskip("transformers")

VOCAB = 24
CHARS = [chr(0x100 + i) for i in range(VOCAB)]  # one printable char per token: text index = token index
PROMPTS = [[1, 2, 3, 2, 1], [7, 7, 20], [5, 11, 16, 4]]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("sampling_params")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    hf = random_hf_model(config, 3, path)
    char_tokenizer(CHARS, CHARS[0]).save_pretrained(str(path))
    return path, hf


def _engine(path: Path, **kwargs: object) -> Engine:
    kwargs.setdefault("kv_cache_tokens", 1024)
    return Engine.from_pretrained(path, block_size=4, **kwargs)


def _raw_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0, -1].float()


def _penalized(logits: torch.Tensor, prompt: list[int], output: list[int], rep: float, pres: float,
               freq: float) -> torch.Tensor:
    """vLLM's penalties written out one token at a time."""
    out = logits.clone()
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] = out[t] - freq * output.count(t) - pres
    return out


def _reference(hf: torch.nn.Module, prompt: list[int], max_tokens: int, rep: float = 1.0, pres: float = 0.0,
               freq: float = 0.0, temperature: float = 0.0, seed: int = 0, sample: int = 0,
               stop_ids: tuple[int, ...] = (), min_tokens: int = 0) -> list[int]:
    """Greedy or counter-sampled tokens from transformers' logits with the penalties and min_tokens mask."""
    key = prompt_keys([prompt])[0]
    output: list[int] = []
    while len(output) < max_tokens:
        logits = _penalized(_raw_logits(hf, prompt + output), prompt, output, rep, pres, freq)
        if len(output) < min_tokens:
            for t in stop_ids:
                logits[t] = -math.inf
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            cdf = probs.cumsum(0)
            coords = [torch.tensor([v]) for v in (len(prompt) + len(output), -1, key, sample)]
            u = float(row_uniforms(seed, *coords)[0])
            token = min(int((cdf <= u * cdf[-1]).sum()), VOCAB - 1)  # first token whose CDF exceeds u
        output.append(token)
        if token in stop_ids:
            break
    return output


# --------------------------------------------------------------------------- bad values and n


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=-1), dict(n=2.0), dict(logprobs=-1), dict(logprobs=1.5),
                                    dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
                                    dict(repetition_penalty=math.inf), dict(presence_penalty=2.5),
                                    dict(frequency_penalty=math.nan), dict(frequency_penalty=True),
                                    dict(min_tokens=-1), dict(min_tokens=17), dict(min_tokens=2.0)])
def test_bad_values_are_one_line_errors(kwargs):
    with pytest.raises(ValueError) as err:
        SamplingParams(max_tokens=16, **kwargs)
    assert "\n" not in str(err.value) and next(iter(kwargs)) in str(err.value)


def test_n_is_samples_per_prompt(tiny):
    path, _ = tiny
    engine = _engine(path)
    params = dict(max_tokens=6, temperature=1.0, seed=5)
    by_n = engine.generate(PROMPTS, SamplingParams(n=3, **params))
    by_arg = engine.generate(PROMPTS, SamplingParams(**params), samples_per_prompt=3)
    assert [[c.token_ids for c in p] for p in by_n[0]] == [[c.token_ids for c in p] for p in by_arg[0]]
    assert all(len(p) == 3 for p in by_n[0])
    assert len({tuple(c.token_ids) for c in by_n[0][0]}) > 1  # three different samples, not one repeated
    assert len(engine.generate(PROMPTS, SamplingParams(n=2, **params), samples_per_prompt=2)[0][0]) == 2
    with pytest.raises(ValueError, match="samples_per_prompt=4 contradicts sampling.n=2"):
        engine.generate(PROMPTS, SamplingParams(n=2, **params), samples_per_prompt=4)


# --------------------------------------------------------------------------- penalties


PENALTIES = [dict(rep=1.8), dict(rep=0.6), dict(pres=1.5), dict(freq=0.9), dict(rep=1.3, pres=-0.5, freq=0.4)]


@pytest.mark.parametrize("pen", PENALTIES, ids=["rep", "rep<1", "presence", "frequency", "all"])
def test_penalties_greedy_match_reference(tiny, pen):
    path, hf = tiny
    engine = _engine(path, max_num_batched_tokens=6)  # prompts chunked, rows batched together
    params = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=pen.get("rep", 1.0),
                            presence_penalty=pen.get("pres", 0.0), frequency_penalty=pen.get("freq", 0.0))
    outs = engine.generate(PROMPTS, params)
    plain = engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0))
    changed = False
    for p, prompt in enumerate(PROMPTS):
        assert outs[0][p][0].token_ids == _reference(hf, prompt, 12, **pen), f"prompt {p}"
        changed |= outs[0][p][0].token_ids != plain[0][p][0].token_ids
    assert changed, "the penalty should change some greedy output, or the test checks nothing"


def test_penalties_sampled_match_reference_and_ignore_batching(tiny):
    path, hf = tiny
    pen = dict(rep=1.5, pres=0.3, freq=0.7)
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=11, n=2, repetition_penalty=1.5,
                            presence_penalty=0.3, frequency_penalty=0.7)
    together = _engine(path).generate(PROMPTS, params)
    for p, prompt in enumerate(PROMPTS):
        for s in range(2):
            expected = _reference(hf, prompt, 8, temperature=0.9, seed=11, sample=s, **pen)
            assert together[0][p][s].token_ids == expected, f"prompt {p} sample {s}"
    # a small KV pool (preemption and recompute), tiny chunks, rows reused by later sequences (two at a time)
    # and one prompt at a time change nothing
    small = _engine(path, kv_cache_tokens=24, max_num_batched_tokens=3)
    crowded = small.generate(PROMPTS, params)
    assert small.last_stats["preemptions"] > 0
    few_rows = _engine(path, max_num_seqs=2).generate(PROMPTS, params)
    alone = [[small.generate([prompt], params)[0][0] for prompt in PROMPTS]]
    for outs in (crowded, few_rows, alone):
        assert [[c.token_ids for c in p] for p in outs[0]] == [[c.token_ids for c in p] for p in together[0]]


# --------------------------------------------------------------------------- min_tokens


def test_min_tokens_masks_stop_ids_and_eos(tiny):
    path, hf = tiny
    engine = _engine(path)
    prompt = PROMPTS[0]
    first = _reference(hf, prompt, 1)[0]  # plain greedy stops right away on this id
    (early,) = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                        stop_token_ids=[first]))[0][0]
    assert (early.token_ids, early.finish_reason) == ([first], "stop")
    for m in (1, 4):
        (late,) = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[first],
                                                           min_tokens=m))[0][0]
        expected = _reference(hf, prompt, 12, stop_ids=(first,), min_tokens=m)
        assert late.token_ids == expected and len(expected) > m
        assert late.finish_reason == ("stop" if expected[-1] == first else "length")
    engine.eos_token_ids = frozenset({first})  # EOS takes the same path; ignore_eos neither stops nor masks
    (eos,) = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, min_tokens=4))[0][0]
    assert eos.token_ids == _reference(hf, prompt, 12, stop_ids=(first,), min_tokens=4)
    (ignored,) = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, min_tokens=4,
                                                          ignore_eos=True))[0][0]
    assert ignored.token_ids == _reference(hf, prompt, 12)


def test_min_tokens_defers_stop_strings(tiny):
    path, hf = tiny
    engine = _engine(path)
    prompt, n, m = PROMPTS[0], 30, 3
    tokens = _reference(hf, prompt, n)
    text = "".join(CHARS[t] for t in tokens)
    stop = text[m - 1]  # completes at output length m: not yet honoured
    assert stop in text[m:], "the test needs the m-th character generated again later"
    stops = [stop, "zzzzzz"]  # a long stop that never matches widens the searched tail back over old text
    (cut,) = engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, stop=stops))[0][0]
    assert cut.text == text[: text.index(stop)]
    # honoured only once the output is longer than m tokens: at the first occurrence at index >= m
    end = next(i for i in range(m, n) if text[i] == stop)
    (late,) = engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, stop=stops,
                                                       min_tokens=m))[0][0]
    assert (late.text, late.token_ids, late.finish_reason) == (text[:end], tokens[: end + 1], "stop")


# --------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("k", [0, 3])
def test_logprobs_are_raw_top_k_and_sampled(tiny, k):
    path, hf = tiny
    engine = _engine(path)
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=2, logprobs=k, repetition_penalty=1.7)
    for p, prompt in enumerate(PROMPTS):
        (c,) = engine.generate([prompt], params)[0][0]
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        total = 0.0
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
            logp = torch.log_softmax(_raw_logits(hf, prompt + c.token_ids[:i]), dim=-1)  # raw: no penalty
            top = logp.topk(k).indices.tolist() if k else []
            assert list(entry)[0] == token and set(entry) == {token, *top}, f"prompt {p} token {i}"
            for t, lp in entry.items():
                assert lp.logprob == pytest.approx(float(logp[t]), abs=1e-4)
                assert lp.rank == 1 + int((logp > logp[t]).sum())
            total += float(logp[token])
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-3)
    (none,) = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0.0))[0][0]
    assert none.logprobs is None and none.cumulative_logprob is None


def test_logprobs_with_sibling_samples(tiny):
    path, hf = tiny
    outs = _engine(path).generate([PROMPTS[2]], SamplingParams(max_tokens=4, temperature=1.0, seed=9, n=3,
                                                               logprobs=1))
    for c in outs[0][0]:  # siblings share the prompt's logits row, each records its own tokens
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
            logp = torch.log_softmax(_raw_logits(hf, PROMPTS[2] + c.token_ids[:i]), dim=-1)
            assert entry[token].logprob == pytest.approx(float(logp[token]), abs=1e-4)


# --------------------------------------------------------------------------- CLI and config


def test_cli_generate_exposes_the_fields(tiny, capsys):
    path, hf = tiny
    text = "".join(CHARS[t] for t in PROMPTS[0])
    base = ["generate", "--model", str(path), "--prompt", text, "--max-tokens", "8", "--device", "cpu",
            "--dtype", "float32"]
    assert cli.main(base + ["--repetition-penalty", "1.3", "--presence-penalty", "0.5", "--frequency-penalty",
                            "0.4", "--logprobs", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = _reference(hf, PROMPTS[0], 8, rep=1.3, pres=0.5, freq=0.4)
    assert out[0] == "".join(CHARS[t] for t in expected)
    lines = [line for line in out if line.startswith("  [")]
    assert len(lines) == 8 and all("| top: " in line for line in lines) and out[-1].startswith("  cumulative")
    assert cli.main(base + ["--n", "2", "--temperature", "1"]) == 0
    assert capsys.readouterr().out.count("--- prompt 0 sample") == 2
    for extra, key in ((["--repetition-penalty", "0"], "repetition_penalty"), (["--logprobs", "-1"], "logprobs"),
                       (["--min-tokens", "9"], "min_tokens"), (["--presence-penalty", "3"], "presence_penalty")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], err


def test_config_sampling_section_reaches_rollouts_and_evaluation():
    from fastes.es.config import TrainConfig
    from fastes.es.evaluation import EvalSpec, sampling_for

    policy = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=-0.2, min_tokens=3)
    config = TrainConfig.from_dict({"model": "m", "task": "countdown", "sampling": dict(max_tokens=8, **policy)})
    short = {**policy, "min_tokens": 2}
    for params, want in ((config.sampling_params(seed=1), policy), (config.sampling_params(greedy=True), policy),
                         (sampling_for(EvalSpec("e", max_tokens=2), config, 0), short)):
        assert {k: getattr(params, k) for k in policy} == want
    for bad, key in ((dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_tokens=9), "min_tokens"),
                     (dict(frequency_penalty=5.0), "frequency_penalty")):
        with pytest.raises(ValueError, match=f"sampling: {key}"):
            TrainConfig.from_dict({"model": "m", "task": "countdown", "sampling": dict(max_tokens=8, **bad)})
