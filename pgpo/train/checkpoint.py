"""Checkpoints written atomically: a temporary folder, then one rename.

A checkpoint holds everything needed to continue exactly: policy, teacher (EMA copy), optimizer,
scheduler, the question sampler's position, counters, and every RNG state.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

PREFIX = "step_"


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(folder: Path, step: int, state: dict) -> Path:
    """Write ``state`` (plus the RNG states) as ``folder/step_000042``; atomic."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_sharded(folder: Path, step: int, state: dict, shards: dict, world) -> Path:
    """Every rank calls this (a collective). ``shards``: state dicts whose tensors are this
    rank's FSDP2 shards (DTensors), written by ``torch.distributed.checkpoint`` into
    ``step_.../shards`` (each rank its own files); ``state``: the small rest, written by rank 0
    as ``state.pt``. Atomic like :func:`save`: a temporary folder renamed when all ranks are
    done."""
    import torch.distributed.checkpoint as dcp

    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{PREFIX}{step:06d}-sharded"  # the same name on every rank
    if world.main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    world.barrier()
    try:
        dcp.save(shards, checkpoint_id=str(tmp / "shards"))
        if world.main:
            record = {**state, "step": step, "rng": rng_state(), "sharded": True}
            torch.save(record, tmp / "state.pt")
        world.barrier()
        if world.main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        world.barrier()
    except BaseException:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_shards(path: Path, templates: dict) -> dict:
    """Fill ``templates`` (state dicts of this rank's DTensors, as given to
    :func:`save_sharded`) in place from ``path/shards``; the number of ranks may differ."""
    import torch.distributed.checkpoint as dcp

    dcp.load(templates, checkpoint_id=str(Path(path) / "shards"))
    return templates


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (temporary folders are ignored)."""
    if not folder.exists():
        return None
    done = sorted(
        p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").exists()
    )
    return done[-1] if done else None


def load(path: Path) -> dict:
    return torch.load(Path(path) / "state.pt", weights_only=False)
