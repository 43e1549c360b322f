"""The training run: :class:`Run` (what a run holds, built from its config) and the step loop.
Its parts live beside it: the rollout engine (:mod:`~pgpo.train.engines`), the logs and the
folder (:mod:`~pgpo.train.run_dir`), resume (:mod:`~pgpo.train.resume`), checkpoint state
(:mod:`~pgpo.train.run_state`) and evaluation (:mod:`~pgpo.train.evaluate`).

``train(cfg)`` is what ``pgpo train`` runs (and what ``pgpo demo`` calls); the step itself is
:func:`pgpo.train.step.train_step`.
"""

from __future__ import annotations

import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from pgpo.cli_util import Interrupted
from pgpo.modulation import AlphaSchedule, Modulation
from pgpo.optim import ModulatedOptimizer
from pgpo.train import checkpoint, distributed, lora, run_state
from pgpo.train.config import TrainConfig
from pgpo.train.data import QuestionSampler, fingerprint, load_split, split_specs
from pgpo.train.distributed import World
from pgpo.train.engines import make_engine, rank_seed
from pgpo.train.evaluate import evaluate_run, teacher_edge
from pgpo.train.forward import Policy
from pgpo.train.guard import CollapseGuard
from pgpo.train.model import load_model, load_tokenizer, torch_dtype
from pgpo.train.resume import (
    changed_settings,
    changes_text,
    refuse_fixed,
    refuse_other_data,
    resume_point,
    resumes_after,
    run_record,
)
from pgpo.train.rollout import prompt_seed
from pgpo.train.run_dir import METRICS, RunDir, RunLogs
from pgpo.train.sft import sft_step
from pgpo.train.step import train_step
from pgpo.train.stop import StopRequest
from pgpo.train.tasks import task_of
from pgpo.train.teacher import Teacher


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
        self.cfg = cfg
        self.world = world or World()
        q, size = cfg.questions_per_step, self.world.size
        if q % size:
            raise ValueError(
                f"batch_size / rollout.n = {q} questions per step do not split over {size} ranks"
            )
        if (cfg.batch_size // size) % cfg.optim.updates_per_batch:
            raise ValueError(
                f"optim.updates_per_batch={cfg.optim.updates_per_batch} does not divide the "
                f"{cfg.batch_size // size} samples per rank of each step"
            )
        seed_everything(cfg.seed)
        # The data first: a wrong path fails before a tokenizer or model is fetched.
        d = cfg.data
        train_spec, test_spec = split_specs(d.train, d.test, d.sciknoweval, d.domain)
        self.task = task_of(cfg)  # the user's reward.function is imported here, from their config
        self.train_data = load_split(train_spec, "train", cfg.seed, d.skip_bad_rows, d.max_train,
                                     self.task)  # fmt: skip
        self.test_data = load_split(test_spec, "test", cfg.seed, d.skip_bad_rows, d.max_test,
                                    self.task)  # fmt: skip
        self.data_fingerprint = {"train": fingerprint(self.train_data.questions),
                                 "test": fingerprint(self.test_data.questions)}  # fmt: skip
        refuse_other_data(data_fingerprint, self.data_fingerprint, cfg)
        self.resumes: list[dict] = []  # config.yaml's record: one entry per resume
        for split, data in (("train", self.train_data), ("test", self.test_data)):
            if data.skipped and self.world.main:
                print(f"pgpo: data.{split}: skipped {data.skipped} bad row(s) of {data.source} "
                      "(data.skip_bad_rows=true)", file=sys.stderr)  # fmt: skip
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
            self.teacher = self._teacher()
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
            self.teacher = self._teacher()
        adamw = torch.optim.AdamW(
            [p for p in self.lm.parameters() if p.requires_grad],  # all, or the adapters
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
        self.modulation = modulation(cfg) if cfg.pgpo.enabled else None
        self.sampler = QuestionSampler(self.train_data.questions, cfg.seed)
        self.guard = CollapseGuard(cfg.collapse.window, cfg.collapse.threshold)
        self.step = 0
        self.skipped = 0
        self.step_seconds_total = 0.0  # training wall-clock (rollouts and updates, no evals)

    def _teacher(self) -> Teacher:
        t = self.cfg.teacher
        dtype = None if t.dtype is None else torch_dtype(t.dtype)
        rate = t.trust_region_rate
        return Teacher(self.policy, t.mode, t.ema_rate, dtype, trust_region_rate=rate,
                       temperature=t.temperature)  # fmt: skip

    def state(self) -> dict:
        """Everything to continue from (:func:`pgpo.train.run_state.state`)."""
        return run_state.state(self)

    def load_state(self, state: dict) -> None:
        run_state.load_state(self, state)

    def restore(self, path: Path, state: dict | None = None) -> None:
        """Continue from a checkpoint folder (:func:`pgpo.train.run_state.restore`)."""
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
            return sft_step(
                questions, self.policy, self.teacher, self.tokenizer, self.engine,
                self.optimizer, self.scheduler, self.cfg, self.world, seeds, self.task,
            )  # fmt: skip
        return train_step(
            questions,
            self.policy,
            self.teacher,
            self.tokenizer,
            self.engine,
            self.optimizer,
            self.scheduler,
            self.cfg,
            self.modulation,
            self.world,
            seeds,
            self.task,
        )

    def evaluate(self) -> dict:
        """avg@k on the test split. Runs on its own RNG stream (seeded by seed and step), so
        evaluating never changes the training run: a resumed run stays bit-identical."""
        e = self.cfg.eval
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)
            return evaluate_run(self, e)

    def teacher_edge(self, count: int) -> dict:
        return teacher_edge(self, count)


# A run whose steps are all skipped (non-finite loss, gradient or I_k) has diverged.
MAX_SKIPPED_IN_A_ROW = 10


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    position: int | None = None,
) -> Path:
    """Run ``cfg.steps`` steps (continuing from the newest intact checkpoint with ``resume``).
    Writes ``metrics.jsonl``, ``samples.jsonl``, ``config.yaml`` and ``checkpoints/`` to
    output.dir (see :mod:`pgpo.train.run_dir` for what it may replace), holding the folder's
    lock throughout. A resume applies and records the settings it may change and refuses the
    others (:mod:`pgpo.train.resume`). ``desc`` labels the progress bar, ``position`` its line
    (for runs in parallel processes). SIGINT / SIGTERM stop it after the current step with a
    checkpoint (:class:`~pgpo.cli_util.Interrupted`)."""
    world = distributed.init_world()  # size 1 unless launched by torchrun
    folder = RunDir(cfg.output.dir, resume=resume, overwrite=cfg.output.overwrite, main=world.main)
    with folder.claimed():
        _train(cfg, world, folder, progress, desc, position)
    return folder.path


def _train(cfg: TrainConfig, world: World, folder: RunDir, progress, desc, position) -> None:
    start = resume_point(folder, cfg.steps) if folder.resume else None
    run = None
    stepped = False
    try:
        changed = {}
        if start is not None:  # refused before any model loads
            changed = changed_settings(start[1]["config"], cfg)
            refuse_fixed(changed, cfg, start[1]["step"])
        run = Run(cfg, world, start and start[1].get("data_fingerprint"))
        if start is not None:
            run.restore(*start)
            run.resumes = resumes_after(start[1].get("resumes", []), run.step, changed)
            if changed and world.main:
                print(f"pgpo: --resume applies {changes_text(changed)} from step {run.step} "
                      f"(recorded in {folder.path / 'config.yaml'})", file=sys.stderr)  # fmt: skip
        folder.start(run_record(folder, cfg, run.data_fingerprint, run.resumes, start),
                     start and run.step)  # fmt: skip
        skipped = {}
        if cfg.data.skip_bad_rows:  # what the data left out, once per process (each reads it)
            skipped = {"data_train_rows_skipped": run.train_data.skipped,
                       "data_test_rows_skipped": run.test_data.skipped}  # fmt: skip
        logs = RunLogs(folder, cfg, skipped)
        try:
            with StopRequest() as stop:
                for _ in _steps(run, folder, logs, stop, progress, desc, position):
                    stepped = True
        finally:
            logs.close()
    except BaseException as err:
        if not stepped and not isinstance(err, Interrupted):
            folder.failed_before_first_step()
        raise
    finally:
        if run is not None:
            run.engine.close()


def _steps(run: Run, folder: RunDir, logs: RunLogs, stop: StopRequest, progress, desc, position):
    """The step loop; yields after each step (logged, and checkpointed when due)."""
    from tqdm import tqdm

    cfg = run.cfg
    if cfg.eval.before_train and run.step == 0:
        logs.step({"step": 0, **{f"eval_{k}": v for k, v in run.evaluate().items()}}, None)
    bar = tqdm(
        range(run.step, cfg.steps),
        initial=run.step,
        total=cfg.steps,
        desc=desc,
        position=position,
        unit="step",
        file=sys.stderr,
        disable=not (progress and run.world.main) or None,
    )
    skipped_in_a_row = 0
    for _ in bar:
        questions, seeds = run.next_questions()
        metrics = run.train_step(questions, seeds=seeds)
        run.step += 1
        run.skipped += metrics["skipped"]
        skipped_in_a_row = skipped_in_a_row + 1 if metrics["skipped"] else 0
        run.engine.sync_weights(run.lm)
        samples = metrics.pop("samples")
        feedback = metrics.pop("feedback", None)  # misleading feedback's per-sample records
        run.step_seconds_total += metrics["step_seconds"]
        row = {"step": run.step, **metrics, "skipped_total": run.skipped,
               "step_seconds_total": run.step_seconds_total}  # fmt: skip
        collapsed = run.guard.observe(run.step, row["reward"])
        if run.guard.collapsed_at is not None:
            row["collapsed_at"] = run.guard.collapsed_at
        if run.engine.sleep_freed_gib is not None:  # vLLM sleep mode, on CUDA
            row["vllm_sleep_freed_gib"] = run.engine.sleep_freed_gib
        best = False
        if run.step % cfg.eval.every == 0 or run.step == cfg.steps:
            row.update({f"eval_{k}": v for k, v in run.evaluate().items()})
            score = row.get("eval_avg_at_k", row.get("eval_p_correct"))  # by eval.mode
            best = cfg.collapse.keep_best and run.guard.improved(run.step, score)
        logs.step(row, samples if run.step % cfg.output.sample_every == 0 else None, feedback)
        bar.set_postfix(
            reward=f"{row['reward']:.2f}", rho=f"{row['rho']:.3f}", loss=f"{row['loss']:.4f}"
        )
        last = run.step == cfg.steps and cfg.output.save_last
        saved = run.step % cfg.output.save_every == 0 or last
        if saved:
            run.save(folder.checkpoints)
        if best:
            run.save_best(folder.checkpoints / "best")
        yield
        if collapsed and cfg.collapse.stop:
            if not saved:
                run.save(folder.checkpoints)
            if run.world.main:
                print(
                    f"pgpo: the training reward collapsed at step {run.step} (mean "
                    f"{run.guard.window_mean():.3f} over {cfg.collapse.window} steps <= "
                    f"{cfg.collapse.threshold:g}); stopped (collapse.stop)",
                    file=sys.stderr,
                )
            return
        if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise ValueError(
                f"the last {skipped_in_a_row} steps were all skipped (non-finite loss, gradient "
                f"or I_k: has the run diverged? optim.lr={cfg.optim.lr:g}); "
                f"see {folder.path / METRICS}"
            )
        signal_number = int(run.world.max(stop.signal))
        if signal_number:
            if not saved:
                run.save(folder.checkpoints)
            raise Interrupted(
                f"stopped by {signal.Signals(signal_number).name} after step {run.step}; "
                f"continue with --resume (checkpoint in {folder.checkpoints})",
                128 + signal_number,
            )


def evaluate_checkpoint(cfg: TrainConfig, path: str | Path) -> dict:
    """avg@k of a checkpoint (under torchrun: sharded like training, test set split over ranks;
    needed for ``fsdp.checkpoint=sharded`` checkpoints)."""
    state = checkpoint.load(Path(path))  # refused in one line before any model loads
    run = Run(cfg, distributed.init_world())
    run.restore(Path(path), state)
    return run.evaluate()
