"""ModelConfig: the architecture of a decoder-only model, read from a local HF ``config.json``.

config.json is parsed as plain JSON (not through transformers) so that both the
transformers 4.x layout (``rope_theta`` + ``rope_scaling``) and the 5.x layout
(``rope_parameters``) load the same, and so that a bad file fails with one line.

Families are small specs (``FAMILIES``): each says which optional pieces the
architecture has (q/k/v bias, q/k norm, ...). A spec may also return the fields it
parses itself (activation, rope, sliding windows), which the generic parser then
leaves alone: Gemma 3 does, since its config.json describes two ropes (local and
global) and its layer pattern differently from Llama/Qwen. Keys a family's
config.json may leave out take transformers' defaults for that family
(``DEFAULTS``), because transformers fills them in the same way.

Gemma 3 multimodal checkpoints (model_type ``gemma3``) load as their text part: the
config is ``text_config`` (top-level token ids and dtype carried over) and
``raw`` becomes a ``gemma3_text`` config, so a saved copy is a Gemma3ForCausalLM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ROPE = ("default", "linear", "llama3")


def _llama(raw: dict[str, Any]) -> dict[str, Any]:
    bias = bool(raw.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(raw.get("mlp_bias", False)), "qk_norm": False}


def _qwen2(raw: dict[str, Any]) -> dict[str, Any]:
    return {"qkv_bias": True, "o_bias": False, "mlp_bias": False, "qk_norm": False}


def _qwen3(raw: dict[str, Any]) -> dict[str, Any]:
    bias = bool(raw.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": False, "qk_norm": True}


def _gemma3(raw: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3 text: sandwich norms, (1 + w) norms, scaled embeddings, local/global layers with two ropes."""
    if raw.get("attn_logit_softcapping") is not None:
        raise ValueError("attn_logit_softcapping is not supported (Gemma 3 checkpoints set none; Gemma 2 is not "
                         "supported)")
    if raw.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention (embedding models) is not supported: fastes is causal only")
    act = raw.get("hidden_activation") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported hidden_activation {act!r} for gemma3 (supported: gelu_pytorch_tanh)")
    layers = _get(raw, "num_hidden_layers", int)
    types = raw.get("layer_types")
    if types is None:  # 4.x layout: every pattern-th layer is global, the others local
        pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6))
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
            raise ValueError(f"config.json sliding_window_pattern must be a positive integer, got {pattern!r}")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    windows = _sliding({"use_sliding_window": True, "sliding_window": raw.get("sliding_window"),
                        "layer_types": types}, layers)
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & set(params):  # 5.x: per layer type
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    else:  # 4.x: rope_theta + rope_scaling are the global rope, rope_local_base_freq the local one
        full, local = dict(params or raw.get("rope_scaling") or {}), {}
    full.setdefault("rope_theta", raw.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", raw.get("rope_local_base_freq", 10_000.0))
    theta, rope_type, scaling = _rope({"rope_parameters": full})
    local_theta, local_type, local_scaling = _rope({"rope_parameters": local})
    scalar = _get(raw, "query_pre_attn_scalar", float, 256.0)
    if not scalar > 0:
        raise ValueError(f"config.json query_pre_attn_scalar must be positive, got {scalar!r}")
    cap = raw.get("final_logit_softcapping")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
        raise ValueError(f"config.json final_logit_softcapping must be a positive number or null, got {cap!r}")
    bias = bool(raw.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": False, "qk_norm": True, "sandwich_norm": True,
            "hidden_act": act, "sliding_windows": windows, "rope_theta": theta, "rope_type": rope_type,
            "rope_scaling": scaling, "local_rope_theta": local_theta, "local_rope_type": local_type,
            "local_rope_scaling": local_scaling, "attn_scale": scalar**-0.5,
            "embed_scale": _get(raw, "hidden_size", int) ** 0.5, "norm_offset": 1.0,
            "final_logit_softcap": float(cap or 0.0)}


FAMILIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3_text": _gemma3}

# transformers' Gemma3TextConfig defaults: hub configs (the multimodal ones above all) leave these out
DEFAULTS: dict[str, dict[str, Any]] = {"gemma3_text": {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "eos_token_id": 1, "bos_token_id": 2,
    "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096}}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward, the loader and the KV cache need to know about one model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: dict[str, Any] = field(default_factory=dict, compare=False)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False  # Gemma: norms after attention and MLP too, and a separate pre-MLP norm
    sliding_windows: tuple[int | None, ...] = ()
    attn_scale: float = 0.0  # 0: head_dim ** -0.5
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden)
    norm_offset: float = 0.0  # Gemma's RMSNorm uses (offset + weight)
    local_rope_theta: float = 0.0  # > 0: sliding-window layers use this rope (Gemma 3's local layers)
    local_rope_type: str = "default"
    local_rope_scaling: dict[str, Any] = field(default_factory=dict, compare=False)
    final_logit_softcap: float = 0.0  # > 0: logits = cap · tanh(logits / cap)
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or self.head_dim**-0.5

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def param_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """HF parameter name -> (shape, role); role is embedding | lm_head | matrix | norm | bias."""
        h, i, q, kv, d = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size, self.head_dim
        out: dict[str, tuple[tuple[int, ...], str]] = {"model.embed_tokens.weight": ((self.vocab_size, h), "embedding")}
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}."
            out[p + "input_layernorm.weight"] = ((h,), "norm")
            out[p + "post_attention_layernorm.weight"] = ((h,), "norm")
            if self.sandwich_norm:
                out[p + "pre_feedforward_layernorm.weight"] = ((h,), "norm")
                out[p + "post_feedforward_layernorm.weight"] = ((h,), "norm")
            for proj, shape in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))):
                out[p + f"self_attn.{proj}.weight"] = (shape, "matrix")
                if (self.qkv_bias and proj != "o_proj") or (self.o_bias and proj == "o_proj"):
                    out[p + f"self_attn.{proj}.bias"] = ((shape[0],), "bias")
            if self.qk_norm:
                out[p + "self_attn.q_norm.weight"] = ((d,), "norm")
                out[p + "self_attn.k_norm.weight"] = ((d,), "norm")
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                out[p + f"mlp.{proj}.weight"] = (shape, "matrix")
                if self.mlp_bias:
                    out[p + f"mlp.{proj}.bias"] = ((shape[0],), "bias")
        out["model.norm.weight"] = ((h,), "norm")
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = ((self.vocab_size, h), "lm_head")
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a parsed config.json; ValueError (one line) on anything unsupported."""
        return _from_dict(raw)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``path/config.json`` (local files only)."""
        return cls.from_dict(read_config_json(path))


def read_config_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model directory {str(path)!r} does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise ValueError(f"no config.json in {str(path)!r}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object")
    return raw


def _get(raw: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = raw.get(key, default)
    if value is None and default is None:
        raise ValueError(f"config.json lacks {key!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"config.json {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _rope(raw: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
    """(theta, rope type, scaling params) from either the 4.x or the 5.x config layout."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json rope parameters must be an object, got {params!r}")
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"config.json rope_theta must be a positive number, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE:
        raise ValueError(f"unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE)})")
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                             "original_max_position_embeddings")}.get(rope_type, ())
    for key in need:
        if not isinstance(params.get(key), (int, float)) or params[key] <= 0:
            raise ValueError(f"rope type {rope_type!r} needs a positive {key!r}, got {params.get(key)!r}")
    if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ValueError("llama3 rope needs high_freq_factor > low_freq_factor")
    if params.get("partial_rotary_factor", 1.0) != 1.0 or raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    return float(theta), rope_type, {k: v for k, v in params.items() if k not in ("rope_theta",)}


def _sliding(raw: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
    types = raw.get("layer_types")
    if types is None:
        first = raw.get("max_window_layers", num_layers)
        types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers:
        raise ValueError(f"config.json layer_types must list {num_layers} entries")
    bad = sorted(set(types) - {"full_attention", "sliding_attention"})
    if bad:
        raise ValueError(f"unsupported layer type(s) {bad}")
    if "sliding_attention" in types and not (isinstance(window, int) and window > 0):
        raise ValueError(f"sliding attention layers need a positive sliding_window, got {window!r}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return windows if any(w is not None for w in windows) else ()


def _eos(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"config.json eos_token_id must be an int or a list of ints, got {eos!r}")
    return tuple(ids)


def _gemma3_text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The text part of a multimodal ``gemma3`` config.json, as the config.json of a Gemma3ForCausalLM."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ValueError("gemma3 config.json has no text_config object")
    if text.get("model_type", "gemma3_text") != "gemma3_text":
        raise ValueError(f"gemma3 text_config has model_type {text.get('model_type')!r}, expected 'gemma3_text'")
    out = dict(text, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"])
    for key in ("eos_token_id", "bos_token_id", "pad_token_id", "torch_dtype", "dtype"):
        if raw.get(key) is not None:  # hub configs keep these at the top level
            out[key] = raw[key]
    if "tie_word_embeddings" not in out and "tie_word_embeddings" in raw:
        out["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return out


def _from_dict(raw: dict[str, Any]) -> ModelConfig:
    if raw.get("model_type") == "gemma3":
        raw = _gemma3_text_config(raw)
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join([*FAMILIES, "gemma3"])
        raise ValueError(f"unsupported architecture {model_type!r} (supported: {supported})")
    saved = raw
    raw = {**DEFAULTS.get(model_type, {}), **raw}
    family = FAMILIES[model_type](raw)
    hidden = _get(raw, "hidden_size", int)
    heads = _get(raw, "num_attention_heads", int)
    kv_heads = _get(raw, "num_key_value_heads", int, heads)
    head_dim = raw.get("head_dim") or (hidden // heads if heads else 0)
    layers = _get(raw, "num_hidden_layers", int)
    ints = {"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "num_hidden_layers": layers}
    for key, value in ints.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.json {key!r} must be a positive integer, got {value!r}")
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    if "hidden_act" not in family:
        family["hidden_act"] = raw.get("hidden_act", "silu")
        if family["hidden_act"] != "silu":
            raise ValueError(f"unsupported hidden_act {family['hidden_act']!r} (supported: silu)")
    if "rope_theta" not in family:
        theta, rope_type, scaling = _rope(raw)
        family.update(rope_theta=theta, rope_type=rope_type, rope_scaling=scaling)
    if "sliding_windows" not in family:
        family["sliding_windows"] = _sliding(raw, layers)
    eps = _get(raw, "rms_norm_eps", float, 1e-6)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"config.json rms_norm_eps must be positive, got {eps!r}")
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    bos = raw.get("bos_token_id")
    return ModelConfig(
        model_type=model_type,
        vocab_size=_get(raw, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_get(raw, "intermediate_size", int),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        max_position_embeddings=_get(raw, "max_position_embeddings", int, 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=dtype if isinstance(dtype, str) else None,
        bos_token_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
        eos_token_ids=_eos(raw),
        raw=dict(saved),
        **family,
    )


__all__ = ["ModelConfig", "FAMILIES", "DEFAULTS", "SUPPORTED_ROPE", "read_config_json"]
