"""Weak error of SDE models against discrete PGPO, as a function of the learning rate.

For each eta and test function g: ``e(eta) = E g(theta_K) - E g(Theta_T)`` with ``K = round(T/eta)``
chain steps and the SDE at ``T = K eta``. The SDE side is Euler-Maruyama with ``m`` and ``2m``
sub-steps per eta (``m = max(2, ceil(eta / sde_step))``, so the EM step never exceeds
``sde_step`` and the reference is equally accurate at every eta), Richardson-extrapolated per path
(``2 g(EM_{h/2}) - g(EM_h)``, residual O(h^2)), both on one Brownian path. With the Gaussian
chain, the chain shares that Brownian path too (coupling), so the per-path differences have a
small variance; the minibatch chain is independent of it.

Why the Gaussian chain may stand in for the minibatch chain: its step has exactly the same
conditional mean and covariance, so the two chains' expectations differ only through third and
higher moments of the step, O(eta^3) per step and O(eta^2) after T/eta steps, below the O(eta)
weak errors being measured (and checked in the tests).

Every estimate carries its standard error (from the per-path differences) and a 95 % interval.
The interval covers Monte Carlo error only; the SDE reference's own discretisation residual is
O(sde_step^2) (about 1e-5 at the default 0.0125 on the toy problems), which matters only when
coupling makes the standard error that small.
A point with ``|e| < 3 SE`` is *unresolved* and is not fitted. Paths that diverged (NaN/inf or
``|theta| > 1e8``) on either side are counted and left out of the mean, never averaged in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from pgpo.multiplier import MultiplierConfig
from sde.chains import gaussian_chain, minibatch_chain
from sde.integrate import BrownianPath, euler_maruyama
from sde.models import Multiplier, make_model
from sde.problems import Problem

TEST_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "theta1": lambda theta: theta[:, 0],
    "sqnorm": lambda theta: (theta**2).sum(axis=1),
    "gauss": lambda theta: np.exp(-0.5 * (theta**2).sum(axis=1)),
}
CHAINS = ("minibatch", "gaussian")
RESOLVED_SE = 3.0  # |e| below this many standard errors: unresolved
PLATEAU_SLOPE = 0.3
ORDER_TOLERANCE = 0.15  # |slope - 1| within this counts as order 1


@dataclass
class Estimate:
    """One weak-error estimate with its Monte Carlo error."""

    model: str
    eta: float
    test_fn: str
    value: float
    se: float
    ci_low: float
    ci_high: float
    resolved: bool
    paths: int
    diverged_chain: int
    diverged_sde: int


@dataclass
class SlopeFit:
    """Weighted least-squares slope of log|e| on log eta, with a bootstrap 95 % interval."""

    slope: float
    ci_low: float
    ci_high: float
    etas: list[float] = field(default_factory=list)

    @property
    def half_width(self) -> float:
        return 0.5 * (self.ci_high - self.ci_low)


def richardson(coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """Per-path Richardson extrapolation of a weak order-1 scheme: ``2 fine - coarse``."""
    return 2.0 * fine - coarse


def estimate_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    """Mean and standard error of ``a - b`` over paths where both are finite; (mean, se, n)."""
    diff = a - b
    ok = np.isfinite(diff)
    n = int(ok.sum())
    if n < 2:
        return float("nan"), float("nan"), n
    return float(diff[ok].mean()), float(diff[ok].std(ddof=1) / np.sqrt(n)), n


def weak_errors(
    problem: Problem,
    multiplier: MultiplierConfig | Multiplier | None,
    etas: Sequence[float],
    models: Sequence[str],
    *,
    info_source: str = "same-batch",
    batch_size: int = 2,
    replace: bool = True,
    paths: int = 10_000,
    horizon: float = 1.0,
    seed: int = 0,
    test_fns: Sequence[str] = ("theta1", "sqnorm", "gauss"),
    chain: str = "minibatch",
    sde_step: float = 0.0125,
    progress: Callable[[str], None] | None = None,
    workers: int = 1,
) -> list[Estimate]:
    """Estimates for every (eta, model, test function), in that order. ``progress(label)`` is
    called once per eta; ``workers`` > 1 computes the etas in that many processes, with the
    same results."""
    if chain not in CHAINS:
        raise ValueError(f"unknown chain {chain!r}; choose from {', '.join(CHAINS)}")
    for name in test_fns:
        if name not in TEST_FUNCTIONS:
            raise ValueError(
                f"unknown test function {name!r}; choose from {', '.join(TEST_FUNCTIONS)}"
            )
    if not sde_step > 0:
        raise ValueError(f"sde_step must be > 0, got {sde_step!r}")
    cells = [
        (problem, multiplier, j, float(eta), tuple(models), info_source, batch_size, replace,
         paths, horizon, seed, tuple(test_fns), chain, sde_step)
        for j, eta in enumerate(etas)
    ]  # fmt: skip
    return map_etas(_eta_cell, cells, [c[3] for c in cells], workers, progress)


def map_etas(
    fn: Callable, cells: list, etas: Sequence[float], workers: int = 1, progress=None
) -> list[Estimate]:
    """``fn(cell)`` for each eta's cell, concatenated in the cells' order: in this process, or
    in ``workers`` processes. Every cell has its own seeds (from the seed and the eta's index),
    so the estimates do not depend on which process computes them: the results are
    bit-identical for every N. ``progress(label)`` is called once per eta."""
    if workers <= 1:
        results = {}
        for i, cell in enumerate(cells):
            results[i] = fn(cell)
            if progress is not None:
                progress(f"eta={etas[i]:g}")
        return [e for i in range(len(cells)) for e in results[i]]
    import concurrent.futures as futures
    import multiprocessing

    # The smallest eta (the most steps) is submitted first, so that it does not finish last.
    order = sorted(range(len(cells)), key=lambda i: etas[i])
    # The platform's default start method: fork on Linux, where the workers import nothing.
    with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context()) as pool:
        jobs = {i: pool.submit(fn, cells[i]) for i in order}
        results = {}
        for i in order:
            results[i] = jobs[i].result()
            if progress is not None:
                progress(f"eta={etas[i]:g}")
    return [e for i in range(len(cells)) for e in results[i]]


def _eta_cell(cell) -> list[Estimate]:
    """The chain and every model at one eta (index j), with that eta's own seeds."""
    (problem, multiplier, j, eta, models, info_source, batch_size, replace, paths, horizon,
     seed, test_fns, chain, sde_step) = cell  # fmt: skip
    out: list[Estimate] = []
    steps = max(1, round(horizon / eta))
    substeps = max(2, int(np.ceil(eta / sde_step - 1e-9)))
    brownian = BrownianPath(
        seed=seed * 1000 + j, paths=paths, dim=problem.d, eta=eta, fine=2 * substeps
    )
    if chain == "gaussian":
        end = gaussian_chain(
            problem, multiplier, eta, steps, batch_size, brownian, info_source, replace
        )
    else:
        end = minibatch_chain(
            problem,
            multiplier,
            eta,
            steps,
            batch_size,
            paths,
            seed=[seed, j, 7],
            info_source=info_source,
            replace=replace,
        )
    for name in models:
        model = make_model(name, problem, multiplier, batch_size, eta, info_source, replace)
        coarse = euler_maruyama(model, problem.theta0, steps, brownian, substeps)
        fine = euler_maruyama(model, problem.theta0, steps, brownian, 2 * substeps)
        sde_bad = coarse.diverged | fine.diverged
        for fn in test_fns:
            g = TEST_FUNCTIONS[fn]
            chain_g = np.where(end.diverged, np.nan, g(end.theta))
            sde_g = np.where(sde_bad, np.nan, richardson(g(coarse.theta), g(fine.theta)))
            value, se, n = estimate_difference(chain_g, sde_g)
            out.append(
                Estimate(
                    model=name,
                    eta=float(eta),
                    test_fn=fn,
                    value=value,
                    se=se,
                    ci_low=value - 1.96 * se,
                    ci_high=value + 1.96 * se,
                    resolved=bool(np.isfinite(value) and abs(value) >= RESOLVED_SE * se),
                    paths=n,
                    diverged_chain=int(end.diverged.sum()),
                    diverged_sde=int(sde_bad.sum()),
                )
            )
    return out


def fit_slope(
    etas: Sequence[float],
    values: Sequence[float],
    ses: Sequence[float],
    n_boot: int = 2000,
    seed: int = 0,
) -> SlopeFit | None:
    """Slope of log|e| against log eta, weights ``(e / se)^2`` (the inverse variance of log|e|);
    95 % interval from a parametric bootstrap ``e* ~ N(e, se^2)``. None with fewer than 2 points."""
    x = np.log(np.asarray(etas, float))
    e, s = np.asarray(values, float), np.asarray(ses, float)
    if len(x) < 2:
        return None

    def wls(y_abs):
        """The weighted slope of each row of ``y_abs`` ``[rows, points]``: ``[rows]``."""
        y = np.log(np.maximum(y_abs, 1e-300))
        w = (y_abs / np.maximum(s, 1e-300)) ** 2
        xm = (w * x).sum(axis=-1, keepdims=True) / w.sum(axis=-1, keepdims=True)
        ym = (w * y).sum(axis=-1, keepdims=True) / w.sum(axis=-1, keepdims=True)
        return (w * (x - xm) * (y - ym)).sum(axis=-1) / (w * (x - xm) ** 2).sum(axis=-1)

    slope = wls(np.abs(e)[None])[0]
    rng = np.random.default_rng(seed)
    boot = wls(np.abs(e + s * rng.standard_normal((n_boot, len(e)))))  # one draw per row
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return SlopeFit(float(slope), float(lo), float(hi), [float(v) for v in etas])


@dataclass
class Summary:
    """Per (model, test function): slope over all resolved points and over the smallest etas."""

    model: str
    test_fn: str
    slope: SlopeFit | None
    slope_small: SlopeFit | None
    resolved: int
    unresolved: int
    plateau: bool
    plateau_value: float | None
    verdict: str


def summarize(estimates: Sequence[Estimate], smallest: int = 3, seed: int = 0) -> list[Summary]:
    """Fit slopes per (model, test function); a small-eta slope below 0.3 is a plateau."""
    out = []
    keys = dict.fromkeys((e.model, e.test_fn) for e in estimates)
    for model, fn in keys:
        points = sorted(
            (e for e in estimates if e.model == model and e.test_fn == fn), key=lambda e: e.eta
        )
        resolved = [e for e in points if e.resolved]
        fit = fit_slope(
            [e.eta for e in resolved],
            [e.value for e in resolved],
            [e.se for e in resolved],
            seed=seed,
        )
        small = resolved[:smallest]
        fit_small = fit_slope(
            [e.eta for e in small], [e.value for e in small], [e.se for e in small], seed=seed
        )
        plateau = fit_small is not None and fit_small.slope < PLATEAU_SLOPE
        plateau_value = None
        if plateau:
            w = np.array([1 / e.se**2 for e in small])
            plateau_value = float((w * np.array([e.value for e in small])).sum() / w.sum())
        if fit is None:
            verdict = "unresolved: too few points above 3 standard errors"
        elif plateau:
            verdict = f"plateau: e -> {plateau_value:.3g} as eta -> 0 (no convergence)"
        else:
            verdict = f"order {fit.slope:.2f} [{fit.ci_low:.2f}, {fit.ci_high:.2f}]"
        out.append(
            Summary(
                model,
                fn,
                fit,
                fit_small,
                len(resolved),
                len(points) - len(resolved),
                plateau,
                plateau_value,
                verdict,
            )
        )
    return out


def order_one(s: Summary, tolerance: float = ORDER_TOLERANCE) -> bool | None:
    """Whether a fit reads as the order-1 picture (claim C8's cell verdict): a converging weak
    error (no plateau) whose slope's 95 % interval reaches ``1 - tolerance``. None (not measured)
    when fewer than 3 etas are resolved: two points always fit a line."""
    if s.slope is None or s.resolved < 3:
        return None
    if s.plateau:
        return False
    return s.slope.ci_high >= 1 - tolerance


def to_json(estimates: Sequence[Estimate], summaries: Sequence[Summary], settings: dict) -> dict:
    return {
        "settings": settings,
        "estimates": [asdict(e) for e in estimates],
        "summaries": [
            {
                **asdict(s),
                "slope": asdict(s.slope) if s.slope else None,
                "slope_small": asdict(s.slope_small) if s.slope_small else None,
            }
            for s in summaries
        ],
    }
