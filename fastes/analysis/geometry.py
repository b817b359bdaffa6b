"""Update geometry: how large, how aligned and how low-rank the change Δ = θ_run − θ_base of each run is.

ES moves θ along sums of random directions while GRPO follows gradients, so the two can
reach similar rewards with very different updates. Per parameter we report ‖Δ‖_F,
‖Δ‖/‖W‖, the cosine between two runs' Δ, and (for matrices) the fraction of Δ's energy
Σ_{i≤k} s_i² / Σ s_i² in its top-k singular directions; sums of squares and dot products
are kept so that per-layer, per-module-kind and total numbers aggregate exactly.
Checkpoints are HF directories read through ``fastes.models.load_model`` (safetensors).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from fastes.models import CausalLM, load_model

DEFAULT_TOP_K = (1, 4, 16)
DEFAULT_SVD_MAX_ELEMENTS = 1 << 26  # 67M: skips the SVD of 150k-vocabulary embeddings unless asked
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def layer_group(name: str) -> str:
    """'layers.3' for a decoder-layer parameter, else the parameter's role (embed_tokens, final_norm, lm_head)."""
    m = _LAYER.match(name)
    if m:
        return f"layers.{m.group(1)}"
    if name.startswith("model.embed_tokens"):
        return "embed_tokens"
    if name.startswith("model.norm"):
        return "final_norm"
    return name.removesuffix(".weight")


def module_kind(name: str) -> str:
    """The parameter's name without its layer index ('self_attn.q_proj.weight'): aggregates across layers."""
    m = _LAYER.match(name)
    return m.group(2) if m else layer_group(name)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) in fp64; NaN when either is zero (the angle is undefined, not 0)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return math.nan
    return float(torch.dot(a, b) / (na * nb))


def topk_energy(delta: torch.Tensor, ks: Sequence[int] = DEFAULT_TOP_K) -> dict[int, float]:
    """Fraction of ‖Δ‖_F² in the top-k singular directions of a matrix, for each k; NaN for Δ = 0."""
    if delta.dim() != 2:
        raise ValueError(f"topk_energy needs a matrix, got shape {tuple(delta.shape)}")
    s2 = torch.linalg.svdvals(delta.float()).double().pow(2)
    total = float(s2.sum())
    if total == 0:
        return {k: math.nan for k in ks}
    cum = torch.cumsum(s2, 0)
    return {k: min(1.0, float(cum[min(k, s2.numel()) - 1]) / total) for k in ks}


def stable_rank(delta: torch.Tensor) -> float:
    """‖Δ‖_F² / ‖Δ‖₂²: a smooth count of the directions that carry the update."""
    s = torch.linalg.svdvals(delta.float()).double()
    return float(s.pow(2).sum() / s[0].pow(2)) if s.numel() and s[0] > 0 else math.nan


@dataclass
class _Sums:
    weight_sq: float = 0.0
    delta_sq: dict[str, float] = field(default_factory=dict)
    dots: dict[str, float] = field(default_factory=dict)

    def add(self, other: _Sums) -> None:
        self.weight_sq += other.weight_sq
        for key, value in other.delta_sq.items():
            self.delta_sq[key] = self.delta_sq.get(key, 0.0) + value
        for key, value in other.dots.items():
            self.dots[key] = self.dots.get(key, 0.0) + value

    def summary(self, runs: Sequence[str], pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        w = math.sqrt(self.weight_sq)
        out: dict[str, Any] = {"weight_norm": w, "delta_norm": {}, "relative": {}, "cosine": {}}
        for run in runs:
            d = math.sqrt(self.delta_sq.get(run, 0.0))
            out["delta_norm"][run] = d
            out["relative"][run] = d / w if w > 0 else math.nan
        for a, b in pairs:
            da, db = self.delta_sq.get(a, 0.0), self.delta_sq.get(b, 0.0)
            out["cosine"][pair_key(a, b)] = self.dots.get(pair_key(a, b), 0.0) / math.sqrt(da * db) \
                if da > 0 and db > 0 else math.nan
        return out


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


@dataclass
class Geometry:
    """Per-parameter rows, per-layer / per-kind aggregates and totals of Δ for every run (and run pair)."""

    runs: list[str]
    params: list[dict[str, Any]]
    layers: dict[str, dict[str, Any]]
    kinds: dict[str, dict[str, Any]]
    total: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> dict[str, Any]:
        for row in self.params:
            if row["name"] == name:
                return row
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "total": self.total, "layers": self.layers, "kinds": self.kinds,
                "params": self.params, "settings": self.settings}


def _load(model: str | Path | CausalLM) -> dict[str, torch.Tensor]:
    if isinstance(model, CausalLM):
        return model.hf_state_dict()
    return load_model(model, dtype=torch.float32, device="cpu").hf_state_dict()


def update_geometry(base: str | Path | CausalLM, runs: Mapping[str, str | Path | CausalLM],
                    top_k: Sequence[int] = DEFAULT_TOP_K, svd_max_elements: int = DEFAULT_SVD_MAX_ELEMENTS,
                    device: str | torch.device = "cpu") -> Geometry:
    """Geometry of Δ_run = θ_run − θ_base for each run; cosines for every pair of runs.

    Matrices with more than ``svd_max_elements`` entries get no SVD numbers (None); ``device``
    is where the SVDs run (a GPU makes 7B-scale matrices quick).
    """
    if not runs:
        raise ValueError("give at least one run to compare with the base")
    ks = sorted({int(k) for k in top_k})
    if not ks or ks[0] < 1:
        raise ValueError(f"top_k values must be >= 1, got {list(top_k)}")
    labels = list(runs)
    pairs = list(combinations(labels, 2))
    theta0 = _load(base)
    thetas = {label: _load(run) for label, run in runs.items()}
    for label, theta in thetas.items():
        if {n: tuple(t.shape) for n, t in theta.items()} != {n: tuple(t.shape) for n, t in theta0.items()}:
            raise ValueError(f"run {label!r} has different parameter names or shapes than the base")
    rows: list[dict[str, Any]] = []
    layers: dict[str, _Sums] = {}
    kinds: dict[str, _Sums] = {}
    total = _Sums()
    for name, w in theta0.items():
        w64 = w.double()
        sums = _Sums(weight_sq=float(w64.pow(2).sum()))
        deltas = {label: thetas[label][name].double() - w64 for label in labels}
        for label, d in deltas.items():
            sums.delta_sq[label] = float(d.pow(2).sum())
        for a, b in pairs:
            sums.dots[pair_key(a, b)] = float((deltas[a] * deltas[b]).sum())
        row: dict[str, Any] = {"name": name, "shape": list(w.shape), "layer": layer_group(name),
                               "kind": module_kind(name), **sums.summary(labels, pairs)}
        if w.dim() == 2:
            do_svd = w.numel() <= svd_max_elements
            row["energy"] = {label: ({str(k): v for k, v in topk_energy(d.to(device), ks).items()}
                                     if do_svd else None) for label, d in deltas.items()}
            row["stable_rank"] = {label: stable_rank(d.to(device)) if do_svd else None for label, d in deltas.items()}
        rows.append(row)
        layers.setdefault(row["layer"], _Sums()).add(sums)
        kinds.setdefault(row["kind"], _Sums()).add(sums)
        total.add(sums)
        del deltas
    summary = total.summary(labels, pairs)
    summary["mean_energy"] = _mean_energy(rows, labels, ks)
    return Geometry(labels, rows, {k: v.summary(labels, pairs) for k, v in layers.items()},
                    {k: v.summary(labels, pairs) for k, v in kinds.items()}, summary,
                    {"base": str(base if not isinstance(base, CausalLM) else base.source_dir),
                     "runs": {k: str(v if not isinstance(v, CausalLM) else v.source_dir) for k, v in runs.items()},
                     "top_k": ks, "svd_max_elements": svd_max_elements})


def _mean_energy(rows: list[dict[str, Any]], labels: Sequence[str], ks: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Mean top-k energy fraction over the matrices that had an SVD and a nonzero Δ, per run."""
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        values = [r["energy"][label] for r in rows if r.get("energy") and r["energy"][label] is not None]
        out[label] = {}
        for k in ks:
            vals = [v[str(k)] for v in values if not math.isnan(v[str(k)])]
            out[label][str(k)] = sum(vals) / len(vals) if vals else math.nan
    return out


def layer_index(group: str) -> int | None:
    """The decoder layer number of a 'layers.N' group (None for embeddings, final norm, lm_head)."""
    return int(group.split(".")[1]) if group.startswith("layers.") else None


__all__ = ["Geometry", "update_geometry", "topk_energy", "stable_rank", "cosine", "layer_group", "module_kind",
           "layer_index", "pair_key", "DEFAULT_TOP_K", "DEFAULT_SVD_MAX_ELEMENTS"]
