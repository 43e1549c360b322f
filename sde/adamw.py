"""PGPO with the AdamW that is trained: the discrete chain, its SDEs, and their weak error.

**The chain** is what :class:`pgpo.optim.ModulatedOptimizer` does to ``torch.optim.AdamW``
(``rho_k`` scales that step's learning rate; the moments are plain AdamW's). Step k = 1, 2, ...
on the batch-mean field ``g_k`` ``[P, d]`` with ``rho_k = rho(I_hat_k)``::

    m_k     = beta1 m_{k-1} + (1 - beta1) g_k
    v_k     = beta2 v_{k-1} + (1 - beta2) g_k^2
    theta_k = theta_{k-1} (1 - eta rho_k lam) - eta rho_k (m_k / c1_k) / (sqrt(v_k / c2_k) + eps)

A *cold* start is training's first step (``m_0 = v_0 = 0``, bias corrections
``c_i,k = 1 - beta_i^k``); a *warm* start is a run resumed long after (``m_0 = grad L(theta_0)``,
``v_0 = E[g^2](theta_0)``, ``c = 1``).

**Scalings.** Each regime is a family of chains indexed by eta whose limit as eta -> 0 is one
eta-free equation (``Sigma_b``: covariance of the batch-mean field, as in :mod:`sde.models`;
``rho_bar(theta)``: the chain's mean multiplier, ``rho(I(theta))`` with full-data information,
``E_B[rho(I_B)]`` over equally likely batches with same-batch information):

``malladi`` (Malladi, Lyu, Panigrahi and Arora 2022, as we read it): ``1 - beta_i = c_i eta^2``,
time ``t = k eta^2``, the gradient noise scaled up as ``sigma = sigma0 / eta``
(``g = grad L + (sigma0 / eta) (g_B - grad L)``), ``eps = eps0 / eta`` and (our addition, so that
decay stays in the limit) ``lam = lam0 eta``. State ``(theta, m, u)`` with ``u = v / sigma^2``::

    d theta = -rho_bar [ m_hat / (sigma0 sqrt(u_hat) + eps0) + lam0 theta ] dt
    d m     = c1 (grad L - m) dt + sigma0 c1 Sigma_b^{1/2} dW
    d u     = c2 (diag Sigma_b - u) dt

``ballistic``: ``1 - beta_i = c_i eta``, time ``t = k eta``; noise, eps and lam as they are::

    d theta = -rho_bar [ m_hat / (sqrt(v_hat) + eps) + lam theta ] dt
    d m     = c1 (grad L - m) dt + c1 sqrt(eta) Sigma_b^{1/2} dW
    d v     = c2 (grad L^2 + diag Sigma_b - v) dt

The noise of v (order ``sqrt(eta)``, non-Gaussian) is left out. With a warm start it moves
expectations by O(eta) and leaves the order alone. A cold start's first steps are another matter:
``v_hat_k`` averages only k squared fields (the first step is ``eta rho sign(g_1)``), a relative
spread ``1 / sqrt(k)`` whose nonlinear effect on ``m_hat / sqrt(v_hat)`` sums to
``O(eta log(1/eta))`` over the steps; a Gaussian v noise does not mend it (it takes ``v_hat``
through 0 in the first steps, where the chain's never goes), so cold starts are measured as they
are against this SDE.
Bias correction is a time factor: ``m_hat = m / gamma1(t)``, ``u_hat = u / gamma2(t)``
(``v_hat`` likewise), ``gamma_i(t) = 1 - exp(-c_i t)``, the limit of ``1 - beta_i^k``; 1 warm.
At ``t = 0`` the cold ratios are 0/0 and take their limits, ``grad L`` and the second moment.

``fixed``: betas as trained, (0.9, 0.999), time ``t = k eta``. No theorem covers it. As
eta -> 0 at fixed betas each moment averages over ``1 / (1 - beta)`` steps, a time
``eta / (1 - beta)`` -> 0, so the chain's limit is the ODE of the moments' means::

    d theta = -[ rho_bar grad L + (1 - beta1) C(theta) ] / (sqrt(grad L^2 + diag Sigma_b) + eps)
              - rho_bar lam theta,      C = E_B[rho(I_B) g_B] - rho_bar grad L

(``C = 0`` with full-data information; with same-batch information the current batch's field,
weighted ``1 - beta1`` in ``m_k``, is correlated with ``rho_k``; terms of order ``1 - beta2`` are
dropped). That ODE is what the fixed regime is compared against: its error contains the moments'
lag, of order ``eta / (1 - beta2)`` for v, small only once eta is well below ``1 - beta2``.

In the two scaled regimes the same-batch correlation enters ``m`` with weight
``1 - beta1 -> 0``: unlike SGD (claim C1), the chain's drift is ``rho_bar`` times AdamW's.

The weak error ``E g(theta_K) - E g(Theta_T)`` compares the minibatch chain (as trained, its own
draws) with the SDE (Euler-Maruyama at ``sde_step`` and ``sde_step / 2``, Richardson-extrapolated);
the two are independent, so the standard error adds both sides' variances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pgpo.multiplier import MultiplierConfig
from sde.chains import Draws, run_chain
from sde.integrate import BrownianPath, Solution, euler_maruyama
from sde.models import (
    ADAMW_INFO_SOURCES,
    Multiplier,
    SDEModel,
    as_multiplier,
    batch_covariance,
    batch_distribution,
    check_info_source,
    example_mean,
    sqrtm_psd,
)
from sde.problems import Problem
from sde.weak_error import RESOLVED_SE, TEST_FUNCTIONS, Estimate, map_etas, richardson

REGIMES = ("malladi", "ballistic", "fixed")
STARTS = ("cold", "warm")


@dataclass(frozen=True)
class AdamWScaling:
    """How AdamW's hyperparameters follow eta in one regime (module docstring).

    ``c1, c2``: ``1 - beta_i = c_i eta^2`` (malladi) or ``c_i eta`` (ballistic); ``betas``: the
    fixed regime's; ``eps``, ``weight_decay``, ``sigma0``: eps0, lam0 and the noise scale.
    """

    regime: str
    start: str = "cold"
    c1: float = 4.0
    c2: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    sigma0: float = 1.0

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; choose from {', '.join(REGIMES)}")
        if self.start not in STARTS:
            raise ValueError(f"unknown start {self.start!r}; choose from {', '.join(STARTS)}")

    def time_step(self, eta: float) -> float:
        """SDE time per chain step: ``eta^2`` (malladi) or ``eta``."""
        return eta**2 if self.regime == "malladi" else eta

    def hyper(self, eta: float) -> dict[str, float]:
        """The chain's AdamW settings at learning rate eta: betas, eps, weight decay and the
        factor on the batch noise."""
        if self.regime == "fixed":
            beta1, beta2 = self.betas
        else:
            h = self.time_step(eta)
            beta1, beta2 = 1.0 - self.c1 * h, 1.0 - self.c2 * h
            if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
                raise ValueError(f"eta {eta:g} too large for c1={self.c1:g}, c2={self.c2:g}")
        scaled = self.regime == "malladi"
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=self.eps / eta if scaled else self.eps,
            weight_decay=self.weight_decay * eta if scaled else self.weight_decay,
            noise=self.sigma0 / eta if scaled else 1.0,
        )


def adamw_update(
    theta: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    rho: np.ndarray,
    k: int,
    eta: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One modulated AdamW step on ``[P, d]`` arrays (``rho`` ``[P]``, ``k`` the 1-based step):
    ``(theta, m, v)`` after it. The order of operations is torch's, so float64 results match
    ``ModulatedOptimizer(torch.optim.AdamW)`` to rounding."""
    lr = eta * np.asarray(rho, dtype=np.float64)[:, None]
    theta = theta * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    c1 = 1.0 - beta1**k if bias_correction else 1.0
    c2 = 1.0 - beta2**k if bias_correction else 1.0
    theta = theta - (lr / c1) * m / (np.sqrt(v) / np.sqrt(c2) + eps)
    return theta, m, v


def _warm_moments(problem, theta0, batch_size, replace_, noise):
    """Stationary ``m_0 = grad L`` and ``v_0 = grad L^2 + noise^2 diag Sigma_b`` at theta0."""
    fields, _ = problem.fields_and_infos(np.asarray(theta0, float)[None])
    grad = example_mean(fields)[0]
    var = np.diagonal(batch_covariance(fields, batch_size, replace_)[0])
    return grad, grad**2 + noise**2 * var


def adamw_chain(
    problem: Problem,
    multiplier: MultiplierConfig | Multiplier | None,
    eta: float,
    scaling: AdamWScaling,
    *,
    horizon: float = 1.0,
    batch_size: int = 2,
    paths: int = 10_000,
    seed: int = 0,
    info_source: str = "same-batch",
    replace_: bool = True,
) -> Solution:
    """Modulated AdamW on ``paths`` paths for ``round(horizon / time_step(eta))`` steps."""
    check_info_source(info_source, ADAMW_INFO_SOURCES)
    hp = scaling.hyper(eta)
    steps = max(1, round(horizon / scaling.time_step(eta)))
    m = v = np.zeros((paths, problem.d))
    if scaling.start == "warm":
        m0, v0 = _warm_moments(problem, problem.theta0, batch_size, replace_, hp["noise"])
        m, v = m + m0, v + v0

    def adamw(theta, state, fields, g_hat, rho, k):
        grad = example_mean(fields)
        g = grad + hp["noise"] * (g_hat - grad)  # the regime's gradient-noise scale
        theta, m, v = adamw_update(
            theta, *state, g, rho, k, eta, hp["beta1"], hp["beta2"], hp["eps"],
            hp["weight_decay"], bias_correction=scaling.start == "cold",
        )  # fmt: skip
        return theta, (m, v)

    draws = Draws(batch_size, paths, seed, info_source, replace_)
    return run_chain(problem, multiplier, adamw, steps, draws, state=(m, v), check_every=8)


def adamw_sde(
    problem: Problem,
    multiplier: MultiplierConfig | Multiplier | None,
    scaling: AdamWScaling,
    eta: float,
    *,
    batch_size: int = 2,
    info_source: str = "same-batch",
    replace_: bool = True,
) -> tuple[SDEModel, np.ndarray]:
    """The regime's limit equation on the state ``z = [theta, m, v]`` ``[P, 3d]`` (theta alone
    for the fixed regime's ODE), and its initial state. Only the ballistic SDE depends on eta."""
    check_info_source(info_source, ADAMW_INFO_SOURCES)
    rho = as_multiplier(multiplier)
    d, regime, cold = problem.d, scaling.regime, scaling.start == "cold"
    if info_source == "same-batch":  # the distinct batches [nB, N] and their probabilities [nB]
        means, probs = batch_distribution(problem.n, batch_size, replace_)
    else:
        means = probs = None
    eps = scaling.eps
    lam = scaling.weight_decay

    def parts(theta, with_corr=False):
        """grad L, Sigma_b, rho_bar and (when asked) C: ``[P, d], [P, d, d], [P], [P, d]``."""
        fields, infos = problem.fields_and_infos(theta)
        grad = example_mean(fields)
        cov = batch_covariance(fields, batch_size, replace_)
        if means is None:
            return grad, cov, rho(example_mean(infos)), np.zeros_like(grad)
        rho_batch = rho(infos @ means.T)  # [P, nB]
        rho_bar = rho_batch @ probs
        if not with_corr:
            return grad, cov, rho_bar, None
        # E_B[rho_B g_B] = sum_i (E_B[rho_B M_Bi]) g_i: one [P, N] weight instead of [P, nB, d]
        weights = (rho_batch * probs) @ means
        corr = (weights[:, :, None] * fields).sum(axis=1) - rho_bar[:, None] * grad
        return grad, cov, rho_bar, corr

    if regime == "fixed":
        beta1 = scaling.betas[0]

        def ode(theta):
            grad, cov, rho_bar, corr = parts(theta, with_corr=True)
            second = grad**2 + np.diagonal(cov, axis1=1, axis2=2)
            direction = (rho_bar[:, None] * grad + (1 - beta1) * corr) / (np.sqrt(second) + eps)
            return -direction - rho_bar[:, None] * lam * theta, None

        return SDEModel("adamw-fixed", ode, 0), np.asarray(problem.theta0, float)

    malladi = regime == "malladi"
    c1, c2 = scaling.c1, scaling.c2
    noise = scaling.sigma0 * c1 if malladi else c1 * np.sqrt(eta)

    def coefficients(z, t):
        # Contiguous copies: every [P, d] operation below then runs as one flat loop instead of
        # P loops of length d (the slices of z are strided)
        theta, m, v = (np.ascontiguousarray(z[:, i * d : (i + 1) * d]) for i in range(3))
        grad, cov, rho_bar, _ = parts(theta)
        var = np.diagonal(cov, axis1=1, axis2=2)
        target_v = var if malladi else grad**2 + var
        gamma1 = 1.0 - np.exp(-c1 * t) if cold else 1.0
        gamma2 = 1.0 - np.exp(-c2 * t) if cold else 1.0
        m_hat = m / gamma1 if gamma1 > 0 else grad  # t = 0: the limits of the 0/0 ratios
        v_hat = v / gamma2 if gamma2 > 0 else target_v
        denom = scaling.sigma0 * np.sqrt(v_hat) + eps if malladi else np.sqrt(v_hat) + eps
        drift = np.concatenate(
            [
                -rho_bar[:, None] * (m_hat / denom + lam * theta),
                c1 * (grad - m),
                c2 * (target_v - v),
            ],
            axis=1,
        )
        g = np.zeros((len(z), 3 * d, d))
        g[:, d : 2 * d, :] = noise * sqrtm_psd(cov)
        return drift, g

    theta0 = np.asarray(problem.theta0, float)
    if cold:
        z0 = np.concatenate([theta0, np.zeros(2 * d)])
    else:
        m0, v0 = _warm_moments(problem, theta0, batch_size, replace_, 1.0)
        if malladi:  # u = v / sigma^2 -> diag Sigma_b: the grad^2 part vanishes in the limit
            v0 = v0 - m0**2
        z0 = np.concatenate([theta0, m0, v0])
    return SDEModel(f"adamw-{regime}", coefficients, d, time_dependent=True), z0


def _independent_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    """Mean of a minus mean of b over their finite entries, and its standard error."""
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2:
        return float("nan"), float("nan"), len(a)
    var = a.var(ddof=1) / len(a) + (b.var(ddof=1) / len(b) if len(b) > 1 else 0.0)
    return float(a.mean() - b.mean()), float(np.sqrt(var)), len(a)


def adamw_weak_errors(
    problem: Problem,
    multiplier: MultiplierConfig | Multiplier | None,
    etas: Sequence[float],
    scaling: AdamWScaling,
    *,
    info_source: str = "same-batch",
    batch_size: int = 2,
    replace_: bool = True,
    paths: int = 10_000,
    sde_paths: int | None = None,
    horizon: float = 1.0,
    seed: int = 0,
    test_fns: Sequence[str] = ("theta1", "sqnorm"),
    sde_step: float = 0.005,
    progress: Callable[[str], None] | None = None,
    workers: int = 1,
) -> list[Estimate]:
    """Weak error of the regime's limit equation against the chain, per (eta, test function).
    The SDE side (``sde_paths``, default ``paths``) is integrated once when it does not depend on
    eta; the fixed regime's ODE on one path. ``progress(label)`` is called once per eta;
    ``workers`` > 1 computes the etas in that many processes, with the same results (each eta has
    its own seeds)."""
    check_info_source(info_source, ADAMW_INFO_SOURCES)
    for fn in test_fns:
        if fn not in TEST_FUNCTIONS:
            raise ValueError(
                f"unknown test function {fn!r}; choose from {', '.join(TEST_FUNCTIONS)}"
            )
    sde_paths = paths if sde_paths is None else sde_paths
    reference = (problem, multiplier, scaling, batch_size, info_source, replace_, sde_paths,
                 horizon, tuple(test_fns), sde_step)  # fmt: skip
    # Every regime but the ballistic one has an eta-free limit: one integration serves every eta.
    shared = None
    if scaling.regime != "ballistic":
        shared = _reference(*reference[:3], float(etas[0]), *reference[3:], seed * 1000 + 500)
    cells = [
        (problem, multiplier, float(eta), j, scaling, info_source, batch_size, replace_, paths,
         horizon, seed, reference, shared)
        for j, eta in enumerate(etas)
    ]  # fmt: skip
    return map_etas(_adamw_eta_cell, cells, [c[2] for c in cells], workers, progress)


def _adamw_eta_cell(cell) -> list[Estimate]:
    """One eta: the chain (seed ``1000 seed + j``) against the shared reference, or against its
    own (ballistic: seed ``1000 seed + 500 + j``)."""
    (problem, multiplier, eta, j, scaling, info_source, batch_size, replace_, paths, horizon,
     seed, reference, shared) = cell  # fmt: skip
    end = adamw_chain(
        problem, multiplier, eta, scaling, horizon=horizon, batch_size=batch_size,
        paths=paths, seed=seed * 1000 + j, info_source=info_source, replace_=replace_,
    )  # fmt: skip
    if shared is None:
        shared = _reference(*reference[:3], eta, *reference[3:], seed * 1000 + 500 + j)
    sde_values, sde_bad = shared
    name = f"adamw-{scaling.regime}-{info_source}-{scaling.start}"
    out = []
    for i, fn in enumerate(reference[8]):
        chain_g = np.where(end.diverged, np.nan, TEST_FUNCTIONS[fn](end.theta))
        value, se, n = _independent_difference(chain_g, sde_values[i])
        out.append(
            Estimate(
                model=name, eta=eta, test_fn=fn, value=value, se=se,
                ci_low=value - 1.96 * se, ci_high=value + 1.96 * se,
                resolved=bool(np.isfinite(value) and abs(value) >= RESOLVED_SE * se),
                paths=n, diverged_chain=int(end.diverged.sum()), diverged_sde=sde_bad,
            )
        )  # fmt: skip
    return out


def _reference(problem, multiplier, scaling, eta, batch_size, info_source, replace_, paths,
               horizon, test_fns, sde_step, seed):  # fmt: skip
    """Richardson-extrapolated ``g(Theta_T)`` per path and test function ``[fns, paths]``, and the
    number of diverged paths."""
    model, z0 = adamw_sde(
        problem, multiplier, scaling, eta, batch_size=batch_size, info_source=info_source,
        replace_=replace_,
    )  # fmt: skip
    paths = 1 if model.is_ode else paths
    steps = max(1, round(horizon / sde_step))
    brownian = BrownianPath(
        seed=seed, paths=paths, dim=max(model.noise_dim, 1), eta=horizon / steps, fine=2
    )
    coarse = euler_maruyama(model, z0, steps, brownian, 1)
    fine = euler_maruyama(model, z0, steps, brownian, 2)
    bad = coarse.diverged | fine.diverged
    d = problem.d
    values = np.stack(
        [
            np.where(
                bad,
                np.nan,
                richardson(
                    TEST_FUNCTIONS[fn](coarse.theta[:, :d]), TEST_FUNCTIONS[fn](fine.theta[:, :d])
                ),
            )
            for fn in test_fns
        ]
    )
    return values, int(bad.sum())


def adamw_study(
    problem: Problem,
    multiplier: MultiplierConfig | Multiplier | None,
    regime: str,
    etas: Sequence[float],
    *,
    paths: int,
    sde_step: float = 0.01,
    seed: int = 0,
    workers: int = 1,
) -> list[Estimate]:
    """Every (information source, start) cell of one regime: full and same-batch information,
    cold and warm starts. ``workers`` > 1 runs the cells in that many processes, with the same
    results (each cell has its own seeds)."""
    cells = [
        (problem, multiplier, tuple(float(e) for e in etas), AdamWScaling(regime, start), info,
         paths, seed + 10 * i, sde_step)
        for i, (info, start) in enumerate(
            (info, start) for info in ("full", "same-batch") for start in STARTS
        )
    ]  # fmt: skip
    if workers <= 1:
        results = [_study_cell(c) for c in cells]
    else:
        import concurrent.futures as futures
        import multiprocessing

        with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context()) as pool:
            results = list(pool.map(_study_cell, cells))
    return [e for r in results for e in r]


def _study_cell(cell) -> list[Estimate]:
    problem, multiplier, etas, scaling, info, paths, seed, sde_step = cell
    return adamw_weak_errors(
        problem, multiplier, etas, scaling, info_source=info, paths=paths, seed=seed,
        sde_step=sde_step,
    )  # fmt: skip
