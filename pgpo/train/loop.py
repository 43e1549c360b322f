"""The training loop: a :class:`~pgpo.train.run.Run` (what a run holds, built from its config)
stepped, logged, evaluated and checkpointed. Its parts live beside it: the run
(:mod:`~pgpo.train.run`), the logs and the folder (:mod:`~pgpo.train.run_folder.run_dir`), resume
(:mod:`~pgpo.train.run_folder.resume`), checkpoint state (:mod:`~pgpo.train.run_folder.run_state`)
and evaluation (:mod:`~pgpo.train.evaluation.evaluate`).

``train(cfg)`` is what ``pgpo train`` runs (and what ``pgpo demo`` calls); the step itself is
:func:`pgpo.train.step.train_step`.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from pgpo.cli_util import Interrupted
from pgpo.train.config import TrainConfig
from pgpo.train.models import distributed
from pgpo.train.models.distributed import World
from pgpo.train.run import Run
from pgpo.train.run_folder import checkpoint
from pgpo.train.run_folder.resume import (
    changed_settings,
    changes_text,
    refuse_fixed,
    resume_point,
    resumes_after,
    run_record,
)
from pgpo.train.run_folder.run_dir import METRICS, RunDir, RunLogs
from pgpo.train.stop import StopRequest

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
    output.dir (see :mod:`pgpo.train.run_folder.run_dir` for what it may replace), holding the
    folder's lock throughout. A resume applies and records the settings it may change and refuses
    the others (:mod:`pgpo.train.run_folder.resume`). ``desc`` labels the progress bar, ``position``
    its line (for runs in parallel processes). SIGINT / SIGTERM stop it after the current step with
    a checkpoint (:class:`~pgpo.cli_util.Interrupted`)."""
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
