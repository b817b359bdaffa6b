"""Malformed model directories fail with one-line ValueErrors that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastes.models import ModelConfig, load_model
from fastes.models.tokenizer import Tokenizer

CONFIG = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 64, "rope_theta": 10000.0, "tie_word_embeddings": False}


def _write(path: Path, config: dict | None = None, drop: str | None = None, extra: str | None = None,
           reshape: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIG if config is None else config)
    (path / "config.json").write_text(json.dumps(config))
    tensors = {name: torch.randn(shape) for name, (shape, _) in ModelConfig.from_dict(config).param_shapes().items()}
    if drop:
        del tensors[drop]
    if extra:
        tensors[extra] = torch.zeros(3)
    if reshape:
        tensors[reshape] = torch.zeros(5, 5)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def _fails(path: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        load_model(path)
    assert "\n" not in str(info.value), "error messages must be one line"


def test_a_good_directory_loads(tmp_path):
    model = load_model(_write(tmp_path / "ok"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.config.qkv_bias
    assert "model.layers.0.self_attn.q_proj.bias" in model.params


def test_missing_directory(tmp_path):
    _fails(tmp_path / "nope", "does not exist")


def test_no_config(tmp_path):
    path = _write(tmp_path / "m")
    (path / "config.json").unlink()
    _fails(path, "no config.json")


def test_bad_json(tmp_path):
    path = _write(tmp_path / "m")
    (path / "config.json").write_text('{"model_type": "llama",')
    _fails(path, "not valid JSON")


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2"},
     r"unsupported architecture 'gpt2' \(supported: llama, qwen2, qwen3, gemma3_text, gemma3\)"),
    ({"model_type": None}, "unsupported architecture None"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs a positive 'low_freq_factor'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_size": "64"}, "'hidden_size' must be int"),
    ({"vocab_size": None}, "lacks 'vocab_size'"),
])
def test_bad_config_values(tmp_path, change, match):
    path = _write(tmp_path / "m")
    (path / "config.json").write_text(json.dumps({**CONFIG, **change}))
    _fails(path, match)


def test_no_safetensors(tmp_path):
    path = _write(tmp_path / "m")
    (path / "model.safetensors").unlink()
    _fails(path, "no model.safetensors or model.safetensors.index.json")
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    _fails(path, "pickle checkpoints are not loaded")


def test_missing_tensor(tmp_path):
    _fails(_write(tmp_path / "m", drop="model.layers.0.self_attn.k_proj.bias"),
           r"lacks 1 tensor\(s\): model.layers.0.self_attn.k_proj.bias")


def test_untied_model_needs_lm_head(tmp_path):
    _fails(_write(tmp_path / "m", drop="lm_head.weight"), "lacks 1 tensor.*lm_head.weight")


def test_unexpected_tensor(tmp_path):
    _fails(_write(tmp_path / "m", extra="model.layers.7.mlp.up_proj.weight"),
           r"1 unexpected tensor\(s\): model.layers.7.mlp.up_proj.weight")


def test_known_extras_are_ignored(tmp_path):
    load_model(_write(tmp_path / "m", extra="model.layers.0.self_attn.rotary_emb.inv_freq"))


def test_wrong_shape(tmp_path):
    _fails(_write(tmp_path / "m", reshape="model.layers.0.mlp.down_proj.weight"),
           r"'model.layers.0.mlp.down_proj.weight' .* shape \(5, 5\), config implies \(16, 24\)")


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", b"garbage" * 3])
def test_corrupt_safetensors(tmp_path, content):
    path = _write(tmp_path / "m")
    (path / "model.safetensors").write_bytes(content)
    _fails(path, "cannot read")


def test_truncated_safetensors(tmp_path):
    path = _write(tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(path, "cannot read")


def test_broken_index(tmp_path):
    path = _write(tmp_path / "m")
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _fails(path, "shard.*missing.*model-00002-of-00002.safetensors")
    (path / "model.safetensors.index.json").write_text("{")
    _fails(path, "not a valid safetensors index")


def test_tied_checkpoint_may_carry_lm_head(tmp_path):
    cfg = {**CONFIG, "tie_word_embeddings": True}
    path = _write(tmp_path / "m", config=cfg, extra="lm_head.weight")
    model = load_model(path)
    assert "lm_head.weight" not in model.params


def test_missing_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer(_write(tmp_path / "m"))


def test_tokenizer_larger_than_the_vocab_is_one_clear_error(tmp_path):
    """A tokenizer whose ids exceed the model's vocab would index past the embedding: refuse it up front."""
    import shutil

    from tokenizers import Tokenizer, models

    from fastes import Engine

    demo = Path(__file__).resolve().parent.parent / "fastes" / "data" / "demo-model"
    model_dir = tmp_path / "model"
    shutil.copytree(demo, model_dir)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0")).save(
        str(model_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"has \d+ tokens but the model's config.json says vocab_size 32") as err:
        Engine.from_pretrained(model_dir, kv_cache_tokens=256)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- non-finite weights, and what saving may touch


def test_nan_or_inf_weights_are_refused_at_load(tmp_path):
    path = _write(tmp_path / "m")
    from safetensors.torch import load_file

    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, str(path / "model.safetensors"))
    _fails(path, "up_proj.weight.*NaN or inf")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = 1e6  # finite in fp32, inf in fp16
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="overflows float16"):
        load_model(path, dtype=torch.float16)


def _saved_model(tmp_path: Path):
    return load_model(_write(tmp_path / "src"))


def test_save_pretrained_never_deletes_what_fastes_did_not_write(tmp_path, monkeypatch):
    from fastes.models import save_pretrained
    from fastes.models.loader import EXPORT_MARKER

    model = _saved_model(tmp_path)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not write") as info:
        save_pretrained(model, user)
    assert "\n" not in str(info.value) and (user / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        save_pretrained(model, file)
    assert file.read_text() == "x"
    monkeypatch.chdir(user)
    with pytest.raises(ValueError, match="working directory"):
        save_pretrained(model, ".")
    assert (user / "notes.txt").read_text() == "mine"
    # an empty directory, then a previous export: both are written, atomically
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained(model, empty)
    assert (empty / EXPORT_MARKER).is_file() and (empty / "model.safetensors").is_file()
    save_pretrained(model, empty)
    assert torch.equal(load_model(empty).params["lm_head.weight"], model.params["lm_head.weight"])


def test_save_pretrained_cleans_leftovers_uses_umask_modes_and_refuses_nan(tmp_path):
    import os
    import stat

    from fastes.models import save_pretrained

    model = _saved_model(tmp_path)
    leftovers = [tmp_path / ".out.tmp-abcd1234", tmp_path / ".out.old-zz_y9xw8"]
    for d in leftovers:
        (d / "d").mkdir(parents=True)
    keep = tmp_path / ".out.tmp-mine"  # not a name save_pretrained makes
    keep.mkdir()
    old = os.umask(0o022)
    try:
        out = save_pretrained(model, tmp_path / "out")
    finally:
        os.umask(old)
    assert not any(d.exists() for d in leftovers) and keep.is_dir()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}
    model.params["lm_head.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        save_pretrained(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
