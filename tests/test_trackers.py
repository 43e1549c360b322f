"""``output.report_to``: each tracker, offline, read back from what the tool itself wrote and
compared with the run's own ``metrics.jsonl``; a named tracker that is not installed is refused in
one line before any model loads; trackers that are not named are not imported."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgpo.train.config import ConfigError, load_config
from pgpo.train.trackers import scalars

ALL = ("tensorboard", "wandb", "trackio", "mlflow")  # all installed by ".[dev]"

ARGS = ["--config", "tiny-cpu", "steps=2", "eval.every=2"]


def offline_env(tmp: Path) -> dict:
    """Every tracker offline and writing under ``tmp`` (wandb's offline mode, Trackio's local
    store, MLflow's file store in output.dir: its default when MLFLOW_TRACKING_URI is unset)."""
    own = ("WANDB_", "TRACKIO_", "MLFLOW_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "TRACKIO_DIR": str(tmp / "trackio-store"), "HF_HUB_OFFLINE": "1"}  # fmt: skip


def pgpo(tmp: Path, *extra: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``pgpo train`` in a fresh interpreter (``prelude`` runs first)."""
    code = f"{prelude}\nimport sys\nfrom pgpo.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "train", *ARGS, *extra],
        env=offline_env(tmp), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """The history rows of a wandb run file (``run-<id>.wandb``: a LevelDB-style log of 32 KiB
    blocks; each record is a 4-byte checksum, a 2-byte length, a 1-byte type (1 full; 2, 3, 4
    first, middle, last part) and a serialized ``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, block, part, history = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(part)
        part = b""
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}  # fmt: skip
            history[record.history.step.num] = {
                k: float(v) for k, v in items.items() if not k.startswith("_")
            }
    return history


def read_back(out: Path, tmp: Path, name: str) -> dict[str, dict[int, dict[str, float]]]:
    """What each tracker holds, as {tracker: {step: {key: value}}}."""
    got: dict[str, dict[int, dict[str, float]]] = {t: {} for t in ALL}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in events.Tags()["scalars"]:
        for event in events.Scalars(key):
            got["tensorboard"].setdefault(event.step, {})[key] = event.value

    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    got["wandb"] = wandb_history(Path(run_file))

    # Trackio reads TRACKIO_DIR when it is imported: read its store in a child process
    code = (
        "import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage\n"
        f"print(json.dumps(SQLiteStorage.get_logs('pgpo', {name!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp),
                          capture_output=True, text=True, check=True)  # fmt: skip
    for row in json.loads(done.stdout.strip().splitlines()[-1]):
        values = {k: float(v) for k, v in row.items() if k not in ("step", "timestamp")}
        got["trackio"][int(row["step"])] = values

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("pgpo").experiment_id])
    assert run.info.run_name == name and run.data.params["optim.lr"] == "0.001"
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            got["mlflow"].setdefault(metric.step, {})[key] = metric.value
    return got


@pytest.mark.slow
def test_every_tracker_holds_the_runs_logged_metrics(tmp_path):
    out = tmp_path / "run"
    done = pgpo(tmp_path, f"output.dir={out}", f"output.report_to=[{','.join(ALL)}]")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"]: scalars(row) for row in rows}
    assert sorted(logged) == [1, 2] and "eval_avg_at_k" in logged[2] and "rho" in logged[1]
    got = read_back(out, tmp_path, name="run")
    for tracker, history in got.items():
        assert sorted(history) == [1, 2], tracker
        for step, values in logged.items():
            assert set(history[step]) == set(values), (tracker, step)
            for key, value in values.items():
                if tracker == "tensorboard":  # event files store float32
                    assert history[step][key] == pytest.approx(value, rel=2**-23, abs=1e-38)
                else:  # JSON, SQLite and MLflow's text files keep a float64 exactly
                    assert history[step][key] == value, (tracker, step, key)


def test_a_named_tracker_that_is_not_installed_stops_the_run_in_one_line(tmp_path):
    out = tmp_path / "run"
    # sys.modules[name] = None is how Python marks a module as absent: find_spec and import fail
    done = pgpo(tmp_path, f"output.dir={out}", "output.report_to=[tensorboard,wandb]",
                prelude="import sys; sys.modules['wandb'] = None")  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "output.report_to: wandb is not installed" in lines[0]
    assert "Traceback" not in done.stderr and not out.exists()  # before anything was written


def test_trackers_not_named_are_not_imported(tmp_path):
    out = tmp_path / "run"
    report = "import atexit, sys; atexit.register(lambda: print('imported', sorted(m for m in " \
             "('wandb', 'trackio', 'mlflow', 'tensorboard') if m in sys.modules)))"  # fmt: skip
    done = pgpo(tmp_path, f"output.dir={out}", "steps=1", prelude=report)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported []" in done.stdout


@pytest.mark.parametrize(
    ("value", "expected"),
    [("wandb", ["wandb"]), ("[mlflow,trackio]", ["mlflow", "trackio"]), ("none", ["none"]),
     ("[]", ["none"])],
)  # fmt: skip
def test_report_to_takes_a_name_or_a_list(value, expected):
    assert load_config("tiny-cpu", [f"output.report_to={value}"]).output.report_to == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [("[none,wandb]", "none or a list of distinct trackers"),
     ("[wandb,wandb]", "none or a list of distinct trackers"),
     ("comet", "output.report_to: must be one of none, tensorboard"),
     ("output.tensorboard=false",
      "unknown key output.tensorboard (now output.report_to=tensorboard)")],
)  # fmt: skip
def test_report_to_refusals_name_the_key(value, message):
    override = value if "=" in value else f"output.report_to={value}"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny-cpu", [override])


def test_a_trackers_folder_alone_is_no_earlier_run_but_goes_with_one(tmp_path):
    from pgpo.train.run_folder.run_dir import RunDir, RunDirError

    (tmp_path / "wandb").mkdir()
    with RunDir(tmp_path, resume=False, overwrite=False, main=True).claimed():  # not refused
        pass
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(RunDirError, match=r"earlier run \(metrics.jsonl, wandb\)"):
        with RunDir(tmp_path, resume=False, overwrite=False, main=True).claimed():
            pass
    (tmp_path / "mine.txt").write_text("kept")
    with RunDir(tmp_path, resume=False, overwrite=True, main=True).claimed() as folder:
        folder.start("steps: 1\n", None)
    assert not (tmp_path / "wandb").exists() and (tmp_path / "mine.txt").read_text() == "kept"
