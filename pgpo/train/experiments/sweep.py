"""``pgpo sweep GRID.yaml``: the paper's grid (domain x method x alpha x seed) as run folders.

A grid file::

    base: qwen3-8b-pgpo               # a preset or config file, shared by every run
    out: runs/table1                  # one folder per run below it
    overrides: [data.sciknoweval=/data/SDPO]
    grid:
      domain: [biology, chemistry, material, physics]   # optional
      method: [sdpo, pgpo]            # sdpo: pgpo.enabled=false; pgpo: one run per alpha
      alpha: [0.5, 1.0, 1.5]
      seed: [42]
    launch: torchrun --nproc-per-node 4 -m pgpo.train   # for --print

Every run's config is built and validated before anything runs. Runs go one after another in
this process, or ``--print`` writes one launch line per run still to do (for a scheduler).
Idempotent and resumable: a finished run is skipped, one with a checkpoint continues with
``--resume``, the rest start fresh.
"""

from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from pgpo.train.config import ConfigError, TrainConfig, load_config
from pgpo.train.run_folder import checkpoint

METHODS = ("sdpo", "pgpo")
GRID_KEYS = ("domain", "method", "alpha", "seed")


@dataclass(frozen=True)
class SweepRun:
    """One cell of the grid: its name (the folder's), overrides and validated config."""

    name: str
    overrides: tuple[str, ...]
    cfg: TrainConfig

    @property
    def folder(self) -> Path:
        return Path(self.cfg.output.dir)

    def state(self) -> str:
        """``done`` (its last step is checkpointed), ``partial`` (it can resume) or ``new``."""
        newest = checkpoint.latest(self.folder / "checkpoints")
        if newest is None:
            return "new"
        step = int(newest.name.removeprefix(checkpoint.PREFIX))
        return "done" if step >= self.cfg.steps else "partial"


def _list(grid: dict, key: str, default: list) -> list:
    value = grid.get(key, default)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"grid.{key}: must be a non-empty list, got {value!r}")
    return value


def expand(path: str | Path) -> tuple[list[SweepRun], dict]:
    """The runs of a grid file (validated) and the file's settings."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the grid ({type(err).__name__})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict):
        raise ConfigError(f"{path}: needs a mapping with base, out and grid")
    unknown = sorted(set(spec) - {"base", "out", "overrides", "grid", "launch"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]}")
    grid = spec["grid"]
    bad = sorted(set(grid) - set(GRID_KEYS))
    if bad:
        raise ConfigError(f"grid.{bad[0]}: unknown (the grid has {', '.join(GRID_KEYS)})")
    for key in ("base", "out"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise ConfigError(f"{path}: {key} must name a preset or file / a folder")
    shared = spec.get("overrides", [])
    if not isinstance(shared, list) or not all(isinstance(o, str) for o in shared):
        raise ConfigError(f"{path}: overrides must be a list of key=value strings")
    methods = _list(grid, "method", ["pgpo"])
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"grid.method: {m!r} is not one of {', '.join(METHODS)}")
    runs = []
    for domain, method, seed in itertools.product(
        _list(grid, "domain", [None]), methods, _list(grid, "seed", [None])
    ):
        for alpha in _list(grid, "alpha", [None]) if method == "pgpo" else [None]:
            parts, over = [], list(shared)
            if domain is not None:
                parts.append(str(domain))
                over.append(f"data.domain={domain}")
            parts.append(method if alpha is None else f"{method}-a{alpha:g}")
            over.append(f"pgpo.enabled={'true' if method == 'pgpo' else 'false'}")
            if alpha is not None:
                over.append(f"pgpo.alpha={alpha}")
            if seed is not None:
                parts.append(f"s{seed}")
                over.append(f"seed={seed}")
            name = "-".join(parts)
            over.append(f"output.dir={Path(spec['out']) / name}")
            try:
                cfg = load_config(spec["base"], over)
            except ConfigError as err:
                raise ConfigError(f"run {name}: {err}") from None
            runs.append(SweepRun(name, tuple(over), cfg))
    return runs, spec


def launch_line(spec: dict, run: SweepRun) -> str:
    """The command that runs (or continues) ``run``: ``launch`` (default ``pgpo train``)."""
    head = spec.get("launch") or "pgpo train"
    tail = ["--resume"] if run.state() == "partial" else []
    return " ".join([head, "--config", shlex.quote(spec["base"]), *tail,
                     *(shlex.quote(o) for o in run.overrides)])  # fmt: skip


def sweep(path: str | Path, print_only: bool = False, progress: bool = True) -> list[str]:
    """Run (or, ``print_only``, print the launch lines of) every run not yet done; returns
    one status line per run."""
    from pgpo.train.loop import train

    runs, spec = expand(path)
    lines = []
    for run in runs:
        state = run.state()
        if state == "done":
            lines.append(f"{run.name}: done")
            continue
        if print_only:
            lines.append(launch_line(spec, run))
            continue
        train(run.cfg, resume=state == "partial", progress=progress, desc=run.name)
        lines.append(f"{run.name}: trained" + (" (resumed)" if state == "partial" else ""))
    return lines
