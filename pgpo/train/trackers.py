"""Experiment trackers, named as transformers' ``report_to`` names them (``output.report_to``).

Each tracker is a small class with ``log(scalars, step)`` and ``close()``; the run's JSON-lines
log (``metrics.jsonl``) stays the record of truth, and every tracker is given the same numeric
entries of each of its rows. A tracker's package is imported only when the run names it, and a
named one that is not installed is refused by the config check, before any model loads.

Where each writes (offline by default, the way each tool spells "offline"):

- ``tensorboard``: event files in ``output.dir/tensorboard``;
- ``wandb``: ``output.dir/wandb``; online or offline as ``WANDB_MODE`` says (``offline``: no
  network, ``wandb sync`` uploads later);
- ``trackio``: Trackio's local store (``TRACKIO_DIR``, by default in the Hugging Face cache),
  project ``output.project``, unless ``TRACKIO_SPACE_ID`` / ``TRACKIO_SERVER_URL`` name a remote;
- ``mlflow``: ``MLFLOW_TRACKING_URI`` when set, else a file store in ``output.dir/mlruns``;
  experiment ``output.project``.

A resumed run (``--resume``) starts a new tracker run of the same name from the checkpoint's step
(wandb continues one run only with ``WANDB_RUN_ID`` and ``WANDB_RESUME``, as under transformers).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

# output.report_to's names -> the module each needs (mlflow: from mlflow or mlflow-skinny)
TRACKERS = {name: name for name in ("tensorboard", "wandb", "trackio", "mlflow")}
# The folders in output.dir that trackers write (the run's own entries: see run_dir)
TRACKER_DIRS = ("tensorboard", "wandb", "mlruns")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(report_to: list[str]) -> list[str]:
    """The named trackers whose package is not installed."""
    return [name for name in report_to if name in TRACKERS and not installed(TRACKERS[name])]


def scalars(row: dict) -> dict[str, float]:
    """The numeric entries of a logged row (bools and the step itself left out)."""
    return {
        key: float(value)
        for key, value in row.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
    }


def flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as ``{"optim.lr": 1e-5, ...}`` (trackers' parameter tables, and the
    settings a resume compares)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TensorBoard:
    def __init__(self, folder: Path, project: str, name: str, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, folder: Path, project: str, name: str, config: dict) -> None:
        import wandb

        self.run = wandb.init(project=project, name=name, dir=str(folder), config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, folder: Path, project: str, name: str, config: dict) -> None:
        import trackio

        # No system-metrics threads: the run's own rows are what is logged.
        self.run = trackio.init(
            project=project, name=name, config=config, embed=False,
            auto_log_cpu=False, auto_log_gpu=False,
        )  # fmt: skip

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    # MLflow caps a parameter's value (500 characters in older servers) and a batch (100 params).
    PARAM_CHARS, PARAMS_PER_BATCH = 500, 100

    def __init__(self, folder: Path, project: str, name: str, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 refuses its file store unless asked; it is what "no server" means here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (folder / "mlruns").absolute().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(project)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k, str(v)[: self.PARAM_CHARS]) for k, v in flat(config).items()]
        for i in range(0, len(params), self.PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + self.PARAMS_PER_BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio, "mlflow": MLflow}


class Trackers:
    """The trackers of ``output.report_to`` (``["none"]``: none), on the main process only."""

    def __init__(
        self, report_to: list[str], folder: Path, project: str, name: str, config: dict
    ) -> None:
        self.open: list = []
        try:
            for tracker in report_to:
                if tracker != "none":
                    self.open.append(_CLASSES[tracker](folder, project, name, config))
        except BaseException:
            self.close()
            raise

    def log(self, row: dict) -> None:
        values = scalars(row)
        for tracker in self.open:
            tracker.log(values, int(row["step"]))

    def close(self) -> None:
        while self.open:
            self.open.pop().close()
