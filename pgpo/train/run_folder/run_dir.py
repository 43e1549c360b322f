"""The run folder (``output.dir``): what a run writes there (its logs: :class:`RunLogs`), and the
only things it ever removes.

A run owns the entries in :data:`OWN` and nothing else in the folder. Rules:
- a fresh run refuses a folder that holds an earlier run, unless ``output.overwrite`` is set, and
  then removes only that run's own entries;
- ``--resume`` keeps the logs up to the checkpoint it continues from, so every step appears once;
- a run that fails before its first step leaves nothing behind: what it created is removed, and so
  is the folder itself if the run created it;
- files are replaced atomically (a temporary file, then one rename);
- one writer at a time: the run holds the folder's lock for its whole life, and a second writer
  is refused in one line naming the holder;
- nothing is dropped silently: a log row cut off by a crash is named when a resume removes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from pgpo.locking import exclusive
from pgpo.outputs import json_text
from pgpo.train.config import TrainConfig, to_dict
from pgpo.train.evaluation.feedback import misleading_feedback
from pgpo.train.run_folder.checkpoint import remove_temporaries
from pgpo.train.trackers import TRACKER_DIRS, Trackers

METRICS, SAMPLES, CONFIG = "metrics.jsonl", "samples.jsonl", "config.yaml"
# misleading feedback only: per-sample records (pgpo.train.evaluation.feedback)
FEEDBACK = "feedback.jsonl"
# A run's own entries: those that mark a folder as holding a run, and the trackers' folders
# (removed with the run's by output.overwrite, but a wandb/ folder alone is no earlier run).
MARKS = (CONFIG, METRICS, SAMPLES, FEEDBACK, "checkpoints", ".vllm-initial-weights")
OWN = MARKS + TRACKER_DIRS


def finished(folder: str | Path, config: dict) -> bool:
    """Whether ``folder`` holds a completed run of ``config`` (a ``to_dict`` of a TrainConfig):
    the same settings (``output.overwrite`` aside; a setting added since the run was saved
    counts as its default) and a logged row for the last step. Tools that run many configs (the
    demo, studies) skip such runs."""
    from pgpo.train.config import settings_of_run, with_defaults

    folder = Path(folder)
    try:
        saved = yaml.safe_load((folder / CONFIG).read_text())
        rows = (folder / METRICS).read_text().splitlines()
        last = json.loads(rows[-1])["step"] if rows else None
        if isinstance(saved, dict):
            saved = with_defaults(settings_of_run(saved))
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return False

    def settings(c: dict) -> dict:
        return {**c, "output": {k: v for k, v in c.get("output", {}).items() if k != "overwrite"}}

    return (
        isinstance(saved, dict) and settings(saved) == settings(config) and last == config["steps"]
    )


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
    """``output.dir`` for one run. Only the main process writes (``main``), and it holds the
    folder's lock for the run's whole life (:meth:`claimed`); every process checks, so that all
    refuse alike."""

    def __init__(self, path: str | Path, *, resume: bool, overwrite: bool, main: bool) -> None:
        self.path, self.resume, self.overwrite, self.main = Path(path), resume, overwrite, main
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output.dir {self.path} exists and is not a folder")
        self.created = not self.path.exists()
        self._earlier: list[str] = []
        self._written: list[Path] = []

    @contextmanager
    def claimed(self) -> Iterator[RunDir]:
        """The folder for this run alone while the block runs: made if need be (a resume needs
        it to exist already) and locked, so that a second writer, a second launch or a
        ``--resume`` beside a live run, is refused in one line naming the process that holds
        it (:func:`pgpo.locking.exclusive`). Then a folder that holds an earlier run is refused
        unless the run resumes it or overwrites it."""
        if not self.main or (self.resume and not self.path.is_dir()):
            self._check_earlier()  # a resume of no folder finds no checkpoint: said next
            yield self
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path):  # refused: the folder is the holder's, left as it is
            try:
                self._check_earlier()
                yield self
            except BaseException:
                self._remove_if_made_empty()
                raise

    def _check_earlier(self) -> None:
        earlier = [name for name in MARKS if (self.path / name).exists()]
        if earlier:
            earlier += [name for name in TRACKER_DIRS if (self.path / name).exists()]
        if earlier and not self.resume and not self.overwrite:
            raise RunDirError(
                f"output.dir {self.path} holds an earlier run ({', '.join(earlier)}): continue "
                "it with --resume, start afresh with output.overwrite=true (removes only those "
                "entries), or choose another output.dir"
            )
        self._earlier = earlier if self.overwrite and not self.resume else []

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def saved_config(self) -> dict | None:
        """The run's saved ``config.yaml`` as a dict (``None``: absent or unreadable)."""
        try:
            saved = yaml.safe_load((self.path / CONFIG).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return saved if isinstance(saved, dict) else None

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
                for line in cut_log(self.path / name, resumed_step):
                    print(f"pgpo: --resume: {line}", file=sys.stderr)
        remove_temporaries(self.checkpoints)

    def failed_before_first_step(self) -> None:
        """Remove what this run created (and the folder, if it created it and it is empty)."""
        if not self.main or self.resume:
            return
        for path in self._written:  # none of them existed when the run started
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self._remove_if_made_empty()

    def _remove_if_made_empty(self) -> None:
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def cut_log(path: Path, step: int) -> list[str]:
    """Keep the rows of the JSON-lines log ``path`` up to ``step`` (the steps after the
    checkpoint are trained again); returns what was removed, in words. A row that does not read
    as JSON, as a crash leaves the last one cut mid-line, is removed and named, with its step
    where its text still shows it."""
    if not path.is_file():
        return []
    kept, later, cut = [], [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            found = re.match(r'\s*\{\s*"step"\s*:\s*(\d+)', line)
            cut.append(f"step {found.group(1)}'s row" if found else f"row {number}")
            continue
        (kept if row_step <= step else later).append(line)
    write_atomic(path, "".join(f"{line}\n" for line in kept))
    said = []
    if cut:
        what = "is not a complete JSON row" if len(cut) == 1 else "are not complete JSON rows"
        said.append(
            f"{path.name}: {', '.join(cut)} {what} (cut off by a crash), removed; {len(kept)} "
            "row(s) remain"
        )
    if later:
        said.append(
            f"{path.name}: {len(later)} row(s) after step {step}, the checkpoint's, are removed "
            "(those steps are trained again)"
        )
    return said


class RunLogs:
    """The run's JSON-lines logs and its trackers (``output.report_to``); main process only,
    no-ops elsewhere."""

    def __init__(self, folder: RunDir, cfg: TrainConfig, first: dict | None = None) -> None:
        self.first = dict(first or {})  # added to the first row this process logs
        main = folder.main
        self.metrics = open(folder.path / METRICS, "a") if main else None
        self.samples = open(folder.path / SAMPLES, "a") if main else None
        # misleading feedback: a row of per-sample records a step (pgpo.train.evaluation.feedback)
        misled = main and misleading_feedback(cfg)
        self.feedback = open(folder.path / FEEDBACK, "a") if misled else None
        out = cfg.output
        name = out.run_name or folder.path.absolute().name
        self.trackers = Trackers(
            out.report_to if main else [], folder.path, out.project, name, to_dict(cfg)
        )

    @staticmethod
    def _write(file, row: dict) -> None:
        if file is not None:
            file.write(json_text(row) + "\n")
            file.flush()

    def step(self, row: dict, samples: list | None, feedback: list | None = None) -> None:
        row, self.first = {**row, **self.first}, {}
        self._write(self.metrics, row)
        if samples is not None:
            self._write(self.samples, {"step": row["step"], "samples": samples})
        if feedback is not None:
            self._write(self.feedback, {"step": row["step"], "samples": feedback})
        self.trackers.log(row)

    def close(self) -> None:
        for file in (self.metrics, self.samples, self.feedback):
            if file is not None:
                file.close()
        self.trackers.close()
