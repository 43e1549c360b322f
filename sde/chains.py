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

import numpy as np

from pgpo.multiplier import MultiplierConfig
from sde.integrate import BrownianPath, Solution, _mark_diverged, euler_maruyama
from sde.models import INFO_SOURCES, Multiplier, as_multiplier, example_mean, make_model
from sde.problems import Problem


def draw_batches(rng: np.random.Generator, paths: int, n: int, b: int, replace: bool):
    """Batch indices ``[paths, b]``, uniform, with or without replacement."""
    if replace:
        return rng.integers(0, n, size=(paths, b))
    return np.argsort(rng.random((paths, n)), axis=1)[:, :b]


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
    """Run discrete PGPO (or SGD) for ``steps`` steps on ``paths`` independent paths."""
    if info_source not in INFO_SOURCES:
        raise ValueError(
            f"unknown info source {info_source!r}; choose from {', '.join(INFO_SOURCES)}"
        )
    rho = as_multiplier(multiplier)
    rng = np.random.default_rng(seed)
    start = problem.theta0 if theta0 is None else theta0
    theta = np.array(np.broadcast_to(np.asarray(start, float), (paths, problem.d)))
    rows = np.arange(paths)[:, None]
    diverged = np.zeros(paths, dtype=bool)
    path = [theta.copy()] if record else None
    with np.errstate(all="ignore"):
        for _ in range(steps):
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
            theta -= eta * rho(info)[:, None] * g_hat
            _mark_diverged(theta, diverged)
            if record:
                path.append(theta.copy())
    return Solution(theta, diverged, np.stack(path) if record else None)


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
