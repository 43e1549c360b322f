"""Exact first and second moments where the problem is linear: ``quadratic`` with constant rho.

With ``info_scale = 0`` the quadratic problem's rho is a constant ``r``. The minibatch chain is the
linear recursion ``theta_{k+1} = theta_k - eta r A (theta_k - xbar_B)`` whose batch noise does not
depend on theta, and every SDE model is an Ornstein-Uhlenbeck process
``d Theta = -r A (Theta - xbar) dt + c sqrt(eta) Sigma_b^{1/2} dW`` (c = r for ``scaled`` and
``matched``, 1 for ``paper``, 0 for ``ode``). Means and covariances of both follow in closed form,
so ``E theta_1`` and ``E |theta|^2`` are exact; ``E exp(-|theta|^2/2)`` is exact for the Gaussian
ones (every SDE, and the Gaussian chain).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import expm

from sde.models import batch_covariance
from sde.problems import Quadratic


def _sigma_b(problem: Quadratic, batch_size: int, replace: bool) -> np.ndarray:
    fields = problem.fields(np.zeros((1, problem.d)))  # the noise does not depend on theta
    return batch_covariance(fields, batch_size, replace)[0]


def chain_moments(
    problem: Quadratic, r: float, eta: float, steps: int, batch_size: int, replace: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and covariance ``[d, d]`` of the minibatch chain after ``steps`` steps."""
    xbar = problem.x.mean(axis=0)
    m = problem.theta0 - xbar
    cov = np.zeros((problem.d, problem.d))
    contraction = np.eye(problem.d) - eta * r * problem.A
    noise = (eta * r) ** 2 * _sigma_b(problem, batch_size, replace)
    for _ in range(steps):
        m = contraction @ m
        cov = contraction @ cov @ contraction.T + noise
    return m + xbar, cov


def ou_moments(
    problem: Quadratic,
    r: float,
    eta: float,
    t_end: float,
    batch_size: int,
    diffusion_scale: float,
    replace: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance at ``t_end`` of
    ``d Theta = -r A (Theta - xbar) dt + diffusion_scale sqrt(eta) Sigma_b^{1/2} dW``."""
    xbar = problem.x.mean(axis=0)
    w, q = np.linalg.eigh(problem.A)
    decay = expm(-r * problem.A * t_end)
    mean = xbar + decay @ (problem.theta0 - xbar)
    s = q.T @ (diffusion_scale**2 * eta * _sigma_b(problem, batch_size, replace)) @ q
    rate = r * (w[:, None] + w[None, :])
    # integral_0^t exp(-rate s) ds, elementwise in A's eigenbasis
    integral = np.where(rate > 0, -np.expm1(-rate * t_end) / np.where(rate > 0, rate, 1.0), t_end)
    return mean, q @ (s * integral) @ q.T


def sme_moments(
    problem: Quadratic, r: float, eta: float, t_end: float, batch_size: int, order: int,
    replace: bool = True,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Mean and covariance at ``t_end`` of Li, Tai and E's stochastic modified equations for the
    chain ``theta_{k+1} = theta_k - eta r g_B`` on the quadratic (constant rho = r):

    - order 1: ``d Theta = -r A (Theta - xbar) dt + r sqrt(eta) Sigma_b^{1/2} dW``;
    - order 2: the drift of ``-grad(f + (eta / 4) |grad f|^2)`` with ``f = r L``, i.e.
      ``-(r A + (eta / 2) r^2 A^2) (Theta - xbar)``, and the same diffusion.

    Their weak errors against the chain are of order 1 and 2 in eta (Li, Tai and E, 2017,
    "Stochastic modified equations and adaptive stochastic gradient algorithms")."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    drift = r * problem.A + (order == 2) * 0.5 * eta * r**2 * problem.A @ problem.A
    xbar = problem.x.mean(axis=0)
    w, q = np.linalg.eigh(drift)  # symmetric: a polynomial in the symmetric A
    mean = xbar + expm(-drift * t_end) @ (problem.theta0 - xbar)
    s = q.T @ (r**2 * eta * _sigma_b(problem, batch_size, replace)) @ q
    rate = w[:, None] + w[None, :]
    integral = np.where(rate > 0, -np.expm1(-rate * t_end) / np.where(rate > 0, rate, 1.0), t_end)
    return mean, q @ (s * integral) @ q.T


def gaussian_expectations(mean: np.ndarray, cov: np.ndarray) -> dict[str, float]:
    """E g for the default test functions under N(mean, cov) (``exp`` is exact only there)."""
    d = len(mean)
    inv = np.linalg.inv(np.eye(d) + cov)
    return {
        "theta1": float(mean[0]),
        "sqnorm": float(mean @ mean + np.trace(cov)),
        "gauss": float(np.exp(-0.5 * mean @ inv @ mean) / np.sqrt(np.linalg.det(np.eye(d) + cov))),
    }
