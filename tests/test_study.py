"""`pgpo study`: the quick study end to end through the real trainer, the matched-step control's
learning rate, resuming, the premise's settings and report, and the statistics (paired
bootstrap, clustered difference, within-run correlation) against their formulas."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from pgpo.cli import main as pgpo_main
from pgpo.demo.study import DEFAULT_METHODS, DEFAULT_SETTINGS
from pgpo.demo.study_report import paired_gain


def quick_study(out: Path) -> int:
    """``pgpo study --quick`` over 2 seeds, in this process (the spawned pool:
    tests/test_demo.py), its warm start cached beside ``out``."""
    argv = ["study", "--quick", "--seeds", "2", "--workers", "1", "--out", str(out),
            "--cache", str(out.parent / "cache")]  # fmt: skip
    return pgpo_main(argv)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "study"
    assert quick_study(out) == 0
    return out


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_quick_study_reports_every_method_in_every_setting(quick):
    summary = json.loads((quick / "summary.json").read_text())
    assert set(summary["settings"]) == set(DEFAULT_SETTINGS)
    for setting in DEFAULT_SETTINGS:
        methods = summary["settings"][setting]["methods"]
        assert set(methods) == set(DEFAULT_METHODS)
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
    for setting in DEFAULT_SETTINGS:
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
    assert quick_study(quick) == 0
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


@pytest.mark.slow
def test_the_premise_settings_report_i_k_by_the_demonstrations_truth(quick):
    """``--settings noisy,wrong-demo``: every run writes one feedback.jsonl record per trained
    sample, and the report's premise numbers are those records' own group means (and the
    metrics' shares); learn and collapse have no premise section. ``pgpo-agreement``'s I_k is
    each step's mean agreement of the trained samples' demonstrations with their group's
    successes minus 1/2, and rho_k is Eq. 9 of it (alpha 1, rho_max 2)."""
    out = quick.parent / "premise"
    cache = str(quick.parent / "cache")
    argv = ["study", "--quick", "--seeds", "1", "--workers", "1",
            "--methods", "sdpo,pgpo-a1,pgpo-agreement",
            "--settings", "noisy,wrong-demo", "--out", str(out), "--cache", cache]  # fmt: skip
    assert pgpo_main(argv) == 0
    from pgpo.demo.premise import read_feedback

    summary = json.loads((out / "summary.json").read_text())
    for setting in ("noisy", "wrong-demo"):
        p = summary["settings"][setting]["premise"]
        records = []
        for folder in sorted((out / setting).iterdir()):
            steps = rows(folder)
            feedback = read_feedback(folder)
            records += feedback
            for row in (r for r in steps if "info" in r):
                mine = [f for f in feedback if f["step"] == row["step"]]
                wrong = sum(not f["demo_right"] for f in mine)
                assert row["demo_wrong_share"] == pytest.approx(wrong / len(mine))
        for folder in (out / setting).glob("pgpo-agreement-seed*"):
            feedback = read_feedback(folder)
            for row in (r for r in rows(folder) if "info" in r):
                shares = [f["success_agreement"] for f in feedback if f["step"] == row["step"]
                          and f["success_agreement"] is not None]  # fmt: skip
                assert row["info"] == pytest.approx(np.mean(shares) - 0.5 if shares else 0.0)
                assert row["rho"] == pytest.approx(min(np.exp(row["info"]), 2.0))
                assert "entropy_gap" in row
        right = [r["gap"] for r in records if r["demo_right"]]
        wrong = [r["gap"] for r in records if not r["demo_right"]]
        assert p["samples"] == len(records) and p["runs"] == 3
        assert p["gap_right"] == pytest.approx(np.mean(right))
        assert p["gap_wrong"] == pytest.approx(np.mean(wrong))
        assert p["gap_difference_se"] > 0 and -1 <= p["r_share_right"]["r"] <= 1
        gap = p["signals"]["gap"]  # the entropy gap is the first signal of the table
        assert gap["difference"] == pytest.approx(p["gap_difference"])
        assert set(p["signals"]) <= {"gap", "p_shown", "p_student_shown", "success_agreement"}
    assert all("premise" not in s for k, s in json.loads(
        (quick / "summary.json").read_text())["settings"].items())  # fmt: skip
    assert (out / "premise.png").stat().st_size > 0 and "I_k mark" in (
        out / "summary.md"
    ).read_text()


def test_the_clustered_difference_is_the_sandwich_formula():
    """With one observation per cluster it is the unpooled two-sample SE times sqrt(n/(n-1));
    with each observation duplicated inside its cluster the SE stays that of the originals
    (duplicates add no information), where an unclustered SE would shrink by sqrt(2)."""
    from pgpo.demo.premise import clustered_difference

    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    right = np.arange(40) % 3 != 0
    diff, se = clustered_difference(x, right, np.arange(40))
    a, b = x[right], x[~right]
    assert diff == pytest.approx(a.mean() - b.mean())
    direct = ((a - a.mean()) ** 2).sum() / len(a) ** 2 + ((b - b.mean()) ** 2).sum() / len(b) ** 2
    assert se == pytest.approx(np.sqrt(direct * 40 / 39))
    diff2, se2 = clustered_difference(
        np.repeat(x, 2), np.repeat(right, 2), np.repeat(np.arange(40), 2)
    )
    assert diff2 == pytest.approx(diff) and se2 == pytest.approx(se)
    with pytest.raises(ValueError, match="both groups"):
        clustered_difference(x, np.ones(40, bool), np.arange(40))


def test_the_within_run_correlation_centres_each_run_and_resamples_runs():
    """Two runs whose levels differ but whose within-run relation is exact: r = 1 pooled
    (uncentred, the levels would pull r down); against numpy's corrcoef on centred values for
    noisy runs, with an interval that holds r."""
    from pgpo.demo.premise import within_run_correlation

    x = [np.arange(5.0), np.arange(5.0)]
    y = [2 * np.arange(5.0) + 100, 2 * np.arange(5.0) - 100]
    assert within_run_correlation(x, y)["r"] == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=30) for _ in range(6)]
    ys = [0.5 * a + rng.normal(size=30) + k for k, a in enumerate(xs)]
    c = within_run_correlation(xs, ys)
    centred = lambda vs: np.concatenate([v - v.mean() for v in vs])  # noqa: E731
    assert c["r"] == pytest.approx(np.corrcoef(centred(xs), centred(ys))[0, 1])
    assert c["ci_low"] <= c["r"] <= c["ci_high"] and c["runs"] == 6 and c["steps"] == 180
    assert within_run_correlation(xs, ys) == c  # seeded


def test_detrending_removes_a_correlation_that_a_shared_trend_alone_makes():
    """Two series that share a drift over training but whose step-to-step changes are
    independent: the centred r is near 1, the detrended r near 0 (within 3 of its standard
    error, 1/sqrt(pairs), under independence), and equal to numpy's on the runs' first
    differences, each centred."""
    from pgpo.demo.premise import within_run_correlation

    rng = np.random.default_rng(3)
    steps = np.arange(120.0)
    xs = [0.01 * steps + rng.normal(scale=0.05, size=120) for _ in range(3)]
    ys = [0.01 * steps + rng.normal(scale=0.05, size=120) for _ in range(3)]
    raw = within_run_correlation(xs, ys)
    detrended = within_run_correlation(xs, ys, detrend=True)
    assert raw["r"] > 0.8 and raw["ci_low"] > 0.7
    assert abs(detrended["r"]) < 3 / np.sqrt(detrended["steps"])
    assert detrended["ci_low"] < 0 < detrended["ci_high"] and detrended["steps"] == 3 * 119
    centred = lambda vs: np.concatenate([np.diff(v) - np.diff(v).mean() for v in vs])  # noqa: E731
    assert detrended["r"] == pytest.approx(np.corrcoef(centred(xs), centred(ys))[0, 1])
    # A step-to-step relation survives: y follows x's changes.
    ys = [x + rng.normal(scale=0.01, size=120) for x in xs]
    assert within_run_correlation(xs, ys, detrend=True)["r"] > 0.9
    # A missing step drops both differences it enters.
    x = np.arange(6.0)
    x[2] = np.nan
    assert within_run_correlation([x], [x**2], detrend=True)["steps"] == 3


def test_the_real_studys_learning_rates_are_chosen_without_a_test_question(tmp_path):
    """``pgpo study --real``'s grid: every tuned method at every rate is fitted and scored on
    the training split's two parts (disjoint), and no question of the test split is among
    them; the rate chosen is the best on the validation slice, the smaller on a tie."""
    from pgpo.demo.real_study import (
        LR_GRID,
        TUNED,
        RealStudyPlan,
        choose_lr,
        grid_configs,
        split_files,
    )
    from pgpo.train.tasks.data import LARGEST_NUMBER, load_jsonl, load_split

    plan = RealStudyPlan(tmp_path / "study")
    grid = grid_configs(plan, Path("model-folder"), split_files(plan.out))
    assert {m for m, _ in grid} == set(TUNED) and {lr for _, lr in grid} == set(LR_GRID)
    test = {q.prompt for q in load_split(LARGEST_NUMBER, "test", 0, False, None).questions}
    train = {q.prompt for q in load_split(LARGEST_NUMBER, "train", 0, False, None).questions}
    for cfg in grid.values():
        fitted = {q.prompt for q in load_jsonl(cfg.data.train).questions}
        scored = {q.prompt for q in load_jsonl(cfg.data.test).questions}
        assert len(fitted) == 300 and len(scored) == 100 and not fitted & scored
        assert (fitted | scored) <= train and not (fitted | scored) & test
        assert cfg.seed == 0 and not cfg.eval.before_train and cfg.eval.every == cfg.steps
    assert choose_lr({3e-5: 0.30, 1e-4: 0.41, 3e-4: 0.39}) == 1e-4
    assert choose_lr({3e-5: 0.41, 1e-4: 0.41, 3e-4: 0.39}) == 3e-5  # a tie: the smaller


def test_the_real_studys_alpha_and_paired_interval():
    """alpha = ln(1.2) / mean I_k, so that exp(alpha I) is 1.2 at the mean; 1 where the mean
    is not positive. The paired gain is the mean difference over seeds and questions, with a
    bootstrap interval that holds it and shrinks when the seeds agree."""
    import math

    from pgpo.demo.real_study import RHO_AIM, alpha_for, paired_over_seeds_and_questions, verdict

    assert math.exp(alpha_for(0.4) * 0.4) == pytest.approx(RHO_AIM)
    assert alpha_for(0.0) == 1.0 and alpha_for(-0.2) == 1.0 and alpha_for(float("nan")) == 1.0
    rng = np.random.default_rng(0)
    b = {s: rng.uniform(size=50) for s in range(3)}
    a = {s: b[s] + 0.05 + rng.normal(scale=0.02, size=50) for s in range(3)}
    g = paired_over_seeds_and_questions(a, b)
    direct = np.mean([np.mean(a[s] - b[s]) for s in range(3)])
    assert g["mean"] == pytest.approx(direct) and g["ci_low"] < g["mean"] < g["ci_high"]
    assert g["ci_low"] > 0 and verdict(g) == "beats" and (g["seeds"], g["questions"]) == (3, 50)
    tie = paired_over_seeds_and_questions({s: b[s] + rng.normal(scale=0.1, size=50)
                                           for s in range(3)}, b)  # fmt: skip
    assert verdict(tie) == "ties" and tie["ci_low"] < 0 < tie["ci_high"]


@pytest.mark.slow
def test_the_real_study_end_to_end_on_smollm2(tmp_path):
    """``pgpo study --real --quick``: SmolLM2 through the grid, the runs and the report. The
    rate each method took is its grid's best on the validation slice, PGPO's alpha follows
    from sdpo-own's I_k there, the matched control runs at PGPO's mean step, and the
    per-question scores the report pairs are those whose means the runs logged."""
    import math

    from pgpo.demo.real_study import RHO_AIM

    out = tmp_path / "real"
    argv = [
        "study",
        "--real",
        "--quick",
        "--out",
        str(out),
        "--methods",
        "sdpo-own,pgpo,sdpo-matched",
        "--workers",
        "1",  # in this process (the spawned pool: tests/test_demo.py)
    ]  # fmt: skip (the letter SFT: tests/test_sft.py)
    assert pgpo_main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    for m, scores in s["lr_grid"].items():
        best = max(scores, key=lambda lr: (scores[lr], -float(lr)))
        assert s["lr"][m] == float(best) == s["methods"][m]["lr"]
    grid_run = rows(out / "grid" / f"sdpo-own-lr{s['lr']['sdpo-own']:g}")
    info = statistics.fmean(r["info"] for r in grid_run if "info" in r)
    assert s["sdpo_own_validation_info"] == pytest.approx(info)
    rule = min(math.log(RHO_AIM) / info, 100.0) if info > 0 else 1.0  # no sign: alpha 1
    assert s["alpha"] == pytest.approx(rule)
    pgpo_rho = statistics.fmean(r["rho"] for r in rows(out / "real" / "pgpo-seed0") if "rho" in r)
    assert s["methods"]["sdpo-matched"]["lr"] == pytest.approx(s["lr"]["sdpo-own"] * pgpo_rho)
    last = [r for r in rows(out / "real" / "pgpo-seed0") if "eval_per_question" in r][-1]
    per_q = last["eval_per_question"]["p_correct_given_letter"]
    assert len(per_q) == 8 and statistics.fmean(per_q) == pytest.approx(
        last["eval_p_correct_given_letter"])  # fmt: skip
    assert s["methods"]["pgpo"]["p_correct_given_letter"]["mean"] == pytest.approx(
        statistics.fmean(per_q))  # fmt: skip
    assert s["pgpo_vs_matched"]["verdict"] in ("beats", "ties", "loses to")
    assert not list(out.rglob("state.pt"))  # no checkpoints: 2 GB each for SmolLM2
    assert "**Verdict (1 seed(s)): PGPO" in (out / "summary.md").read_text()
    assert (out / "curves.png").stat().st_size > 0
