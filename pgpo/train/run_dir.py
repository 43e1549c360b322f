"""The run folder (``output.dir``): what a run writes there, and the only things it ever removes.

A run owns the entries in :data:`OWN` and nothing else in the folder. Rules:
- a fresh run refuses a folder that holds an earlier run, unless ``output.overwrite`` is set, and
  then removes only that run's own entries;
- ``--resume`` keeps the logs up to the checkpoint it continues from, so every step appears once;
- a run that fails before its first step leaves nothing behind: what it created is removed, and so
  is the folder itself if the run created it;
- files are replaced atomically (a temporary file, then one rename).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pgpo.train.checkpoint import remove_temporaries
from pgpo.train.trackers import TRACKER_DIRS

METRICS, SAMPLES, CONFIG = "metrics.jsonl", "samples.jsonl", "config.yaml"
FEEDBACK = "feedback.jsonl"  # misleading feedback only: per-sample records (pgpo.train.feedback)
# A run's own entries: those that mark a folder as holding a run, and the trackers' folders
# (removed with the run's by output.overwrite, but a wandb/ folder alone is no earlier run).
MARKS = (CONFIG, METRICS, SAMPLES, FEEDBACK, "checkpoints", ".vllm-initial-weights")
OWN = MARKS + TRACKER_DIRS


def finished(folder: str | Path, config: dict) -> bool:
    """Whether ``folder`` holds a completed run of ``config`` (a ``to_dict`` of a TrainConfig):
    the same settings (``output.overwrite`` aside; a setting added since the run was saved
    counts as its default) and a logged row for the last step. Tools that run many configs (the
    demo, studies) skip such runs."""
    import yaml

    from pgpo.train.config import TrainConfig, to_dict

    folder = Path(folder)
    try:
        saved = yaml.safe_load((folder / CONFIG).read_text())
        rows = (folder / METRICS).read_text().splitlines()
        last = json.loads(rows[-1])["step"] if rows else None
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return False
    if isinstance(saved, dict):
        saved = _with_defaults(saved, to_dict(TrainConfig()))

    def settings(c: dict) -> dict:
        return {**c, "output": {k: v for k, v in c.get("output", {}).items() if k != "overwrite"}}

    return (
        isinstance(saved, dict) and settings(saved) == settings(config) and last == config["steps"]
    )


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """``saved`` with the keys it lacks taken from ``defaults``, section by section."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


class RunDirError(ValueError):
    """``output.dir`` cannot take this run (one line, naming the folder)."""


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text``, or what it held before: never half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunDir:
    """``output.dir`` for one run. Only the main process writes (``main``); every process
    checks, so that all refuse alike."""

    def __init__(self, path: str | Path, *, resume: bool, overwrite: bool, main: bool) -> None:
        self.path, self.resume, self.main = Path(path), resume, main
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output.dir {self.path} exists and is not a folder")
        self.created = not self.path.exists()
        earlier = [name for name in MARKS if (self.path / name).exists()]
        if earlier:
            earlier += [name for name in TRACKER_DIRS if (self.path / name).exists()]
        if earlier and not resume and not overwrite:
            raise RunDirError(
                f"output.dir {self.path} holds an earlier run ({', '.join(earlier)}): continue "
                "it with --resume, start afresh with output.overwrite=true (removes only those "
                "entries), or choose another output.dir"
            )
        self._earlier = earlier if overwrite and not resume else []
        self._written: list[Path] = []

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def start(self, config_yaml: str, resumed_step: int | None) -> None:
        """Before the first step: the folder, its config, logs cut back to ``resumed_step``,
        and no temporaries of interrupted saves."""
        if not self.main:
            return
        for name in self._earlier:  # output.overwrite: the earlier run's own entries only
            target = self.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG, METRICS, SAMPLES, FEEDBACK, "checkpoints", *TRACKER_DIRS):
            if not (self.path / name).exists():
                self._written.append(self.path / name)
        write_atomic(self.path / CONFIG, config_yaml)
        if resumed_step is not None:
            for name in (METRICS, SAMPLES, FEEDBACK):
                self._cut_log(self.path / name, resumed_step)
        remove_temporaries(self.checkpoints)

    def _cut_log(self, path: Path, step: int) -> None:
        """Keep the rows up to ``step``: the steps after the checkpoint are run again."""
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a row cut off by a crash
        write_atomic(path, "".join(f"{line}\n" for line in kept))

    def failed_before_first_step(self) -> None:
        """Remove what this run created (and the folder, if it created it and it is empty)."""
        if not self.main or self.resume:
            return
        for path in self._written:  # none of them existed when the run started
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()
