"""Gemma 3 text models against transformers (the oracle): paged-cache logits, greedy generation,
perturbed members, multimodal (``gemma3``) checkpoints, save/load, and the real-shape presets.

Tiny random models are built with transformers' Gemma3TextConfig (no downloads). Their
sliding window (5) is shorter than the test sequences (12–20 tokens) and local layers use
a rope base different from global ones, so a wrong window, rope or layer pattern shows.
Norm weights are drawn around 0 (Gemma's norms compute 1 + w), other weights wider than
HF's init, so every piece of the forward matters.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from oracle import check_chunked_prefill_then_decode, hf_logits, packed_prefill, random_ids
from tiny_model import hf_model, randomize_

from fastes import Engine, Population, SamplingParams
from fastes.models import ModelConfig, Perturbation, load_model, save_pretrained
from fastes.models.decoder import _Rows, rms_norm
from fastes.models.presets import PRESETS, preset_config, write_random_model
from fastes.models.rope import inv_freq

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
BLOCK = 4
WINDOW = 5
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]  # pattern 3
TEXT = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, sliding_window=WINDOW,
            layer_types=LAYER_TYPES, query_pre_attn_scalar=24, rope_theta=10000.0, rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0}, bos_token_id=257, eos_token_id=256, pad_token_id=0)
VARIANTS = {
    "tied": {},
    # untied lm_head, attention biases, final logit softcapping: the optional pieces
    "capped": dict(tie_word_embeddings=False, attention_bias=True, final_logit_softcapping=3.0,
                   rope_scaling=None, layer_types=["full_attention", "sliding_attention"] * 2),
}
pytestmark = pytest.mark.usefixtures("one_thread")
_prefill = partial(packed_prefill, block=BLOCK, pool_factor=1)  # a tight pool: tokens / BLOCK + 2 per sequence


def _build(path: Path, seed: int, **overrides: object) -> torch.nn.Module:
    hf = hf_model(transformers.Gemma3TextConfig(**{**TEXT, **overrides}))
    torch.manual_seed(seed)  # after the init, before the redraw
    randomize_(hf, norm=0.0)  # Gemma's norms compute 1 + w: w around 0
    hf.save_pretrained(str(path))
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("gemma3")
    return {name: (root / name, _build(root / name, i, **kw)) for i, (name, kw) in enumerate(VARIANTS.items())}


# --------------------------------------------------------------------------- config and pieces


def test_config_reads_gemma3_fields(checkpoints):
    path, hf = checkpoints["tied"]
    cfg = load_model(path).config
    assert cfg.sliding_windows == (WINDOW, WINDOW, None, WINDOW)
    assert (cfg.rope_theta, cfg.rope_type, cfg.local_rope_theta, cfg.local_rope_type) == (1e4, "linear", 100.0,
                                                                                          "default")
    assert cfg.softmax_scale == 24**-0.5 and cfg.embed_scale == 8.0 and cfg.norm_offset == 1.0
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.tie_word_embeddings and cfg.final_logit_softcap == 0.0
    assert set(cfg.param_shapes()) == {n for n, _ in hf.named_parameters()}  # HF names, tied lm_head listed once
    rotary = hf.model.rotary_emb
    torch.testing.assert_close(inv_freq(cfg), rotary.full_attention_inv_freq, rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_freq(cfg, local=True), rotary.sliding_attention_inv_freq, rtol=1e-6, atol=0)
    assert load_model(checkpoints["capped"][0]).config.final_logit_softcap == 3.0


def test_v4_config_layout_reads_the_same(checkpoints, tmp_path):
    """transformers 4.x wrote rope_theta / rope_local_base_freq / rope_scaling and sliding_window_pattern."""
    path, _ = checkpoints["tied"]
    raw = json.loads((path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw.pop("layer_types")
    raw.update(rope_theta=rope["full_attention"]["rope_theta"], rope_local_base_freq=100.0,
               rope_scaling={"type": "linear", "factor": 2.0}, sliding_window_pattern=3)
    a, b = ModelConfig.from_dict(raw), load_model(path).config
    assert a.sliding_windows == b.sliding_windows and a.rope_scaling["factor"] == 2.0
    for local in (False, True):
        assert torch.equal(inv_freq(a, local), inv_freq(b, local))


@pytest.mark.parametrize("bad,match", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "relu"}, "unsupported hidden_activation 'relu'"),
    ({"sliding_window": None}, "need a positive sliding_window"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be positive"),
])
def test_unsupported_gemma3_settings_fail_in_one_line(checkpoints, bad, match):
    raw = {**json.loads((checkpoints["tied"][0] / "config.json").read_text()), **bad}
    with pytest.raises(ValueError, match=match) as info:
        ModelConfig.from_dict(raw)
    assert "\n" not in str(info.value)


def test_bf16_embedding_scale_and_norm_match_transformers(checkpoints):
    """In bf16 the √hidden scale is rounded before it multiplies, and (1 + w) is applied in fp32, as in HF."""
    path, hf = checkpoints["tied"]
    model = load_model(path, dtype=torch.bfloat16)
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    ids = random_ids(0, [16])[0]
    with torch.no_grad():
        want = hf16.model.embed_tokens(ids)
        assert torch.equal(model._embed(ids, _Rows(None), None), want)
        x = torch.randn(7, 64).to(torch.bfloat16) * 3
        got = rms_norm(x, model.params["model.norm.weight"], model.config.rms_norm_eps, model.config.norm_offset)
        assert torch.equal(got, hf16.model.norm(x))


# --------------------------------------------------------------------------- logits through the paged cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_prefill_matches_transformers(checkpoints, variant):
    path, hf = checkpoints[variant]
    model = load_model(path)
    seqs = random_ids(1, [12, 3, 17, 20])
    got = _prefill(model, seqs)
    for logits, ids in zip(got, seqs, strict=True):
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, hf_logits(hf, ids), atol=ATOL, rtol=0)
    # the window matters: with it wider than the sequence, rows past the window differ far beyond the tolerance
    wide = tuple(None if w is None else 1000 for w in model.config.sliding_windows)
    model.config = dataclasses.replace(model.config, sliding_windows=wide)
    unwindowed = _prefill(model, seqs[3:])[0]
    assert (unwindowed[WINDOW:] - got[3][WINDOW:]).abs().max() > 100 * ATOL
    torch.testing.assert_close(unwindowed[:WINDOW], got[3][:WINDOW], atol=1e-5, rtol=0)


def test_chunked_prefill_then_decode_matches_transformers(checkpoints):
    """Prefill chunks and one-token decode steps of several sequences share each forward."""
    path, hf = checkpoints["tied"]
    model = load_model(path)
    check_chunked_prefill_then_decode(model, hf, random_ids(2, [18, 13, 16]), prompt_lens=[7, 3, 9], chunk=3,
                                      num_blocks=32, block=BLOCK, atol=ATOL)


# --------------------------------------------------------------------------- generation and perturbed members

PROMPTS = [[5, 17, 200, 3, 9, 44, 2], [42], [7, 7, 130, 64, 2, 250, 11, 90, 31]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine(path: Path) -> Engine:
    return Engine.from_pretrained(path, kv_cache_tokens=512, block_size=BLOCK)


def _hf_greedy(hf: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    config = copy.deepcopy(hf.generation_config)
    config.eos_token_id = None  # like ignore_eos: run all n tokens without masking EOS out of the argmax
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, max_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers_generate(checkpoints, variant):
    """Sequences run past the window (prompt + 12 > 5), so HF's sliding-window cache is exercised too."""
    path, hf = checkpoints[variant]
    outs = _engine(path).generate(PROMPTS, GREEDY)
    for prompt, (done,) in zip(PROMPTS, outs[0], strict=True):
        assert done.token_ids == _hf_greedy(hf, prompt, 12)


def _oracle(engine: Engine, hf: torch.nn.Module, pop: Population, member: int, step: int) -> torch.nn.Module:
    """A copy of ``hf`` with every parameter set to W + σ·s·E_m, the dense delta taken from the engine."""
    twin = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in twin.named_parameters():  # a tied lm_head is the embedding: listed once
            p.add_(engine.perturbation(name, member, pop, step))
    return twin


CASES = [
    ("tied", dict(mode="lowrank", rank=2, perturb_1d=True, perturb_embeddings=True)),
    ("capped", dict(mode="full", perturb_1d=True, perturb_lm_head=True, layerwise_scale=True, antithetic=False)),
]


@pytest.mark.parametrize("variant,kwargs", CASES, ids=[c[0] for c in CASES])
def test_perturbed_members_match_transformers(checkpoints, variant, kwargs):
    path, hf = checkpoints[variant]
    engine = _engine(path)
    pop = Population(size=4, sigma=1e-2, seed=7, **kwargs)
    step = 2
    names = engine.perturbed_names(pop)
    assert any("layernorm" in n for n in names) and any("q_norm" in n for n in names)
    pert = Perturbation.for_model(engine.model, pop, step)
    seqs = random_ids(3, [12, 6, 14, 9])
    members = [0, 3, -1, 3]
    got = _prefill(engine.model, seqs, members, pert)
    oracles = {m: hf if m < 0 else _oracle(engine, hf, pop, m, step) for m in set(members)}
    for i, m in enumerate(members):
        want = hf_logits(oracles[m], seqs[i])
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=0)
        if m >= 0:  # the perturbation must be far above the tolerance for the check to mean anything
            assert (want - hf_logits(hf, seqs[i])).abs().max() > 100 * ATOL
    outs = engine.generate(PROMPTS[:2], GREEDY, population=pop, step=step)
    for prompt, (done,) in zip(PROMPTS[:2], outs[3], strict=True):
        assert done.token_ids == _hf_greedy(oracles[3], prompt, 12)


# --------------------------------------------------------------------------- multimodal checkpoints, saving


def _multimodal(text_hf: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A tiny Gemma3ForConditionalGeneration whose language model is ``text_hf``, saved to ``path``."""
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text_hf.config.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4, eos_token_id=[256, 7])
    mm = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    mm.model.language_model.load_state_dict(text_hf.model.state_dict())
    mm.save_pretrained(str(path))
    return mm


def test_multimodal_checkpoint_loads_its_text_part(checkpoints, tmp_path):
    path, hf = checkpoints["tied"]
    mm = _multimodal(hf, tmp_path / "mm")
    model = load_model(tmp_path / "mm")
    assert model.config.model_type == "gemma3_text" and model.config.eos_token_ids == (256, 7)
    reference = load_model(path)
    assert model.params.keys() == reference.params.keys()
    assert all(torch.equal(model.params[n], reference.params[n]) for n in model.params)
    ids = random_ids(4, [15])[0]
    got = _prefill(model, [ids])[0]
    torch.testing.assert_close(got, hf_logits(mm, ids), atol=ATOL, rtol=0)
    # saving writes a text-only Gemma3ForCausalLM directory
    out = save_pretrained(model, tmp_path / "text")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "gemma3_text" and saved["architectures"] == ["Gemma3ForCausalLM"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    torch.testing.assert_close(hf_logits(reloaded, ids), got, atol=ATOL, rtol=0)


def test_hub_style_multimodal_layout_loads(checkpoints, tmp_path):
    """Hub configs (4.x) give only non-default text_config keys and keep eos/dtype at the top level;
    transformers >= 4.52 stored the text model under ``model.language_model.``."""
    from safetensors.torch import save_file

    path, hf = checkpoints["tied"]
    text = {k: v for k, v in TEXT.items() if k not in ("layer_types", "rope_scaling")}
    text.update(model_type="gemma3_text", sliding_window_pattern=3, rope_scaling={"rope_type": "linear", "factor": 2.0})
    del text["eos_token_id"]
    raw = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "eos_token_id": [256, 7],
           "torch_dtype": "float32", "text_config": text, "vision_config": {"model_type": "siglip_vision_model"}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    tensors = {"model.language_model." + n[len("model."):]: p.detach().clone() for n, p in hf.named_parameters()}
    tensors["model.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(3)
    tensors["model.multi_modal_projector.mm_input_projection_weight"] = torch.ones(3, 2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path)
    assert model.config.eos_token_ids == (256, 7) and model.config.sliding_windows == (WINDOW, WINDOW, None, WINDOW)
    ids = random_ids(5, [14])[0]
    torch.testing.assert_close(_prefill(model, [ids])[0], hf_logits(hf, ids), atol=ATOL, rtol=0)
    # a multimodal config without its text part fails in one line
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "vision_config": {}}))
    with pytest.raises(ValueError, match="gemma3 config.json has no text_config object") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_pretrained_round_trip(checkpoints, tmp_path, variant):
    path, hf = checkpoints[variant]
    out = save_pretrained(load_model(path), tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    ids = random_ids(6, [13])[0]
    torch.testing.assert_close(hf_logits(reloaded, ids), hf_logits(hf, ids), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- real-shape presets


def test_presets_have_the_real_shapes(tmp_path):
    counts = {name: sum(torch.Size(s).numel() for s, _ in preset_config(name).param_shapes().values())
              for name in PRESETS}
    assert 0.49e9 < counts["qwen2.5-0.5b"] < 0.50e9 and 1.5e9 < counts["qwen2.5-1.5b"] < 1.6e9
    assert 0.99e9 < counts["gemma3-1b"] < 1.01e9
    gemma = preset_config("gemma3-1b")
    assert gemma.sliding_windows == tuple(None if (i + 1) % 6 == 0 else 512 for i in range(26))
    assert (gemma.num_heads, gemma.num_kv_heads, gemma.head_dim, gemma.vocab_size) == (4, 1, 256, 262144)
    # the writer's output loads in transformers and fastes alike (shrunk to keep the test small)
    small = dict(num_hidden_layers=2, vocab_size=300, hidden_size=32, intermediate_size=48, head_dim=16)
    out = write_random_model("gemma3-1b", tmp_path / "g", dtype=torch.float32, overrides=small)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ids = random_ids(7, [6])[0]
    torch.testing.assert_close(_prefill(load_model(out), [ids])[0], hf_logits(hf, ids), atol=ATOL, rtol=0)
