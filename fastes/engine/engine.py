"""Engine: generation by a whole ES population in one continuous batch, and the ES update.

``generate`` runs every (member, prompt, sample) sequence together: one scheduler, one
paged KV pool, one forward per step whose rows are sorted by member so the population
ops see contiguous segments. On CUDA, steps where every sequence decodes one token replay a
CUDA graph (fastes.engine.cuda_graphs); other steps run eagerly. ``update`` applies
W += lr·s·Σ c_m·E_m by regenerating the noise; ``perturbation`` returns one member's dense
σ·s·E_m for inspection and tests.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from fastes.engine.attention_batch import build_attention_batch
from fastes.engine.block_manager import BlockManager
from fastes.engine.cpu_heap import release_cpu_heap
from fastes.engine.cuda_graphs import DEFAULT_MAX_GRAPH_BATCH, DecodeGraphs, GraphCaptureError
from fastes.engine.kv_cache import DEFAULT_BLOCK_SIZE, KVCache, profile_num_blocks
from fastes.engine.request import generation_config_eos, member_prompt_indices, token_ids
from fastes.engine.sampling import MAX_SAMPLES, SamplingParams, prompt_keys, sample
from fastes.engine.scheduler import Chunk, Scheduler
from fastes.engine.sequence import Completion, Sequence, Status
from fastes.models import CausalLM, Perturbation, Tokenizer, load_model, load_tokenizer, perturbed_names
from fastes.models import save_pretrained as save_model
from fastes.ops import member_noise
from fastes.ops.es_update import es_update
from fastes.ops.perturbed_linear import BACKENDS as OP_BACKENDS
from fastes.population import Population

CPU_KV_TOKENS = 65536
Outputs = list[list[list[Completion]]]


class Engine:
    """A loaded model, its tokenizer and a paged KV pool; see DESIGN.md section 8 for the API."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None = None, kv_cache_tokens: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, backend: str = "auto", cuda_graphs: bool | None = None,
                 max_graph_batch: int = DEFAULT_MAX_GRAPH_BATCH) -> None:
        """``cuda_graphs``: replay decode steps from CUDA graphs (None: on CUDA with the auto / triton backend;
        True elsewhere is an error). ``max_graph_batch``: the largest decode batch captured; bigger ones run eagerly.
        """
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer in {str(tokenizer.path)!r} has {tokenizer.vocab_size} tokens but the "
                             f"model's config.json says vocab_size {model.config.vocab_size}: they do not match")
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        if backend not in OP_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(OP_BACKENDS)}; got {backend!r}")
        self.backend = backend
        model.backend = backend  # the engine's choice holds for unperturbed forwards and attention too
        self.block_size = block_size
        on_gpu = self.device.type == "cuda"
        self.max_num_seqs = max_num_seqs or (1024 if on_gpu else 4096)
        self.max_num_batched_tokens = max_num_batched_tokens or 8192
        if kv_cache_tokens is None:
            if on_gpu:
                num_blocks = profile_num_blocks(model, self.max_num_batched_tokens, block_size)
            else:
                num_blocks = -(-CPU_KV_TOKENS // block_size)
        else:
            if isinstance(kv_cache_tokens, bool) or not isinstance(kv_cache_tokens, int) or kv_cache_tokens < 1:
                raise ValueError(f"kv_cache_tokens must be a positive integer or None, got {kv_cache_tokens!r}")
            num_blocks = -(-kv_cache_tokens // block_size)
        self.kv_cache = KVCache.for_model(model.config, num_blocks, block_size, model.dtype, self.device)
        if cuda_graphs is None:
            cuda_graphs = on_gpu and backend in ("auto", "triton")
        if cuda_graphs and not on_gpu:
            raise ValueError(f"cuda_graphs=True needs a CUDA device; the model is on {self.device}")
        if cuda_graphs and backend not in ("auto", "triton"):
            raise ValueError(f"cuda_graphs=True needs the auto or triton backend, got {backend!r}")
        if isinstance(max_graph_batch, bool) or not isinstance(max_graph_batch, int) or max_graph_batch < 1:
            raise ValueError(f"max_graph_batch must be a positive integer, got {max_graph_batch!r}")
        self.decode_graphs = (DecodeGraphs(model, self.kv_cache, min(max_graph_batch, self.max_num_seqs))
                              if cuda_graphs else None)
        self.manager = BlockManager(num_blocks, block_size)
        eos = set(model.config.eos_token_ids) | set(generation_config_eos(model.source_dir))
        if tokenizer is not None:
            eos |= set(tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        kv_cache_tokens: int | None = None, **kwargs: object) -> Engine:
        """Load a local HF directory (config.json, safetensors, tokenizer files)."""
        model = load_model(path, dtype=dtype, device=device)
        tokenizer = None
        path = Path(path)
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(path)
        return cls(model, tokenizer, kv_cache_tokens=kv_cache_tokens, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ prompts

    def encode_prompts(self, prompts: Seq[str] | Seq[Seq[int]], use_chat_template: bool = False) -> list[list[int]]:
        """Token ids of each prompt (text through the tokenizer); ValueError on anything the model cannot take."""
        if isinstance(prompts, str) or not isinstance(prompts, Seq) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        vocab = self.model.config.vocab_size
        out: list[list[int]] = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; this model directory has none (pass token ids)")
                ids = (self.tokenizer.encode_chat(prompt) if use_chat_template else self.tokenizer.encode(prompt))
            else:
                ids = token_ids(prompt)
                if ids is None or any(not 0 <= t < vocab for t in ids):
                    raise ValueError(f"prompt {i} must hold integer token ids in [0, {vocab})")
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            out.append(ids)
        return out

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Seq[str] | Seq[Seq[int]], sampling: SamplingParams | None = None,
                 population: Population | None = None, step: int = 0, samples_per_prompt: int = 1,
                 use_chat_template: bool = False, progress: bool = False,
                 members: Seq[int] | None = None, member_prompts: Seq[Seq[int]] | None = None) -> Outputs:
        """outs[member][prompt][sample] -> Completion; population None runs the unperturbed model (one member).

        ``members`` generates only those members of ``population`` (a rank's share in a multi-process run):
        outs is then indexed in the order of ``members``; their noise is the same as in the full population.
        ``member_prompts`` gives each member (in that order) its own list of indices into ``prompts``
        (an ES step with a prompt batch per noise index); outs[m][j] is then member m's j-th prompt.
        Sampling depends on a prompt's content, not its position, so a member's completions are the
        same as when it generates every prompt.
        """
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) \
                or not 1 <= samples_per_prompt <= MAX_SAMPLES:
            raise ValueError(f"samples_per_prompt must be an integer in [1, {MAX_SAMPLES}], got {samples_per_prompt!r}")
        if population is not None and not isinstance(population, Population):
            raise ValueError(f"population must be a fastes.Population or None, got {type(population).__name__}")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model directory has none (use stop_token_ids)")
        token_prompts = self.encode_prompts(prompts, use_chat_template)
        max_len = self.model.config.max_position_embeddings
        pool = self.manager.num_blocks * self.block_size
        for i, ids in enumerate(token_prompts):
            if len(ids) >= max_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the model's context is {max_len}")
            if len(ids) > pool:
                raise ValueError(f"KV cache too small: prompt {i} has {len(ids)} tokens and the pool holds {pool}; "
                                 "raise kv_cache_tokens")
        if members is not None:
            if population is None:
                raise ValueError("members needs a population")
            members = [operator.index(m) for m in members]
            for m in members:
                population.member_index(m)  # ValueError outside [0, size)
            if len(set(members)) != len(members):
                raise ValueError(f"members must be distinct, got {members}")
        else:
            members = list(range(population.size)) if population else [-1]
        chosen = member_prompt_indices(member_prompts, len(members), len(token_prompts))
        pert = (Perturbation.for_model(self.model, population, step, self.backend, tuple(members))
                if population else None)
        slots = {member: i for i, member in enumerate(members)}
        seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little")
        keys = prompt_keys(token_prompts)
        seqs: list[Sequence] = []
        for member, indices in zip(members, chosen, strict=True):
            for j, p in enumerate(indices):
                ids = token_prompts[p]
                seqs.append(Sequence(seq_id=len(seqs), member=member, prompt_index=j, sample_index=0,
                                     prompt_len=len(ids), tokens=list(ids), params=sampling, seed=seed,
                                     fork_into=list(range(1, samples_per_prompt)), prompt_key=keys[p]))
        bar = _Progress(len(seqs) * samples_per_prompt * sampling.max_tokens) if progress else None
        try:
            results = self._run(seqs, pert, bar)
        finally:
            if bar is not None:
                bar.close()
            if self.device.type == "cpu":
                release_cpu_heap()
        outs: Outputs = [[[None] * samples_per_prompt for _ in indices] for indices in chosen]  # type: ignore[misc]
        for seq in results:
            outs[slots[seq.member]][seq.prompt_index][seq.sample_index] = Completion(
                token_ids=seq.output_ids, text=seq.text or "", finish_reason=seq.finish_reason or "length")
        return outs

    def _run(self, seqs: list[Sequence], pert: Perturbation | None, bar: _Progress | None) -> list[Sequence]:
        self.manager.reset()
        graphs = self.decode_graphs
        if graphs is not None:
            graphs.begin(pert)
            replays = graphs.num_replays
        scheduler = Scheduler(self.manager, self.max_num_seqs, self.max_num_batched_tokens)
        for seq in seqs:
            scheduler.add(seq)
        finished: list[Sequence] = []
        next_id = len(seqs)
        steps, tokens = 0, 0
        while not scheduler.done:
            chunks = scheduler.schedule()
            self.kv_cache.copy_blocks(self.manager.take_copies())
            logits = self._forward(chunks, pert)  # one row per chunk that samples, in chunk order
            samplers: list[Sequence] = []
            rows: list[int] = []  # logit row of each sampler: forked samples reuse their parent's row
            for row, chunk in enumerate(c for c in chunks if c.samples):
                parent = chunk.seq
                parent.num_computed = chunk.end
                samplers.append(parent)
                rows.append(row)
                for sample_index in parent.fork_into:  # prompt done: siblings split off, sharing its blocks
                    child = Sequence(seq_id=next_id, member=parent.member, prompt_index=parent.prompt_index,
                                     sample_index=sample_index, prompt_len=parent.prompt_len,
                                     tokens=list(parent.tokens), params=parent.params, seed=parent.seed,
                                     prompt_key=parent.prompt_key)
                    next_id += 1
                    scheduler.admit_fork(parent, child)
                    samplers.append(child)
                    rows.append(row)
                parent.fork_into = []
            for chunk in chunks:
                if not chunk.samples:
                    chunk.seq.num_computed = chunk.end
            index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            new_tokens = self._sample(logits.index_select(0, index), samplers) if samplers else None
            advance = len(samplers)
            for seq, token in zip(samplers, new_tokens.tolist() if new_tokens is not None else [], strict=True):
                seq.tokens.append(int(token))
                reason = self._stop_reason(seq)
                if reason is not None:
                    scheduler.finish(seq, reason)
                    finished.append(seq)
                    advance += seq.params.max_tokens - seq.num_output  # what it will not generate
            steps += 1
            tokens += sum(c.end - c.start for c in chunks)
            if bar is not None:
                bar.advance(advance)
        self.last_stats = {"steps": steps, "tokens": tokens, "preemptions": scheduler.num_preemptions,
                           "graph_steps": graphs.num_replays - replays if graphs else 0}
        return finished

    def _forward(self, chunks: list[Chunk], pert: Perturbation | None) -> torch.Tensor:
        graphs = self.decode_graphs
        if graphs is not None and len(chunks) <= graphs.max_batch and all(c.samples and c.end - c.start == 1
                                                                          for c in chunks):
            tables = [self.manager.block_table(c.seq.seq_id) for c in chunks]
            if graphs.fits(len(chunks), max(len(t) for t in tables)):
                try:
                    return self._forward_graph(chunks, tables, pert)
                except GraphCaptureError as err:
                    warnings.warn(f"{err}; decoding without CUDA graphs from now on", RuntimeWarning, stacklevel=2)
                    self.decode_graphs = None
        attn, positions = build_attention_batch(self.manager, [(c.seq.seq_id, c.start, c.end) for c in chunks],
                                                self.device)
        ids = [t for c in chunks for t in c.seq.tokens[c.start : c.end]]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        row_member = None
        if pert is not None:
            row_member = torch.tensor([c.seq.member for c in chunks for _ in range(c.end - c.start)],
                                      dtype=torch.int32, device=self.device)
        ends, total = [], 0
        for c in chunks:
            total += c.end - c.start
            if c.samples:
                ends.append(total - 1)
        logits_indices = torch.tensor(ends, dtype=torch.long, device=self.device)
        return self.model.forward(input_ids, positions, attn, self.kv_cache, row_member, pert, logits_indices)

    def _forward_graph(self, chunks: list[Chunk], tables: list[list[int]], pert: Perturbation | None) -> torch.Tensor:
        """A decode step (one new token per sequence) replayed from a CUDA graph; the LM head runs eagerly."""
        graphs = self.decode_graphs
        assert graphs is not None
        hidden = graphs.run([c.seq.tokens[c.start] for c in chunks], [c.start for c in chunks],
                            [c.seq.member for c in chunks],
                            [self.manager.slots(c.seq.seq_id, c.start, c.end)[0] for c in chunks],
                            [c.end for c in chunks], tables)
        row_member = graphs.row_member[: len(chunks)] if pert is not None else None
        return self.model.logits(hidden, row_member, pert)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        dev = logits.device
        positions = torch.tensor([len(s.tokens) for s in seqs], device=dev)
        members = torch.tensor([s.member for s in seqs], device=dev)
        prompts = torch.tensor([s.prompt_key for s in seqs], device=dev)
        samples = torch.tensor([s.sample_index for s in seqs], device=dev)
        return sample(logits, [s.params for s in seqs], [s.seed for s in seqs], positions, members, prompts, samples)

    def _stop_reason(self, seq: Sequence) -> str | None:
        params, token = seq.params, seq.tokens[-1]
        if (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
            seq.text = self._decode(seq.output_ids)
            return "stop"
        if params.stop and self.tokenizer is not None:
            text = self._decode(seq.output_ids)
            hits = [(text.find(s), s) for s in params.stop if s in text]
            if hits:
                pos, stop = min(hits)
                seq.text = text[: pos + (len(stop) if params.include_stop_str_in_output else 0)]
                return "stop"
        if seq.num_output >= params.max_tokens or len(seq.tokens) >= self.model.config.max_position_embeddings:
            seq.text = self._decode(seq.output_ids)
            return "length"
        return None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    # ------------------------------------------------------------------ ES: perturbation and update

    def perturbed_names(self, population: Population) -> list[str]:
        return perturbed_names(self.model.config.param_shapes(), population, self.model.lora_names())

    def perturbation(self, name: str, member: int, population: Population, step: int = 0) -> torch.Tensor:
        """Dense σ·s·E_m (fp32, model device) of HF parameter ``name``; zeros if the population does not perturb it."""
        if name not in self.model.params:
            raise ValueError(f"unknown parameter {name!r}")
        population.member_index(member)
        param = self.model.params[name]
        if name not in self.perturbed_names(population):
            return torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        pert = Perturbation.for_model(self.model, population, step)
        mode = population.mode if param.dim() == 2 and population.mode != "lora" else "full"
        noise = member_noise.dense_member(pert.noise, name, member, tuple(param.shape), mode, population.rank,
                                          param.device)
        return noise.mul_(pert.sigma * pert.scale(name))

    def update(self, population: Population, step: int, coeffs: torch.Tensor | Seq[float], lr: float) -> None:
        """W_t += lr·s_t·Σ_m c_m·E_m,t for every perturbed parameter, from seeds alone."""
        if not isinstance(population, Population):
            raise ValueError(f"population must be a fastes.Population, got {type(population).__name__}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ValueError(f"lr must be a finite number, got {lr!r}")
        try:
            coeffs = torch.as_tensor(coeffs, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"coeffs must be a 1-D tensor or sequence of numbers: {err}") from None
        if coeffs.numel() != population.size:
            raise ValueError(f"coeffs has {coeffs.numel()} entries for a population of {population.size}")
        if not torch.isfinite(coeffs).all():
            raise ValueError("coeffs must be finite")
        pert = Perturbation.for_model(self.model, population, step)
        coeffs = coeffs.to(torch.float32)
        for name in self.perturbed_names(population):
            param = self.model.params[name]
            mode = population.mode if param.dim() == 2 and population.mode != "lora" else "full"
            es_update(param, pert.noise, coeffs.to(param.device), lr, pert.scale(name), mode, population.rank, name,
                      backend=self.backend if self.backend != "auto" else "auto")

    def save_pretrained(self, out_dir: str | Path) -> Path:
        save_model(self.model, out_dir)
        return Path(out_dir)


class _Progress:
    """A transient rich bar over the tokens still to generate (early stops count as done)."""

    def __init__(self, total: int) -> None:
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._task = self._bar.add_task("generating", total=total)
        self._bar.start()

    def advance(self, n: int) -> None:
        self._bar.update(self._task, advance=n)

    def close(self) -> None:
        self._bar.stop()


__all__ = ["Engine", "Completion", "Status"]
