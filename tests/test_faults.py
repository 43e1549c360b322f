"""Faults a real run meets: a SIGKILL while a checkpoint is written, a damaged newest checkpoint,
SIGTERM from a scheduler, and checkpoint files crafted to run code. Each run is the real
``python -m pgpo.train`` in a subprocess, compared with a straight run of the same config."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pgpo.cli import main as pgpo_main
from pgpo.train.run_folder import checkpoint

STEPS = 5
ARGS = ["--config", "tiny-cpu", f"steps={STEPS}", "eval.every=100"]


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pgpo.train", *ARGS, f"output.dir={out}", *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(out, *extra), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "straight"
    launch(out, "output.save_every=1")
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Every step logged once, the same losses and rho, bit-identical final weights."""
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["rho"]) for r in ra] == [(r["loss"], r["rho"]) for r in rb]
    sa = checkpoint.load(checkpoint.latest(a / "checkpoints"))
    sb = checkpoint.load(checkpoint.latest(b / "checkpoints"))
    for part in ("policy", "teacher"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part


@pytest.mark.slow
def test_sigkill_while_a_checkpoint_is_written_then_resume_equals_the_straight_run(
    straight, tmp_path
):
    out = tmp_path / "killed"
    caught = False
    for _ in range(3):  # the save takes a fraction of a second: catch one in the act
        proc = subprocess.Popen(
            command(out, "output.save_every=1", "output.overwrite=true"),
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while proc.poll() is None:
            ckpts = out / "checkpoints"
            temporaries = list(ckpts.glob(".tmp-step_*")) if ckpts.is_dir() else []
            if any(not t.name.startswith(".tmp-step_000001") for t in temporaries):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                caught = bool(list(ckpts.glob(".tmp-step_*")))
                break
            time.sleep(0.01)  # a step's save lasts ~0.3 s; finer polling took CPU from the run
        if caught:
            break
    assert caught, "never caught a checkpoint being written"
    launch(out, "--resume")
    assert not list((out / "checkpoints").glob(".tmp-*"))  # its own leftovers are gone
    assert_same_run(straight, out)


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(straight, tmp_path):
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(straight, out)
    newest = out / "checkpoints" / f"step_{STEPS:06d}" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short
    done = launch(out, "--resume")
    assert f"skips damaged checkpoint step_{STEPS:06d}" in done.stderr
    assert_same_run(straight, out)


@pytest.mark.slow
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(straight, tmp_path):
    out = tmp_path / "terminated"
    proc = subprocess.Popen(
        command(out, "output.save_every=1000"),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (out / "metrics.jsonl").exists() or len(rows(out)) < 2:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "--resume" in err
    stopped_at = rows(out)[-1]["step"]
    assert stopped_at < STEPS  # it stopped early...
    assert checkpoint.latest(out / "checkpoints").name == f"step_{stopped_at:06d}"  # ...saved
    launch(out, "--resume")
    assert_same_run(straight, out)


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_in_a_checkpoint_never_runs(straight, tmp_path, capsys):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload works when unpickled freely
    assert marker.exists()
    marker.unlink()

    whole = tmp_path / "whole" / "checkpoints" / "step_000001"
    state = checkpoint.load(straight / "checkpoints" / "step_000001")
    whole.mkdir(parents=True)
    torch.save({**state, "sampler": _Payload(marker)}, whole / "state.pt")
    sharded = tmp_path / "sharded" / "checkpoints" / "step_000001"
    (sharded / "shards").mkdir(parents=True)
    small = {k: v for k, v in state.items() if k not in ("policy", "teacher", "optimizer")}
    torch.save({**small, "sharded": True}, sharded / "state.pt")
    (sharded / "shards" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))

    for ckpt in (whole, sharded):
        run_dir = ckpt.parents[1]
        for argv in (
            ["eval", "--config", "tiny-cpu", "--checkpoint", str(ckpt)],
            ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")],
            ["consolidate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "whole2")],
            ["train", "--config", "tiny-cpu", f"output.dir={run_dir}", "--resume"],
        ):
            assert pgpo_main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and err.startswith("pgpo: error:"), err
            assert not marker.exists(), argv
    assert not (tmp_path / "export").exists() and not (tmp_path / "whole2").exists()
    with pytest.raises(checkpoint.CheckpointError, match="Python objects other than tensors"):
        checkpoint.load(whole)
    with pytest.raises(checkpoint.CheckpointError, match="refers to posix.system"):
        checkpoint.SafeReader(sharded / "shards").read_metadata()


def test_checkpoints_of_the_earlier_format_still_load(straight, tmp_path):
    """Earlier versions pickled NumPy's RNG state as an array: loaded by name, not refused."""
    state = checkpoint.load(straight / "checkpoints" / "step_000002")
    np.random.seed(7)
    old = {**state, "rng": {**state["rng"], "numpy": np.random.get_state()}}
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "state.pt")
    loaded = checkpoint.load(tmp_path / "old")
    checkpoint.set_rng_state(loaded["rng"])
    expected = np.random.RandomState(7).random_sample(3)
    assert np.array_equal(np.random.random_sample(3), expected)


def test_an_export_killed_midway_leaves_nothing_that_outlives_the_next_one(straight, tmp_path):
    """SIGKILL while ``pgpo export`` writes: its temporary folder stays (nothing can run after
    SIGKILL), the next export of the same folder removes it, and the export has the mode the
    umask gives (not mkdtemp's private 0700: a vLLM server running as another user reads it)."""
    last = checkpoint.latest(straight / "checkpoints")
    argv = [sys.executable, "-m", "pgpo.cli", "export", "--checkpoint", str(last)]
    out = tmp_path / "model"
    proc = subprocess.Popen([*argv, "--out", str(out)], env=env(), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".model.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".model.tmp-*")) and not out.exists()  # killed while writing
    assert pgpo_main(["export", "--checkpoint", str(last), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the leftover is gone
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_checkpoint_gives_one_line_and_keeps_the_last(tmp_path):
    """A real full disk, not a simulated one: the run's folder is a 250 MB tmpfs, room for one
    checkpoint of tiny-cpu (157 MB) but not for the next. Step 2's checkpoint fails part-way:
    one line that names the disk and the file (torch's own error is "unexpected pos"), exit 2,
    step 1's checkpoint intact, no temporary folder left. Needs root to mount (CI runs as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=250m", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = disk / "run"
        done = subprocess.run(
            command(out, "output.save_every=1"), env=env(), capture_output=True, text=True
        )
        assert done.returncode == 2, done.stderr[-2000:]
        err = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr
        assert (
            err[-1].startswith("pgpo: error: no space left on device (") and "state.pt" in err[-1]
        )
        left = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert left == ["step_000001"]  # the last good one, and nothing half-written
        assert checkpoint.load(out / "checkpoints" / "step_000001")["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- One writer per folder, and a resume that tells the truth --------------------------------


def test_two_runs_racing_into_one_folder_one_trains_and_the_other_is_refused(tmp_path, capsys):
    """Two ``pgpo train`` into one output.dir, launched together with different seeds: the one
    that takes the folder's lock trains, the other exits 2 naming the holder's process id and
    command, and so does a ``--resume`` beside the live run. The folder then holds one run's
    files: its config (its seed) and each of its steps once."""
    from pgpo.locking import holder

    out = tmp_path / "shared"
    long = ("steps=200", "output.save_every=1000", "eval.every=1000")
    procs = {
        seed: subprocess.Popen(
            command(out, *long, f"seed={seed}"),
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    }
    deadline = time.monotonic() + 300
    while all(p.poll() is None for p in procs.values()):
        assert time.monotonic() < deadline, "neither run was refused"
        time.sleep(0.05)
    loser = next(s for s, p in procs.items() if p.poll() is not None)
    winner = 1 - loser
    err = procs[loser].stderr.read()
    assert procs[loser].returncode == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    holder_command = " ".join(["pgpo.train", *command(out, *long, f"seed={winner}")[3:]])
    assert line == (
        f"pgpo: error: output.dir {out} is in use: process {procs[winner].pid} "
        f"({holder_command[:297] + '...' if len(holder_command) > 300 else holder_command}) is "
        "writing there; wait for it to end, or choose another output.dir"
    ), line
    assert holder(out) == procs[winner].pid
    # --resume beside the live run: refused the same way (here from this process).
    assert pgpo_main(["train", *ARGS, f"output.dir={out}", "--resume"]) == 2
    resumed = capsys.readouterr().err
    assert f"is in use: process {procs[winner].pid} (" in resumed, resumed
    while not (out / "metrics.jsonl").exists() or not rows(out):  # a step done, then stop it
        assert procs[winner].poll() is None, procs[winner].stderr.read()[-2000:]
        time.sleep(0.05)
    procs[winner].send_signal(signal.SIGTERM)
    procs[winner].communicate(timeout=300)
    assert procs[winner].returncode == 128 + signal.SIGTERM
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == winner
    steps = [r["step"] for r in rows(out)]
    assert steps == list(range(1, len(steps) + 1))  # each step once, from one run
    assert holder(out) is None  # the lock went with its process: nothing to clean up
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "config.yaml", "metrics.jsonl", "samples.jsonl"]  # fmt: skip


@pytest.mark.slow
def test_two_studies_into_one_out_one_runs_and_the_other_is_refused(tmp_path, capsys):
    """A second ``pgpo study`` with the same ``--out`` as a live one exits 2 naming the holder,
    before writing anything; the folder then holds the first study's files alone."""
    from pgpo.locking import holder

    out, cache = tmp_path / "race", str(tmp_path / "cache")
    argv = ["study", "--quick", "--seeds", "1", "--methods", "sdpo", "--settings", "learn",
            "--out", str(out), "--cache", cache]  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "pgpo.cli", *argv],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while holder(out) != first.pid:  # the first study holds --out: now the second one
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    capsys.readouterr()
    assert pgpo_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pgpo: error: --out {out} is in use: process {first.pid} (pgpo.cli "
                          "study --quick --seeds 1 --methods sdpo"), err  # fmt: skip
    assert len(err.splitlines()) == 1
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["settings"]["learn"]["methods"]) == ["sdpo"]
    assert sorted(p.name for p in (out / "learn").iterdir()) == ["sdpo-seed0"]
    assert [r["step"] for r in rows(out / "learn" / "sdpo-seed0") if r["step"] > 0] == [1, 2, 3]
    assert holder(out) is None


def _schedule_run(out: Path, *extra: str) -> list[str]:
    return ["train", "--config", "tiny-cpu", f"output.dir={out}", "eval.every=100", *extra]


def test_a_resume_applies_and_records_a_new_lr_warmup_and_alpha_exactly(tmp_path, capsys):
    """Trained 2 steps at lr 1e-3 (warmup 4), alpha 1; resumed to step 4 at lr 5e-4 (warmup
    6), alpha 3. The resumed run equals a straight run with that schedule, set by hand step by
    step: the same losses and rho, bit-identical weights. config.yaml keeps the settings the run
    started with and records the change; the metrics show the new values from step 3."""
    import yaml

    from pgpo.train.config import load_config
    from pgpo.train.loop import Run

    out = tmp_path / "run"
    first = ("steps=2", "optim.lr=1e-3", "optim.warmup_steps=4", "pgpo.alpha=1")
    assert pgpo_main(_schedule_run(out, *first)) == 0
    later = ("steps=4", "optim.lr=5e-4", "optim.warmup_steps=6", "pgpo.alpha=3")
    capsys.readouterr()
    assert pgpo_main(_schedule_run(out, *later, "--resume")) == 0
    err = capsys.readouterr().err
    assert (
        "pgpo: --resume applies steps 2 -> 4, pgpo.alpha 1.0 -> 3.0, optim.lr 0.001 -> 0.0005, "
        f"optim.warmup_steps 4 -> 6 from step 2 (recorded in {out / 'config.yaml'})"
    ) in err, err

    # The straight run: each step's lr and alpha set by hand, the schedule written out.
    run = Run(load_config("tiny-cpu", _schedule_run(out, "steps=4")[3:]))
    losses = []
    for k in range(4):
        lr = 1e-3 * min(1.0, (k + 1) / 4) if k < 2 else 5e-4 * min(1.0, (k + 1) / 6)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.modulation.schedule.alpha = 1.0 if k < 2 else 3.0
        questions, seeds = run.next_questions()
        metrics = run.train_step(questions, seeds=seeds)
        run.step += 1
        run.engine.sync_weights(run.lm)
        losses.append((metrics["loss"], metrics["rho"]))
    logged = rows(out)
    assert [(r["loss"], r["rho"]) for r in logged] == losses
    assert [r["alpha"] for r in logged] == [1.0, 1.0, 3.0, 3.0]
    final = checkpoint.load(checkpoint.latest(out / "checkpoints"))
    assert all(torch.equal(final["policy"][k], v) for k, v in run.lm.state_dict().items())

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["optim"]["lr"], saved["optim"]["warmup_steps"], saved["pgpo"]["alpha"]) == (
        1e-3, 4, 1.0)  # fmt: skip
    assert saved["resumes"] == [{"step": 2, "changed": {
        "steps": [2, 4], "optim.lr": [1e-3, 5e-4], "optim.warmup_steps": [4, 6],
        "pgpo.alpha": [1.0, 3.0]}}]  # fmt: skip
    # Loaded as a config, the run's config.yaml gives the settings it ended with.
    ended = load_config(out / "config.yaml")
    assert (ended.optim.lr, ended.optim.warmup_steps, ended.pgpo.alpha, ended.steps) == (
        5e-4, 6, 3.0, 4)  # fmt: skip
    # The model card of the export says what was changed, and when.
    assert pgpo_main(["export", "--checkpoint", str(checkpoint.latest(out / "checkpoints")),
                      "--out", str(tmp_path / "model")]) == 0  # fmt: skip
    card = (tmp_path / "model" / "README.md").read_text()
    assert "- resumed at step 2: steps 2 -> 4, pgpo.alpha 1.0 -> 3.0, optim.lr 0.001" in card


def test_a_resume_with_other_questions_behind_the_same_file_is_refused(tmp_path, capsys):
    """data.train names the same file, but one answer in it changed since the run started."""
    from pgpo.train.tasks.data import synthetic, write_jsonl

    questions = synthetic(8, seed=5).questions
    data = write_jsonl(questions, tmp_path / "mine.jsonl")
    out = tmp_path / "run"
    argv = _schedule_run(out, f"data.train={data}", "data.test=synthetic")
    assert pgpo_main([*argv, "steps=1"]) == 0
    saved = data.read_text()
    first = json.loads(saved.splitlines()[0])
    first["answer"] = next(a for a in "ABCD" if a != first["answer"] and f"\n{a}: " in first[
        "prompt"])  # fmt: skip
    data.write_text("\n".join([json.dumps(first), *saved.splitlines()[1:]]) + "\n")
    before = (out / "metrics.jsonl").read_text(), (out / "config.yaml").read_text()
    capsys.readouterr()
    assert pgpo_main([*argv, "steps=2", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"pgpo: error: --resume: data.train ({data}) holds other questions "
                          "than the run was started with (fingerprint "), err  # fmt: skip
    assert ((out / "metrics.jsonl").read_text(), (out / "config.yaml").read_text()) == before


def test_a_log_row_cut_off_by_a_crash_is_named_when_a_resume_removes_it(straight, tmp_path):
    """A crash cut metrics.jsonl mid-row at step 2, whose checkpoint is intact: the resume says
    that step 2's row is removed and how many remain, and continues from step 2."""
    import shutil

    out = tmp_path / "cut"
    shutil.copytree(straight, out)
    for later in range(3, STEPS + 1):
        shutil.rmtree(out / "checkpoints" / f"step_{later:06d}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    done = launch(out, "--resume")
    assert (
        "pgpo: --resume: metrics.jsonl: step 2's row is not a complete JSON row (cut off by a "
        "crash), removed; 1 row(s) remain"
    ) in done.stderr, done.stderr
    assert [r["step"] for r in rows(out)] == [1, 3, 4, 5]
