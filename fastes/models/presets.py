"""Real-shape model presets with random weights, for benchmarks on machines without the checkpoints.

Throughput and memory depend on shapes, not on trained values, so a benchmark such as
bench/generate.py can run "Gemma-3-1B shapes" from a directory written here instead of
a download. Each preset is the config.json of the real model (architecture fields as
published; tokenizer ids kept so EOS handling looks the same), and
``write_random_model`` writes an HF directory (config.json + safetensors, no
tokenizer) that both fastes and transformers load. Generated text is meaningless.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from fastes.models.config import ModelConfig
from fastes.models.decoder import CausalLM
from fastes.models.loader import save_pretrained

_QWEN25 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
           "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "initializer_range": 0.02,
           "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "use_cache": True,
           "use_sliding_window": False, "vocab_size": 151936}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {**_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "max_window_layers": 24, "sliding_window": 32768},
    "qwen2.5-1.5b": {**_QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "max_window_layers": 28, "sliding_window": 32768},
    # google/gemma-3-1b-it: 26 layers, every 6th global (rope 1e6), the others local (window 512, rope 1e4)
    "gemma3-1b": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
                  "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
                  "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
                  "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
                  "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4,
                  "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
                  "rms_norm_eps": 1e-6, "rope_local_base_freq": 10000.0, "rope_scaling": None,
                  "rope_theta": 1000000.0, "sliding_window": 512, "sliding_window_pattern": 6,
                  "tie_word_embeddings": True, "use_cache": True, "vocab_size": 262144},
}


def preset_raw(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json dict of preset ``name`` (a copy), with ``overrides`` applied (e.g. fewer layers in tests)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return {**copy.deepcopy(PRESETS[name]), **(overrides or {})}


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    return ModelConfig.from_dict(preset_raw(name, overrides))


def random_model(name: str, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", seed: int = 0,
                 overrides: dict[str, Any] | None = None) -> CausalLM:
    """A CausalLM of the preset's shapes: matrices and embeddings N(0, 0.02), norms at their identity, biases 0.

    Weights are drawn tensor by tensor in fp32 and cast, so peak extra memory is one fp32 tensor.
    """
    config = preset_config(name, overrides)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params: dict[str, torch.Tensor] = {}
    for pname, (shape, role) in config.param_shapes().items():
        if role == "norm":  # identity norm: weight 1, or 0 where the norm computes (1 + weight)
            tensor = torch.full(shape, 1.0 - config.norm_offset)
        elif role == "bias":
            tensor = torch.zeros(shape)
        else:
            tensor = torch.randn(shape, generator=gen).mul_(0.02)
        params[pname] = tensor.to(device=device, dtype=dtype)
    return CausalLM(config, params)


def write_random_model(name: str, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       overrides: dict[str, Any] | None = None) -> Path:
    """Write preset ``name`` with random weights as an HF directory at ``out_dir`` (atomically); return its path."""
    return save_pretrained(random_model(name, dtype, "cpu", seed, overrides), out_dir)


__all__ = ["PRESETS", "preset_raw", "preset_config", "random_model", "write_random_model"]
