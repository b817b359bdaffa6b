"""The decoder sends q/k/v and gate/up through one perturbed_linear_group when none has LoRA or bias noise.

The grouped forward (Triton interpreter: one shrink launch per group) must give the CPU forward's logits,
and the bias-noise case must keep the per-projection path. With LoRA on every projection, q/k/v and gate/up go
through one lora_linear_group each (one LoRA shrink launch), unless their adapters differ in being perturbed.
"""

from __future__ import annotations

import pytest
import torch
from oracle import packed_prefill, random_ids
from tiny_model import random_hf_model

from fastes.models import Perturbation, load_model
from fastes.models import decoder as decoder_lib
from fastes.ops._triton import TRITON_ERROR
from fastes.population import Population

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(TRITON_ERROR is not None, reason=f"triton unusable: {TRITON_ERROR}")]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer Qwen2 (q/k/v have biases) saved and loaded back."""
    path = tmp_path_factory.mktemp("qwen2")
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=1e6)
    random_hf_model(config, 3, path)
    return load_model(path)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = decoder_lib.perturbed_linear_group

    def spy(x, weights, biases, names, *args, **kwargs):
        calls.append([n.split(".")[-2] for n in names])
        return real(x, weights, biases, names, *args, **kwargs)

    monkeypatch.setattr(decoder_lib, "perturbed_linear_group", spy)
    return calls


def test_grouped_triton_forward_equals_the_cpu_forward(qwen2, monkeypatch):
    pop = Population(size=4, sigma=3e-2, mode="lowrank", rank=2, seed=5, antithetic=True)
    prompts, members = random_ids(64, [5, 3, 4], vocab=64), [1, -1, 2]
    want = packed_prefill(qwen2, prompts, members, Perturbation.for_model(qwen2, pop, 0, backend="cpu"))
    calls = _spy(monkeypatch)
    got = packed_prefill(qwen2, prompts, members, Perturbation.for_model(qwen2, pop, 0, backend="triton"))
    assert calls == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    plain = packed_prefill(qwen2, prompts)
    assert (got[0] - plain[0]).abs().max() > 1e-3  # member 1's noise reached the logits


def test_bias_noise_keeps_q_k_v_on_their_own(qwen2, monkeypatch):
    """q/k/v biases carry 1-D noise here: they stay per projection (gate/up, bias-free, still group)."""
    pop = Population(size=2, sigma=3e-2, mode="lowrank", seed=5, perturb_1d=True)
    prompts, members = random_ids(64, [4, 3], vocab=64), [0, 1]
    want = packed_prefill(qwen2, prompts, members, Perturbation.for_model(qwen2, pop, 0))
    calls = _spy(monkeypatch)
    got = packed_prefill(qwen2, prompts, members, Perturbation.for_model(qwen2, pop, 0))
    assert calls == [["gate_proj", "up_proj"]] * 2
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def qwen2_lora(tmp_path_factory: pytest.TempPathFactory):
    """The same 2-layer Qwen2 with rank-4 LoRA on every projection, B made nonzero so that the adapters count."""
    path = tmp_path_factory.mktemp("qwen2_lora")
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=1e6)
    random_hf_model(config, 3, path)
    model = load_model(path)
    model.add_lora(rank=4, alpha=8.0, seed=2)
    g = torch.Generator().manual_seed(1)
    for _, name_b in model.lora.values():
        model.params[name_b].copy_(0.2 * torch.randn(model.params[name_b].shape, generator=g))
    return model


def _lora_spy(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = decoder_lib.lora_linear_group

    def spy(x, weights, biases, loras_a, loras_b, *args, **kwargs):
        calls.append([n.split(".")[-3] for n in args[4]])
        return real(x, weights, biases, loras_a, loras_b, *args, **kwargs)

    monkeypatch.setattr(decoder_lib, "lora_linear_group", spy)
    return calls


def test_grouped_triton_lora_forward_equals_the_cpu_forward(qwen2_lora, monkeypatch):
    """q/k/v and gate/up LoRA go through one lora_linear_group each (one shrink launch on Triton); the logits
    are the CPU forward's (one lora_linear per projection)."""
    pop = Population(size=4, sigma=5e-2, mode="lora", rank=4, seed=5, antithetic=True)
    prompts, members = random_ids(64, [5, 3, 4], vocab=64), [1, -1, 2]
    want = packed_prefill(qwen2_lora, prompts, members, Perturbation.for_model(qwen2_lora, pop, 0, backend="cpu"))
    calls = _lora_spy(monkeypatch)
    got = packed_prefill(qwen2_lora, prompts, members, Perturbation.for_model(qwen2_lora, pop, 0, backend="triton"))
    assert calls == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    unperturbed = packed_prefill(qwen2_lora, prompts)
    assert (got[0] - unperturbed[0]).abs().max() > 1e-3  # member 1's adapter noise reached the logits
    torch.testing.assert_close(got[1], unperturbed[1], atol=1e-4, rtol=0)  # the -1 sequence has none


def test_lora_group_with_one_adapter_unperturbed_keeps_its_projections_apart(qwen2_lora, monkeypatch):
    """k_proj's adapters excluded from the noise: q/k/v cannot share one σ, so they run one lora_linear each
    (gate/up still group) and the logits stay the CPU forward's."""
    pop = Population(size=2, sigma=5e-2, mode="lora", rank=4, seed=5, exclude=("*k_proj*",))
    prompts, members = random_ids(64, [4, 3], vocab=64), [0, 1]
    want = packed_prefill(qwen2_lora, prompts, members, Perturbation.for_model(qwen2_lora, pop, 0, backend="cpu"))
    calls = _lora_spy(monkeypatch)
    got = packed_prefill(qwen2_lora, prompts, members, Perturbation.for_model(qwen2_lora, pop, 0, backend="triton"))
    assert calls == [["gate_proj", "up_proj"]] * 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
