"""LoRA adapters in PEFT's on-disk format: export a run's adapters, or start a run from an existing adapter.

A PEFT LoRA directory holds ``adapter_config.json`` (``peft_type: LORA``, ``r``,
``lora_alpha``, ``target_modules``, ``use_rslora``...) and ``adapter_model.safetensors``
with tensors named ``base_model.model.<module>.lora_A.weight`` [r, in] and
``….lora_B.weight`` [out, r]; the layer computes x Wᵀ + scaling · x Aᵀ Bᵀ with
scaling = lora_alpha / r (lora_alpha / √r with rsLoRA). fastes keeps the same layout
and one scaling for all adapters (`fastes.models.lora`), so the mapping is names only.

Export writes ``lora_alpha = scaling · r`` and ``use_rslora: false``, which PEFT turns
back into the same scaling. Import accepts plain LoRA on linear weights: per-module
ranks or alphas (``rank_pattern`` / ``alpha_pattern``), DoRA, trained biases,
``modules_to_save`` and Conv1D layouts (``fan_in_fan_out``) are refused with one line,
because fastes' adapters cannot represent them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from fastes.models import lora as lora_lib

__all__ = ["save_peft_adapter", "load_peft_adapter", "read_peft_adapter", "CONFIG_FILE", "WEIGHTS_FILE", "PREFIX"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _target_modules(model: Any) -> list[str]:
    """Short module names (``q_proj``) when the adapters cover every such matrix, else full module paths."""
    adapted = set(model.lora)
    short = sorted({base.rsplit(".", 2)[-2] for base in adapted})
    covered = set(lora_lib.target_weights(model.config.param_shapes(), short))
    if covered == adapted:
        return short
    return sorted(base[: -len(".weight")] for base in adapted)


def save_peft_adapter(model: Any, out_dir: str | Path, base_model: str | Path | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory (created if needed); returns its path."""
    from safetensors.torch import save_file

    if not model.lora:
        raise ValueError("the model has no LoRA adapters to export (population.mode is not lora)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = {tuple(model.params[a].shape)[0] for a, _ in model.lora.values()}
    if len(ranks) != 1:
        raise ValueError(f"adapters of different ranks {sorted(ranks)} cannot be written as one PEFT config")
    rank = ranks.pop()
    tensors = {}
    for base, (name_a, name_b) in model.lora.items():
        stem = PREFIX + base[: -len(".weight")]
        tensors[f"{stem}.lora_A.weight"] = model.params[name_a].detach().to("cpu").contiguous()
        tensors[f"{stem}.lora_B.weight"] = model.params[name_b].detach().to("cpu").contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model) if base_model is not None else None,
        "r": rank,
        "lora_alpha": float(model.lora_scaling) * rank,
        "target_modules": _target_modules(model),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def read_peft_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], float]:
    """(adapter config, {base weight name: (A, B)} as tensors keyed by fastes names, scaling), validated."""
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    config_file, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file():
        raise ValueError(f"PEFT adapter {str(folder)!r}: no {CONFIG_FILE}")
    if not weights.is_file():
        extra = " (adapter_model.bin is not read: re-save it with safetensors)" if (folder / "adapter_model.bin"
                                                                                    ).is_file() else ""
        raise ValueError(f"PEFT adapter {str(folder)!r}: no {WEIGHTS_FILE}{extra}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"PEFT adapter {str(config_file)!r} is not valid JSON: {err}") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"PEFT adapter {str(folder)!r}: peft_type {config.get('peft_type')!r}, only LORA is supported")
    unsupported = [key for key, ok in (("rank_pattern", not config.get("rank_pattern")),
                                       ("alpha_pattern", not config.get("alpha_pattern")),
                                       ("use_dora", not config.get("use_dora")),
                                       ("bias", config.get("bias", "none") == "none"),
                                       ("modules_to_save", not config.get("modules_to_save")),
                                       ("fan_in_fan_out", not config.get("fan_in_fan_out"))) if not ok]
    if unsupported:
        raise ValueError(f"PEFT adapter {str(folder)!r}: {', '.join(unsupported)} not supported by fastes' LoRA")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(weights)).items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight",
                                                                               ".lora_B.weight")
        if not (name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight")):
            raise ValueError(f"PEFT adapter {str(folder)!r}: unexpected tensor {key!r} (only lora_A / lora_B)")
        tensors[name] = tensor
    return config, tensors, scaling


def load_peft_adapter(model: Any, path: str | Path) -> dict[str, Any]:
    """Install the adapters of a PEFT directory on `model` (which must have none yet); returns the adapter config."""
    if model.lora:
        raise ValueError("model already has LoRA adapters")
    config, tensors, scaling = read_peft_adapter(path)
    shapes = model.config.param_shapes()
    pairs: dict[str, tuple[str, str]] = {}
    for name in tensors:
        if name.endswith(".lora_A.weight"):
            base = name[: -len(".lora_A.weight")] + ".weight"
            pairs[base] = lora_lib.adapter_names(base)
    rank = int(config["r"])
    for base, (name_a, name_b) in pairs.items():
        if base not in shapes or len(shapes[base][0]) != 2:
            raise ValueError(f"PEFT adapter {str(path)!r}: {base!r} is not a matrix of this model")
        if name_b not in tensors:
            raise ValueError(f"PEFT adapter {str(path)!r}: {name_a!r} has no matching lora_B")
        out_f, in_f = shapes[base][0]
        for name, want in ((name_a, (rank, in_f)), (name_b, (out_f, rank))):
            if tuple(tensors[name].shape) != want:
                raise ValueError(f"PEFT adapter {str(path)!r}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {want} for r={rank}")
    if not pairs or len(pairs) * 2 != len(tensors):
        raise ValueError(f"PEFT adapter {str(path)!r}: lora_A / lora_B tensors do not pair up")
    for name_a, name_b in pairs.values():
        model.params[name_a] = tensors[name_a].to(device=model.device, dtype=model.dtype).contiguous()
        model.params[name_b] = tensors[name_b].to(device=model.device, dtype=model.dtype).contiguous()
    model.lora = pairs
    model.lora_scaling = float(scaling)
    return config
