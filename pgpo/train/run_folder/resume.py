"""What ``pgpo train --resume`` continues from (:func:`resume_point`), what it may change, and
the run's record of it (:func:`run_record`).

A resume compares its settings with those the checkpoint was trained under (the checkpoint's own
``config``). A changed setting of :data:`~pgpo.train.config.RESUMABLE` (the learning rate and its
warmup, alpha and rho_max, steps, cadences, memory knobs, the folder and trackers) is applied from
the resumed step on and recorded; any other change is refused in one line that lists each one.
The questions are compared by their fingerprint, so that different questions behind the same
file name are refused too.

The record lives in the run's ``config.yaml``: the settings the run was started with, its
``data_fingerprint``, and ``resumes``, one entry per resume (``step``, and ``changed``: each key
with its old and new value). Checkpoints carry the same list, so an export's model card reports
it. A resume from step s replaces the entries at s or later: the steps they covered are trained
again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pgpo.train.config import RESUMABLE, RUN_RECORD, TrainConfig, to_dict, with_defaults
from pgpo.train.run_folder import checkpoint
from pgpo.train.run_folder.run_dir import RunDir
from pgpo.train.trackers import flat


class ResumeError(ValueError):
    """A resume that would change what cannot change mid-run (one line naming each change)."""


def changed_settings(before: dict, cfg: TrainConfig) -> dict[str, list]:
    """``{dotted key: [old, new]}`` for every setting of ``cfg`` that differs from ``before`` (a
    saved config dict; a setting it lacks, added since it was saved, counts as its default)."""
    old, new = flat(with_defaults(before)), flat(to_dict(cfg))
    return {key: [old.get(key), value] for key, value in new.items() if old.get(key) != value}


def refuse_fixed(changed: dict[str, list], cfg: TrainConfig, step: int) -> None:
    """Raise :class:`ResumeError` listing every change a resume may not make."""
    fixed = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if "pgpo.alpha" in changed and cfg.pgpo.alpha_schedule == "target_rho":
        fixed["pgpo.alpha"] = changed["pgpo.alpha"]  # only target_rho's start: its state goes on
    if not fixed:
        return
    raise ResumeError(
        f"--resume from step {step} cannot change {changes_text(fixed)}: fixed for a run "
        "(pgpo config --keys says which settings may change); resume with the run's values, "
        "or start a new run in another output.dir"
    )


def refuse_other_data(saved: dict | None, now: dict[str, str], cfg: TrainConfig) -> None:
    """Raise :class:`ResumeError` when the questions of a split differ from those the run was
    started with (``saved``: the checkpoint's fingerprints; ``None`` for an older checkpoint,
    which has none to compare)."""
    if not saved:
        return
    for split, fingerprint in now.items():
        if saved.get(split) not in (None, fingerprint):
            source = getattr(cfg.data, split) or cfg.data.sciknoweval or cfg.data.train
            raise ResumeError(
                f"--resume: data.{split} ({source}) holds other questions than the run was "
                f"started with (fingerprint {saved[split][:12]} then, {fingerprint[:12]} now); "
                "resume with the run's data, or start a new run in another output.dir"
            )


def resumes_after(earlier: list[dict], step: int, changed: dict[str, list]) -> list[dict]:
    """The record of resumes once this one, from ``step``, is added: earlier entries at ``step``
    or later are dropped (their steps are trained again)."""
    kept = [entry for entry in earlier if entry["step"] < step]
    return [*kept, {"step": step, "changed": changed}]


def changes_text(changed: dict[str, list]) -> str:
    """``optim.lr 0.001 -> 0.0005, pgpo.alpha 1.0 -> 3.0``."""
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())


def describe(resumes: list[dict]) -> list[str]:
    """One line per resume that changed something: ``step 2: optim.lr 0.001 -> 0.0005``."""
    return [f"step {r['step']}: {changes_text(r['changed'])}" for r in resumes if r["changed"]]


def resume_point(folder: RunDir, steps: int) -> tuple[Path, dict]:
    """The newest intact checkpoint to continue from (damaged newer ones are skipped)."""
    path, state, skipped = checkpoint.newest_intact(folder.checkpoints)
    if path is None:
        why = f": {'; '.join(skipped)}" if skipped else ""
        raise ValueError(f"--resume: no usable checkpoint in {folder.checkpoints}{why}")
    for reason in skipped:  # the run goes on from an older checkpoint: say which were left
        print(f"pgpo: --resume skips damaged checkpoint {reason}", file=sys.stderr)
    if state["step"] >= steps:
        raise ValueError(
            f"--resume: {path} is at step {state['step']} and steps={steps}: nothing to do "
            "(raise steps to train further)"
        )
    return path, state


def run_record(
    folder: RunDir, cfg: TrainConfig, fingerprint: str, resumes: list, start: tuple | None
) -> str:
    """config.yaml: the settings the run was started with (a resume keeps the saved ones), the
    fingerprint of its questions, and its resumes."""
    settings = to_dict(cfg)
    if start is not None:
        saved = folder.saved_config() or start[1]["config"]
        settings = {k: v for k, v in saved.items() if k not in RUN_RECORD}
    record = {**settings, "data_fingerprint": fingerprint}
    if resumes:
        record["resumes"] = resumes
    return yaml.safe_dump(record, sort_keys=False, default_flow_style=None)
