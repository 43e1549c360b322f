"""Checkpoints written atomically: a temporary folder, then one rename.

A checkpoint holds everything needed to continue exactly: policy, teacher (EMA copy), optimizer,
scheduler, the question sampler's position, counters, and every RNG state.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import warnings
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


def save(folder: Path, step: int, state: dict, rng: dict | None = None) -> Path:
    """Write ``state`` plus the RNG states (this process's, or ``rng``) as
    ``folder/step_000042``; atomic."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save({**state, "step": step, "rng": rng or rng_state()}, tmp / "state.pt")
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


def load_sharded_weights(path: Path, part: str) -> dict[str, torch.Tensor] | None:
    """One model of a sharded checkpoint (``part``: "policy" or "teacher") as whole tensors with
    transformers' names, read without torch.distributed and without the rest of the state
    (4 bytes a parameter in float32, where :func:`consolidate` needs 20). None when the
    checkpoint holds no such model (a live teacher)."""
    import torch.distributed.checkpoint as dcp

    shards = str(Path(path) / "shards")
    stored = dcp.FileSystemReader(shards).read_metadata().state_dict_metadata
    prefix = f"{part}."
    wanted = {
        key.removeprefix(prefix): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if key.startswith(prefix)
    }
    if not wanted:
        return None
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({part: wanted}, checkpoint_id=shards, no_dist=True)
    return _transformers_names(wanted)


def _transformers_names(state: dict) -> dict:
    """Keys without the :class:`~pgpo.train.forward.Policy` wrapper's "lm." prefix."""
    return {k.removeprefix("lm."): v for k, v in state.items()}


def consolidate(path: Path) -> dict:
    """A sharded checkpoint (:func:`save_sharded`) as a whole one: the dict :func:`save` writes
    (transformers' parameter names, optimizer state keyed by parameter index), so a single
    process can evaluate or continue it. Runs without torch.distributed; needs host memory for
    the whole state (20 bytes a parameter with AdamW and an fp32 teacher)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    small = load(path)
    if not small.get("sharded"):
        raise ValueError(f"{path} is not a sharded checkpoint (it is whole already)")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(Path(path) / "shards"), str(Path(tmp) / "whole.pt"))
        whole = torch.load(Path(tmp) / "whole.pt", weights_only=False)

    # torch.distributed.checkpoint keys optimizer state by parameter name, in the optimizer's
    # parameter order; torch's own optimizer state dicts key it by position in that order.
    groups = whole["optimizer"]["param_groups"]
    index = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
    optimizer = {
        "state": {index[name]: s for name, s in whole["optimizer"]["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
    }
    rest = {k: v for k, v in small.items() if k != "sharded"}
    teacher = _transformers_names(whole["teacher"]) if "teacher" in whole else None
    policy = _transformers_names(whole["policy"])
    return {**rest, "policy": policy, "teacher": teacher, "optimizer": optimizer}


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
