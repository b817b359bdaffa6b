"""Make the bundled demo model: a tiny Llama pretrained on 3-digit addition, stopped while still weak.

The demo must show ES *improving* a model on a 2-core CPU in minutes, so the model is
deliberately stopped early (held-out exact match in the target band) and shipped as a
real HF directory: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json and a model card. Run again with the same arguments to remake it:

    python scripts/make_demo_model.py --out fastes/data/demo-model

Training uses plain PyTorch on transformers' LlamaForCausalLM (this is an offline script,
not the engine). Data: "a+b=" with a, b uniform in [0, 10**digits), target "c<eos>", loss
on the answer tokens only; the held-out set is drawn from its own seed and excluded from
training.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

CHARS = list("0123456789+*-= \n")
SPECIALS = ["<pad>", "<bos>", "<eos>"]
PAD, BOS, EOS = 0, 1, 2


def build_tokenizer(out: Path) -> None:
    """A character-level tokenizer (one token per character) that transformers loads as a fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "model_max_length": 64, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode(text: str) -> list[int]:
    offset = len(SPECIALS)
    return [CHARS.index(ch) + offset for ch in text]


def problem(rng: random.Random, digits: int) -> tuple[int, int]:
    return rng.randrange(10**digits), rng.randrange(10**digits)


def batch(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] and labels (−100 outside the answer) for "a+b=c<eos>" sequences, right-padded."""
    seqs, labels = [], []
    for a, b in pairs:
        prompt, answer = encode(f"{a}+{b}="), encode(str(a + b)) + [EOS]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    lab = torch.full((len(seqs), width), -100)
    for i, (s, lb) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab


@torch.no_grad()
def accuracy(model: torch.nn.Module, pairs: list[tuple[int, int]], max_new: int = 6) -> float:
    """Greedy exact match (answer then EOS), prompts left-padded and decoded together."""
    prompts = [encode(f"{a}+{b}=") for a, b in pairs]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (ids != PAD).long()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, eos_token_id=EOS,
                         pad_token_id=PAD)[:, width:]
    correct = 0
    for (a, b), row in zip(pairs, out.tolist(), strict=True):
        expected = encode(str(a + b)) + [EOS]
        correct += row[: len(expected)] == expected
    return correct / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fastes/data/demo-model"))
    parser.add_argument("--digits", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--stop-at", type=float, default=0.25, help="stop once held-out accuracy reaches this")
    parser.add_argument("--num-eval", type=int, default=500)
    args = parser.parse_args()

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    held_rng = random.Random(args.seed + 1_000_003)
    held_out = [problem(held_rng, args.digits) for _ in range(args.num_eval)]
    held_set = set(held_out)
    rng = random.Random(args.seed)
    config = LlamaConfig(vocab_size=32, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start = time.time()
    acc, step = 0.0, 0
    log = []
    for step in range(1, args.max_steps + 1):
        pairs = []
        while len(pairs) < args.batch:
            pair = problem(rng, args.digits)
            if pair not in held_set:
                pairs.append(pair)
        ids, labels = batch(pairs)
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0:
            model.eval()
            acc = accuracy(model, held_out)
            log.append({"step": step, "loss": round(loss.item(), 4), "heldout_accuracy": acc})
            print(f"step {step:5d} loss {loss.item():.4f} held-out accuracy {acc:.3f} ({time.time() - start:.0f}s)",
                  flush=True)
            if acc >= args.stop_at:
                break
    tmp = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=args.out.parent if args.out.parent.exists() else None))
    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False).save_pretrained(tmp)
    build_tokenizer(tmp)
    card = {"task": f"{args.digits}-digit addition, prompt 'a+b=' answer 'c<eos>'", "seed": args.seed,
            "steps": step, "batch": args.batch, "lr": args.lr, "hidden": args.hidden, "layers": args.layers,
            "params": sum(p.numel() for p in model.parameters()), "heldout_accuracy": acc,
            "num_eval": args.num_eval, "train_seconds": round(time.time() - start, 1), "log": log}
    (tmp / "training_log.json").write_text(json.dumps(card, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(card))
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(args.out)
    print(f"wrote {args.out} ({card['params']} parameters, held-out accuracy {acc:.3f})")


def model_card(card: dict) -> str:
    return f"""# fastes demo model

A tiny Llama-architecture model bundled with fastes so that `make demo` / `fastes train`
can show Evolution Strategies improving a model on a CPU, with no download.

- Task: {card['task']}; character-level tokenizer (digits, `+ * - =`, space, newline, `<pad> <bos> <eos>`).
- Architecture: {card['layers']} layers, hidden {card['hidden']}, 4 attention heads / 2 KV heads (GQA), tied
  embeddings, {card['params']} parameters, stored in fp32.
- Training: supervised next-token loss on the answer tokens, AdamW lr {card['lr']}, batch {card['batch']},
  seed {card['seed']}, {card['steps']} steps ({card['train_seconds']} s on a 2-core CPU); problems drawn
  uniformly, the {card['num_eval']}-problem held-out set excluded from training.
- Deliberately stopped early: held-out greedy exact-match accuracy {card['heldout_accuracy']:.1%}, so that ES has
  room to improve it.
- Made by `scripts/make_demo_model.py` (in the fastes repository); `training_log.json` holds the curve.
"""


if __name__ == "__main__":
    main()
