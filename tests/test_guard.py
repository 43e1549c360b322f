"""The collapse guard (``collapse.*``), the best checkpoint and the cumulative training time."""

import json

import pytest
import torch

from pgpo.train.config import load_config
from pgpo.train.guard import CollapseGuard
from pgpo.train.loop import train
from pgpo.train.run_folder import checkpoint


def tiny(tmp_path, *overrides):
    return load_config("tiny-cpu", [f"output.dir={tmp_path}", "eval.every=1000", *overrides])


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_guard_fires_once_when_the_window_mean_reaches_the_threshold():
    guard = CollapseGuard(window=3, threshold=0.2)
    fired = [guard.observe(k, r) for k, r in enumerate([0.5, 0.4, 0.1, 0.1, 0.0, 0.0], 1)]
    # window means: -, -, 0.333, 0.2 (<= 0.2: collapse), 0.067, 0.033
    assert fired == [False, False, False, True, False, False] and guard.collapsed_at == 4
    assert guard.window_mean() == pytest.approx(0.1 / 3)
    assert [guard.improved(k, s) for k, s in enumerate([0.3, 0.5, 0.5, 0.4], 1)] == [
        True, True, False, False
    ]  # fmt: skip
    assert guard.best_step == 2  # ties keep the first


def test_a_forced_collapse_stops_the_run_with_a_checkpoint(tmp_path, capsys):
    # threshold 1: any reward (0 or 1) collapses once the window is full
    cfg = tiny(tmp_path, "steps=5", "collapse.window=2", "collapse.threshold=1",
               "collapse.stop=true", "output.save_every=1000")  # fmt: skip
    out = train(cfg, progress=False)
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2]
    assert "collapsed_at" not in logged[0] and logged[1]["collapsed_at"] == 2
    assert [p.name for p in checkpoint.candidates(out / "checkpoints")] == ["step_000002"]
    assert "collapsed at step 2" in capsys.readouterr().err


def test_without_stop_the_collapse_is_logged_and_the_run_goes_on(tmp_path):
    out = train(tiny(tmp_path, "steps=3", "collapse.window=2", "collapse.threshold=1"),
                progress=False)  # fmt: skip
    assert [r.get("collapsed_at") for r in rows(out)] == [None, 2, 2]


@pytest.mark.slow
def test_the_best_checkpoint_is_the_best_evaluated_step(tmp_path):
    cfg = tiny(
        tmp_path, "steps=4", "eval.every=1", "output.save_every=1", "collapse.keep_best=true"
    )
    out = train(cfg, progress=False)
    scores = [r["eval_avg_at_k"] for r in rows(out)]
    best_step = scores.index(max(scores)) + 1  # the first of equal scores
    kept = checkpoint.candidates(out / "checkpoints" / "best")
    assert [p.name for p in kept] == [f"step_{best_step:06d}"]
    a, b = checkpoint.load(kept[0]), checkpoint.load(out / "checkpoints" / kept[0].name)
    assert all(torch.equal(a["policy"][k], b["policy"][k]) for k in a["policy"])
    # `best/` is no step of its own: resuming picks the newest step, not the best
    assert checkpoint.latest(out / "checkpoints").name == "step_000004"


@pytest.mark.slow
def test_a_resumed_run_keeps_the_guards_window_and_the_total_time(tmp_path):
    guard = ("collapse.window=3", "collapse.threshold=1")
    straight = train(tiny(tmp_path / "a", "steps=4", *guard), progress=False)
    train(tiny(tmp_path / "b", "steps=2", "output.save_every=2", *guard), progress=False)
    resumed = train(tiny(tmp_path / "b", "steps=4", *guard), resume=True, progress=False)
    assert [r.get("collapsed_at") for r in rows(straight)] == [None, None, 3, 3]
    assert [r.get("collapsed_at") for r in rows(resumed)] == [None, None, 3, 3]
    total = 0.0
    for r in rows(resumed):  # cumulative over the resume: the time a budget is read against
        total += r["step_seconds"]
        assert r["step_seconds_total"] == pytest.approx(total, rel=1e-9)
