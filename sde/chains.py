"""Discrete chains: SGD and PGPO on a finite-sum problem, vectorised over paths.

``theta_{k+1} = theta_k - eta * rho(I_hat_k) * g_hat_k`` with ``g_hat_k`` the mean update field of
a batch of ``batch_size`` examples and ``I_hat_k`` the mean information of

- ``same-batch``: the same batch (the paper's Algorithm 1);
- ``independent-batch``: an independent batch of the same size;
- ``full``: all N examples.

``multiplier=None`` gives rho = 1: SGD, SDPO's baseline.

:func:`gaussian_chain` is the surrogate whose step has exactly the mean and covariance of the
minibatch chain's step (the ``matched`` model's Euler step of length eta) but Gaussian noise, taken
from a :class:`~sde.integrate.BrownianPath` so that it can share increments with the SDE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pgpo.multiplier import MultiplierConfig
from sde.integrate import BrownianPath, Solution, _mark_diverged, euler_maruyama
from sde.models import Multiplier, as_multiplier, check_info_source, example_mean, make_model
from sde.problems import Problem


def draw_batches(rng: np.random.Generator, paths: int, n: int, b: int, replace: bool):
    """Batch indices ``[paths, b]``, uniform, with or without replacement."""
    if replace:
        return rng.integers(0, n, size=(paths, b))
    return np.argsort(rng.random((paths, n)), axis=1)[:, :b]


def minibatch_signals(
    problem: Problem,
    theta: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    replace: bool,
    info_source: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step's draw at ``theta`` ``[paths, d]``: the per-example fields ``[paths, n, d]``, the
    minibatch gradient ``[paths, d]`` (the mean over a batch of ``batch_size`` examples per
    path) and I ``[paths]`` from ``info_source``: the same batch, a second independent batch
    (drawn after the first), or all n examples."""
    paths = theta.shape[0]
    rows = np.arange(paths)[:, None]
    fields, infos = problem.fields_and_infos(theta)
    batch = draw_batches(rng, paths, problem.n, batch_size, replace)
    g_hat = example_mean(fields[rows, batch])
    if info_source == "same-batch":
        info = example_mean(infos[rows, batch])
    elif info_source == "independent-batch":
        other = draw_batches(rng, paths, problem.n, batch_size, replace)
        info = example_mean(infos[rows, other])
    else:
        info = example_mean(infos)
    return fields, g_hat, info


# One step of a chain's optimizer on every path: (theta, state, fields, g_hat, rho, k) -> (theta,
# state), with theta and g_hat [paths, d], the per-example fields [paths, n, d], rho [paths] and
# k the 1-based step; state holds the optimizer's other arrays (AdamW's moments), or ().
ChainUpdate = Callable[
    [np.ndarray, tuple, np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, tuple]
]


@dataclass(frozen=True)
class Draws:
    """How a chain draws its noise: ``batch_size`` examples a step (with or without
    replacement) for each of ``paths`` paths from generator ``seed``, I from ``info_source``."""

    batch_size: int
    paths: int
    seed: int | list[int]
    info_source: str = "same-batch"
    replace: bool = True


def run_chain(
    problem: Problem,
    multiplier: MultiplierConfig | Multiplier | None,
    update: ChainUpdate,
    steps: int,
    draws: Draws,
    theta0: np.ndarray | None = None,
    state: tuple = (),
    record: bool = False,
    check_every: int = 1,
) -> Solution:
    """The loop every discrete chain shares, on ``paths`` independent paths: each step draws a
    batch and I (:func:`minibatch_signals`), then ``update`` moves theta by ``rho(I)``. A path
    whose theta stops being finite or passes the blow-up bound is marked diverged and frozen at
    NaN (checked every ``check_every`` steps and at the last). ``state``: the optimizer's
    arrays beside theta at the start, each ``[paths, d]``."""
    rho = as_multiplier(multiplier)
    rng = np.random.default_rng(draws.seed)
    start = problem.theta0 if theta0 is None else theta0
    theta = np.array(np.broadcast_to(np.asarray(start, float), (draws.paths, problem.d)))
    diverged = np.zeros(draws.paths, dtype=bool)
    path = [theta.copy()] if record else None
    with np.errstate(all="ignore"):
        for k in range(1, steps + 1):
            fields, g_hat, info = minibatch_signals(problem, theta, rng, draws.batch_size,
                                                    draws.replace, draws.info_source)  # fmt: skip
            theta, state = update(theta, state, fields, g_hat, rho(info), k)
            if k % check_every == 0 or k == steps:
                _mark_diverged(theta, diverged)
            if record:
                path.append(theta.copy())
    return Solution(theta, diverged, np.stack(path) if record else None)


def minibatch_chain(
    problem: Problem,
    multiplier: MultiplierConfig | Multiplier | None,
    eta: float,
    steps: int,
    batch_size: int,
    paths: int,
    seed: int,
    info_source: str = "same-batch",
    replace: bool = True,
    theta0: np.ndarray | None = None,
    record: bool = False,
) -> Solution:
    """Run discrete PGPO (or SGD) for ``steps`` steps on ``paths`` independent paths:
    ``theta <- theta - eta * rho(I) * g_hat``."""
    check_info_source(info_source)

    def sgd(theta, state, _fields, g_hat, rho, _k):
        return theta - eta * rho[:, None] * g_hat, state

    draws = Draws(batch_size, paths, seed, info_source, replace)
    return run_chain(problem, multiplier, sgd, steps, draws, theta0, record=record)


def gaussian_chain(
    problem: Problem,
    multiplier: MultiplierConfig | Multiplier | None,
    eta: float,
    steps: int,
    batch_size: int,
    brownian: BrownianPath,
    info_source: str = "same-batch",
    replace: bool = True,
    record: bool = False,
) -> Solution:
    """The Gaussian surrogate chain, driven by the whole-step increments of ``brownian``."""
    model = make_model("matched", problem, multiplier, batch_size, eta, info_source, replace)
    return euler_maruyama(model, problem.theta0, steps, brownian, substeps=1, record=record)
