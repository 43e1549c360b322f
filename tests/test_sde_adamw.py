"""PGPO with AdamW in the SDE toolkit (sde.adamw): the chain is the trainer's optimizer, the
SDEs are their formulas, and the study gives the same numbers on any number of workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgpo.multiplier import MultiplierConfig
from pgpo.optim import ModulatedOptimizer
from sde.adamw import AdamWScaling, adamw_chain, adamw_sde, adamw_study, adamw_update
from sde.models import batch_covariance, batch_distribution, batches
from sde.problems import make_problem

MULT = MultiplierConfig(1.0, 2.0, "paper")


@pytest.mark.parametrize("warm", [False, True])
def test_the_chains_step_is_modulated_torch_adamw(warm):
    """adamw_update equals ModulatedOptimizer(torch.optim.AdamW) step by step, in float64."""
    rng = np.random.default_rng(0)
    paths, d, steps = 3, 2, 25
    eta, beta1, beta2, eps, wd = 0.05, 0.8, 0.95, 1e-3, 0.1
    theta = rng.standard_normal((paths, d))
    m = rng.standard_normal((paths, d)) if warm else np.zeros((paths, d))
    v = rng.random((paths, d)) if warm else np.zeros((paths, d))
    params = [torch.nn.Parameter(torch.tensor(theta[p], dtype=torch.float64)) for p in range(paths)]
    opts = []
    for p, param in enumerate(params):
        opt = ModulatedOptimizer(
            torch.optim.AdamW([param], lr=eta, betas=(beta1, beta2), eps=eps, weight_decay=wd)
        )
        if warm:  # a run resumed long after its start: bias corrections are exactly 1
            state = opt.state_dict()
            state["state"] = {
                0: {
                    "step": torch.tensor(1e7),
                    "exp_avg": torch.tensor(m[p]),
                    "exp_avg_sq": torch.tensor(v[p]),
                }
            }
            opt.load_state_dict(state)
        opts.append(opt)
    for k in range(1, steps + 1):
        g = rng.standard_normal((paths, d))
        rho = rng.uniform(0.5, 2.0, paths)
        theta, m, v = adamw_update(
            theta, m, v, g, rho, k, eta, beta1, beta2, eps, wd, bias_correction=not warm
        )
        for p, (param, opt) in enumerate(zip(params, opts)):
            param.grad = torch.tensor(g[p])
            opt.step(rho[p])
    torch_theta = np.stack([p.detach().numpy() for p in params])
    # float64 rounding over 25 steps of the same operations in the same order
    np.testing.assert_allclose(theta, torch_theta, rtol=1e-13, atol=1e-14)
    torch_v = np.stack([o.state[p]["exp_avg_sq"].numpy() for o, p in zip(opts, params)])
    np.testing.assert_allclose(v, torch_v, rtol=1e-13)


def test_malladi_hyperparameters_follow_eta():
    s = AdamWScaling("malladi", c1=4.0, c2=1.0, eps=1e-3, weight_decay=0.01, sigma0=1.5)
    hp = s.hyper(0.1)
    assert hp["beta1"] == pytest.approx(1 - 4 * 0.01) and hp["beta2"] == pytest.approx(0.99)
    assert hp["eps"] == pytest.approx(1e-2) and hp["weight_decay"] == pytest.approx(1e-3)
    assert hp["noise"] == pytest.approx(15.0) and s.time_step(0.1) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="too large"):
        s.hyper(0.6)  # 1 - beta1 = 4 * 0.36 > 1


@pytest.mark.parametrize("regime", ["malladi", "ballistic"])
@pytest.mark.parametrize("info_source", ["full", "same-batch"])
def test_warm_start_sde_coefficients_are_the_formulas(regime, info_source):
    """At a warm start the drift and diffusion equal the module docstring's equations, computed
    here directly from the per-example fields and every batch."""
    problem = make_problem("quadratic")
    scaling = AdamWScaling(regime, "warm", eps=1e-3, weight_decay=0.05)
    eta, b = 0.05, 2
    model, z0 = adamw_sde(problem, MULT, scaling, eta, batch_size=b, info_source=info_source)
    theta = np.array([[0.3, -1.2], [1.5, 0.4]])
    fields, infos = problem.fields_and_infos(theta)
    grad = fields.mean(axis=1)
    sigma_b = batch_covariance(fields, b, True)
    var = np.diagonal(sigma_b, axis1=1, axis2=2)
    if info_source == "full":
        rho_bar = np.minimum(np.exp(infos.mean(axis=1)), 2.0)
    else:
        every = batches(problem.n, b, True)  # all 64 ordered batches, equally likely
        rho_bar = np.minimum(np.exp(infos[:, every].mean(axis=2)), 2.0).mean(axis=1)
    m = grad + 0.1
    v = var + (0 if regime == "malladi" else grad**2) + 0.2
    z = np.concatenate([theta, m, v], axis=1)
    drift, g = model.coefficients(z, 0.7)
    denom = np.sqrt(v) + 1e-3
    np.testing.assert_allclose(drift[:, :2], -rho_bar[:, None] * (m / denom + 0.05 * theta))
    np.testing.assert_allclose(drift[:, 2:4], 4.0 * (grad - m))
    np.testing.assert_allclose(drift[:, 4:], np.full((2, 2), 1.0 * -0.2))  # c2 (target - v)
    scale = 4.0 if regime == "malladi" else 4.0 * np.sqrt(eta)
    gg = np.einsum("pij,pkj->pik", g, g)  # the diffusion covariance per unit time
    np.testing.assert_allclose(gg[:, 2:4, 2:4], scale**2 * sigma_b, atol=1e-12)
    assert np.all(gg[:, :2, :] == 0) and np.all(gg[:, 4:, :] == 0)
    fields0, _ = problem.fields_and_infos(problem.theta0[None])
    grad0 = fields0.mean(axis=1)[0]
    var0 = np.diagonal(batch_covariance(fields0, b, True)[0])
    v0 = var0 if regime == "malladi" else grad0**2 + var0
    np.testing.assert_allclose(z0, np.concatenate([problem.theta0, grad0, v0]))


@pytest.mark.parametrize("n,b,replace", [(8, 2, True), (5, 3, True), (6, 3, False)])
def test_the_distinct_batches_give_every_batch_expectation(n, b, replace):
    """p @ f(M) over the distinct batches equals the plain mean of f over every equally likely
    batch, for a nonlinear f; with replacement the C(n + b - 1, b) distinct batches are fewer."""
    from math import comb

    means, probs = batch_distribution(n, b, replace)
    every = batches(n, b, replace)
    x = np.random.default_rng(0).standard_normal((4, n))  # [P, N] per-example values
    f = np.exp(np.sin(3 * x[:, every].mean(axis=2)))  # [P, n_batches]
    np.testing.assert_allclose(np.exp(np.sin(3 * x @ means.T)) @ probs, f.mean(axis=1), rtol=1e-14)
    assert len(means) == (comb(n + b - 1, b) if replace else comb(n, b))
    assert abs(probs.sum() - 1) < 1e-15 and np.all(probs > 0)


def test_cold_start_chain_first_step_is_a_sign_step():
    """Step 1 of a cold start is eta rho sign(g_1) (plus decay): what the SDE cannot follow."""
    problem = make_problem("quadratic")
    scaling = AdamWScaling("ballistic", "cold", weight_decay=0.0)
    eta = 0.05
    end = adamw_chain(problem, None, eta, scaling, horizon=eta, paths=64, seed=3)
    step = np.abs(end.theta - problem.theta0)
    np.testing.assert_allclose(step, eta, rtol=1e-6)  # |m_hat / sqrt(v_hat)| = 1 up to eps


def test_the_study_is_bit_identical_on_one_and_two_workers():
    problem = make_problem("quadratic")
    kwargs = dict(paths=200, sde_step=0.05)
    one = adamw_study(problem, MULT, "malladi", (0.3, 0.2), workers=1, **kwargs)
    two = adamw_study(problem, MULT, "malladi", (0.3, 0.2), workers=2, **kwargs)
    assert len(one) == 2 * 2 * 2 * 2  # 2 info sources x 2 starts x 2 etas x 2 test functions
    assert [(e.model, e.eta, e.test_fn, e.value, e.se) for e in one] == [
        (e.model, e.eta, e.test_fn, e.value, e.se) for e in two
    ]


@pytest.mark.slow
def test_the_weak_error_command_for_adamw_is_claim_c8s_cell(tmp_path, capsys):
    """``pgpo-sde weak-error --optimizer adamw --regime malladi`` on a small grid gives the same
    weak errors, slope and verdict as the report's C8 cell with the same settings (the cell
    same-batch/warm is the study's fourth, so its seed is 30)."""
    import json

    from proofs_checks.claims import Effort, claim_c8_adamw
    from sde.cli import main as sde_main

    etas, paths = (0.2, 0.14, 0.1, 0.07), 4000
    effort = Effort("test", paths, (0.1,), adamw_paths=paths, adamw_etas=(("malladi", etas),))
    (tmp_path / "report").mkdir()
    cell = claim_c8_adamw(MULT, effort, tmp_path / "report", "malladi").numbers
    out = tmp_path / "cli"
    argv = ["weak-error", "--optimizer", "adamw", "--regime", "malladi", "--start", "warm",
            "--info-source", "same-batch", "--etas", ",".join(map(str, etas)),
            "--paths", str(paths), "--seed", "30", "--test-fns", "theta1,sqnorm",
            "--out", str(out)]  # fmt: skip
    assert sde_main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert (out / "weak_error.png").stat().st_size > 5_000
    for fn in ("theta1", "sqnorm"):
        report = cell[f"same-batch-warm {fn}"]
        mine = [[e["eta"], e["value"], e["se"]] for e in results["estimates"] if e["test_fn"] == fn]
        assert mine == report["errors"]  # bit for bit: the same chain and SDE draws
        summary = next(s for s in results["summaries"] if s["test_fn"] == fn)
        assert summary["model"] == "adamw-malladi-same-batch-warm"
        # The same points give the same fitted slope; the interval is a bootstrap of its own
        # (seeded by --seed), so the verdict is compared, not the interval's digits.
        assert f"slope {summary['slope']['slope']:.2f} [" in report["fit"]
        assert report["verdict"] == "holds"
    assert printed.count("order-1 picture (claim C8's cell verdict): holds") == 2
