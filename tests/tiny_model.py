"""Tiny random Llama checkpoints with a char-level tokenizer, made on the fly for ES tests (no downloads)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CHARS = string.digits + string.ascii_lowercase + " +-*=?.,:"
SPECIALS = ["<eos>", "<bos>", "<unk>"]


def make_tokenizer(path: Path) -> int:
    """A char-level word-level tokenizer (≤ 64 tokens) saved as tokenizer.json + tokenizer_config.json."""
    import transformers
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    vocab = {c: i for i, c in enumerate(SPECIALS + list(CHARS))}
    raw = RawTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", bos_token="<bos>",
                                               unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}={% endif %}")
    tok.save_pretrained(str(path))
    return len(vocab)


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
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.3 if p.dim() == 2 else 0.1)
    model.save_pretrained(str(path))
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
