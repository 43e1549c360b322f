"""Checkpoints: written atomically, read as data.

A checkpoint holds everything needed to continue exactly: policy, teacher (EMA copy), optimizer,
scheduler, the question sampler's position, counters, and every RNG state. It is written into a
temporary folder that one rename turns into ``step_000042``.

Reading never runs code from the file. ``state.pt`` is read with ``torch.load(weights_only=True)``
(tensors and plain Python values only; checkpoints of earlier versions also held NumPy's RNG
state as an array, which is allowed by name). The shards of a sharded checkpoint are read through
:class:`SafeReader`, whose metadata unpickler knows only the classes of
``torch.distributed.checkpoint``'s metadata, and :class:`SafeLoadPlanner`, which reads the
shards' non-tensor values with ``weights_only=True`` too. A file that is damaged, or holds
anything else, raises :class:`CheckpointError` (one line).
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

PREFIX = "step_"
TMP_PREFIX = f".tmp-{PREFIX}"
REQUIRED = ("step", "rng", "config", "scheduler", "sampler", "skipped")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, damaged, or holding more than data)."""


# --- RNG states -------------------------------------------------------------------------------


def rng_state() -> dict:
    """Python's, NumPy's and torch's global generators, as tensors and plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        keys = numpy["keys"].numpy().astype(np.uint32)
        numpy = (numpy["bit_generator"], keys, numpy["pos"], numpy["has_gauss"],
                 numpy["cached_gaussian"])  # fmt: skip
    np.random.set_state(numpy)  # a tuple: a checkpoint of an earlier version
    torch.set_rng_state(state["torch"])


# --- writing ----------------------------------------------------------------------------------


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an older ``final`` (the same step saved again) is set aside
    first and removed only after the new one is in place."""
    old = final.with_name(f"{TMP_PREFIX}{final.name}-replaced")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class _WriteErrors:
    """A file for ``torch.save`` that keeps the first OSError of its writes: torch's zip writer
    swallows it and raises its own "unexpected pos" RuntimeError, which says nothing of a full
    disk or of the file."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj, path: Path) -> None:
    """``torch.save(obj, path)``; a failed write (a disk that fills up on the way) raises the
    OSError itself, naming ``path``, instead of torch's RuntimeError."""
    with open(path, "wb") as file:
        writer = _WriteErrors(file)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            err = writer.error
            raise OSError(err.errno, err.strerror, str(path)) from None


def save(folder: Path, step: int, state: dict, rng: dict | None = None) -> Path:
    """Write ``state`` plus the RNG states (this process's, or ``rng``) as
    ``folder/step_000042``; atomic."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f"{TMP_PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _torch_save({**state, "step": step, "rng": rng or rng_state()}, tmp / "state.pt")
        _replace(tmp, final)
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
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f"{TMP_PREFIX}{step:06d}-sharded"  # the same name on every rank
    if world.main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    world.barrier()
    try:
        dcp.save(shards, checkpoint_id=str(tmp / "shards"))
        if world.main:
            record = {**state, "step": step, "rng": rng_state(), "sharded": True}
            _torch_save(record, tmp / "state.pt")
        world.barrier()
        if world.main:
            _replace(tmp, final)
        world.barrier()
    except BaseException:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_temporaries(folder: Path) -> list[Path]:
    """Remove what interrupted saves left in ``folder`` (only this module's own ``.tmp-step_*``
    folders); returns them. Call before a run writes its first checkpoint."""
    if not folder.is_dir():
        return []
    left = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX))
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
    return left


# --- reading ----------------------------------------------------------------------------------


def _numpy_rng_globals() -> list:
    """What an earlier version's pickled NumPy RNG state needs: an array and its dtype."""
    core = getattr(np, "_core", None) or np.core
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def load(path: Path) -> dict:
    """``path/state.pt`` as data (tensors and plain values only): a :class:`CheckpointError`
    when it is missing, damaged, holds anything else, or is not a pgpo checkpoint."""
    file = Path(path) / "state.pt"
    if not file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (no state.pt)")
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "unsupported global" in text.lower() or "unsupported class" in text.lower():
            raise CheckpointError(
                f"{file}: not loaded: it holds Python objects other than tensors and plain values"
            ) from None
        detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
        raise CheckpointError(f"{file} is damaged ({(detail or ['unreadable'])[0]})") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, AttributeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{file} is damaged ({reason})") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file}: not a pgpo checkpoint (no {', '.join(missing)})")
    config = state["config"]
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict)):
        raise CheckpointError(f"{file}: not a pgpo checkpoint (no training config)")
    return state


def candidates(folder: Path) -> list[Path]:
    """Complete checkpoint folders in ``folder``, newest first (temporary folders ignored)."""
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.pt").exists()]
    return sorted(done, reverse=True)


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``."""
    found = candidates(folder)
    return found[0] if found else None


def newest_intact(folder: Path) -> tuple[Path | None, dict | None, list[str]]:
    """The newest checkpoint in ``folder`` whose ``state.pt`` (and, for a sharded one, shard
    metadata) reads as data, its state, and why each newer one was skipped."""
    skipped = []
    for path in candidates(folder):
        try:
            state = load(path)
            if state.get("sharded"):
                SafeReader(path / "shards").read_metadata()
            return path, state, skipped
        except CheckpointError as err:
            skipped.append(f"{path.name}: {err}")
    return None, None, skipped


# --- sharded checkpoints ----------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``torch.distributed.checkpoint`` metadata and refuses everything else."""

    MODULES = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str):
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        if name in self.MODULES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"shard metadata refers to {module}.{name}")


class SafeReader(dcp.FileSystemReader):
    """A ``FileSystemReader`` whose metadata is read by an unpickler that accepts only the
    checkpoint library's own metadata classes (the library's reader unpickles it freely)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent}: no shard metadata (.metadata)") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path} is damaged or not data ({err})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not shard metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """A ``DefaultLoadPlanner`` that reads the shards' non-tensor values (optimizer steps,
    param groups) with ``weights_only=True``: the default planner unpickles them freely."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            data = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"a shard value is not data ({err})") from None
        # The parent unpickles freely: hand it our own re-serialization of the plain value.
        clean = io.BytesIO()
        torch.save(data, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def load_shards(path: Path, templates: dict) -> dict:
    """Fill ``templates`` (state dicts of this rank's DTensors, as given to
    :func:`save_sharded`) in place from ``path/shards``; the number of ranks may differ."""
    shards = Path(path) / "shards"
    dcp.load(templates, storage_reader=SafeReader(shards), planner=SafeLoadPlanner())
    return templates


def load_sharded_weights(path: Path, part: str) -> dict[str, torch.Tensor] | None:
    """One model of a sharded checkpoint (``part``: "policy" or "teacher") as whole tensors with
    transformers' names, read without torch.distributed and without the rest of the state
    (4 bytes a parameter in float32, where :func:`consolidate` needs 20). None when the
    checkpoint holds no such model (a live teacher)."""
    shards = Path(path) / "shards"
    stored = SafeReader(shards).read_metadata().state_dict_metadata
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
        dcp.load(
            {part: wanted},
            storage_reader=SafeReader(shards),
            planner=SafeLoadPlanner(),
            no_dist=True,
        )
    return _transformers_names(wanted)


def _transformers_names(state: dict) -> dict:
    """Keys without the :class:`~pgpo.train.models.forward.Policy` wrapper's "lm." prefix."""
    return {k.removeprefix("lm."): v for k, v in state.items()}


def _unflatten(flat: dict, paths: dict) -> dict:
    """Nested dicts and lists from ``torch.distributed.checkpoint``'s flat keys and their
    paths (``metadata.planner_data``: key -> (section, ..., leaf))."""
    root: dict = {}
    for key, value in flat.items():
        path = paths.get(key, (key,))
        node = root
        for part, nxt in zip(path[:-1], path[1:]):
            if isinstance(node, list):
                while len(node) <= part:
                    node.append(None)
                if node[part] is None:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
            else:
                node = node.setdefault(part, [] if isinstance(nxt, int) else {})
        if isinstance(node, list):
            while len(node) <= path[-1]:
                node.append(None)
        node[path[-1]] = value
    return root


def _read_all_shards(shards: Path) -> dict:
    """Every value of a sharded checkpoint as whole tensors and plain values, nested as saved;
    one process, no torch.distributed."""
    metadata = SafeReader(shards).read_metadata()
    flat = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        if isinstance(m, TensorStorageMetadata)
        else None
        for key, m in metadata.state_dict_metadata.items()
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(
            flat,
            storage_reader=SafeReader(shards),
            planner=SafeLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
            no_dist=True,
        )
    return _unflatten(flat, metadata.planner_data or {})


def consolidate(path: Path) -> dict:
    """A sharded checkpoint (:func:`save_sharded`) as a whole one: the dict :func:`save` writes
    (transformers' parameter names, optimizer state keyed by parameter index), so a single
    process can evaluate or continue it. Runs without torch.distributed; needs host memory for
    the whole state (20 bytes a parameter with AdamW and an fp32 teacher)."""
    small = load(path)
    if not small.get("sharded"):
        raise CheckpointError(f"{path} is not a sharded checkpoint (it is whole already)")
    whole = _read_all_shards(Path(path) / "shards")

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
