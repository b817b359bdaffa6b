"""Tiny random checkpoints made on the fly for tests (no downloads).

``make_tiny_model``: a Llama with a char-level tokenizer and ``DigitTask`` for the ES tests;
``random_hf_model`` / ``randomize_`` / ``char_tokenizer``: the pieces, for other families and sizes.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CHARS = string.digits + string.ascii_lowercase + " +-*=?.,:"
SPECIALS = ["<eos>", "<bos>", "<unk>"]
DIGIT_TASK = f"{Path(__file__).resolve()}:DigitTask"  # the task factory below, as a config names it


def char_tokenizer(vocab: list[str], unk: str, **special: str) -> object:
    """A PreTrainedTokenizerFast with one token per character of ``vocab`` (WordLevel, ``unk`` for the rest).

    ``special`` (eos_token=..., bos_token=..., unk_token=...) is passed on to PreTrainedTokenizerFast.
    """
    import transformers
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(vocab)}, unk_token=unk))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **special)


def make_tokenizer(path: Path) -> int:
    """A char-level word-level tokenizer (≤ 64 tokens) saved as tokenizer.json + tokenizer_config.json."""
    vocab = SPECIALS + list(CHARS)
    tok = char_tokenizer(vocab, "<unk>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}={% endif %}")
    tok.save_pretrained(str(path))
    return len(vocab)


def randomize_(model: torch.nn.Module, norm: float | None = 1.0, std: float = 0.15) -> None:
    """Redraw the weights wider than HF's init, in place, from torch's global generator.

    Matrices N(0, std²), other tensors (biases) N(0, 0.1²); norm weights ``norm`` + N(0, 0.2²),
    or left as they are when ``norm`` is None.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, std if p.dim() == 2 else 0.1)
            elif norm is not None:
                p.copy_(norm + 0.2 * torch.randn_like(p))


def hf_model(config: object) -> torch.nn.Module:
    """transformers' causal LM of ``config`` (HF's init), eager attention, fp32, eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()


def random_hf_model(config: object, seed: int, path: str | Path | None = None, norm: float | None = 1.0,
                    std: float = 0.15) -> torch.nn.Module:
    """``hf_model(config)`` built after ``torch.manual_seed(seed)``, then ``randomize_``d; saved to ``path``."""
    torch.manual_seed(seed)
    model = hf_model(config)
    randomize_(model, norm, std)
    if path is not None:
        model.save_pretrained(str(path))
    return model


def make_tiny_model(path: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2,
                    tie: bool = False) -> Path:
    """A random 2-layer Llama (vocab 64) + tokenizer in ``path``; returns the path."""
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(path)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=0,
                                      tie_word_embeddings=tie, rope_theta=10000.0)
    assert vocab <= config.vocab_size
    random_hf_model(config, seed, path, norm=None, std=0.3)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 1}))
    return path


class DigitTask:
    """A learnable toy task: reward = fraction of digits in the completion (eval: "correct" when ≥ half are digits).

    Usable as ``task: "tests/tiny_model.py:DigitTask"`` in a config (a task factory).
    """

    name = "digits"
    use_chat_template = False
    system_prompt = None

    def __init__(self, num_train: int = 6) -> None:
        from fastes.es.tasks.base import Example

        words = ["12+3=", "abc", "x y", "7*8=", "hello", "zz", "q?", "m n o", "4-1", "ok."]
        self._train = [Example(w, "", {"length": len(w)}) for w in words[:num_train]]
        self._eval = [Example(w, "", {"length": len(w)}) for w in ["q", "w e", "1=2", "ok"]]

    def train_examples(self) -> list:
        return list(self._train)

    def eval_examples(self) -> list:
        return list(self._eval)

    def reward(self, completions: list, prompts: list | None = None, **columns: object) -> list[float]:
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

    def is_correct(self, completion: str, example: object) -> bool:
        return self.reward([completion])[0] >= 0.5
