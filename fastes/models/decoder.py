"""The decoder forward of Llama / Qwen2 / Qwen3 / Gemma 3, written over flat packed tokens (vLLM style).

One forward serves prefill chunks and decode steps of many sequences and of many
population members at once: rows are tokens, ``row_member`` tags each row with its
member (−1: the unperturbed model), and every linear goes through a population op
that adds that member's noise inside the matmul. Parameters stay in a flat dict
under their HF names, so noise (keyed by name) and checkpoints line up with HF.

No Python loop runs over tokens; loops are over layers and, for the small 1-D
perturbations, over the members present in the batch.

Gemma 3 differs from the others by config flags, not by a separate class, so noise,
LoRA, scales and saving stay one code path: embeddings times √hidden (rounded to the
model dtype first, as transformers does), (1 + w) RMSNorms computed in fp32, norms
after attention and after the MLP plus a separate pre-MLP norm (``sandwich_norm``),
GELU-tanh MLP, softmax scale query_pre_attn_scalar^-½, and sliding-window layers that
use their own rope base (``local_rope_theta``).

Sliding-window layers read only the last ``window`` positions, but their blocks are
not freed early: a block holds one position range for *all* layers (the block table is
per sequence, not per layer), and global layers still need every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from fastes.models import lora as lora_lib
from fastes.models.batch import AttentionBatch
from fastes.models.config import ModelConfig
from fastes.models.perturbation import Perturbation, measure_scales
from fastes.models.rope import apply_rope, inv_freq, rope_cos_sin
from fastes.ops.attention import paged_attention, write_kv
from fastes.ops.lora_linear import lora_linear, lora_linear_group
from fastes.ops.perturbed_embedding import perturbed_embedding
from fastes.ops.perturbed_linear import perturbed_linear, perturbed_linear_group

KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]


class _Rows:
    """Row -> member tags of the current hidden rows (None: every row runs the unperturbed model)."""

    def __init__(self, member: torch.Tensor | None) -> None:
        self.member = member

    def vector(self, vec: torch.Tensor, name: str, pert: Perturbation) -> torch.Tensor:
        """Per-row vec + σ·s·E_m [T, D] (fp32 math, vec's dtype): how a 1-D parameter is perturbed.

        A gather from the step's cached table of member deltas: no host sync, so a decode
        step that perturbs norms or biases can still be captured in a CUDA graph.
        """
        assert self.member is not None
        table, lookup = pert.vector_deltas(name, tuple(vec.shape), vec.device)
        index = lookup.index_select(0, self.member.long() + 1)
        if not index.is_cuda and bool((index < 0).any()):  # on CUDA the engine only passes listed members
            raise ValueError(f"row_member holds members outside the perturbation's members {pert.members}")
        delta = table.index_select(0, index)
        return (vec.float() + delta).to(vec.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) times (offset + weight); weight [D] or per-row [T, D].

    Without offset (Llama/Qwen) the normalized x is cast back before the weight multiplies it;
    with one (Gemma) everything stays fp32 until the end, since 1 + w rounded to bf16 loses w.
    """
    xf = x.float()
    normed = xf * xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    if weight.dim() == 2 and x.dim() == 3:
        weight = weight.unsqueeze(1)
    if offset:
        return (normed * (weight.float() + offset)).to(x.dtype)
    normed = normed.to(x.dtype)
    if weight.dtype == x.dtype:  # normed is a fresh tensor of x's shape: scale it in place (w·n is n·w)
        return normed.mul_(weight)
    return weight * normed


class CausalLM:
    """A decoder-only LM: config + HF-named parameters (+ optional LoRA adapters), and its forward."""

    def __init__(self, config: ModelConfig, params: dict[str, torch.Tensor], source_dir: str | Path | None = None):
        self.config = config
        self.params = params
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.lora: dict[str, tuple[str, str]] = {}  # base weight name -> (A name, B name)
        self.lora_scaling = 1.0
        self._scales: dict[str, float] | None = None
        self.backend = "auto"  # of the ops when no perturbation names one, and of attention
        first = params["model.embed_tokens.weight"]
        self._inv_freq = inv_freq(config).to(first.device)
        self._inv_freq_local = inv_freq(config, local=True).to(first.device) if config.local_rope_theta else None

    # ------------------------------------------------------------------ properties and bookkeeping

    @property
    def dtype(self) -> torch.dtype:
        return self.params["model.embed_tokens.weight"].dtype

    @property
    def device(self) -> torch.device:
        return self.params["model.embed_tokens.weight"].device

    def noise_scales(self) -> dict[str, float]:
        """std(W_t) of every base parameter, measured on first call and kept (layerwise scaling)."""
        if self._scales is None:
            self._scales = measure_scales(self.params, list(self.config.param_shapes()))
        return self._scales

    def set_noise_scales(self, scales: dict[str, float]) -> None:
        """Restore scales measured earlier (e.g. on resume, so s_t stays the one measured at start)."""
        self._scales = dict(scales)

    def add_lora(self, rank: int, targets: Sequence[str] | None = None, alpha: float | None = None,
                 seed: int = 0) -> None:
        """Create adapters (B = 0, A Gaussian from ``seed``; see fastes.models.lora) on the target modules."""
        if self.lora:
            raise ValueError("model already has LoRA adapters")
        from fastes.population import Population

        targets = tuple(targets) if targets is not None else Population(size=1, antithetic=False).lora_targets
        shapes = self.config.param_shapes()
        bases = lora_lib.target_weights(shapes, targets)
        self.params.update(lora_lib.init_adapters(bases, shapes, rank, seed, self.dtype, self.device))
        self.lora = {base: lora_lib.adapter_names(base) for base in bases}
        self.lora_scaling = float(alpha if alpha is not None else rank) / rank

    def lora_names(self) -> dict[str, str]:
        """Adapter name -> its base weight name."""
        return {adapter: base for base, pair in self.lora.items() for adapter in pair}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters in HF layout (no lm_head when tied), LoRA adapters merged into their weights."""
        out = {n: self.params[n] for n in self.config.param_shapes()}
        for base, (name_a, name_b) in self.lora.items():
            out[base] = lora_lib.merged_weight(out[base], self.params[name_a], self.params[name_b], self.lora_scaling)
        return out

    # ------------------------------------------------------------------ forward

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.forward(*args, **kwargs)  # type: ignore[arg-type]

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch, kv_caches: KVCaches,
                row_member: torch.Tensor | None = None, perturbation: Perturbation | None = None,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [S, vocab] of the rows ``logits_indices`` (all rows when None).

        input_ids / positions / row_member are [T]; ``attn`` places the T rows in the paged
        ``kv_caches`` (one (k, v) pair per layer), into which this call writes their K/V.
        Without ``perturbation`` every row runs the unperturbed model and ``row_member`` is ignored.
        """
        h = self.hidden_states(input_ids, positions, attn, kv_caches, row_member, perturbation)
        if logits_indices is not None:
            h = h.index_select(0, logits_indices)
            if row_member is not None:
                row_member = row_member.index_select(0, logits_indices)
        return self.logits(h, row_member, perturbation)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBatch,
                      kv_caches: KVCaches, row_member: torch.Tensor | None = None,
                      perturbation: Perturbation | None = None) -> torch.Tensor:
        """The residual stream [T, hidden] after the last layer (before the final norm); writes K/V.

        Free of host syncs on CUDA, so a decode step of it can be captured in a CUDA graph.
        """
        cfg = self.config
        if len(kv_caches) != cfg.num_layers:
            raise ValueError(f"kv_caches has {len(kv_caches)} layers, the model has {cfg.num_layers}")
        if perturbation is not None and row_member is None:
            raise ValueError("a perturbation needs row_member (one member id per row, -1 for unperturbed)")
        rows = _Rows(row_member if perturbation is not None else None)
        pert = perturbation
        h = self._embed(input_ids, rows, pert)
        rope = rope_cos_sin(positions, self._inv_freq)
        local_rope = rope_cos_sin(positions, self._inv_freq_local) if self._inv_freq_local is not None else rope
        for layer in range(cfg.num_layers):
            p = f"model.layers.{layer}."
            cos, sin = local_rope if cfg.sliding_window(layer) is not None else rope
            x = self._norm(h, p + "input_layernorm.weight", rows, pert)
            a = self._attention(x, layer, cos, sin, attn, kv_caches[layer], rows, pert)
            # the first add makes h this forward's own tensor (the embedding's output may alias a parameter);
            # every later residual add goes in place
            if cfg.sandwich_norm:  # Gemma: normalize each branch's output before the residual add
                a = self._norm(a, p + "post_attention_layernorm.weight", rows, pert)
                h = h + a if layer == 0 else h.add_(a)
                x = self._norm(h, p + "pre_feedforward_layernorm.weight", rows, pert)
                h.add_(self._norm(self._mlp(x, p + "mlp.", rows, pert), p + "post_feedforward_layernorm.weight",
                                  rows, pert))
            else:
                h = h + a if layer == 0 else h.add_(a)
                x = self._norm(h, p + "post_attention_layernorm.weight", rows, pert)
                h.add_(self._mlp(x, p + "mlp.", rows, pert))
        return h

    @torch.no_grad()
    def logits(self, h: torch.Tensor, row_member: torch.Tensor | None = None,
               perturbation: Perturbation | None = None) -> torch.Tensor:
        """fp32 logits [S, vocab] of residual-stream rows ``h`` (final norm, then the LM head)."""
        rows = _Rows(row_member if perturbation is not None else None)
        h = self._norm(h, "model.norm.weight", rows, perturbation)
        return self._lm_head(h, rows, perturbation).float()

    def _op_args(self, name: str, ndim: int, role: str, pert: Perturbation | None) -> dict[str, object]:
        """Keyword arguments of a population op for parameter ``name``: noise=None when not perturbed."""
        if pert is None or not pert.perturbs(name, ndim, role):
            return {"noise": None, "sigma": 0.0, "scale": 1.0, "mode": "full", "rank": 1,
                    "backend": pert.backend if pert is not None else self.backend}
        return {"noise": pert.noise, "sigma": pert.sigma, "scale": pert.scale(name), "mode": pert.mode,
                "rank": pert.rank, "num_members": pert.num_members, "backend": pert.backend}

    def _embed(self, ids: torch.Tensor, rows: _Rows, pert: Perturbation | None) -> torch.Tensor:
        name = "model.embed_tokens.weight"
        role = "tied" if self.config.tie_word_embeddings else "embedding"
        args = self._op_args(name, 2, role, pert)
        h = perturbed_embedding(ids, self.params[name], rows.member, name=name, **args)  # type: ignore[arg-type]
        if self.config.embed_scale == 1.0:
            return h
        # the scale is rounded to the model dtype before multiplying (bf16: √1152 = 33.94 -> 34.0), as in HF;
        # a Python float (exact in that dtype) rather than a device tensor keeps this CUDA-graph safe
        return h * float(torch.tensor(self.config.embed_scale, dtype=torch.float32).to(h.dtype))

    def _lm_head(self, h: torch.Tensor, rows: _Rows, pert: Perturbation | None) -> torch.Tensor:
        tied = self.config.tie_word_embeddings
        name, role = ("model.embed_tokens.weight", "tied") if tied else ("lm_head.weight", "lm_head")
        args = self._op_args(name, 2, role, pert)
        logits = perturbed_linear(h, self.params[name], None, rows.member, name=name,
                                  **args)  # type: ignore[arg-type]
        cap = self.config.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits  # in the model dtype, as transformers does

    def _norm(self, x: torch.Tensor, name: str, rows: _Rows, pert: Perturbation | None) -> torch.Tensor:
        weight = self.params[name]
        if pert is not None and rows.member is not None and pert.perturbs(name, 1, "norm"):
            weight = rows.vector(weight, name, pert)
        return rms_norm(x, weight, self.config.rms_norm_eps, self.config.norm_offset)

    def _linear(self, x: torch.Tensor, prefix: str, rows: _Rows, pert: Perturbation | None) -> torch.Tensor:
        """y = x (W + σ·s·E_m)ᵀ + b (+ LoRA); name=prefix + 'weight' keys the noise."""
        wname, bname = prefix + "weight", prefix + "bias"
        weight, bias = self.params[wname], self.params.get(bname)
        if wname in self.lora:
            name_a, name_b = self.lora[wname]
            perturbed = pert is not None and pert.perturbs(wname, 2, "lora")
            return lora_linear(x, weight, bias, self.params[name_a], self.params[name_b], self.lora_scaling,
                               rows.member, pert.noise if perturbed else None, pert.sigma if perturbed else 0.0,
                               name_a, name_b, pert.num_members if perturbed else None,
                               pert.backend if pert is not None else self.backend)
        bias_noise = (bias is not None and pert is not None and rows.member is not None
                      and pert.perturbs(bname, 1, "bias"))
        args = self._op_args(wname, 2, "matrix", pert)
        y = perturbed_linear(x, weight, None if bias_noise else bias, rows.member, name=wname,
                             **args)  # type: ignore[arg-type]
        if bias_noise:
            y = y + rows.vector(bias, bname, pert)  # type: ignore[arg-type]
        return y

    def _linears(self, x: torch.Tensor, prefixes: Sequence[str], rows: _Rows,
                 pert: Perturbation | None) -> list[torch.Tensor]:
        """``_linear`` of projections that read the same x (q/k/v, gate/up). When every one has 2-D noise and
        none has LoRA or bias noise, one grouped op: on Triton lowrank one shrink launch serves them all; when
        every one has LoRA (all perturbed or none), one LoRA group: on Triton one shrink launch."""
        wnames = [p + "weight" for p in prefixes]
        if all(w in self.lora for w in wnames):
            return self._lora_linears(x, wnames, rows, pert)
        args = [self._op_args(w, 2, "matrix", pert) for w in wnames]
        if (pert is None or rows.member is None or any(a["noise"] is None for a in args)
                or any(w in self.lora for w in wnames)
                or any(p + "bias" in self.params and pert.perturbs(p + "bias", 1, "bias") for p in prefixes)):
            return [self._linear(x, p, rows, pert) for p in prefixes]
        scales = [float(a["scale"]) for a in args]  # type: ignore[arg-type]
        biases = [self.params.get(p + "bias") for p in prefixes]
        return perturbed_linear_group(x, [self.params[w] for w in wnames], biases, wnames, rows.member, pert.noise,
                                      pert.sigma, scales, pert.mode, pert.rank, pert.num_members, pert.backend)

    def _lora_linears(self, x: torch.Tensor, wnames: Sequence[str], rows: _Rows,
                      pert: Perturbation | None) -> list[torch.Tensor]:
        """``_linear`` of LoRA projections that read the same x, as one ``lora_linear_group`` when their adapters
        are all perturbed or all not (the group shares σ and the noise spec)."""
        perturbed = {pert is not None and pert.perturbs(w, 2, "lora") for w in wnames}
        if len(perturbed) != 1:
            return [self._linear(x, w[: -len("weight")], rows, pert) for w in wnames]
        on = perturbed.pop()
        pairs = [self.lora[w] for w in wnames]
        return lora_linear_group(x, [self.params[w] for w in wnames],
                                 [self.params.get(w[: -len("weight")] + "bias") for w in wnames],
                                 [self.params[a] for a, _ in pairs], [self.params[b] for _, b in pairs],
                                 self.lora_scaling, rows.member, pert.noise if on else None,
                                 pert.sigma if on else 0.0, [a for a, _ in pairs], [b for _, b in pairs],
                                 pert.num_members if on else None, pert.backend if pert is not None else self.backend)

    def _attention(self, x: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBatch,
                   kv: tuple[torch.Tensor, torch.Tensor], rows: _Rows, pert: Perturbation | None) -> torch.Tensor:
        cfg = self.config
        p = f"model.layers.{layer}.self_attn."
        tokens = x.shape[0]
        q, k, v = self._linears(x, [p + "q_proj.", p + "k_proj.", p + "v_proj."], rows, pert)
        q = q.view(tokens, cfg.num_heads, cfg.head_dim)
        k = k.view(tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(tokens, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = self._norm(q, p + "q_norm.weight", rows, pert)
            k = self._norm(k, p + "k_norm.weight", rows, pert)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache, v_cache = kv
        write_kv(k, v, k_cache, v_cache, attn.slot_mapping, self.backend)
        out = paged_attention(q, k_cache, v_cache, attn.cu_seqlens_q, attn.seq_lens, attn.block_tables,
                              cfg.softmax_scale, cfg.sliding_window(layer), attn.max_q_len, self.backend)
        return self._linear(out.reshape(tokens, cfg.q_size), p + "o_proj.", rows, pert)

    def _mlp(self, x: torch.Tensor, prefix: str, rows: _Rows, pert: Perturbation | None) -> torch.Tensor:
        gate, up = self._linears(x, [prefix + "gate_proj.", prefix + "up_proj."], rows, pert)
        # gate is this call's own fresh output: activate and gate it in place (no [T, intermediate] temporaries)
        act = F.gelu(gate, approximate="tanh") if self.config.hidden_act == "gelu_pytorch_tanh" else F.silu(gate, True)
        return self._linear(act.mul_(up), prefix + "down_proj.", rows, pert)


__all__ = ["CausalLM", "rms_norm", "KVCaches"]
