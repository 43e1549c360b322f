"""The training run: setup, the step loop, evaluation, logging, checkpoints, resume.

``train(cfg)`` is what ``pgpo train`` runs (and what ``pgpo demo`` calls); the step itself is
:func:`pgpo.train.step.train_step`.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from pgpo.multiplier import MultiplierConfig
from pgpo.optim import ModulatedOptimizer
from pgpo.train import checkpoint
from pgpo.train.config import TrainConfig, to_dict
from pgpo.train.data import QuestionSampler, load_split
from pgpo.train.evaluate import evaluate
from pgpo.train.model import load_model, load_tokenizer
from pgpo.train.rollout import make_engine
from pgpo.train.step import train_step
from pgpo.train.teacher import Teacher


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """Everything a run holds; built from a config, optionally restored from a checkpoint."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
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
        self.policy = load_model(cfg.model, cfg.seed)
        self.teacher = Teacher(self.policy, cfg.teacher.mode, cfg.teacher.ema_rate)
        self.engine = make_engine(cfg.rollout.engine, self.policy, self.tokenizer)
        adamw = torch.optim.AdamW(
            self.policy.parameters(),
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
        self.multiplier = (
            MultiplierConfig(cfg.pgpo.alpha, cfg.pgpo.rho_max, cfg.pgpo.kind)
            if cfg.pgpo.enabled
            else None
        )
        self.sampler = QuestionSampler(self.train_data.questions, cfg.seed)
        self.step = 0
        self.skipped = 0

    def state(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "skipped": self.skipped,
            "config": to_dict(self.cfg),
        }

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint folder written by :func:`checkpoint.save`."""
        self.load_state(checkpoint.load(path))

    def load_state(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.skipped, self.step = state["skipped"], state["step"]
        checkpoint.set_rng_state(state["rng"])

    def train_step(self, questions, multiplier: MultiplierConfig | None | str = "config") -> dict:
        """One step on ``questions`` (the run's own multiplier unless one is given)."""
        mult = self.multiplier if multiplier == "config" else multiplier
        return train_step(
            questions,
            self.policy,
            self.teacher,
            self.tokenizer,
            self.engine,
            self.optimizer,
            self.scheduler,
            self.cfg,
            mult,
        )

    def evaluate(self) -> dict:
        """avg@k on the test split. Runs on its own RNG stream (seeded by seed and step), so
        evaluating never changes the training run: a resumed run stays bit-identical."""
        e = self.cfg.eval
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)
            return self._evaluate(e)

    def _evaluate(self, e) -> dict:
        return evaluate(
            self.engine,
            self.tokenizer,
            self.test_data.questions,
            e.n,
            e.temperature,
            e.top_p,
            e.max_new_tokens,
            self.cfg.rollout.max_prompt_tokens,
            self.cfg.reward.leading_letter,
        )


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

    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(cfg)
    ckpt_dir = out / "checkpoints"
    if resume:
        found = checkpoint.latest(ckpt_dir)
        if found is None:
            raise ValueError(f"--resume: no checkpoint in {ckpt_dir}")
        run.restore(found)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    writer = _writer(out, cfg.output.tensorboard)
    metrics_file = open(out / "metrics.jsonl", "a")
    samples_file = open(out / "samples.jsonl", "a")
    try:
        if cfg.eval.before_train and run.step == 0:
            row = {"step": 0, **{f"eval_{k}": v for k, v in run.evaluate().items()}}
            metrics_file.write(json.dumps(row) + "\n")
        bar = tqdm(
            range(run.step, cfg.steps),
            initial=run.step,
            total=cfg.steps,
            desc=desc,
            position=position,
            unit="step",
            file=sys.stderr,
            disable=not progress or None,
        )
        for _ in bar:
            questions = run.sampler.next(cfg.questions_per_step)
            metrics = run.train_step(questions)
            run.step += 1
            run.skipped += metrics["skipped"]
            run.engine.sync_weights(run.policy)
            samples = metrics.pop("samples")
            row = {"step": run.step, **metrics, "skipped_total": run.skipped}
            if run.step % cfg.eval.every == 0 or run.step == cfg.steps:
                result = run.evaluate()
                row.update({f"eval_{k}": v for k, v in result.items()})
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            if run.step % cfg.output.sample_every == 0:
                samples_file.write(json.dumps({"step": run.step, "samples": samples}) + "\n")
                samples_file.flush()
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        writer.add_scalar(key, value, run.step)
            bar.set_postfix(
                reward=f"{row['reward']:.2f}", rho=f"{row['rho']:.3f}", loss=f"{row['loss']:.4f}"
            )
            if run.step % cfg.output.save_every == 0 or run.step == cfg.steps:
                checkpoint.save(ckpt_dir, run.step, run.state())
    finally:
        metrics_file.close()
        samples_file.close()
        if writer is not None:
            writer.close()
    return out


def evaluate_checkpoint(cfg: TrainConfig, path: str | Path) -> dict:
    run = Run(cfg)
    if not (Path(path) / "state.pt").exists():
        raise ValueError(f"--checkpoint {path}: not a checkpoint folder (no state.pt)")
    run.restore(Path(path))
    return run.evaluate()
