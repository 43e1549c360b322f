"""sde: problems, models and integrators against direct formulas and brute force."""

import itertools

import numpy as np
import pytest

from pgpo.multiplier import MultiplierConfig
from sde.chains import gaussian_chain, minibatch_chain
from sde.exact import chain_moments, ou_moments
from sde.integrate import BrownianPath, euler_maruyama, integrate_torchsde
from sde.models import batch_covariance, constant_rho, make_model, sqrtm_psd
from sde.problems import Distill, Logistic, Quadratic, make_problem

RNG = np.random.default_rng(123)


def numerical_grad(f, theta, h=1e-6):
    """Central differences of f: [P, d] -> [P, N], as [P, N, d]."""
    cols = [(f(theta + h * e) - f(theta - h * e)) / (2 * h) for e in np.eye(theta.shape[1])]
    return np.stack(cols, axis=-1)


def test_quadratic_and_logistic_fields_are_gradients_of_their_losses():
    q = Quadratic()
    theta = RNG.standard_normal((4, q.d))
    np.testing.assert_allclose(q.fields(theta), numerical_grad(q.losses, theta), atol=1e-7)
    lg = Logistic()

    def logistic_losses(th):
        margin = (th @ lg.x.T) * lg.y
        return np.logaddexp(0, -margin) + 0.5 * lg.lam * (th**2).sum(1, keepdims=True)

    np.testing.assert_allclose(lg.fields(theta), numerical_grad(logistic_losses, theta), atol=1e-7)


def test_logistic_info_is_binary_entropy_of_prediction():
    lg = Logistic()
    theta = RNG.standard_normal((3, lg.d))
    p = 1 / (1 + np.exp(-(theta @ lg.x.T)))
    np.testing.assert_allclose(
        lg.infos(theta), -(p * np.log(p) + (1 - p) * np.log(1 - p)), atol=1e-12
    )


def test_distill_field_is_the_semi_gradient_with_the_teacher_frozen():
    ds = Distill()
    theta = RNG.standard_normal((3, ds.d))
    frozen_teacher = []
    for th in theta:  # teacher probabilities at the current theta, then held fixed
        zt = np.einsum("nkd,d->nk", ds.U, th) + ds.f
        frozen_teacher.append(zt - np.logaddexp.reduce(zt, axis=1, keepdims=True))

    def kl_to_frozen(th_batch, i):
        z = np.einsum("nkd,pd->pnk", ds.W, th_batch)
        log_s = z - np.logaddexp.reduce(z, axis=2, keepdims=True)
        kl = (np.exp(log_s) * (log_s - frozen_teacher[i][None])).sum(2)
        return kl + 0.5 * ds.lam * (th_batch**2).sum(1, keepdims=True)

    for i in range(len(theta)):
        fd = numerical_grad(lambda th, i=i: kl_to_frozen(th, i), theta[i : i + 1])
        np.testing.assert_allclose(ds.fields(theta[i : i + 1]), fd, atol=1e-7)
    # ... and it is not a gradient: its Jacobian (summed over examples) is not symmetric,
    jac = numerical_grad(lambda th: ds.fields(th).sum(1), theta[:1])[0]
    assert abs(jac[0, 1] - jac[1, 0]) > 1e-3
    # while with the teacher reading theta like the student (context 0) it is a gradient.
    same = Distill(context=0.0)
    jac0 = numerical_grad(lambda th: same.fields(th).sum(1), theta[:1])[0]
    assert abs(jac0[0, 1] - jac0[1, 0]) < 1e-6


def brute_force_batches(n, b, replace):
    if replace:
        return list(itertools.product(range(n), repeat=b))
    return list(itertools.combinations(range(n), b))


@pytest.mark.parametrize("replace", [True, False])
def test_batch_covariance_matches_enumeration(replace):
    q = Quadratic()
    theta = RNG.standard_normal((2, q.d))
    fields = q.fields(theta)
    for b in (1, 2, 3):
        means = np.array(
            [
                [fields[p, list(B)].mean(0) for B in brute_force_batches(q.n, b, replace)]
                for p in range(2)
            ]
        )
        centred = means - means.mean(1, keepdims=True)
        expected = np.einsum("pbd,pbe->pde", centred, centred) / means.shape[1]
        np.testing.assert_allclose(batch_covariance(fields, b, replace), expected, atol=1e-12)


def test_sqrtm_psd_is_a_symmetric_square_root():
    for d in (1, 2, 3):
        r = RNG.standard_normal((5, d, d + 1))
        cov = r @ r.transpose(0, 2, 1)
        root = sqrtm_psd(cov)
        np.testing.assert_allclose(root @ root, cov, atol=1e-10)
        np.testing.assert_allclose(root, root.transpose(0, 2, 1), atol=1e-12)


@pytest.mark.parametrize("info_source", ["same-batch", "full", "independent-batch"])
def test_matched_model_is_the_chains_exact_step_moments(info_source):
    problem = Logistic()
    mult = MultiplierConfig(1.5, 2.0)
    eta, b = 0.1, 2
    theta = RNG.standard_normal((2, problem.d))
    model = make_model("matched", problem, mult, b, eta, info_source)
    drift, g = model.coefficients(theta)
    fields, infos = problem.fields(theta), problem.infos(theta)
    batches = brute_force_batches(problem.n, b, True)
    for p in range(2):
        steps = []
        for B in batches:
            g_b = fields[p, list(B)].mean(0)
            if info_source == "same-batch":
                steps.append([mult(infos[p, list(B)].mean()) * g_b])
            elif info_source == "full":
                steps.append([mult(infos[p].mean()) * g_b])
            else:
                steps.append([mult(infos[p, list(C)].mean()) * g_b for C in batches])
        steps = np.array(steps).reshape(-1, problem.d)
        np.testing.assert_allclose(drift[p], -steps.mean(0), atol=1e-12)
        cov = np.cov(steps.T, bias=True)
        np.testing.assert_allclose(g[p] @ g[p].T, eta * cov, atol=1e-12)


def test_second_order_drift_on_quadratic_with_constant_rho():
    q = Quadratic()
    eta, r = 0.1, 1.3
    theta = RNG.standard_normal((3, q.d))
    model = make_model("second-order", q, constant_rho(r), 2, eta)
    dev = theta - q.x.mean(0)
    expected = -r * dev @ q.A - 0.5 * eta * r**2 * dev @ q.A @ q.A
    np.testing.assert_allclose(model.drift(theta), expected, atol=1e-7)


def test_brownian_coarse_increments_are_sums_of_fine_ones_and_reproducible():
    bp = BrownianPath(seed=5, paths=7, dim=2, eta=0.1, fine=4)
    fine, coarse, whole = bp.increments(3, 4), bp.increments(3, 2), bp.increments(3, 1)
    np.testing.assert_allclose(coarse[0], fine[0] + fine[1])
    np.testing.assert_allclose(whole[0], fine.sum(0))
    np.testing.assert_array_equal(fine, BrownianPath(5, 7, 2, 0.1, 4).increments(3, 4))
    assert not np.array_equal(fine, bp.increments(4, 4))
    # variance per fine increment: eta / fine (chi-square check, 5 sigma)
    big = BrownianPath(1, 20000, 2, 0.1, 4).increments(0, 4)
    var = big.var()
    assert abs(var - 0.025) < 5 * 0.025 * np.sqrt(2 / big.size)


def test_em_is_reproducible_and_matches_exact_ou_moments():
    q = Quadratic(info_scale=0.0)
    r, eta, steps, paths = 1.4, 0.05, 20, 20000
    model = make_model("paper", q, constant_rho(r), 2, eta)
    bp = BrownianPath(11, paths, q.d, eta, fine=8)
    a = euler_maruyama(model, q.theta0, steps, bp, substeps=8)
    b = euler_maruyama(model, q.theta0, steps, bp, substeps=8)
    np.testing.assert_array_equal(a.theta, b.theta)
    mean, cov = ou_moments(q, r, eta, steps * eta, 2, 1.0)
    se = np.sqrt(np.diag(cov) / paths)
    # EM with h = eta/8 has an O(h) bias ~ 1e-3 here; the mean's MC error is se.
    assert np.all(np.abs(a.theta.mean(0) - mean) < 4 * se + 2e-3)
    np.testing.assert_allclose(np.cov(a.theta.T), cov, rtol=0.1)


def test_torchsde_backend_agrees_with_ours_within_monte_carlo_error():
    problem = make_problem("logistic")
    mult = MultiplierConfig(1.0, 2.0)
    eta, steps, paths = 0.1, 10, 4000
    model = make_model("scaled", problem, mult, 2, eta, "full")
    ours = euler_maruyama(
        model, problem.theta0, steps, BrownianPath(0, paths, problem.d, eta, 2), substeps=2
    )
    theirs = integrate_torchsde(model, problem.theta0, steps, eta, paths, seed=1, substeps=2)
    for g in (lambda t: t[:, 0], lambda t: (t**2).sum(1)):
        a, b = g(ours.theta), g(theirs.theta)
        se = np.sqrt(a.var() / paths + b.var() / paths)
        assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)
    assert np.all(np.isfinite(theirs.theta))


def test_gaussian_chain_matches_minibatch_chain_moments():
    problem = make_problem("quadratic")
    mult = MultiplierConfig(1.0, 2.0)
    eta, steps, paths = 0.1, 10, 20000
    mini = minibatch_chain(problem, mult, eta, steps, 2, paths, seed=3)
    gauss = gaussian_chain(problem, mult, eta, steps, 2, BrownianPath(4, paths, problem.d, eta, 1))
    for g in (lambda t: t[:, 0], lambda t: (t**2).sum(1)):
        a, b = g(mini.theta), g(gauss.theta)
        se = np.sqrt(a.var() / paths + b.var() / paths)
        # Same one-step mean and covariance: the chains differ by O(eta^2) in E g.
        assert abs(a.mean() - b.mean()) < 4 * se + eta**2


def test_chain_quadratic_constant_rho_matches_exact_recursion():
    q = Quadratic(info_scale=0.0)
    r, eta, steps, paths = 1.0, 0.1, 10, 40000
    out = minibatch_chain(q, None, eta, steps, 2, paths, seed=0)
    mean, cov = chain_moments(q, r, eta, steps, 2)
    se = np.sqrt(np.diag(cov) / paths)
    assert np.all(np.abs(out.theta.mean(0) - mean) < 4 * se)
    np.testing.assert_allclose(np.cov(out.theta.T), cov, rtol=0.05, atol=1e-4)


def test_diverged_paths_are_marked_not_averaged():
    q = Quadratic()
    out = minibatch_chain(
        q, MultiplierConfig(1.0, 2.0), eta=5.0, steps=40, batch_size=2, paths=50, seed=0
    )
    assert out.diverged.all() and np.isnan(out.theta).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="cubic"), "unknown SDE model"),
        (dict(info_source="oracle"), "unknown info source"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    args = dict(name="paper", problem=Quadratic(), multiplier=None, batch_size=2, eta=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_model(**args)


def test_weak_error_results_are_bit_identical_for_any_number_of_workers(tmp_path):
    from sde.cli import main as sde_main

    outs = []
    for workers in (1, 2):
        out = tmp_path / "study"  # the same folder: results.json records it
        args = ["weak-error", "--paths", "200", "--etas", "0.2,0.1,0.05", "--out", str(out)]
        assert sde_main([*args, "--workers", str(workers)]) == 0
        outs.append((out / "results.json").read_bytes())
    assert outs[0] == outs[1]


def test_li_tai_e_modified_equations_are_order_one_and_two_on_the_quadratic():
    """Positive controls from the literature: on the quadratic with constant rho the chain's
    moments and the first- and second-order SMEs' are all closed-form, so the weak errors are
    exact (no Monte Carlo error) and their slopes must be 1 and 2."""
    from sde.exact import chain_moments, gaussian_expectations, sme_moments
    from sde.weak_error import fit_slope

    q = make_problem("quadratic", info_scale=0.0)
    etas = [0.1, 0.05, 0.025, 0.0125, 0.00625]
    for order in (1, 2):
        for fn in ("theta1", "sqnorm"):
            errors = []
            for eta in etas:
                chain = gaussian_expectations(*chain_moments(q, 1.0, eta, round(1 / eta), 2))
                sme = gaussian_expectations(*sme_moments(q, 1.0, eta, 1.0, 2, order))
                errors.append(chain[fn] - sme[fn])
            fit = fit_slope(etas[-3:], errors[-3:], [1e-12] * 3, n_boot=10)
            assert abs(fit.slope - order) < 0.05, (order, fn, fit.slope)


@pytest.mark.slow
def test_the_toolkits_second_order_model_is_li_tai_es_second_order_sme():
    """The same SME through the toolkit's own model and Euler-Maruyama: the Monte Carlo mean
    agrees with the closed form within 4 standard errors (which the test computes)."""
    from sde.exact import sme_moments

    q = make_problem("quadratic", info_scale=0.0)
    eta, paths = 0.1, 20_000
    steps, substeps = round(1 / eta), 64  # EM's own O(h) error far below the SE
    model = make_model("second-order", q, constant_rho(1.0), 2, eta, "full", True)
    brownian = BrownianPath(seed=3, paths=paths, dim=q.d, eta=eta, fine=substeps)
    end = euler_maruyama(model, q.theta0, steps, brownian, substeps)
    mean, cov = sme_moments(q, 1.0, eta, 1.0, 2, order=2)
    se = end.theta.std(axis=0, ddof=1) / np.sqrt(paths)
    assert np.all(np.abs(end.theta.mean(axis=0) - mean) < 4 * se + 1e-3 * eta), (
        end.theta.mean(axis=0), mean, se)  # fmt: skip
