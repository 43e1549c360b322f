"""A run's checkpoint state: what :class:`pgpo.train.run.Run` saves and restores (every
function here takes that run, ``run``).

Whole tensors in one ``state.pt`` (gathered by rank 0 under FSDP2), or per-rank shards
(``fsdp.checkpoint: sharded``); with LoRA, the adapters alone. The file format itself is
:mod:`pgpo.train.run_folder.checkpoint`'s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pgpo.train.config import to_dict
from pgpo.train.models import distributed, lora
from pgpo.train.run_folder import checkpoint


def state(run) -> dict:
    """Everything to continue from, whole tensors (under FSDP2 gathered: a collective).
    With LoRA the policy is its adapters alone: the base is model.path's (or the seed's),
    and only the adapters are gathered."""
    if run.uses_lora:
        weights = {"policy": lora.adapter_state(run.lm), "teacher": run.teacher.state_dict()}
    elif run.world.distributed:
        teacher = None
        if run.cfg.teacher.mode != "live":
            teacher = distributed.full_state_dict(run.teacher.lm)
        weights = {"policy": distributed.full_state_dict(run.lm), "teacher": teacher}
    else:
        weights = {"policy": run.lm.state_dict(), "teacher": run.teacher.state_dict()}
    if run.world.distributed:
        weights["optimizer"] = distributed.full_optimizer_state(run.optimizer.optimizer)
    else:
        weights["optimizer"] = run.optimizer.state_dict()
    return {**weights, **small_state(run)}


def restore(run, path: Path, state: dict | None = None) -> None:
    """Continue from a checkpoint folder written by :meth:`save` (``state``: its
    ``state.pt``, when already read). A checkpoint that does not fit this run's model is
    refused in one line."""
    state = checkpoint.load(path) if state is None else state
    try:
        _restore(run, path, state)
    except (RuntimeError, KeyError) as err:  # shapes or names that do not match
        reason = (str(err).strip().splitlines() or [repr(err)])[0]
        raise checkpoint.CheckpointError(
            f"{path} does not fit this run's model ({reason})"
        ) from None


def _restore(run, path: Path, state: dict) -> None:
    if state.get("sharded"):
        if not run.world.distributed:
            raise ValueError(
                f"{path} is a sharded checkpoint: load it under torchrun "
                "(torchrun -m pgpo.train, or -m pgpo.cli eval)"
            )
        shards = checkpoint.load_shards(path, shard_templates(run))
        load_shards(run, shards)
        load_rest(run, state)
    else:
        load_state(run, state)


def save(run, folder: Path) -> None:
    """Checkpoint the current step into ``folder`` (every rank calls this)."""
    if run.world.distributed and run.cfg.fsdp.checkpoint == "sharded":
        checkpoint.save_sharded(folder, run.step, small_state(run), shard_templates(run), run.world)
        return
    whole = state(run)  # a collective under FSDP2: every rank gathers
    if run.world.main:
        checkpoint.save(folder, run.step, whole)
    run.world.barrier()


def save_best(run, folder: Path) -> None:
    """Checkpoint the current step as the best one: ``folder/step_...``, the previous best
    removed once the new one is complete."""
    save(run, folder)
    if run.world.main:
        for older in checkpoint.candidates(folder)[1:]:
            shutil.rmtree(older, ignore_errors=True)
    run.world.barrier()


def small_state(run) -> dict:
    schedule = None if run.modulation is None else run.modulation.schedule.state_dict()
    return {
        "scheduler": run.scheduler.state_dict(),
        "sampler": run.sampler.state_dict(),
        "skipped": run.skipped,
        "config": to_dict(run.cfg),
        "alpha_schedule": schedule,
        "guard": run.guard.state_dict(),
        "step_seconds_total": run.step_seconds_total,
        "data_fingerprint": run.data_fingerprint,
        "resumes": run.resumes,
    }


def shard_templates(run) -> dict:
    """This rank's shards of policy, optimizer and teacher (FSDP2 DTensors)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    shards = {
        "policy": get_model_state_dict(run.policy),
        "optimizer": get_optimizer_state_dict(run.policy, run.optimizer.optimizer),
    }
    if run.cfg.teacher.mode != "live":
        shards["teacher"] = get_model_state_dict(run.teacher.policy)
    return shards


def load_shards(run, shards: dict) -> None:
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(run.policy, shards["policy"])
    set_optimizer_state_dict(run.policy, run.optimizer.optimizer, shards["optimizer"])
    if "teacher" in shards:
        set_model_state_dict(run.teacher.policy, shards["teacher"])


def load_state(run, state: dict) -> None:
    if run.uses_lora:
        names = {n for n, _ in lora.adapters(run.lm)}
        if set(state["policy"]) != names:
            raise KeyError("its policy is not this run's LoRA adapters (model.lora)")
    if run.world.distributed:
        distributed.load_full_state_dict(run.lm, state["policy"], strict=not run.uses_lora)
        if run.uses_lora:
            run.teacher.load_state_dict(state["teacher"])
        elif state["teacher"] is not None and run.cfg.teacher.mode != "live":
            distributed.load_full_state_dict(run.teacher.lm, state["teacher"])
        distributed.load_full_optimizer_state(run.optimizer.optimizer, state["optimizer"])
    else:
        run.lm.load_state_dict(state["policy"], strict=not run.uses_lora)
        run.teacher.load_state_dict(state["teacher"])
        run.optimizer.load_state_dict(state["optimizer"])
    load_rest(run, state)


def load_rest(run, state: dict) -> None:
    run.engine.sync_weights(run.lm)
    run.scheduler.load_state_dict(state["scheduler"])
    learning_rate_from_config(run)
    run.sampler.load_state_dict(state["sampler"])
    run.skipped, run.step = state["skipped"], state["step"]
    run.guard.load_state_dict(state.get("guard"))  # older checkpoints have neither
    run.step_seconds_total = state.get("step_seconds_total", 0.0)
    if run.modulation is not None and state.get("alpha_schedule") is not None:
        run.modulation.schedule.load_state_dict(state["alpha_schedule"])
    checkpoint.set_rng_state(state["rng"])


def learning_rate_from_config(run) -> None:
    """After a restore: optim.lr and the warmup of this run's config from the restored step
    on, as a run started with them would have them at this step (the restored optimizer and
    scheduler hold the values they were saved with; a resume may have changed them)."""
    scheduler, lr = run.scheduler, run.cfg.optim.lr
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
