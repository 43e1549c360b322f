"""The toolkit's findings, each as a check that could fail (docs/sde.md, docs/claims.md)."""

import json

import numpy as np
import pytest

from pgpo.multiplier import MultiplierConfig
from sde.cli import main as sde_main
from sde.exact import chain_moments, gaussian_expectations, ou_moments
from sde.models import constant_rho
from sde.problems import Quadratic, make_problem
from sde.weak_error import fit_slope, summarize, weak_errors

ETAS = [0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625]
PAPER = MultiplierConfig(1.0, 2.0)


def verdicts(estimates):
    return {(s.model, s.test_fn): s for s in summarize(estimates)}


# 3 models x 4 etas x 2 test functions = 24 interval checks: each uses the Bonferroni z for a
# 95 % family-wise level (two-sided 0.05 / 24 per check), so that chance alone fails the test
# 5 % of the time at most, while a bias of a few standard errors still fails it.
Z_FAMILY = 3.08


@pytest.mark.parametrize("model,scale", [("paper", 1.0), ("scaled", None), ("ode", 0.0)])
def test_estimate_agrees_with_exact_ou_weak_error_at_every_eta(model, scale):
    q = Quadratic(info_scale=0.0)  # constant rho: the SDEs are OU processes
    r, etas, paths = 1.4, [0.2, 0.1, 0.05, 0.025], 4000
    est = weak_errors(
        q,
        constant_rho(r),
        etas,
        [model],
        info_source="full",
        paths=paths,
        chain="minibatch",
        test_fns=("theta1", "sqnorm"),
        seed=1,
    )
    diffusion = r if scale is None else scale
    for e in est:
        steps = round(1.0 / e.eta)
        chain = gaussian_expectations(*chain_moments(q, r, e.eta, steps, 2))
        sde = gaussian_expectations(*ou_moments(q, r, e.eta, steps * e.eta, 2, diffusion))
        exact = chain[e.test_fn] - sde[e.test_fn]
        assert abs(e.value - exact) <= Z_FAMILY * e.se, (e, exact)
        assert abs(exact) > 3 * e.se  # the check is not vacuous: the error itself is resolved


@pytest.mark.parametrize("problem", ["quadratic", "logistic", "distill"])
def test_full_information_paper_sde_is_order_one(problem):
    est = weak_errors(
        make_problem(problem),
        PAPER,
        ETAS,
        ["paper"],
        info_source="full",
        paths=2000,
        chain="gaussian",
        test_fns=("theta1",),
    )
    fit = verdicts(est)[("paper", "theta1")].slope
    assert fit is not None and abs(fit.slope - 1.0) <= 0.15, fit


@pytest.mark.slow
def test_same_batch_paper_sde_plateaus_while_matched_is_order_one():
    est = weak_errors(
        make_problem("quadratic"),
        PAPER,
        ETAS,
        ["paper", "matched"],
        info_source="same-batch",
        paths=2000,
        chain="gaussian",
        test_fns=("theta1",),
    )
    v = verdicts(est)
    paper, matched = v[("paper", "theta1")], v[("matched", "theta1")]
    assert paper.plateau and paper.slope_small.slope < 0.3
    smallest = sorted((e for e in est if e.model == "paper"), key=lambda e: e.eta)[:3]
    assert abs(paper.plateau_value) > 10 * max(e.se for e in smallest)
    assert abs(matched.slope.slope - 1.0) <= 0.15 and matched.slope.half_width <= 0.1


def test_second_order_model_reaches_order_two_with_smooth_rho():
    est = weak_errors(
        make_problem("quadratic"),
        MultiplierConfig(1.0, 2.0, "smooth"),
        ETAS,
        ["second-order"],
        info_source="full",
        paths=2000,
        chain="gaussian",
        test_fns=("theta1",),
    )
    fit = verdicts(est)[("second-order", "theta1")].slope
    assert abs(fit.slope - 2.0) <= 0.25, fit


def test_fit_slope_recovers_a_known_power_law():
    etas = np.array(ETAS)
    values = 0.3 * etas**1.5
    fit = fit_slope(etas, values, values * 0.01)
    assert abs(fit.slope - 1.5) < 1e-9 and fit.ci_low < 1.5 < fit.ci_high


def test_same_seed_same_numbers():
    run = lambda: weak_errors(
        make_problem("logistic"),
        PAPER,
        [0.1, 0.05],
        ["paper"],
        paths=300,
        chain="minibatch",
        seed=4,
    )
    assert [e.value for e in run()] == [e.value for e in run()]


def test_cli_weak_error_writes_results_and_plot(tmp_path, capsys):
    out = tmp_path / "we"
    code = sde_main(
        [
            "weak-error",
            "--etas",
            "0.2,0.1",
            "--paths",
            "200",
            "--models",
            "paper,matched",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert len(data["estimates"]) == 2 * 2 * 3 and data["settings"]["paths"] == 200
    assert (out / "weak_error.png").stat().st_size > 10_000
    assert "verdict" in capsys.readouterr().out


def test_cli_simulate_writes_paths(tmp_path):
    out = tmp_path / "sim"
    assert sde_main(["simulate", "--paths", "20", "--eta", "0.1", "--out", str(out)]) == 0
    data = np.load(out / "paths.npz")
    assert data["sde"].shape == (11, 20, 2) and data["chain"].shape == (11, 20, 2)
    assert (out / "paths.png").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["weak-error", "--etas", "-0.1"], "--etas"),
        (["weak-error", "--problem", "cubic"], "--problem"),
        (["weak-error", "--paths", "1"], "--paths"),
        (["weak-error", "--models", "paper,foo"], "--models"),
        (["weak-error", "--rho-max", "0.5"], "rho_max"),
        (["weak-error", "--without-replacement", "--batch-size", "9"], "--batch-size"),
        (["simulate", "--eta", "0"], "--eta"),
        (["frobnicate"], "command"),
    ],
)
def test_cli_bad_arguments_one_line_exit_2(argv, needle, capsys, tmp_path):
    assert sde_main(argv + ["--out", str(tmp_path / "x")] if argv[0] != "frobnicate" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and err.startswith("pgpo-sde: error:")
    assert not (tmp_path / "x").exists()
