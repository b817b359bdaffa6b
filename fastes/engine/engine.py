"""Engine: generation by a whole ES population in one continuous batch, and the ES update.

``generate`` runs every (member, prompt, sample) sequence together (docs/design.md, "The engine"):
each step reads schedule → run → postprocess. The Scheduler plans the step (which sequences feed
which tokens, block slots, forks of finished prompts) in rows sorted by member; the ModelRunner
turns the plan into the forward's inputs, runs the forward (on CUDA, decode steps replay a CUDA
graph) and samples; the Scheduler then books the tokens, stops and finishes. ``update`` applies
W += lr·s·Σ c_m·E_m by regenerating the noise; ``perturbation`` returns one member's dense
σ·s·E_m for inspection and tests. The Engine itself keeps the public API (docs/design.md, "Public API")
and checks arguments.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from fastes.engine.batch_state import BatchState
from fastes.engine.block_manager import BlockManager
from fastes.engine.config import CPU_KV_TOKENS, DEFAULT_BLOCK_SIZE, DEFAULT_MAX_GRAPH_BATCH, EngineConfig
from fastes.engine.cpu_heap import release_cpu_heap
from fastes.engine.cuda_graphs import DecodeGraphs
from fastes.engine.kv_cache import KVCache, profile_num_blocks
from fastes.engine.logprobs import cumulative_logprob
from fastes.engine.model_runner import ModelRunner
from fastes.engine.penalties import LogitsProcessor
from fastes.engine.progress import Progress
from fastes.engine.request import generation_config_eos, member_prompt_indices, token_ids
from fastes.engine.sampling import MAX_SAMPLES, SamplingParams, prompt_keys
from fastes.engine.scheduler import Scheduler
from fastes.engine.sequence import Completion, Sequence, Status
from fastes.engine.stopping import StopChecker, finish_texts
from fastes.models import CausalLM, Perturbation, Tokenizer, load_model, load_tokenizer, perturbed_names
from fastes.models import save_pretrained as save_model
from fastes.ops import member_noise
from fastes.ops.es_update import es_update
from fastes.ops.perturbed_linear import BACKENDS as OP_BACKENDS
from fastes.population import Population

Outputs = list[list[list[Completion]]]
PROMPT_CACHE = 65536  # text prompts whose token ids are kept (an ES run re-sends the same prompts)


class Engine:
    """A loaded model, its tokenizer and a paged KV pool; docs/design.md, "Public API", lists what it offers."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None = None, kv_cache_tokens: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, backend: str = "auto", cuda_graphs: bool | None = None,
                 max_graph_batch: int = DEFAULT_MAX_GRAPH_BATCH, config: EngineConfig | None = None) -> None:
        """``cuda_graphs``: replay decode steps from CUDA graphs (None: on CUDA with the auto / triton backend;
        True elsewhere is an error). ``max_graph_batch``: the largest decode batch captured; bigger ones run eagerly.
        ``config`` replaces all the tuning keyword arguments at once.
        """
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer in {str(tokenizer.path)!r} has {tokenizer.vocab_size} tokens but the "
                             f"model's config.json says vocab_size {model.config.vocab_size}: they do not match")
        if backend not in OP_BACKENDS or (config is not None and config.backend not in OP_BACKENDS):
            raise ValueError(f"backend must be one of {', '.join(OP_BACKENDS)}; got {backend!r}")
        if config is None:
            config = EngineConfig(kv_cache_tokens, block_size, max_num_seqs, max_num_batched_tokens, backend,
                                  cuda_graphs, max_graph_batch)
        self.device = model.device
        on_gpu = self.device.type == "cuda"
        widest = max(model.config.intermediate_size, model.config.hidden_size) * model.dtype.itemsize
        self.config = config = config.resolve(on_gpu, widest)
        if config.cuda_graphs and not on_gpu:
            raise ValueError(f"cuda_graphs=True needs a CUDA device; the model is on {self.device}")
        if config.cuda_graphs and config.backend not in ("auto", "triton"):
            raise ValueError(f"cuda_graphs=True needs the auto or triton backend, got {config.backend!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.backend = config.backend
        model.backend = config.backend  # the engine's choice holds for unperturbed forwards and attention too
        self.block_size = config.block_size
        self.max_num_seqs: int = config.max_num_seqs  # type: ignore[assignment]
        self.max_num_batched_tokens: int = config.max_num_batched_tokens  # type: ignore[assignment]
        if config.kv_cache_tokens is not None:
            num_blocks = -(-config.kv_cache_tokens // self.block_size)
        elif on_gpu:
            num_blocks = profile_num_blocks(model, self.max_num_batched_tokens, self.block_size)
        else:
            num_blocks = -(-CPU_KV_TOKENS // self.block_size)
        self.kv_cache = KVCache.for_model(model.config, num_blocks, self.block_size, model.dtype, self.device)
        graphs = (DecodeGraphs(model, self.kv_cache, min(config.max_graph_batch, self.max_num_seqs))
                  if config.cuda_graphs else None)
        self.runner = ModelRunner(model, self.kv_cache, graphs)
        self.manager = BlockManager(num_blocks, self.block_size)
        self.batch_state = BatchState()
        eos = set(model.config.eos_token_ids) | set(generation_config_eos(model.source_dir))
        if tokenizer is not None:
            eos |= set(tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.last_stats: dict[str, float] = {}
        self._prompt_cache: dict[tuple[str, bool], list[int]] = {}

    @property
    def decode_graphs(self) -> DecodeGraphs | None:
        """The runner's decode graphs (None: every step runs eagerly; a failed capture sets it to None)."""
        return self.runner.graphs

    @decode_graphs.setter
    def decode_graphs(self, graphs: DecodeGraphs | None) -> None:
        self.runner.graphs = graphs

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
                ids = self._encode(prompt, use_chat_template)
            else:
                ids = token_ids(prompt)
                if ids is None or any(not 0 <= t < vocab for t in ids):
                    raise ValueError(f"prompt {i} must hold integer token ids in [0, {vocab})")
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            out.append(ids)
        return out

    def _encode(self, text: str, chat: bool) -> list[int]:
        """Token ids of a text prompt, kept: an ES run sends the same prompts again every step."""
        key = (text, chat)
        ids = self._prompt_cache.get(key)
        if ids is None:
            assert self.tokenizer is not None
            ids = self.tokenizer.encode_chat(text) if chat else self.tokenizer.encode(text)
            if len(self._prompt_cache) >= PROMPT_CACHE:
                self._prompt_cache.clear()
            self._prompt_cache[key] = ids
        return list(ids)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Seq[str] | Seq[Seq[int]], sampling: SamplingParams | None = None,
                 population: Population | None = None, step: int = 0, samples_per_prompt: int | None = None,
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
        if samples_per_prompt is None:  # vLLM's n; both given and different is an error
            samples_per_prompt = sampling.n
        elif sampling.n != 1 and samples_per_prompt != sampling.n:
            raise ValueError(f"samples_per_prompt={samples_per_prompt!r} contradicts sampling.n={sampling.n}")
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
        bar = Progress(len(seqs) * samples_per_prompt * sampling.max_tokens) if progress else None
        try:
            results = self._run(seqs, pert, sampling, seed, bar)
        finally:
            if bar is not None:
                bar.close()
            if self.device.type == "cpu":
                release_cpu_heap()
        finish_texts(results, self.tokenizer)
        outs: Outputs = [[[None] * samples_per_prompt for _ in indices] for indices in chosen]  # type: ignore[misc]
        for seq in results:
            outs[slots[seq.member]][seq.prompt_index][seq.sample_index] = Completion(
                token_ids=seq.output_ids, text=seq.text or "", finish_reason=seq.finish_reason or "length",
                logprobs=seq.logprobs, cumulative_logprob=cumulative_logprob(seq.logprobs, seq.output_ids))
        return outs

    def _run(self, seqs: list[Sequence], pert: Perturbation | None, params: SamplingParams, seed: int,
             bar: Progress | None) -> list[Sequence]:
        """The step loop: schedule → run → postprocess, until every sequence finished."""
        self.manager.reset()
        self.batch_state.reset()
        graphs = self.decode_graphs
        if graphs is not None:
            graphs.begin(pert)
            replays = graphs.num_replays
        stop = StopChecker(params, self.eos_token_ids, self.tokenizer, self.model.config.max_position_embeddings)
        processor = LogitsProcessor.for_params(params, stop.stop_ids, self.model.config.vocab_size)
        scheduler = Scheduler(self.manager, self.max_num_seqs, self.max_num_batched_tokens, self.batch_state, stop)
        for seq in seqs:
            scheduler.add(seq)
        finished: list[Sequence] = []
        steps, tokens = 0, 0
        while not scheduler.done:
            plan = scheduler.schedule()
            sampled = self.runner.run(plan, self.batch_state, pert, params, seed, processor)
            done = scheduler.postprocess(plan, sampled)
            finished += done
            steps += 1
            tokens += plan.num_tokens
            if bar is not None:  # tokens sampled, and those that stopped sequences will not generate
                bar.advance(len(sampled) + sum(s.params.max_tokens - s.num_output for s in done))
        self.last_stats = {"steps": steps, "tokens": tokens, "preemptions": scheduler.num_preemptions,
                           "graph_steps": graphs.num_replays - replays if graphs else 0}
        return finished

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


__all__ = ["Engine", "Completion", "Status"]
