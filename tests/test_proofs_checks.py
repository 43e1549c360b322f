"""proofs_checks: each check passes where it must and fails on a crafted case."""

import json
import math

import numpy as np
import pytest

from pgpo.multiplier import MultiplierConfig
from proofs_checks.checks import (
    CONDITIONAL,
    FAILS,
    HOLDS,
    NOT_MEASURED,
    log_checks,
    problem_checks,
    read_metrics,
    rho_at_least_one,
    rho_checks,
)
from proofs_checks.cli import main as check_main
from proofs_checks.cli import multiplier_checks
from sde.problems import Problem, make_problem


def verdicts(checks):
    return {c.id: c.verdict for c in checks}


GRID = dict(half_width=5.0, points=200_001)


@pytest.mark.parametrize("kind", ["paper", "floored", "smooth"])
def test_real_multipliers_pass_what_they_must(kind):
    v = verdicts(multiplier_checks(MultiplierConfig(1.0, 2.0, kind)))
    for check in ("rho.bounded", "rho.continuous", "rho.lipschitz", "rho.monotone"):
        assert v[check] == HOLDS, (kind, check)
    assert v["rho.differentiable"] == (HOLDS if kind == "smooth" else FAILS)


def test_discontinuous_multiplier_fails_continuity_and_lipschitz():
    step = lambda I: np.where(I < 0.3, 1.0, 2.0)
    v = verdicts(rho_checks(step, (0.0, 2.0), 2.0, (), **GRID))
    assert v["rho.continuous"] == FAILS and v["rho.lipschitz"] == FAILS
    assert v["rho.bounded"] == HOLDS and v["rho.monotone"] == HOLDS


def test_too_steep_multiplier_fails_lipschitz_only():
    steep = lambda I: np.minimum(np.exp(3.0 * I), 2.0)  # claimed alpha 1, actual 3
    v = verdicts(rho_checks(steep, (0.0, 2.0), 2.0, (math.log(2) / 3,), **GRID))
    assert v["rho.lipschitz"] == FAILS and v["rho.continuous"] == HOLDS


def test_unbounded_or_decreasing_multiplier_fails():
    v = verdicts(rho_checks(lambda I: np.exp(I), (0.0, 2.0), 2.0, (), **GRID))
    assert v["rho.bounded"] == FAILS
    v = verdicts(rho_checks(lambda I: 1.5 + 0.1 * np.sin(I), (1.0, 2.0), 0.1, (), **GRID))
    assert v["rho.monotone"] == FAILS and v["rho.bounded"] == HOLDS


def test_unclaimed_kink_is_found():
    v = rho_checks(lambda I: 1.0 + 0.2 * np.abs(I - 0.7), (0.0, 10.0), 0.2, (), **GRID)
    diff = next(c for c in v if c.id == "rho.differentiable")
    assert diff.verdict == FAILS
    assert abs(diff.numbers["unclaimed_kinks"][0] - 0.7) < 1e-3


def test_rho_at_least_one_counts_negative_information():
    mult = MultiplierConfig(1.0, 2.0)
    infos = np.array([-0.5, -0.1, 0.0, 0.2, 0.4, np.nan])
    check = rho_at_least_one(mult, infos, "test")
    assert check.verdict == FAILS
    assert check.numbers["share_I_negative"] == pytest.approx(2 / 5)
    assert check.numbers["n"] == 5
    assert rho_at_least_one(mult, np.abs(infos), "test").verdict == HOLDS
    floored = MultiplierConfig(1.0, 2.0, "floored")
    assert rho_at_least_one(floored, infos, "test").verdict == HOLDS


def test_problem_checks_find_the_non_gradient_field():
    mult = MultiplierConfig(1.0, 2.0)
    for name, expected in (("quadratic", HOLDS), ("logistic", HOLDS), ("distill", FAILS)):
        v = verdicts(problem_checks(make_problem(name), mult, samples=300))
        assert v[f"{name}.gradient_field"] == expected, name
        assert v[f"{name}.drift_lipschitz"] == HOLDS and v[f"{name}.drift_growth"] == HOLDS


class Cubic(Problem):
    """A crafted problem whose drift grows like |theta|^3: not Lipschitz, not linear growth."""

    name = "cubic"

    def __init__(self):
        self.theta0 = np.array([1.0, -1.0])

    @property
    def n(self):
        return 2

    def fields(self, theta):
        return np.stack([theta**3, theta**3 + 0.1], axis=1)

    def infos(self, theta):
        return np.zeros((theta.shape[0], 2))


def test_problem_checks_fail_on_superlinear_drift():
    v = verdicts(problem_checks(Cubic(), MultiplierConfig(1.0, 2.0), samples=300))
    assert v["cubic.drift_lipschitz"] == FAILS and v["cubic.drift_growth"] == FAILS
    assert v["cubic.gradient_field"] == HOLDS


def test_training_log_checks(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": k, "info": i, "rho": None, "entropy_student": 1.0, "entropy_teacher": 0.5}
        for k, i in enumerate([-0.2, 0.1, 0.3, 0.9, 1.2])
    ]
    rows.insert(2, {"step": 99, "eval_accuracy": 0.5})  # rows without info are skipped
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    metrics = read_metrics(path)
    assert len(metrics["info"]) == 5
    v = {c.id: c for c in log_checks(metrics, MultiplierConfig(1.0, 2.0), "log")}
    assert v["claim.rho_ge_1"].numbers["share_I_negative"] == pytest.approx(0.2)
    assert v["log.at_cap"].numbers["share_at_cap"] == pytest.approx(0.4)  # I >= ln 2
    assert v["log.at_cap"].verdict == CONDITIONAL
    path.write_text('{"info": 0.1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_c6_not_measured_without_benchmark_output(tmp_path):
    from proofs_checks.claims import claim_c6_overhead

    assert claim_c6_overhead(tmp_path / "missing.json").verdict == NOT_MEASURED


def _study(tmp_path, collapsed: dict, quick: bool = False):
    methods = {m: {"collapsed": c, "runs": ["r"] * 3} for m, c in collapsed.items()}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"quick": quick, "settings": {"collapse": {"methods": methods}}}))
    return path


def test_c7_is_read_from_the_studys_collapse_counts(tmp_path):
    from proofs_checks.claims import claim_c7_stability

    def verdict(collapsed, quick=False):
        return claim_c7_stability(_study(tmp_path, collapsed, quick)).verdict

    assert verdict({"sdpo": 3, "pgpo-a1": 1, "pgpo-token": 0}) == HOLDS
    assert verdict({"sdpo": 2, "pgpo-a1": 1, "pgpo-token": 3}) == CONDITIONAL
    assert verdict({"sdpo": 2, "pgpo-a1": 2, "pgpo-token": 3}) == FAILS
    assert verdict({"sdpo": 0, "pgpo-a1": 0}) == NOT_MEASURED  # nothing to be stable against
    assert verdict({"sdpo": 3, "pgpo-a1": 0}, quick=True) == NOT_MEASURED
    assert claim_c7_stability(tmp_path / "missing.json").verdict == NOT_MEASURED
    check = claim_c7_stability(_study(tmp_path, {"sdpo": 3, "pgpo-a1": 1}))
    assert "SDPO collapsed in 3/3 runs" in check.summary and "pgpo-a1 1/3" in check.summary


def test_cli_rho_table_and_bad_arguments(capsys):
    assert check_main(["rho", "--alpha", "1.0", "--rho-max", "2.0"]) == 0
    out = capsys.readouterr().out
    assert "rho.lipschitz" in out and "holds" in out
    for argv in (
        ["rho", "--alpha", "-1"],
        ["rho", "--rho-max", "0.5"],
        ["rho", "--kind", "x"],
        ["report", "--log", "/nonexistent.jsonl", "--out", "/tmp/never"],
    ):
        assert check_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pgpo-check: error:") and "\n" not in err


@pytest.mark.slow
def test_the_claims_shared_studies_are_the_numbers_of_separate_calls():
    """Studies computes each (problem, multiplier, information, model) once per report: a model
    asked for again, or alongside others, has bit for bit the estimates of its own call."""
    from proofs_checks.claims import Effort, Studies
    from sde.weak_error import weak_errors

    mult = MultiplierConfig(1.0, 2.0, "paper")
    effort = Effort("test", 64, (0.2, 0.1))
    studies = Studies(effort)
    first = studies.estimates("quadratic", mult, ["paper"], "full")
    both = studies.estimates("quadratic", mult, ["printed", "paper"], "full")
    alone = weak_errors(make_problem("quadratic"), mult, effort.etas, ["printed"],
                        info_source="full", paths=64, chain="gaussian",
                        test_fns=("theta1", "sqnorm"))  # fmt: skip
    assert [e for e in both if e.model == "paper"] == first
    assert [e for e in both if e.model == "printed"] == alone
    assert [(e.eta, e.model) for e in both][:4] == [(0.2, "printed")] * 2 + [(0.2, "paper")] * 2
    smooth = MultiplierConfig(1.0, 2.0, "smooth")  # another multiplier: computed, not reused
    assert studies.estimates("quadratic", smooth, ["paper"], "full") != first


def test_quick_report_verdicts_and_evidence(tmp_path):
    out = tmp_path / "report"
    bench = tmp_path / "train_step.json"  # what benchmarks/bench_train_step.py writes
    bench.write_text(json.dumps({"time_ratio": 1.004}))
    study = tmp_path / "no-study.json"
    args = ["report", "--quick", "--out", str(out), "--bench", str(bench), "--study", str(study),
            "--premise", str(study)]  # fmt: skip
    assert check_main(args) == 0
    data = json.loads((out / "report.json").read_text())
    claims = {c["id"]: c for c in data["checks"]["Claims"]}
    # The verdicts of the full run (and of the theory): docs/claims.md gives its numbers.
    assert claims["C1.full"]["verdict"] == HOLDS
    assert claims["C1.same_batch"]["verdict"] == FAILS
    assert claims["C2.printed"]["verdict"] == FAILS
    assert claims["C3.sigma"]["verdict"] == CONDITIONAL
    assert claims["C4.kink"]["verdict"] == HOLDS
    assert claims["C5.rho_ge_1"]["verdict"] == CONDITIONAL
    assert claims["C6.overhead"]["verdict"] == HOLDS and "1.004" in claims["C6.overhead"]["summary"]
    # C8, AdamW: Malladi et al.'s scaling converges; at the trained betas the chain is far from
    # its eta -> 0 limit at these etas (a plateau); the ballistic warm starts are order 1 (its
    # cold starts need more paths than --quick has: the full report resolves them).
    assert claims["C8.malladi"]["verdict"] == HOLDS
    assert claims["C8.fixed"]["verdict"] == FAILS
    assert "plateau" in claims["C8.fixed"]["numbers"]["full-cold theta1"]["fit"]
    ballistic = claims["C8.ballistic"]["numbers"]
    assert ballistic["full-warm theta1"]["verdict"] == HOLDS
    assert ballistic["full-warm sqnorm"]["verdict"] == HOLDS
    report = (out / "REPORT.md").read_text()
    assert "quick" in report
    for c in claims.values():
        assert c["title"] in report
        if c["id"] not in ("C6.overhead", "C7.stability", "C9.premise"):  # intervals, sizes
            assert "[" in c["summary"] or "+-" in c["summary"], c["summary"]
        if c["figure"]:
            assert (out / c["figure"]).stat().st_size > 5_000


def test_c9_reads_the_premise_study_and_needs_both_signs_in_every_setting(tmp_path):
    """C9's verdict from a premise study's summary.json: holds when, in every setting, the gap
    difference is over 2 SEs and r's interval is above 0; fails when neither holds anywhere;
    conditional in between; not measured without a file or for a --quick study."""
    from proofs_checks.claims import claim_c9_premise

    def summary(diff, se, low, quick=False):
        p = {
            "gap_difference": diff,
            "gap_difference_se": se,
            "samples": 100,
            "runs": 3,
            "r_share_right": {"r": low + 0.1, "ci_low": low, "ci_high": low + 0.2, "runs": 3},
        }
        path = tmp_path / f"s{diff}{se}{low}{quick}.json"
        settings = {s: {"premise": p} for s in ("noisy", "wrong-demo")}
        path.write_text(json.dumps({"quick": quick, "settings": settings}))
        return path  # fmt: skip

    assert claim_c9_premise(summary(0.01, 0.001, 0.05)).verdict == HOLDS
    assert claim_c9_premise(summary(0.001, 0.001, -0.3)).verdict == FAILS
    c = claim_c9_premise(summary(0.01, 0.001, -0.3))
    assert c.verdict == CONDITIONAL and "+0.0100 +- 0.0010" in c.summary
    assert claim_c9_premise(summary(0.01, 0.001, 0.05, quick=True)).verdict == NOT_MEASURED
    assert claim_c9_premise(tmp_path / "none.json").verdict == NOT_MEASURED
    # A study that reports the detrended r: the batch-level test reads it, not the centred r.
    path = summary(0.01, 0.001, 0.05)
    data = json.loads(path.read_text())
    for setting in data["settings"].values():
        detrended = {"r": 0.01, "ci_low": -0.04, "ci_high": 0.06, "runs": 3}
        setting["premise"]["r_share_right_detrended"] = detrended
    path.write_text(json.dumps(data))
    c = claim_c9_premise(path)
    assert c.verdict == CONDITIONAL and "detrended +0.01 [-0.04, +0.06]" in c.summary


def test_c9_reads_the_real_models_premise_beside_the_toys(tmp_path):
    """pgpo study --real's premise (SmolLM2, a noisy verifier) is one more setting of C9: read
    alone, or with the toy's; a real study without premise runs says so."""
    from proofs_checks.claims import REAL_SETTING, claim_c9_premise

    def premise(diff, low):
        r = {"r": low + 0.1, "ci_low": low, "ci_high": low + 0.2, "runs": 3}
        return {"gap_difference": diff, "gap_difference_se": 0.001, "samples": 50, "runs": 3,
                "r_share_right": r, "r_share_right_detrended": r}  # fmt: skip

    real = tmp_path / "real.json"
    real.write_text(json.dumps({"steps": 24, "premise": premise(0.01, 0.05)}))
    alone = claim_c9_premise(None, real)
    assert alone.verdict == HOLDS and REAL_SETTING in alone.numbers and str(real) in alone.summary
    toys = tmp_path / "toys.json"
    toys.write_text(json.dumps({"settings": {"noisy": {"premise": premise(0.0, -0.3)}}}))
    both = claim_c9_premise(toys, real)
    assert both.verdict == CONDITIONAL and set(both.numbers) == {"noisy", REAL_SETTING}
    real.write_text(json.dumps({"premise": {"not_measured": "no wrong demonstration"}}))
    c = claim_c9_premise(toys, real)
    assert c.verdict == FAILS and "not measured (no wrong demonstration)" in c.summary
