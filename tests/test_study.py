"""`pgpo study`: the quick study end to end through the real trainer, the matched-step control's
learning rate, resuming, and the paired bootstrap against its formula."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from pgpo.cli import main as pgpo_main
from pgpo.demo.study import METHODS, SETTINGS
from pgpo.demo.study_report import paired_gain


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "study"
    cache = out.parent / "cache"
    assert (
        pgpo_main(["study", "--quick", "--seeds", "2", "--out", str(out), "--cache", str(cache)])
        == 0
    )
    return out


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_quick_study_reports_every_method_in_every_setting(quick):
    summary = json.loads((quick / "summary.json").read_text())
    assert set(summary["settings"]) == set(SETTINGS)
    for setting in SETTINGS:
        methods = summary["settings"][setting]["methods"]
        assert set(methods) == set(METHODS)
        for name, m in methods.items():
            assert len(m["runs"]) == 2 and len(m["final"]) == 2
            assert (name == "sdpo") == ("gain_final" not in m)
        assert (quick / f"curves_{setting}.png").stat().st_size > 0
    assert (quick / "distributions.png").exists() and (quick / "summary.md").exists()
    token = rows(quick / "learn" / "pgpo-token-seed0")
    assert all(r["rho"] == 1.0 for r in token if "rho" in r)  # the step itself is not scaled
    assert any(r.get("rho_weight_mean", 1.0) != 1.0 for r in token)  # the weights are


@pytest.mark.slow
def test_the_matched_control_uses_exactly_the_paired_runs_mean_rho(quick):
    for setting in SETTINGS:
        for seed in (0, 1):
            paired = [r["rho"] for r in rows(quick / setting / f"pgpo-a1-seed{seed}") if "rho" in r]
            base = json.loads(json.dumps(_config(quick / setting / f"sdpo-seed{seed}")))
            matched = _config(quick / setting / f"sdpo-matched-seed{seed}")
            assert matched["optim"]["lr"] == base["optim"]["lr"] * statistics.fmean(paired)
            assert matched["seed"] == seed and not matched["pgpo"]["enabled"]


def _config(folder: Path) -> dict:
    import yaml

    return yaml.safe_load((folder / "config.yaml").read_text())


@pytest.mark.slow
def test_a_second_call_keeps_the_finished_runs(quick, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in quick.glob("*/*/metrics.jsonl")}
    cache = quick.parent / "cache"
    assert (
        pgpo_main(["study", "--quick", "--seeds", "2", "--out", str(quick), "--cache", str(cache)])
        == 0
    )
    err = capsys.readouterr().err  # 7 methods x 2 settings x 2 seeds, then the 4 matched runs
    assert "kept 28 finished run(s)" in err and "kept 4 finished run(s)" in err
    assert {p: p.stat().st_mtime_ns for p in quick.glob("*/*/metrics.jsonl")} == stamps


def test_paired_gain_is_the_mean_difference_with_a_bootstrap_interval():
    method = {0: {"final": 0.5}, 1: {"final": 0.7}, 2: {"final": 0.4}}
    base = {0: {"final": 0.4}, 1: {"final": 0.5}, 2: {"final": 0.5}, 3: {"final": 0.9}}
    g = paired_gain(method, base, "final")
    diffs = np.array([0.1, 0.2, -0.1])
    assert g["mean"] == pytest.approx(diffs.mean())
    assert g["per_seed"] == pytest.approx({0: 0.1, 1: 0.2, 2: -0.1})
    # Resampled means lie between the smallest and largest difference, around the mean.
    assert diffs.min() <= g["ci_low"] <= g["mean"] <= g["ci_high"] <= diffs.max()
    assert paired_gain(method, {5: {"final": 0}}, "final") is None
