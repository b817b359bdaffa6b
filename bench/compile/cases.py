"""The one list of what the compile gate drives: launcher names, device-check patches, and cases.

Everything here that names a fastes internal is in ``LAUNCHERS`` and ``DEVICE_CHECKS``; a rename in
fastes/ops is a one-line change here. Each case calls a real launcher on ``meta`` tensors at Qwen2.5
shapes (N = 32 members x 16 prompts = 512 decode rows, an 8192-token prefill budget), so the
launcher picks its own tiles, warps, stages and grid; autotuned launchers compile every config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# name used by the cases -> "module:attribute" of the launcher
LAUNCHERS = {
    "noise_fill": "fastes.ops.noise:noise_fill_triton",
    "philox_blocks": "fastes.ops.noise:philox_blocks_triton",
    "linear": "fastes.ops.perturbed_linear_triton:perturbed_linear_triton",
    "lowrank_shrink": "fastes.ops.perturbed_linear_triton:lowrank_shrink",
    "embedding": "fastes.ops.perturbed_embedding:perturbed_embedding_triton",
    "lora": "fastes.ops.lora_linear:lora_linear_triton",
    "lora_shrink_group": "fastes.ops.lora_linear:lora_shrink_group",
    "write_kv": "fastes.ops.attention_triton:write_kv_triton",
    "attention": "fastes.ops.attention_triton:paged_attention_triton",
    "num_splits": "fastes.ops.attention_triton:default_num_splits",
    "es_update": "fastes.ops.es_update_triton:plan_es_update",
    "round": "fastes.ops.stochastic_round:_round_triton",
}

# "Am I on CUDA?" checks that a meta tensor would fail, answered "yes" while the gate runs
# (fastes._backend.triton_interpreted / require_triton are always patched; see patches.py).
# "module:function" -> replacement kind: "noop" (a check), "sms" (returns the H100's SM count),
# "rewrite" (the function's own source with `x.device.type != "cuda"` read as False).
DEVICE_CHECKS = {
    "fastes.ops.attention_triton:_check_device": "noop",
    "fastes.ops.attention_triton:_sm_count": "sms",
    "fastes.ops.es_update_triton:plan_es_update": "rewrite",
}

# Kernels whose spills fail the gate (issue 15: GEMMs, shrink/expand, attention, update, noise).
HOT_KERNELS = frozenset({
    "_gemm_kernel", "_shrink_kernel", "_expand_kernel", "_epilogue_kernel", "_prefill_kernel", "_decode_kernel",
    "_lowrank_kernel", "_lowrank_factors_kernel", "_full_kernel", "_noise_fill_kernel", "_full_gemm_kernel",
})


@dataclass(frozen=True)
class Model:
    """The layer shapes of one model that the kernels see."""

    name: str
    hidden: int
    inter: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 151936


QWEN_05B = Model("qwen2.5-0.5b", 896, 4864, 14, 2, 64)
QWEN_15B = Model("qwen2.5-1.5b", 1536, 8960, 12, 2, 128)
MEMBERS, PROMPTS = 32, 16
DECODE_ROWS = MEMBERS * PROMPTS  # one token per sequence per decode step
PREFILL_ROWS = 8192              # the scheduler's default max_num_batched_tokens
BLOCK_SIZE = 16                  # KV-cache block size


@dataclass(frozen=True)
class Case:
    """One launcher call; ``subset`` cases form the quick gate of ``make test``."""

    name: str
    run: Callable[[], None]
    subset: bool = False


def launcher(name: str) -> Callable[..., Any]:
    """The launcher registered under ``name`` (imported on first use)."""
    module, attr = LAUNCHERS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def _meta(shape: tuple[int, ...], dtype: Any) -> Any:
    import torch
    return torch.empty(shape, dtype=dtype, device="meta")


def _rows(t: int) -> Any:
    import torch
    return torch.empty((t,), dtype=torch.int32, device="meta")  # row_member: only dtype and shape matter


def _linears(m: Model) -> dict[str, tuple[int, int, bool]]:
    """name -> (out, in, bias) of the projections whose shapes differ."""
    return {"q": (m.q_heads * m.head_dim, m.hidden, True), "k": (m.kv_heads * m.head_dim, m.hidden, True),
            "o": (m.hidden, m.q_heads * m.head_dim, False), "up": (m.inter, m.hidden, False),
            "down": (m.hidden, m.inter, False)}


def _noise_cases(specs: dict[str, Any]) -> list[Case]:
    import torch
    cases = []
    n = QWEN_15B.inter * QWEN_15B.hidden
    for kind in ("gaussian", "rademacher"):
        for ew in (False, True):
            def run(kind: str = kind, ew: bool = ew) -> None:
                launcher("noise_fill")(_meta((n,), torch.float32), 2**40 + 3, 77, 5, 1, 0, kind, elementwise=ew)
            cases.append(Case(f"noise_fill {kind}{' elementwise' if ew else ''}", run, subset=not ew))
    cases.append(Case("philox_blocks", lambda: launcher("philox_blocks")(2**64 - 1, 5, 6, 7, 0, 2**20,
                                                                         device="meta")))
    return cases


def _linear_cases(specs: dict[str, Any]) -> list[Case]:
    import torch
    cases = []
    for m in (QWEN_15B, QWEN_05B):
        for dtype in (torch.bfloat16, torch.float32):
            dname = "bf16" if dtype == torch.bfloat16 else "fp32"
            for mode, kinds in (("plain", [None]), ("lowrank", ["gaussian", "rademacher"]),
                                ("full", ["gaussian", "rademacher"])):
                for kind in kinds:
                    for lname, (out_f, in_f, bias) in _linears(m).items():
                        rows = (DECODE_ROWS, PREFILL_ROWS) if lname in ("q", "up") else (DECODE_ROWS,)
                        for t in rows:
                            def run(dtype: Any = dtype, out_f: int = out_f, in_f: int = in_f, bias: bool = bias,
                                    t: int = t, kind: str | None = kind, mode: str = mode) -> None:
                                spec = specs[kind] if kind else None
                                launcher("linear")(_meta((t, in_f), dtype), _meta((out_f, in_f), dtype),
                                                   _meta((out_f,), dtype) if bias else None,
                                                   _rows(t) if spec else None, spec, 1e-3, 0.02,
                                                   "full" if mode == "plain" else mode, 1, "w")
                            quick = m is QWEN_15B and dtype == torch.bfloat16 and lname == "q" and t == DECODE_ROWS \
                                and kind != "rademacher"
                            cases.append(Case(f"linear {mode} {kind or ''} {dname} {m.name} {lname} T={t}".replace(
                                "  ", " "), run, subset=quick))
    for rank in (4, 8):
        def run_rank(rank: int = rank) -> None:
            m = QWEN_15B
            launcher("linear")(_meta((DECODE_ROWS, m.hidden), torch.bfloat16),
                               _meta((m.inter, m.hidden), torch.bfloat16), None, _rows(DECODE_ROWS),
                               specs["gaussian"], 1e-3, 0.02, "lowrank", rank, "w")
        cases.append(Case(f"linear lowrank gaussian bf16 up rank={rank}", run_rank))
    for m in (QWEN_15B, QWEN_05B):  # the decoder's grouped lowrank shrinks: one launch for q/k/v, one for gate/up
        for dtype in (torch.bfloat16, torch.float32):
            for kind in ("gaussian", "rademacher"):
                for group in ("qkv", "gate+up"):
                    def run_group(m: Model = m, dtype: Any = dtype, kind: str = kind, group: str = group) -> None:
                        names = ["q", "k", "v"] if group == "qkv" else ["gate", "up"]
                        launcher("lowrank_shrink")(_meta((DECODE_ROWS, m.hidden), dtype), _rows(DECODE_ROWS),
                                                   specs[kind], names, [1e-3] * len(names), 1)
                    dname = "bf16" if dtype == torch.bfloat16 else "fp32"
                    cases.append(Case(f"lowrank shrink {group} {kind} {dname} {m.name} T={DECODE_ROWS}", run_group))
    for t in (1, 3):  # the small CUDA-graph decode buckets (T == 1 and T % 16 != 0 specialisations)
        for mode, kind in (("plain", None), ("lowrank", "gaussian"), ("full", "gaussian")):
            def run_small(t: int = t, mode: str = mode, kind: str | None = kind) -> None:
                h = QWEN_15B.hidden
                spec = specs[kind] if kind else None
                launcher("linear")(_meta((t, h), torch.bfloat16), _meta((h, h), torch.bfloat16),
                                   _meta((h,), torch.bfloat16), _rows(t) if spec else None, spec, 1e-3, 0.02,
                                   "full" if mode == "plain" else mode, 1, "w")
            cases.append(Case(f"linear {mode} bf16 T={t} (graph bucket)", run_small))

    def run_lm_head() -> None:
        m = QWEN_15B
        launcher("linear")(_meta((DECODE_ROWS, m.hidden), torch.bfloat16), _meta((m.vocab, m.hidden), torch.bfloat16),
                           None, None, None, 0.0, 1.0, "full", 1, "lm_head")
    cases.append(Case("linear plain bf16 lm_head", run_lm_head))
    return cases


def _embedding_lora_cases(specs: dict[str, Any]) -> list[Case]:
    import torch
    cases = []
    m = QWEN_15B
    for mode, rank, kind in (("full", 1, "gaussian"), ("full", 1, "rademacher"), ("lowrank", 1, "gaussian"),
                             ("lowrank", 8, "rademacher"), (None, 1, None)):
        for dtype in (torch.bfloat16, torch.float32):
            def run(mode: str | None = mode, rank: int = rank, kind: str | None = kind, dtype: Any = dtype) -> None:
                ids = torch.empty((DECODE_ROWS,), dtype=torch.long, device="meta")
                spec = specs[kind] if kind else None
                launcher("embedding")(ids, _meta((m.vocab, m.hidden), dtype), _rows(DECODE_ROWS) if spec else None,
                                      spec, 1e-3 if spec else 0.0, 0.02, mode or "full", rank, "embed")
            dname = "bf16" if dtype == torch.bfloat16 else "fp32"
            quick = mode == "lowrank" and rank == 1 and dtype == torch.bfloat16
            cases.append(Case(f"embedding {mode or 'plain'} {kind or ''} r={rank} {dname}".replace("  ", " "), run,
                              subset=quick))
    for model in (QWEN_15B, QWEN_05B):  # rank 8 at every projection shape (the cost model's LoRA decode step)
        for lname, (out_f, in_f, _) in _linears(model).items():
            def run_proj(out_f: int = out_f, in_f: int = in_f) -> None:
                t, bf16 = DECODE_ROWS, torch.bfloat16
                launcher("lora")(_meta((t, in_f), bf16), _meta((out_f, in_f), bf16), None, _meta((8, in_f), bf16),
                                 _meta((out_f, 8), bf16), 2.0, _rows(t), specs["gaussian"], 0.1, "a", "b")
            cases.append(Case(f"lora r=8 gaussian bf16 {model.name} {lname} T={DECODE_ROWS}", run_proj))
        for dtype in (torch.bfloat16, torch.float32):  # the decoder's grouped LoRA shrinks: q/k/v, gate/up
            for kind in ("gaussian", "rademacher"):
                for group in ("qkv", "gate+up"):
                    def run_group(model: Model = model, dtype: Any = dtype, kind: str = kind,
                                  group: str = group) -> None:
                        names = ["q", "k", "v"] if group == "qkv" else ["gate", "up"]
                        launcher("lora_shrink_group")(_meta((DECODE_ROWS, model.hidden), dtype),
                                                      [_meta((8, model.hidden), dtype)] * len(names),
                                                      _rows(DECODE_ROWS), specs[kind], 0.1, names)
                    dname = "bf16" if dtype == torch.bfloat16 else "fp32"
                    cases.append(Case(f"lora shrink {group} r=8 {kind} {dname} {model.name} T={DECODE_ROWS}",
                                      run_group))
    for dtype in (torch.bfloat16, torch.float32):
        for rank, (out_f, in_f) in ((8, (m.hidden, m.hidden)), (16, (m.hidden, m.hidden)), (64, (m.inter, m.hidden))):
            for kind in ("gaussian", "rademacher"):
                def run_lora(dtype: Any = dtype, rank: int = rank, out_f: int = out_f, in_f: int = in_f,
                             kind: str = kind) -> None:
                    t = DECODE_ROWS
                    launcher("lora")(_meta((t, in_f), dtype), _meta((out_f, in_f), dtype), _meta((out_f,), dtype),
                                     _meta((rank, in_f), dtype), _meta((out_f, rank), dtype), 2.0, _rows(t),
                                     specs[kind], 0.1, "a", "b")
                dname = "bf16" if dtype == torch.bfloat16 else "fp32"
                quick = rank == 8 and kind == "gaussian" and dtype == torch.bfloat16
                cases.append(Case(f"lora r={rank} {kind} {dname} {out_f}x{in_f}", run_lora, subset=quick))
    return cases


def _attention_cases() -> list[Case]:
    import torch
    cases = []
    i32 = torch.int32
    for m in (QWEN_15B, QWEN_05B):
        qh, kvh, hd = m.q_heads, m.kv_heads, m.head_dim
        for dtype in (torch.bfloat16, torch.float32):
            dname = "bf16" if dtype == torch.bfloat16 else "fp32"

            def run_write(dtype: Any = dtype, kvh: int = kvh, hd: int = hd) -> None:
                t = DECODE_ROWS
                cache = (4096, BLOCK_SIZE, kvh, hd)
                launcher("write_kv")(_meta((t, kvh, hd), dtype), _meta((t, kvh, hd), dtype),
                                     _meta(cache, dtype), _meta(cache, dtype),
                                     torch.empty((t,), dtype=torch.int64, device="meta"))
            cases.append(Case(f"attn write_kv {dname} {m.name}", run_write))
            for max_q, window in ((1024, None), (512, 1024), (8, None)):
                def run_prefill(dtype: Any = dtype, max_q: int = max_q, window: int | None = window,
                                qh: int = qh, kvh: int = kvh, hd: int = hd) -> None:
                    s = 8
                    launcher("attention")(_meta((s * max_q, qh, hd), dtype), _meta((4096, BLOCK_SIZE, kvh, hd), dtype),
                                          _meta((4096, BLOCK_SIZE, kvh, hd), dtype),
                                          torch.empty((s + 1,), dtype=i32, device="meta"),
                                          torch.empty((s,), dtype=i32, device="meta"),
                                          torch.empty((s, 256), dtype=i32, device="meta"), hd ** -0.5, window, max_q)
                quick = m is QWEN_15B and max_q == 1024
                cases.append(Case(f"attn prefill {dname} {m.name} max_q={max_q} window={window}", run_prefill,
                                  subset=quick and dtype == torch.bfloat16))
            for seqs, ctx, window in ((DECODE_ROWS, 1024, None), (DECODE_ROWS, 4096, 1024), (8, 4096, None),
                                      (1, 32768, None)):
                def run_decode(dtype: Any = dtype, seqs: int = seqs, ctx: int = ctx, window: int | None = window,
                               qh: int = qh, kvh: int = kvh, hd: int = hd) -> None:
                    splits = launcher("num_splits")(seqs, kvh, ctx, torch.device("cuda", 0))
                    launcher("attention")(_meta((seqs, qh, hd), dtype), _meta((8192, BLOCK_SIZE, kvh, hd), dtype),
                                          _meta((8192, BLOCK_SIZE, kvh, hd), dtype),
                                          torch.empty((seqs + 1,), dtype=i32, device="meta"),
                                          torch.empty((seqs,), dtype=i32, device="meta"),
                                          torch.empty((seqs, ctx // BLOCK_SIZE), dtype=i32, device="meta"),
                                          hd ** -0.5, window, 1, num_splits=splits)
                quick = m is QWEN_15B and dtype == torch.bfloat16 and seqs == 8
                cases.append(Case(f"attn decode {dname} {m.name} seqs={seqs} ctx={ctx} window={window}", run_decode,
                                  subset=quick))
    return cases


def _update_cases(specs: dict[str, Any]) -> list[Case]:
    import torch
    cases = []
    m = QWEN_15B
    coeffs = torch.linspace(-1, 1, MEMBERS, dtype=torch.float64)
    for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"), (torch.float16, "fp16")):
        for mode, rank, kind, shape in (("lowrank", 1, "gaussian", (m.inter, m.hidden)),
                                        ("lowrank", 1, "rademacher", (m.inter, m.hidden)),
                                        ("lowrank", 4, "gaussian", (m.hidden, m.inter)),
                                        ("lowrank", 1, "gaussian", (m.vocab, m.hidden)),
                                        ("full", 1, "gaussian", (m.inter, m.hidden)),
                                        ("full", 1, "rademacher", (m.inter, m.hidden)),
                                        ("full", 1, "gaussian", (m.hidden,))):
            if dtype == torch.float16 and (mode, kind) != ("lowrank", "gaussian"):
                continue

            def run(dtype: Any = dtype, mode: str = mode, rank: int = rank, kind: str = kind,
                    shape: tuple[int, ...] = shape) -> None:
                launcher("es_update")(_meta(shape, dtype), specs[kind], coeffs, 1e-3, 0.02, mode, rank, "w")()
            quick = dtype == torch.bfloat16 and rank == 1 and kind == "gaussian" and len(shape) == 2 \
                and shape[0] == m.inter
            cases.append(Case(f"es_update {mode} {kind} r={rank} {dname} {'x'.join(map(str, shape))}", run,
                              subset=quick))
    for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        def run_round(dtype: Any = dtype) -> None:
            n = m.inter * m.hidden
            launcher("round")(_meta((n,), torch.float32), _meta((n,), dtype), 5, "w", 3)
        cases.append(Case(f"stochastic_round {dname}", run_round))
    return cases


def build_cases() -> list[Case]:
    """Every case, in a fixed order (sharding splits this list)."""
    from fastes.noise import NoiseSpec

    specs = {kind: NoiseSpec(seed=2**40 + 7, step=3, kind=kind, antithetic=True)
             for kind in ("gaussian", "rademacher")}
    return (_noise_cases(specs) + _linear_cases(specs) + _embedding_lora_cases(specs) + _attention_cases()
            + _update_cases(specs))
