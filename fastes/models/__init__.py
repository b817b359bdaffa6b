"""Model definitions (Llama / Qwen2 / Qwen3 / Gemma 3 text), the HF safetensors loader/saver and the tokenizer."""

from __future__ import annotations

from fastes.models.config import ModelConfig
from fastes.models.decoder import CausalLM
from fastes.models.loader import load_model, save_pretrained
from fastes.models.perturbation import Perturbation, measure_scales, perturbed_names
from fastes.models.tokenizer import Tokenizer, load_tokenizer

__all__ = ["ModelConfig", "CausalLM", "load_model", "save_pretrained", "Perturbation", "measure_scales",
           "perturbed_names", "Tokenizer", "load_tokenizer"]
