"""Load an HF directory into a CausalLM (safetensors only, never pickle), and save one back.

Loading is strict: every tensor the config implies must be present with its exact
shape, and nothing else may be (beyond known-harmless extras such as rotary
``inv_freq`` buffers), because a silently missing or ignored tensor makes a model
that generates plausible nonsense. Errors are one-line ValueErrors.

Multimodal Gemma 3 checkpoints (model_type ``gemma3``) load as their text part: the
language model's tensors are renamed to the Gemma3ForCausalLM names (``model.…``,
``lm_head.weight``) and the vision tower and projector are skipped; saving such a
model writes a text-only gemma3_text directory.

Saving writes into a temporary sibling directory and renames it into place, so a
kill leaves either the previous directory or the complete new one, never a mix. It
never deletes what fastes did not write: the target must be new, empty, or a previous
fastes export (recognized by the EXPORT_MARKER file written into every export); the
staging leftovers of a killed save (``.NAME.tmp-*``, ``.NAME.old-*``) are removed by the
next save of the same directory. Non-finite weights are refused both ways: a model that
loads with NaN/inf generates pad tokens, and one saved with them is lost work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastes._fsutil import chmod_files_like_open, chmod_like_mkdir, fsync_dir, fsync_tree
from fastes.models.config import ModelConfig, read_config_json
from fastes.models.decoder import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_EXTRAS = re.compile(r".*\.rotary_emb\.inv_freq$")
# multimodal gemma3: stored prefix -> text model prefix (transformers 4.50 / hub layout, then >= 4.52 layout)
TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."))
NON_TEXT = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
EXPORT_MARKER = ".fastes-export"  # in every directory save_pretrained writes: "safe to replace"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def _short(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the shard index or the single model.safetensors."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{str(index)!r} is not a valid safetensors index: {err!r}") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{str(index)!r}: weight_map must be an object")
        files = {name: path / str(shard) for name, shard in weight_map.items()}
        missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing:
            raise ValueError(f"shard(s) listed in {INDEX_FILE} are missing from {str(path)!r}: {_short(missing)}")
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {_short(pickled)}: pickle checkpoints are not loaded)" if pickled else ""
        raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(path)!r}{hint}")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {str(single)!r}: {err}") from None


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> CausalLM:
    """Read config.json and the safetensors weights of ``path``; cast to ``dtype`` and move to ``device``."""
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
    raw = read_config_json(path)
    config = ModelConfig.from_dict(raw)
    expected = config.param_shapes()
    files = weight_files(path)
    stored = {name: name for name in files}  # our (HF text model) name -> name inside the file
    if raw.get("model_type") == "gemma3":
        stored, files = _text_part(files)
    tied_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [n for n in expected if n not in files]
    unexpected = [n for n in files if n not in expected and n not in tied_extra and not IGNORED_EXTRAS.match(n)]
    if missing:
        raise ValueError(f"checkpoint in {str(path)!r} lacks {len(missing)} tensor(s): {_short(missing)}")
    if unexpected:
        raise ValueError(f"checkpoint in {str(path)!r} has {len(unexpected)} unexpected tensor(s): "
                         f"{_short(unexpected)}")
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    params: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    tensor = f.get_tensor(stored[name])
                    shape = expected[name][0]
                    if tuple(tensor.shape) != shape:
                        raise ValueError(f"tensor {name!r} in {file.name} has shape {tuple(tensor.shape)}, "
                                         f"config implies {shape}")
                    if not tensor.is_floating_point():
                        raise ValueError(f"tensor {name!r} in {file.name} has non-float dtype {tensor.dtype}")
                    if not bool(torch.isfinite(tensor).all()):
                        raise ValueError(f"tensor {name!r} in {str(file)!r} holds NaN or inf values: the model is "
                                         "corrupt (a diverged run?) and would generate garbage")
                    params[name] = tensor.to(device=device, dtype=dtype).contiguous()
                    if not bool(torch.isfinite(params[name]).all()):
                        raise ValueError(f"tensor {name!r} in {file.name} overflows {DTYPES[dtype]} (inf after the "
                                         "cast); load it in a wider dtype")
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {str(file)!r}: {str(err).splitlines()[0] if str(err) else err!r}") from None
    return CausalLM(config, params, source_dir=path)


def _text_part(files: dict[str, Path]) -> tuple[dict[str, str], dict[str, Path]]:
    """Renamed language-model tensors of a multimodal checkpoint: (name -> stored name, name -> file)."""
    stored: dict[str, str] = {}
    for name in files:
        if NON_TEXT.match(name):
            continue
        new = next((short + name[len(long):] for long, short in TEXT_PREFIXES if name.startswith(long)), name)
        stored[new] = name
    return stored, {new: files[old] for new, old in stored.items()}


def _config_for_save(model: CausalLM) -> dict[str, Any]:
    raw = dict(model.config.raw)
    name = DTYPES[model.dtype]
    if "dtype" in raw:
        raw["dtype"] = name
    raw["torch_dtype"] = name
    return raw


def save_pretrained(model: CausalLM, out_dir: str | Path, max_shard_bytes: int | None = None,
                    source_dir: str | Path | None = None) -> Path:
    """Write ``out_dir`` as an HF directory (config.json, safetensors, tokenizer files) atomically.

    ``out_dir`` must be new, an empty directory, or a previous fastes export (it is then
    replaced as a whole); anything else is a one-line ValueError, so a typo cannot wipe a
    user's directory. LoRA adapters are merged into their weights so that transformers
    loads the model as is. ``max_shard_bytes`` splits the weights into shards with an index
    (one file when None). Tokenizer / generation files are copied from ``source_dir``
    (default: where the model was loaded). Files get the modes the umask gives.
    """
    out_dir = Path(out_dir).resolve()
    _check_target(out_dir)
    state = {n: t.detach().to("cpu").contiguous() for n, t in model.hf_state_dict().items()}
    bad = [n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"save_pretrained: refusing to save non-finite (NaN/inf) weights in {_short(bad)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_staging_leftovers(out_dir.parent, out_dir.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_weights(state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(_config_for_save(model), indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
        source = Path(source_dir) if source_dir is not None else model.source_dir
        if source is not None:  # read before the old directory moves away, so saving in place works
            for fname in TOKENIZER_FILES:
                if (source / fname).is_file():
                    shutil.copyfile(source / fname, tmp / fname)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": "fastes-export", "version": 1}) + "\n",
                                         encoding="utf-8")
        chmod_files_like_open(tmp)
        fsync_tree(tmp)
        chmod_like_mkdir(tmp)  # mkdtemp made it 0700
        old = None
        if out_dir.exists() and any(out_dir.iterdir()):  # a previous export: swap it out, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "d")
        os.replace(tmp, out_dir)  # over an empty directory, or into a free name: atomic either way
        fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_target(out_dir: Path) -> None:
    """ValueError unless ``out_dir`` is free, an empty directory, or a directory fastes exported before."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ValueError(f"save_pretrained: {str(out_dir)!r} exists and is not a directory; refusing to replace it")
    if not out_dir.exists():
        return
    cwd = Path.cwd().resolve()
    if out_dir == cwd or out_dir in cwd.parents:
        raise ValueError(f"save_pretrained: {str(out_dir)!r} is (or holds) the working directory; save into a "
                         "new subdirectory")
    if any(out_dir.iterdir()) and not (out_dir / EXPORT_MARKER).is_file():
        raise ValueError(f"save_pretrained: {str(out_dir)!r} is a non-empty directory that fastes did not write "
                         f"(no {EXPORT_MARKER}); choose a new or empty directory")


def remove_staging_leftovers(parent: Path, name: str) -> None:
    """Delete the ``.NAME.tmp-XXXXXXXX`` / ``.NAME.old-XXXXXXXX`` directories a killed save of NAME left."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-[A-Za-z0-9_]{{8}}$")
    try:
        children = list(parent.iterdir())
    except OSError:
        return
    for child in children:
        if pattern.match(child.name) and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)


def _write_weights(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None) -> None:
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(state, str(out / SINGLE_FILE), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


__all__ = ["load_model", "save_pretrained", "weight_files", "TOKENIZER_FILES", "EXPORT_MARKER",
           "remove_staging_leftovers"]
