"""Stop strings on incrementally decoded text (fastes.engine.stopping) against decoding the whole output.

The oracle is what the engine did before: after every token, decode the whole output and search it.
A byte-level BPE tokenizer trained here on text with multi-byte characters makes tokens that end
inside a character, and stop strings that span several tokens.
"""

from __future__ import annotations

import random

import pytest

from fastes.engine.sampling import SamplingParams
from fastes.engine.sequence import Sequence
from fastes.engine.stopping import StopChecker, finish_texts
from fastes.models import load_tokenizer

CORPUS = ["héllo wörld, ça va? ünïcødé 😀 text", "the answer is 42. STOP here", "naïve café ∑ ≤ ≥ → end"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("bpe")
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>").save_pretrained(str(path))
    return load_tokenizer(path)


def _oracle(tok, output: list[int], stops: tuple[str, ...], include: bool) -> tuple[int, str] | None:
    """(number of tokens at the stop, cut text) by decoding the whole output after every token."""
    for n in range(1, len(output) + 1):
        text = tok.decode(output[:n])
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            pos, stop = min(hits)
            return n, text[: pos + (len(stop) if include else 0)]
    return None


def _run(checker: StopChecker, prompt: list[int], output: list[int]) -> tuple[int, str | None] | None:
    seq = Sequence(seq_id=0, member=0, prompt_index=0, sample_index=0, prompt_len=len(prompt), tokens=list(prompt),
                   params=checker.params, seed=0)
    for n, token in enumerate(output, 1):
        seq.tokens.append(token)
        if checker(seq, token) == "stop":
            return n, seq.text
    return None


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_match_decoding_the_whole_output(tokenizer, include):
    rng = random.Random(0)
    texts = [" ".join(rng.sample(CORPUS[:3], 3)) for _ in range(30)]
    found = 0
    for text in texts:
        output = tokenizer.encode(text, add_special_tokens=False)
        words = text.split()
        stops = (rng.choice(words)[1:4] or "é", "STOP", "😀")
        params = SamplingParams(max_tokens=10_000, stop=stops, include_stop_str_in_output=include)
        checker = StopChecker(params, frozenset(), tokenizer, 10_000)
        want = _oracle(tokenizer, output, stops, include)
        assert _run(checker, [7, 8], output) == want
        found += want is not None
    assert found == len(texts)


def test_each_step_decodes_only_the_new_tokens(tokenizer):
    """O(new tokens) per step: no decode call reads more than a few tokens, however long the output grows."""
    output = tokenizer.encode(" ".join(CORPUS[:3]) * 4, add_special_tokens=False)
    assert len(output) > 100
    params = SamplingParams(max_tokens=10_000, stop=("never seen",))
    checker = StopChecker(params, frozenset(), tokenizer, 10_000)
    lengths: list[int] = []
    decode = tokenizer.decode

    def counting(ids, skip_special_tokens=True):
        lengths.append(len(ids))
        return decode(ids, skip_special_tokens)

    tokenizer.decode = counting
    try:
        assert _run(checker, [], output) is None
    finally:
        del tokenizer.decode
    assert len(lengths) <= 2 * len(output) and max(lengths) <= 6, max(lengths)


def test_stop_ids_length_and_final_texts(tokenizer):
    eos = tokenizer.eos_token_ids[0]
    params = SamplingParams(max_tokens=4, stop_token_ids=(5,))
    checker = StopChecker(params, frozenset({eos}), tokenizer, 12)
    seq = Sequence(seq_id=0, member=0, prompt_index=0, sample_index=0, prompt_len=2, tokens=[1, 2], params=params,
                   seed=0)
    for token, want in ((9, None), (5, "stop")):
        seq.tokens.append(token)
        assert checker(seq, token) == want
    seq.tokens = [1, 2, 9, 9, 9]
    assert checker(seq, 9) is None
    seq.tokens.append(9)
    assert checker(seq, 9) == "length"  # max_tokens
    seq.tokens = list(range(11, 23))
    assert checker(seq, 22) == "length"  # the context (12 positions)
    assert checker(seq, eos) == "stop"
    ignoring = StopChecker(SamplingParams(max_tokens=50, ignore_eos=True), frozenset({eos}), tokenizer, 100)
    assert ignoring(seq, eos) is None
    done = [Sequence(seq_id=i, member=0, prompt_index=0, sample_index=0, prompt_len=1, tokens=[3, *ids],
                     params=params, seed=0) for i, ids in enumerate(([40, 41], [50]))]
    done[1].text = "kept"
    finish_texts(done, tokenizer)
    assert done[0].text == tokenizer.decode([40, 41]) and done[1].text == "kept"
