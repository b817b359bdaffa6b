"""Member noise materialized on a device with the fastest available noise backend.

The CPU paths of the population ops use this (C++ fill when built); GPU kernels
never call it, they regenerate noise in registers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

import torch

from fastes import _backend
from fastes.noise import KIND_INT, NoiseSpec, member_noise_tensor, tensor_id
from fastes.ops.noise import noise_fill

CACHE_BYTES = 256 << 20
_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_cache_bytes = 0


def _cached(key: tuple, make: object) -> torch.Tensor:
    """LRU over CPU noise: a step's forwards reuse every member's factors; noise is a pure function of the key."""
    global _cache_bytes
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    value = make()  # type: ignore[operator]
    size = value.numel() * value.element_size()
    if size <= CACHE_BYTES // 4:
        _cache[key] = value
        _cache_bytes += size
        while _cache_bytes > CACHE_BYTES:
            _, old = _cache.popitem(last=False)
            _cache_bytes -= old.numel() * old.element_size()
    return value


def clear_cache() -> None:
    global _cache_bytes
    _cache.clear()
    _cache_bytes = 0


def stream_tensor(spec: NoiseSpec, name: str, index: int, numel: int, offset: int = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements offset.. of one noise stream as float32 [numel] on ``device`` (read-only: it may be cached)."""
    def make() -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32, device=device)
        noise_fill(out, spec.seed, tensor_id(name), index, spec.step, offset, spec.kind)
        return out

    if torch.device(device).type != "cpu":
        return make()
    return _cached((spec.seed, spec.step, spec.kind, name, index, numel, offset), make)


def stream_tensors(spec: NoiseSpec, name: str, indices: list[int], numel: int, offset: int = 0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Several indices' streams as the rows of one fresh float32 [K, numel] tensor on ``device``.

    Rows already in the cache are copied; the others are filled in one call (the C++
    ``noise_fill_many``: one thread team for all rows) and not cached, since callers such as the
    update read them once.
    """
    device = torch.device(device)
    out = torch.empty((len(indices), numel), dtype=torch.float32, device=device)
    missing: list[int] = []
    for row, index in enumerate(indices):
        key = (spec.seed, spec.step, spec.kind, name, index, numel, offset)
        hit = _cache.get(key) if device.type == "cpu" else None
        if hit is None:
            missing.append(row)
        else:
            out[row] = hit
    if not missing or numel == 0:
        return out
    rows = out if len(missing) == len(indices) else torch.empty((len(missing), numel), dtype=torch.float32,
                                                                 device=device)
    many = getattr(_backend.extension(), "noise_fill_many", None) if device.type == "cpu" else None
    if many is not None:
        many(rows, spec.seed, tensor_id(name), [indices[r] for r in missing], spec.step, offset, KIND_INT[spec.kind])
    else:
        for j, row in enumerate(missing):
            noise_fill(rows[j], spec.seed, tensor_id(name), indices[row], spec.step, offset, spec.kind)
    if rows is not out:
        out[missing] = rows
    return out


def dense(spec: NoiseSpec, name: str, member: int, shape: tuple[int, ...],
          device: torch.device | str = "cpu") -> torch.Tensor:
    """Signed dense E_m (float32), a fresh tensor."""
    values, sign = dense_unsigned(spec, name, member, shape, device)
    return values.clone() if sign > 0 else -values


def dense_unsigned(spec: NoiseSpec, name: str, member: int, shape: tuple[int, ...],
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """(E of the member's noise index, read-only and possibly cached; its antithetic sign): E_m = sign · E."""
    index, sign = spec.member(member)
    return stream_tensor(spec, name, index, math.prod(shape), 0, device).reshape(shape), sign


def lowrank_factors(spec: NoiseSpec, name: str, member: int, out_features: int, in_features: int, rank: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A [out, r], B [in, r], sign) of member ``member``; E_m = sign · A Bᵀ / √r. A and B are read-only."""
    index, sign = spec.member(member)
    flat = stream_tensor(spec, name, index, (in_features + out_features) * rank, 0, device)
    b = flat[: in_features * rank].reshape(in_features, rank)
    a = flat[in_features * rank :].reshape(out_features, rank)
    return a, b, sign


def stacked_lowrank(spec: NoiseSpec, name: str, members: tuple[int, ...], out_features: int, in_features: int,
                    rank: int, device: torch.device | str = "cpu",
                    scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale·sign_m·A_mᵀ stacked [M, r, out], B_mᵀ stacked [M, r, in]) for ``members``; read-only, cached on CPU.

    Every linear of every forward in a step asks for the same stack, so it is built once. The factors
    are stored transposed (rank-major) so the CPU products read them along their long, contiguous
    dimension: (X_m B_m) as X_m·(B_mᵀ)ᵀ and its product with A_mᵀ run 2-4x faster than with inner
    stride r (measured for the demo's shapes, BENCHMARKS.md "The demo ES step").
    """

    def make() -> torch.Tensor:
        # every member's stream in one fill (the rows lowrank_factors reads one at a time), then transposed
        pairs = [spec.member(m) for m in members]
        flat = stream_tensors(spec, name, [i for i, _ in pairs], (in_features + out_features) * rank, 0, device)
        signs = torch.tensor([s * scale for _, s in pairs], dtype=torch.float32, device=flat.device)
        a = flat[:, in_features * rank :].view(len(members), out_features, rank).transpose(1, 2) * signs.view(-1, 1, 1)
        b = flat[:, : in_features * rank].view(len(members), in_features, rank).transpose(1, 2)
        return torch.cat([a.reshape(len(members), -1), b.reshape(len(members), -1)], dim=1)

    key = ("stacked-lowrank-t", spec.seed, spec.step, spec.kind, spec.antithetic, name, members, out_features,
           in_features, rank, scale)
    both = make() if torch.device(device).type != "cpu" else _cached(key, make)
    split = out_features * rank
    return (both[:, :split].reshape(len(members), rank, out_features),
            both[:, split:].reshape(len(members), rank, in_features))


def dense_member(spec: NoiseSpec, name: str, member: int, shape: tuple[int, ...], mode: str, rank: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Signed E_m in any mode, dense (fp32): used for ``engine.perturbation`` and CPU caches."""
    if mode == "lowrank" and len(shape) == 2:
        a, b, sign = lowrank_factors(spec, name, member, shape[0], shape[1], rank, device)
        return (a @ b.T).mul_(sign / math.sqrt(rank))
    return dense(spec, name, member, shape, device)


def fold_coefficients(noise: NoiseSpec, coeffs: torch.Tensor) -> list[tuple[int, float]]:
    """(noise index, Σ sign·c) per distinct index, in index order, zeros dropped (fp64 sums)."""
    folded: dict[int, float] = {}
    for m, c in enumerate(coeffs.double().tolist()):
        index, sign = noise.member(m)
        folded[index] = folded.get(index, 0.0) + sign * c
    return [(i, c) for i, c in sorted(folded.items()) if c != 0.0]


def reference_weights(weight: torch.Tensor, row_member: torch.Tensor | None, rows: int, noise: NoiseSpec | None,
                      sigma: float, scale: float, mode: str, rank: int, name: str
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For the ops' oracles: (row mask, W + σ·s·E_m) per member in ``row_member`` (−1 or no noise: W itself).

    W and E_m (the pure-Python reference noise) are fp32 on the CPU; ``rows``: the row count when
    ``row_member`` is None (every row unperturbed).
    """
    w32 = weight.float().cpu()
    members = row_member.cpu() if row_member is not None else torch.full((rows,), -1)
    for m in torch.unique(members).tolist():
        w = w32
        if m >= 0 and noise is not None:
            w = w32 + sigma * scale * member_noise_tensor(noise, name, m, tuple(weight.shape), mode, rank)
        yield members == m, w
