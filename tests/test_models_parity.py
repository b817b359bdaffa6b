"""fastes' own decoder forward against transformers (the oracle), through the paged KV cache.

Tiny random models of each family are built with transformers' config classes and saved
to a temporary directory (no downloads). Parameters are re-drawn with larger spread than
HF's init (norm weights and biases too) so that every piece of the forward matters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from oracle import check_chunked_prefill_then_decode, hf_logits, packed_prefill, random_ids
from tiny_model import random_hf_model

from fastes.engine.attention_batch import build_attention_batch
from fastes.engine.block_manager import BlockManager
from fastes.engine.kv_cache import KVCache
from fastes.models import Perturbation, Tokenizer, load_model, perturbed_names, save_pretrained
from fastes.models.rope import inv_freq
from fastes.noise import member_noise_tensor
from fastes.population import Population

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
BLOCK = 4
COMMON = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=257,
              eos_token_id=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}
FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3_tied": ("LlamaConfig", dict(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama_linear_bias": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 10000.0}, attention_bias=True,
                                              mlp_bias=True)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0)),
    "qwen2_sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_theta=1000000.0)),
}
pytestmark = pytest.mark.usefixtures("one_thread")


def _make_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer without merges (256 byte tokens + eos + bos), with a chat template."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = RawTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    raw.add_special_tokens(["<|eos|>", "<|bos|>"])  # ids 256, 257 as in the model config
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eos|>", bos_token="<|bos|>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [256, 7]}))


def _build(family: str, path: Path) -> torch.nn.Module:
    cls_name, extra = FAMILIES[family]
    model = random_hf_model(getattr(transformers, cls_name)(**COMMON, **extra), hash(family) % 1000, path)
    _make_tokenizer(path)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("models")
    return {f: (root / f, _build(f, root / f)) for f in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_prefill_matches_transformers(checkpoints, family):
    path, hf = checkpoints[family]
    model = load_model(path)
    prompts = random_ids(1, [5, 1, 11, 8])
    for got, ids in zip(packed_prefill(model, prompts), prompts, strict=True):
        want = hf_logits(hf, ids)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama3_tied", "qwen2", "qwen3"])
def test_chunked_prefill_then_decode_matches_transformers(checkpoints, family):
    """Sequences in different phases share each forward: chunks of prompts, then one token per step."""
    path, hf = checkpoints[family]
    model = load_model(path)
    check_chunked_prefill_then_decode(model, hf, random_ids(2, [14, 9, 12]), prompt_lens=[7, 3, 5], chunk=3,
                                      num_blocks=64, block=BLOCK, atol=ATOL)


def test_logits_indices_select_rows(checkpoints):
    path, hf = checkpoints["qwen2"]
    model = load_model(path)
    prompts = random_ids(3, [6, 4])
    bm = BlockManager(16, BLOCK)
    cache = KVCache.for_model(model.config, 16, BLOCK)
    for i, p in enumerate(prompts):
        bm.allocate(i, -1, len(p))
    attn, positions = build_attention_batch(bm, [(0, 0, 6), (1, 0, 4)])
    last = torch.tensor([5, 9])
    got = model.forward(torch.cat(prompts), positions, attn, cache, logits_indices=last)
    assert got.shape == (2, 260) and got.dtype == torch.float32
    want = torch.stack([hf_logits(hf, p)[-1] for p in prompts])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads_the_same(checkpoints, tmp_path):
    path, hf = checkpoints["qwen3"]
    hf.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    a, b = load_model(path), load_model(tmp_path)
    assert a.params.keys() == b.params.keys()
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name


@pytest.mark.parametrize("family", ["llama3_tied", "qwen2"])
def test_save_pretrained_round_trip(checkpoints, tmp_path, family):
    path, hf = checkpoints[family]
    model = load_model(path)
    out = save_pretrained(model, tmp_path / "saved")
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    ids = random_ids(4, [9])[0]
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(hf, ids), atol=1e-6, rtol=0)
    sharded = save_pretrained(model, tmp_path / "saved", max_shard_bytes=30_000)  # overwrite in place
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    again = load_model(sharded)
    assert all(torch.equal(again.params[n], model.params[n]) for n in model.params)


def test_v4_config_layout_loads(checkpoints, tmp_path):
    """transformers 4.x writes rope_theta + rope_scaling at top level; both layouts must agree."""
    path, _ = checkpoints["llama3_tied"]
    raw = json.loads((path / "config.json").read_text())
    rope = raw.pop("rope_parameters", None) or dict(raw.pop("rope_scaling"), rope_theta=raw.pop("rope_theta"))
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    assert torch.equal(inv_freq(load_model(tmp_path).config), inv_freq(load_model(path).config))
    assert load_model(tmp_path).config.rope_type == "llama3"


def test_tokenizer(checkpoints, tmp_path):
    path, _ = checkpoints["qwen2"]
    tok = Tokenizer(path)
    ids = tok.encode("hello world", add_special_tokens=False)
    assert tok.decode(ids) == "hello world"
    assert set(tok.eos_token_ids) == {256, 7}
    chat = tok.apply_chat_template("hi")
    assert chat == "<|user|>hi\n<|assistant|>"
    assert tok.encode_chat("hi") == tok.encode(chat, add_special_tokens=False)


# --------------------------------------------------------------------------- perturbed parity


def _oracle(hf: torch.nn.Module, names: list[str], pop: Population, member: int, scales: dict[str, float],
            step: int) -> torch.nn.Module:
    """A copy of ``hf`` whose perturbed parameters are set to W + σ·s·E_m (the reference noise)."""
    import copy

    twin = copy.deepcopy(hf)
    params = dict(twin.named_parameters(remove_duplicate=False))
    spec = pop.spec(step)
    with torch.no_grad():
        for name in names:
            p = params[name]
            e = member_noise_tensor(spec, name, member, tuple(p.shape), pop.mode, pop.rank)
            p.add_(pop.sigma * scales.get(name, 1.0) * e)
    return twin


def _oracle_names(hf: torch.nn.Module, pop: Population) -> list[str]:
    """The perturbed HF parameters, decided here from Population.perturbs alone (independent of fastes' forward)."""
    tied = hf.config.tie_word_embeddings
    names = []
    for name, p in hf.named_parameters():  # a tied lm_head is listed once, as the embedding
        if name == "model.embed_tokens.weight":
            hit = pop.perturbs(name, 2, "embedding") or (tied and pop.perturbs(name, 2, "lm_head"))
        else:
            hit = pop.perturbs(name, p.dim(), "lm_head" if name == "lm_head.weight" else "matrix")
        if hit:
            names.append(name)
    return names


PERTURBED_CASES = [
    ("llama", dict(mode="lowrank", rank=2)),
    ("qwen2", dict(mode="full", perturb_1d=True, layerwise_scale=True)),
    ("qwen3", dict(mode="lowrank", rank=2, perturb_1d=True, perturb_embeddings=True, perturb_lm_head=True)),
    ("llama3_tied", dict(mode="full", perturb_embeddings=True, antithetic=False, exclude=("*.0.mlp.*",))),
]


@pytest.mark.parametrize("family,kwargs", PERTURBED_CASES, ids=[c[0] for c in PERTURBED_CASES])
def test_perturbed_members_match_transformers(checkpoints, family, kwargs):
    path, hf = checkpoints[family]
    model = load_model(path)
    pop = Population(size=4, sigma=1e-2, seed=11, **kwargs)
    step = 3
    pert = Perturbation.for_model(model, pop, step)
    names = _oracle_names(hf, pop)
    assert sorted(names) == sorted(perturbed_names(model.config.param_shapes(), pop))
    prompts = random_ids(5, [6, 4, 7, 5, 3])
    members = [0, 3, -1, 1, 3]
    got = packed_prefill(model, prompts, members, pert)
    for m in sorted(set(members)):
        ref = hf if m < 0 else _oracle(hf, names, pop, m, pert.scales, step)
        for i in (i for i, mi in enumerate(members) if mi == m):
            want = hf_logits(ref, prompts[i])
            torch.testing.assert_close(got[i], want, atol=ATOL, rtol=0)
            if m >= 0:  # the perturbation must be far above the tolerance for the check to mean anything
                assert (want - hf_logits(hf, prompts[i])).abs().max() > 100 * ATOL
    # a member alone in the batch gives the same logits as in the mix: rows do not interfere
    alone = packed_prefill(model, [prompts[1], prompts[4]], [3, 3], pert)
    torch.testing.assert_close(alone[0], got[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[1], got[4], atol=1e-5, rtol=0)


def test_perturbed_reference_backend_agrees(checkpoints):
    path, _ = checkpoints["qwen2"]
    model = load_model(path)
    pop = Population(size=2, sigma=1e-2, mode="lowrank", rank=2, seed=5, perturb_1d=True)
    prompts, members = random_ids(6, [5, 3]), [1, 0]
    fast = packed_prefill(model, prompts, members, Perturbation.for_model(model, pop, 0))
    ref = packed_prefill(model, prompts, members, Perturbation.for_model(model, pop, 0, backend="reference"))
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_perturbation_members_bound_the_1d_noise(checkpoints):
    """Perturbation(members=...) caches 1-D noise for those members only: the same result for them, and a
    clear error (not the unperturbed weights, silently) for a row of any other member."""
    path, _ = checkpoints["qwen2"]
    model = load_model(path)
    pop = Population(size=4, sigma=1e-2, mode="lowrank", seed=5, perturb_1d=True)
    prompts = random_ids(6, [5, 3])
    every = packed_prefill(model, prompts, [3, 1], Perturbation.for_model(model, pop, 0))
    listed = packed_prefill(model, prompts, [3, 1], Perturbation.for_model(model, pop, 0, members=(1, 3)))
    for a, b in zip(every, listed, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="outside the perturbation's members"):
        packed_prefill(model, prompts, [3, 2], Perturbation.for_model(model, pop, 0, members=(1, 3)))


def test_lora_members_match_transformers(checkpoints, tmp_path):
    path, hf = checkpoints["qwen3"]
    model = load_model(path)
    model.add_lora(rank=2, targets=("q_proj", "v_proj", "down_proj"), alpha=4.0, seed=1)
    g = torch.Generator().manual_seed(0)
    for _, name_b in model.lora.values():
        model.params[name_b].copy_(0.2 * torch.randn(model.params[name_b].shape, generator=g))
    pop = Population(size=2, sigma=5e-2, mode="lora", rank=2, seed=9)
    pert = Perturbation.for_model(model, pop, 1)
    prompts, members = random_ids(7, [5, 6, 4]), [1, -1, 0]
    got = packed_prefill(model, prompts, members, pert)
    spec = pop.spec(1)
    for i, m in enumerate(members):
        twin = __import__("copy").deepcopy(hf)
        params = dict(twin.named_parameters())
        with torch.no_grad():
            for base, (name_a, name_b) in model.lora.items():
                a, b = model.params[name_a].clone(), model.params[name_b].clone()
                if m >= 0:
                    a += pop.sigma * member_noise_tensor(spec, name_a, m, tuple(a.shape))
                    b += pop.sigma * member_noise_tensor(spec, name_b, m, tuple(b.shape))
                params[base].add_(model.lora_scaling * b @ a)
        torch.testing.assert_close(got[i], hf_logits(twin, prompts[i]), atol=ATOL, rtol=0)
    # the saved model has the adapters merged, so transformers reproduces the unperturbed LoRA model
    out = save_pretrained(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(merged, prompts[1]), got[1], atol=ATOL, rtol=0)


def test_lora_init_is_neutral(checkpoints):
    path, _ = checkpoints["llama"]
    model = load_model(path)
    before = packed_prefill(model, random_ids(8, [5]))[0]
    model.add_lora(rank=4)
    assert len(model.lora) == 7 * model.config.num_layers
    a_name, b_name = next(iter(model.lora.values()))
    assert model.params[b_name].abs().sum() == 0 and model.params[a_name].std() > 0
    assert math.isclose(float(model.params[a_name].std()), 1 / math.sqrt(64), rel_tol=0.3)
    torch.testing.assert_close(packed_prefill(model, random_ids(8, [5]))[0], before, atol=1e-6, rtol=0)
