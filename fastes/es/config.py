"""TrainConfig: everything an ES run needs, loadable from YAML and overridable from the command line.

A run is fully described by this config plus (seed, step): nothing else is stored between
steps. Values are checked here, before anything is loaded or written, so bad input is a
one-line ValueError. Top-level keys are overridden as ``--key value``, section keys as
``--section.key value`` (or ``--key value`` when the name is unique across sections); the
string is converted by the dataclass field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastes.es.config_rules import MODES, OPTIMIZERS, RULES, SHAPINGS, require
from fastes.es.config_values import build, coerce, rewards, strip_optional

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class PopulationConfig:
    """Who is evaluated each step: N members θ + σ_t·s·E_m (see fastes.Population)."""

    size: int = 8
    antithetic: bool = True
    mode: str = "lowrank"
    rank: int = 1
    noise: str = "gaussian"
    sigma: float = 1e-3
    sigma_schedule: str = "constant"
    sigma_final: float | None = None  # end value of a linear/cosine sigma schedule (None: sigma)
    layerwise_scale: bool = False
    perturb_embeddings: bool = False
    perturb_lm_head: bool = False
    perturb_1d: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    noise_reuse: int = 1  # k consecutive steps share one noise draw (EGGROLL-vLLM: 4)


@dataclass
class LoraConfig:
    """Adapters created when population.mode is lora (the base weights stay frozen)."""

    rank: int = 8
    alpha: float | None = None
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    init_from: str | None = None  # a PEFT adapter directory to start from (its rank, alpha and modules win)


@dataclass
class FitnessConfig:
    """From rewards to one number per member, then to shaped fitness."""

    shaping: str = "zscore"
    pass_at_k: int | None = None  # fitness = mean over prompts of unbiased pass@k (needs samples_per_prompt >= k)
    member_fitness: str | None = None  # "module:function" receiving all rollouts of a member
    group_size: int | None = None  # members per group for group_global/sign (null: the antithetic pair, or all)
    center_baseline: bool = False  # also score the unperturbed weights; fitness = member score − that score


@dataclass
class OptimConfig:
    """Step on the ES direction g = s·Σ c_m E_m: sgd needs no memory, momentum/adam keep fp32 state."""

    name: str = "sgd"
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_to: str = "zero"  # "start": anchored decay θ ← θ − lr·wd·(θ − θ₀), θ₀ the run's starting weights


@dataclass
class SamplingConfig:
    """Training rollouts (evaluation is greedy with the same max_tokens and stop); the penalties and min_tokens
    (vLLM's, see fastes.engine.penalties) shape the policy itself, so evaluation applies them too."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    common_random_numbers: bool = False  # every member of a step draws from the same sampling stream
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0

    def policy(self) -> dict[str, Any]:
        """The SamplingParams keywords that rollouts and evaluation share: penalties and min_tokens."""
        return {"repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "min_tokens": self.min_tokens}


@dataclass
class DistributedConfig:
    """Multi-process runs under torchrun (ignored in one process); see fastes.es.distributed."""

    check_every: int = 10  # steps between cross-rank weight checksum checks (0: only the check at start)
    timeout_s: float = 600.0  # a collective waiting longer ends the run with an error (not a hang)


@dataclass
class CheckpointConfig:
    """Retention of run/checkpoints/step-N (see fastes.es.checkpoint)."""

    keep_last: int = 3  # the newest checkpoints kept (0: all); the best by held-out accuracy is kept too
    keep_best: bool = True


@dataclass
class EvaluationConfig:
    """Named eval sets, their saved outputs, and sample completions during training (fastes.es.evaluation)."""

    sets: list[dict[str, Any]] = field(default_factory=list)  # [{name, task?, split?, size?, samples?, pass_k?...}]
    save_outputs: bool = True  # <run>/evals/<name>/step-N.jsonl: every completion of every evaluation
    log_completions_every: int = 0  # every N steps, a few training completions in metrics.jsonl and the console
    log_completions: int = 2


@dataclass
class TrainConfig:
    """One ES run. ``rewards`` is a list of {func: "module:function" | "file.py:function", weight}."""

    model: str = ""
    dtype: str = "auto"
    device: str = "auto"
    task: str = ""
    task_options: dict[str, Any] = field(default_factory=dict)
    rewards: list[dict[str, Any]] = field(default_factory=list)
    use_chat_template: bool | None = None
    seed: int = 0
    steps: int = 100
    prompts_per_step: int = 8
    same_prompts: bool = True  # false: a batch per noise index (its two antithetic members share it)
    samples_per_prompt: int = 1
    eval_every: int = 10
    eval_size: int = 64
    save_every: int = 0
    max_failed_steps: int = 3  # consecutive steps whose rewards/fitness fail on every rollout before the run stops
    out: str = "runs/es"
    resume: str | None = None
    kv_cache_tokens: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    cuda_graphs: bool | None = None  # decode from CUDA graphs; null: on for CUDA devices, false: always eager
    progress: bool = True
    tensorboard: bool = True  # false drops tensorboard from report_to
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # jsonl (always), tensorboard, wandb
    reward_timeout_s: float = 300.0  # per reward call; a timeout counts as a failure (0: no worker thread)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TrainConfig:
        """Build and validate; unknown keys and wrongly typed values raise one-line ValueErrors."""
        config = build(cls, data or {}, "")
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        return cls.from_dict(apply_overrides(read_yaml(path), overrides or []))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def replace(self, overrides: list[str]) -> TrainConfig:
        """A copy with ``--key value`` overrides applied (validated)."""
        return TrainConfig.from_dict(apply_overrides(self.to_dict(), overrides))

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Ranges and choices; raises ValueError naming the key."""
        require(bool(self.model), "model is required (set model: in the config or pass --model DIR)")
        require(bool(self.task), "task is required (set task: in the config or pass --task NAME)")
        for key, ok, wanted in RULES:
            value = self._get(key)
            if not ok(value, self):
                raise ValueError(f"{key} must be {wanted}, got {value!r}")
        for i, spec in enumerate(self.rewards):
            require(isinstance(spec.get("func"), str) and ":" in spec["func"],
                     f"rewards[{i}].func must be 'module:function' or 'file.py:function', got {spec.get('func')!r}")
        try:
            self.sampling_params()
            self.sampling_params(greedy=True)
        except ValueError as err:
            raise ValueError(f"sampling: {err}") from None
        from fastes.es.evaluation import parse_eval_sets

        parse_eval_sets(self.evaluation.sets)

    def _get(self, key: str) -> Any:
        obj: Any = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def sampling_params(self, seed: int | None = None, greedy: bool = False) -> Any:
        """The engine's SamplingParams for training rollouts (or greedy evaluation: same length and stops)."""
        from fastes.engine.sampling import SamplingParams

        s = self.sampling
        shape = {"temperature": 0.0} if greedy else {"temperature": s.temperature, "top_p": s.top_p,
                                                    "top_k": s.top_k, "min_p": s.min_p}
        if not greedy and s.common_random_numbers:
            shape["common_random_numbers"] = True
        return SamplingParams(max_tokens=s.max_tokens, stop=tuple(s.stop), ignore_eos=s.ignore_eos, seed=seed, **shape,
                              **s.policy())


# ---------------------------------------------------------------------- YAML and overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).replace("\n", " ")
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(argv: list[str]) -> list[tuple[str, str | None]]:
    """``--key value`` / ``--key=value`` pairs (a value may be missing for a bare boolean flag)."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"expected --key value, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if eq:
            pairs.append((key, value))
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((key, argv[i + 1]))
            i += 2
        else:
            pairs.append((key, None))
            i += 1
    return pairs


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge command-line overrides into a config mapping (values converted by field type)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, raw in parse_overrides(overrides):
        key = key.replace("-", "_")
        if key.startswith("task_options."):  # free-form options of the task: YAML-typed values
            options = data.get("task_options")
            data["task_options"] = options = dict(options) if isinstance(options, dict) else {}
            options[key.partition(".")[2]] = yaml.safe_load(raw) if raw is not None else True
            continue
        path = resolve_key(key)
        tp = field_type(path)
        if raw is None:
            if strip_optional(tp)[0] is not bool:
                raise ValueError(f"--{key} needs a value")
            raw = "true"
        value = rewards(raw) if path == ("rewards",) else coerce(raw, tp, ".".join(path))
        if len(path) == 1:
            data[path[0]] = value
        else:
            section = data.get(path[0])
            if section is None:
                section = data[path[0]] = {}
            elif not isinstance(section, dict):
                raise ValueError(f"{path[0]} must be a mapping, got {type(section).__name__}")
            section[path[1]] = value
    return data


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(hints[f.name])}


def resolve_key(key: str) -> tuple[str, ...]:
    """``steps`` -> (steps,); ``optim.lr`` or a unique ``lr`` -> (optim, lr); ValueError otherwise."""
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    sections = _sections()
    if "." in key:
        section, _, name = key.partition(".")
        if section in sections and name in {f.name for f in dataclasses.fields(sections[section])}:
            return (section, name)
    elif key in top and key not in sections:
        return (key,)
    else:
        hits = [(s, key) for s, cls in sections.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            options = ", ".join("--" + ".".join(h) for h in hits)
            raise ValueError(f"ambiguous option --{key}: use one of {options}")
    known = sorted(top - set(sections)) + [f"{s}.{f.name}" for s, c in sections.items() for f in dataclasses.fields(c)]
    close = difflib.get_close_matches(key, known, n=1)
    raise ValueError(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))


def field_type(path: tuple[str, ...]) -> Any:
    hints = typing.get_type_hints(TrainConfig)
    if len(path) == 1:
        return hints[path[0]]
    return typing.get_type_hints(hints[path[0]])[path[1]]


__all__ = [
    "TrainConfig",
    "PopulationConfig",
    "LoraConfig",
    "FitnessConfig",
    "OptimConfig",
    "SamplingConfig",
    "DistributedConfig",
    "EvaluationConfig",
    "CheckpointConfig",
    "read_yaml",
    "apply_overrides",
    "parse_overrides",
    "resolve_key",
    "SHAPINGS",
    "MODES",
    "OPTIMIZERS",
]
