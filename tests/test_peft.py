"""PEFT adapters: fastes' export loads in peft to the logits of W + (α/r)·B A; a PEFT-made adapter runs in fastes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tiny_model import make_tiny_model  # noqa: E402

from fastes.engine.engine import Engine  # noqa: E402
from fastes.engine.sampling import SamplingParams  # noqa: E402
from fastes.models.peft import CONFIG_FILE, WEIGHTS_FILE, load_peft_adapter, save_peft_adapter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[1, 12, 13, 14, 40, 50, 7, 9]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("peft") / "tiny", seed=3)


def _hf(model_dir: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()


def _randomize_adapters(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name_a, name_b in model.lora.values():
        model.params[name_a].copy_(torch.randn(model.params[name_a].shape, generator=gen) * 0.3)
        model.params[name_b].copy_(torch.randn(model.params[name_b].shape, generator=gen) * 0.3)


def test_export_loads_in_peft_to_the_merged_logits(model_dir, tmp_path):
    engine = Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
    engine.model.add_lora(4, ["q_proj", "v_proj", "down_proj"], alpha=6.0, seed=1)
    _randomize_adapters(engine.model, 0)
    out = save_peft_adapter(engine.model, tmp_path / "adapter", base_model=model_dir)
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 6.0 and config["peft_type"] == "LORA"
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    loaded = peft.PeftModel.from_pretrained(_hf(model_dir), str(out)).eval()
    # the oracle: plain transformers with W + (alpha / r) B A written into each adapted weight here
    merged = _hf(model_dir)
    state = merged.state_dict()
    with torch.no_grad():
        for base, (name_a, name_b) in engine.model.lora.items():
            state[base] += 1.5 * engine.model.params[name_b] @ engine.model.params[name_a]
    merged.load_state_dict(state)
    with torch.no_grad():
        got, want, plain = loaded(IDS).logits, merged(IDS).logits, _hf(model_dir)(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapters matter: a dropped or mis-scaled B A would show


def test_peft_made_adapter_runs_in_fastes(model_dir, tmp_path):
    base = _hf(model_dir)
    lora_config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "o_proj", "up_proj"],
                                  use_rslora=True, init_lora_weights=False)
    torch.manual_seed(0)
    made = peft.get_peft_model(base, lora_config).eval()
    made.save_pretrained(str(tmp_path / "made"))
    engine = Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
    cfg = load_peft_adapter(engine.model, tmp_path / "made")
    assert cfg["r"] == 2 and engine.model.lora_scaling == pytest.approx(5 / 2**0.5)  # rsLoRA: alpha / sqrt(r)
    assert len(engine.model.lora) == 3 * 2  # three modules on each of the two layers
    prompt = [1, 12, 13, 14, 40]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ours = engine.generate([prompt], sampling=greedy)[0][0][0].token_ids
    with torch.no_grad():
        theirs = made.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                               pad_token_id=0)[0, len(prompt):].tolist()
        plain = _hf(model_dir).generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                        min_new_tokens=8, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs and ours != plain
    again = save_peft_adapter(engine.model, tmp_path / "again")  # and back: same tensors, same scaling
    reloaded = Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu").model
    load_peft_adapter(reloaded, again)
    assert reloaded.lora_scaling == pytest.approx(engine.model.lora_scaling)
    for name in engine.model.lora_names():
        assert torch.equal(reloaded.params[name], engine.model.params[name])


@pytest.mark.parametrize("change,message", [
    ({"peft_type": "IA3"}, "only LORA"), ({"use_dora": True}, "use_dora"), ({"bias": "all"}, "bias"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"r": 3}, "expected"),
])
def test_unsupported_adapters_fail_with_one_line(model_dir, tmp_path, change, message):
    engine = Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu")
    engine.model.add_lora(4, ["q_proj"], seed=0)
    out = save_peft_adapter(engine.model, tmp_path / "a")
    config = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**config, **change}))
    fresh = Engine.from_pretrained(model_dir, dtype=torch.float32, device="cpu").model
    with pytest.raises(ValueError, match=message) as err:
        load_peft_adapter(fresh, out)
    assert "\n" not in str(err.value)
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_peft_adapter(fresh, out)


def test_lora_run_exports_an_adapter_and_a_run_starts_from_it(model_dir, tmp_path):
    from tiny_model import DigitTask

    from fastes.es.config import TrainConfig
    from fastes.es.trainer import Trainer

    base = dict(model=str(model_dir), task="digits", device="cpu", steps=2, prompts_per_step=2, eval_size=0,
                progress=False, report_to=["jsonl"], kv_cache_tokens=2048, optim=dict(lr=0.5),
                population=dict(size=4, mode="lora", sigma=0.5), lora=dict(rank=2, targets=["q_proj", "up_proj"]),
                sampling=dict(max_tokens=4, temperature=0.0))
    first = Trainer(TrainConfig.from_dict({**base, "out": str(tmp_path / "a")}), task=DigitTask())
    first.train()
    adapter = tmp_path / "a" / "checkpoints" / "step-2" / "adapter"
    assert any(bool(first.engine.model.params[b].abs().max() > 0) for _, b in first.engine.model.lora.values())
    assert (adapter / CONFIG_FILE).is_file() and (adapter / WEIGHTS_FILE).is_file()
    assert not (adapter.parent / CONFIG_FILE).exists()  # the merged checkpoint stays a plain HF model
    loaded = peft.PeftModel.from_pretrained(_hf(model_dir), str(adapter)).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(adapter.parent), torch_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, merged.eval()(IDS).logits, rtol=1e-5, atol=1e-5)
    cfg = {**base, "out": str(tmp_path / "b"), "lora": dict(rank=8, init_from=str(adapter))}
    second = Trainer(TrainConfig.from_dict(cfg), task=DigitTask())
    assert set(second.engine.model.lora) == set(first.engine.model.lora)  # the adapter's modules and rank win
    for name in first.engine.model.lora_names():
        assert torch.equal(second.engine.model.params[name], first.engine.model.params[name])
    with pytest.raises(ValueError, match="lora.init_from must be null unless"):
        TrainConfig.from_dict({**cfg, "population": dict(size=4, mode="lowrank")})
