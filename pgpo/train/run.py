"""What a training run holds: :class:`Run`, built from its config (the data, the model and its
teacher, the rollout engine, the optimizer and its schedule, the modulation), and the few
calls the step loop (:mod:`pgpo.train.loop`) makes on it. Its state lives in
:mod:`~pgpo.train.run_folder.run_state`, its evaluation in :mod:`~pgpo.train.evaluation.evaluate`,
the step itself in :mod:`~pgpo.train.step` and :mod:`~pgpo.train.sft`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import torch

from pgpo.modulation import AlphaSchedule, Modulation
from pgpo.optim import ModulatedOptimizer
from pgpo.train.config import TrainConfig
from pgpo.train.evaluation.evaluate import evaluate_run, teacher_edge
from pgpo.train.guard import CollapseGuard
from pgpo.train.models import distributed, lora
from pgpo.train.models.distributed import World
from pgpo.train.models.forward import Policy
from pgpo.train.models.model import load_model, load_tokenizer, torch_dtype
from pgpo.train.models.teacher import Teacher
from pgpo.train.rollout import prompt_seed
from pgpo.train.rollout.engines import make_engine, rank_seed
from pgpo.train.run_folder import run_state
from pgpo.train.run_folder.resume import refuse_other_data
from pgpo.train.sft import sft_step
from pgpo.train.step import train_step
from pgpo.train.tasks import Task, task_of
from pgpo.train.tasks.data import Dataset, QuestionSampler, fingerprint, load_split, split_specs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def modulation(cfg: TrainConfig) -> Modulation:
    """The ``pgpo`` section as the step's :class:`~pgpo.modulation.Modulation`."""
    p = cfg.pgpo
    schedule = AlphaSchedule(
        p.alpha_schedule,
        p.alpha,
        rho_target=p.rho_target,
        rate=p.schedule_rate,
        alpha_min=p.alpha_min,
        alpha_max=p.alpha_max,
        floor=p.info_floor,
        window=p.schedule_window,
    )
    return Modulation(p.rho_max, p.kind, p.sharpness, p.granularity, p.combine_step, schedule)


def check_batch(cfg: TrainConfig, world: World) -> None:
    """One-line errors for a batch that does not split over the ranks and mini-batches."""
    q, size = cfg.questions_per_step, world.size
    if q % size:
        raise ValueError(
            f"batch_size / rollout.n = {q} questions per step do not split over {size} ranks"
        )
    if (cfg.batch_size // size) % cfg.optim.updates_per_batch:
        raise ValueError(
            f"optim.updates_per_batch={cfg.optim.updates_per_batch} does not divide the "
            f"{cfg.batch_size // size} samples per rank of each step"
        )


def load_data(
    cfg: TrainConfig, world: World, started_with: dict | None
) -> tuple[Task, Dataset, Dataset, dict]:
    """The task and both splits with their fingerprints. ``started_with``: the fingerprints a
    resumed run was started with; other questions behind the same names are refused. Rank 0
    reports the rows ``data.skip_bad_rows`` left out."""
    d = cfg.data
    train_spec, test_spec = split_specs(d.train, d.test, d.sciknoweval, d.domain)
    task = task_of(cfg)  # the user's reward.function is imported here, from their config
    train_data = load_split(train_spec, "train", cfg.seed, d.skip_bad_rows, d.max_train, task)
    test_data = load_split(test_spec, "test", cfg.seed, d.skip_bad_rows, d.max_test, task)
    fingerprints = {"train": fingerprint(train_data.questions),
                    "test": fingerprint(test_data.questions)}  # fmt: skip
    refuse_other_data(started_with, fingerprints, cfg)
    for split, data in (("train", train_data), ("test", test_data)):
        if data.skipped and world.main:
            print(f"pgpo: data.{split}: skipped {data.skipped} bad row(s) of {data.source} "
                  "(data.skip_bad_rows=true)", file=sys.stderr)  # fmt: skip
    return task, train_data, test_data, fingerprints


def make_teacher(policy: Policy, cfg: TrainConfig) -> Teacher:
    t = cfg.teacher
    dtype = None if t.dtype is None else torch_dtype(t.dtype)
    return Teacher(policy, t.mode, t.ema_rate, dtype, trust_region_rate=t.trust_region_rate,
                   temperature=t.temperature)  # fmt: skip


def make_optimizer(lm: torch.nn.Module, cfg: TrainConfig):
    """AdamW over the trainable parameters (all, or the adapters), wrapped to take rho-scaled
    steps, and its schedule: a constant learning rate after a linear warmup (the reference's)."""
    adamw = torch.optim.AdamW(
        [p for p in lm.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
    )
    warmup = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        adamw, lambda k: min(1.0, (k + 1) / warmup) if warmup > 0 else 1.0
    )
    return ModulatedOptimizer(adamw), scheduler


class Run:
    """Everything a run holds; built from a config, optionally restored from a checkpoint.

    Under ``torchrun`` (``world.distributed``) the policy and a separate teacher are sharded
    with FSDP2, each rank takes its slice of every step's questions and of the test set, and
    checkpoints are gathered whole by rank 0 or written per rank (``fsdp.checkpoint``)."""

    def __init__(
        self, cfg: TrainConfig, world: World | None = None, data_fingerprint: dict | None = None
    ) -> None:
        """``data_fingerprint``: the fingerprints of the questions a resumed run was started
        with; other questions behind the same names are refused before any model loads."""
        self.cfg, self.world = cfg, world or World()
        check_batch(cfg, self.world)
        seed_everything(cfg.seed)
        # The data first: a wrong path fails before a tokenizer or model is fetched.
        self.task, self.train_data, self.test_data, self.data_fingerprint = load_data(
            cfg, self.world, data_fingerprint
        )
        self.resumes: list[dict] = []  # config.yaml's record: one entry per resume
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        self.lm = load_model(cfg.model, cfg.seed)  # the causal LM (same init on every rank)
        self.uses_lora = cfg.model.lora.rank > 0
        if self.uses_lora:  # adapters on the frozen base, seeded like the model: alike on all ranks
            l = cfg.model.lora  # noqa: E741
            lora.apply(self.lm, l.rank, l.alpha, l.dropout, l.target_modules)
        if torch.cuda.is_available() and not self.world.distributed:
            self.lm.to("cuda")  # one process on a GPU machine trains there (FSDP2 places its own)
        self.policy = Policy(self.lm)  # what the step calls
        if not self.uses_lora:
            self.teacher = make_teacher(self.policy, cfg)
        if self.world.rank:  # every other rank samples from its own stream; rank 0 keeps seed's
            seed_everything(rank_seed(cfg.seed, self.world.rank))
        self.engine = make_engine(
            cfg, self.lm, self.tokenizer, distributed=self.world.distributed, rank=self.world.rank
        )
        if self.world.distributed:
            distributed.shard(self.policy, self.lm, cfg.fsdp, trainable=True)
            if cfg.teacher.mode != "live" and not self.uses_lora:
                distributed.shard(self.teacher.policy, self.teacher.lm, cfg.fsdp, trainable=False)
        if self.uses_lora:  # adapter values cloned from the (sharded) adapters: sharded alike
            self.teacher = make_teacher(self.policy, cfg)
        self.optimizer, self.scheduler = make_optimizer(self.lm, cfg)
        self.modulation = modulation(cfg) if cfg.pgpo.enabled else None
        self.sampler = QuestionSampler(self.train_data.questions, cfg.seed)
        self.guard = CollapseGuard(cfg.collapse.window, cfg.collapse.threshold)
        self.step = 0
        self.skipped = 0
        self.step_seconds_total = 0.0  # training wall-clock (rollouts and updates, no evals)

    def state(self) -> dict:
        """Everything to continue from (:func:`pgpo.train.run_folder.run_state.state`)."""
        return run_state.state(self)

    def load_state(self, state: dict) -> None:
        run_state.load_state(self, state)

    def restore(self, path: Path, state: dict | None = None) -> None:
        """Continue from a checkpoint folder (:func:`pgpo.train.run_folder.run_state.restore`)."""
        run_state.restore(self, path, state)

    def save(self, folder: Path) -> None:
        """Checkpoint the current step into ``folder`` (every rank calls this)."""
        run_state.save(self, folder)

    def save_best(self, folder: Path) -> None:
        run_state.save_best(self, folder)

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
        """One step on ``questions`` with the run's modulation (None: SDPO), or the supervised
        yardstick's (``objective: sft``)."""
        if self.cfg.objective == "sft":
            return sft_step(questions, self, self.cfg, seeds)
        return train_step(questions, self, self.cfg, self.modulation, seeds)

    def evaluate(self) -> dict:
        """avg@k on the test split. Runs on its own RNG stream (seeded by seed and step), so
        evaluating never changes the training run: a resumed run stays bit-identical."""
        e = self.cfg.eval
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)
            return evaluate_run(self, e)

    def teacher_edge(self, count: int) -> dict:
        return teacher_edge(self, count)
