"""SDE models of discrete PGPO, built from any :class:`~sde.problems.Problem`.

An :class:`SDEModel` is a drift ``b(theta): [P, d] -> [P, d]`` and a diffusion
``G(theta): [P, d] -> [P, d, m]`` (``G G^T`` is the diffusion covariance per unit time; m is the
dimension of the driving Brownian motion). Time is ``t = k * eta``.

Noise: the batch-mean field of a size-b batch drawn with replacement has covariance
``Sigma_b = Cov_i(g_i) / b`` (population covariance over the N examples); without replacement it
carries the finite-population factor ``(N - b) / (N - 1)``. Every model's diffusion is the
symmetric PSD square root of its covariance, ``[P, d, d]``, so that all models (and the Gaussian
chain) are driven by one d-dimensional Brownian motion and can share its increments.

Models (docs/sde.md explains what each one tests):

- ``paper``: drift ``-rho(I(theta)) grad L``, diffusion ``sqrt(eta) Sigma_b^{1/2}``
  (Theorem A.2 ii, with the ``sqrt(eta)`` that the printed theorem drops restored);
- ``printed``: as ``paper`` but without ``sqrt(eta)`` (the theorem as printed, for claim C2);
- ``unbatched``: as ``paper`` with the one-example covariance ``Sigma`` in place of ``Sigma_b``
  (Eq. 4-7 as printed, for claim C3);
- ``scaled``: as ``paper`` with diffusion ``sqrt(eta) rho Sigma_b^{1/2}``;
- ``matched``: the first-order SME of the actual chain, drift ``-E_B[rho(I_B) g_B]``, diffusion
  ``sqrt(eta) Cov_B[rho(I_B) g_B]^{1/2}``, exact by enumerating every batch;
- ``ode``: the modulated gradient flow, no noise;
- ``second-order``: drift ``b - (eta/2) (Db) b`` with the full-information drift b, diffusion as
  ``scaled`` (the positive control that should reach weak order 2).

``I(theta)`` is the full-data information (the mean of ``iota_i``) in every model but
``matched``, which uses whatever the chain uses (``info_source``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pgpo.multiplier import MultiplierConfig
from sde.problems import Problem

MODELS = ("paper", "printed", "unbatched", "scaled", "matched", "ode", "second-order")
INFO_SOURCES = ("same-batch", "independent-batch", "full")
ADAMW_INFO_SOURCES = ("same-batch", "full")  # the AdamW chain and its limits


def check_info_source(source: str, allowed: tuple[str, ...] = INFO_SOURCES) -> str:
    """``source`` when it is one of ``allowed``, else a one-line ValueError naming them."""
    if source not in allowed:
        raise ValueError(f"unknown info source {source!r}; choose from {', '.join(allowed)}")
    return source


Multiplier = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ConstantRho:
    """rho = value whatever I; a picklable multiplier (worker processes receive it)."""

    value: float = 1.0

    def __call__(self, info):
        return np.full_like(np.asarray(info, dtype=np.float64), self.value)


def constant_rho(value: float = 1.0) -> Multiplier:
    """rho = value whatever I (value 1: SGD, SDPO's baseline)."""
    return ConstantRho(float(value))


def as_multiplier(multiplier: MultiplierConfig | Multiplier | None) -> Multiplier:
    """A MultiplierConfig, any callable I -> rho, or None (rho = 1)."""
    return constant_rho(1.0) if multiplier is None else multiplier


@dataclass(frozen=True)
class SDEModel:
    """``d theta = b(theta) dt + G(theta) dW``; W is ``noise_dim``-dimensional.

    ``coefficients(theta [P, d]) -> (b [P, d], G)``: one call, since both usually need the same
    per-example fields; ``coefficients(theta, t)`` when ``time_dependent``.
    ``G`` is ``[P, d, noise_dim]``, or ``[d, noise_dim]`` for additive noise
    shared by every path (applied as one matrix product), or None for an ODE.
    """

    name: str
    coefficients: Callable[..., tuple[np.ndarray, np.ndarray | None]]
    noise_dim: int
    time_dependent: bool = False

    def drift(self, theta: np.ndarray) -> np.ndarray:
        return self.coefficients(theta)[0]

    def diffusion(self, theta: np.ndarray) -> np.ndarray | None:
        return self.coefficients(theta)[1]

    @property
    def is_ode(self) -> bool:
        return self.noise_dim == 0


def batches(n: int, b: int, replace: bool) -> np.ndarray:
    """Every equally likely batch: ``[n_batches, b]`` indices (ordered tuples with replacement,
    combinations without)."""
    if replace:
        return np.array(list(itertools.product(range(n), repeat=b)), dtype=np.int64)
    return np.array(list(itertools.combinations(range(n), b)), dtype=np.int64)


def batch_distribution(n: int, b: int, replace: bool) -> tuple[np.ndarray, np.ndarray]:
    """The distinct batches and their probabilities: ``M [n_distinct, N]``, with ``M @ x`` the
    batch means of per-example values ``x [N, ...]``, and ``p [n_distinct]`` (summing to 1), so
    that an expectation over the equally likely batches is ``E_B[f(B)] = p @ f(M)``.

    A batch mean depends only on how often each example is in the batch: the ``n^b`` ordered
    batches drawn with replacement collapse to ``C(n + b - 1, b)`` distinct ones (36 instead of
    64 for n = 8, b = 2), each with probability (its orderings) / n^b. Without replacement every
    batch is distinct and ``p = 1 / C(n, b)``. Fewer rows: the SDEs evaluate rho on each."""
    index = batches(n, b, replace)
    means = np.zeros((len(index), n))
    np.add.at(means, (np.arange(len(index))[:, None], index), 1.0 / b)
    # Orderings of one batch give bit-identical rows (the same 1/b added the same times).
    distinct, counts = np.unique(means, axis=0, return_counts=True)
    return distinct, counts / len(index)


def sqrtm_psd(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of PSD matrices ``[P, d, d]`` (negative rounding clipped to 0)."""
    d = cov.shape[-1]
    if d == 1:
        return np.sqrt(np.maximum(cov, 0.0))
    if d == 2:  # closed form: (M + s I) / t with s = sqrt(det M), t = sqrt(tr M + 2 s)
        det = np.maximum(cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] * cov[:, 1, 0], 0.0)
        s = np.sqrt(det)
        t = np.sqrt(np.maximum(cov[:, 0, 0] + cov[:, 1, 1] + 2 * s, 0.0))
        root = cov + s[:, None, None] * np.eye(2)
        return root / np.where(t > 0, t, 1.0)[:, None, None]
    w, q = np.linalg.eigh(cov)
    return (q * np.sqrt(np.maximum(w, 0.0))[:, None, :]) @ np.swapaxes(q, 1, 2)


def example_mean(x: np.ndarray) -> np.ndarray:
    """Mean over axis 1 (the examples, or the batches): ``[P, N, ...] -> [P, ...]``.

    ``x.mean(axis=1)`` up to the order of the additions, several times faster: NumPy's reduction
    over the middle axis of the toolkit's ``[paths, 8, 2]`` arrays took 0.57 ms against 0.09 ms
    for this (4,000 paths), and it ran in every step of every chain and SDE.
    """
    return np.einsum("pn...->p...", x) / x.shape[1]


def weighted_cov(samples: np.ndarray) -> np.ndarray:
    """Population covariance over axis 1 of equally likely samples: ``[P, n, d] -> [P, d, d]``."""
    centred = samples - example_mean(samples)[:, None]
    d = samples.shape[2]
    if d > 4:
        return np.swapaxes(centred, 1, 2) @ centred / samples.shape[1]
    # Few dimensions: one einsum per entry is 1.7x faster than NumPy's batched [d, n] @ [n, d].
    cov = np.empty((len(samples), d, d))
    for i in range(d):
        for j in range(i, d):
            cov[:, i, j] = np.einsum("pn,pn->p", centred[:, :, i], centred[:, :, j])
            cov[:, j, i] = cov[:, i, j]
    return cov / samples.shape[1]


def batch_covariance(fields: np.ndarray, b: int, replace: bool) -> np.ndarray:
    """``Sigma_b``, the covariance of a size-b batch mean: ``[P, N, d] -> [P, d, d]``."""
    n = fields.shape[1]
    cov = weighted_cov(fields) / b
    if not replace:
        cov = cov * ((n - b) / (n - 1) if n > 1 else 0.0)
    return cov


def full_drift(problem: Problem, rho: Multiplier) -> Callable[[np.ndarray], np.ndarray]:
    """``-rho(I(theta)) grad L(theta)`` with full-data information: ``[P, d] -> [P, d]``."""

    def drift(theta):
        fields, infos = problem.fields_and_infos(theta)
        return -rho(example_mean(infos))[:, None] * example_mean(fields)

    return drift


def _directional_derivative(f, theta, v, eps=1e-6):
    """(Df)(theta) v by a central difference scaled to |v|: ``[P, d]`` each."""
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    step = eps * np.maximum(1.0, np.linalg.norm(theta, axis=1, keepdims=True))
    unit = v / np.where(norm > 0, norm, 1.0)
    return (f(theta + step * unit) - f(theta - step * unit)) / (2 * step) * norm


def make_model(
    name: str,
    problem: Problem,
    multiplier: MultiplierConfig | Multiplier | None,
    batch_size: int,
    eta: float,
    info_source: str = "full",
    replace: bool = True,
) -> SDEModel:
    """Build SDE model ``name`` for PGPO on ``problem`` at learning rate ``eta``."""
    if name not in MODELS:
        raise ValueError(f"unknown SDE model {name!r}; choose from {', '.join(MODELS)}")
    check_info_source(info_source)
    if not 1 <= batch_size <= (10**9 if replace else problem.n):
        raise ValueError(
            f"batch size must be in [1, {problem.n}] without replacement, got {batch_size}"
        )
    rho = as_multiplier(multiplier)
    b, n, root_eta = batch_size, problem.n, float(np.sqrt(eta))

    if name == "ode":
        drift = full_drift(problem, rho)
        return SDEModel(name, lambda theta: (drift(theta), None), 0)

    if name in ("paper", "printed", "unbatched", "scaled", "second-order"):
        factor = 1.0 if name == "printed" else root_eta
        noise_batch = 1 if name == "unbatched" else b
        scaled = name in ("scaled", "second-order")
        first = full_drift(problem, rho) if name == "second-order" else None

        def coefficients(theta):
            fields, infos = problem.fields_and_infos(theta)
            rho_full = rho(example_mean(infos))[:, None]
            drift = -rho_full * example_mean(fields)
            g = factor * sqrtm_psd(batch_covariance(fields, noise_batch, replace))
            if scaled:
                g = g * rho_full[:, :, None]
            if first is not None:  # b - (eta / 2) (Db) b
                drift = drift - 0.5 * eta * _directional_derivative(first, theta, drift)
            return drift, g

        return SDEModel(name, coefficients, problem.d)

    # matched: the chain's exact one-step mean and covariance, by enumerating batches.
    # The step is a_B g_B over the distinct batches B, of probabilities p_B; its mean is
    # sum_B p_B a_B g_B and its second moment sum_B p_B c_B g_B g_B^T, with c_B = a_B^2 when a_B
    # is fixed by theta and B (same-batch, full) and c_B = E[rho(I_B')^2] when rho comes from an
    # independent batch B'.
    means, probs = batch_distribution(n, b, replace)  # [nB, N], [nB]: the distinct batches

    def matched_coefficients(theta):
        fields, infos = problem.fields_and_infos(theta)
        g_batch = means @ fields  # [P, nB, d]
        if info_source == "full":
            a = np.broadcast_to(rho(example_mean(infos))[:, None], g_batch.shape[:2])
            c = a**2
        else:
            rho_batch = rho(infos @ means.T)  # [P, nB]
            if info_source == "same-batch":
                a, c = rho_batch, rho_batch**2
            else:
                a = np.broadcast_to((rho_batch @ probs)[:, None], rho_batch.shape)
                c = np.broadcast_to((rho_batch**2 @ probs)[:, None], rho_batch.shape)
        mean_step = ((a * probs)[:, None, :] @ g_batch)[:, 0, :]
        second = np.swapaxes(g_batch * (c * probs)[:, :, None], 1, 2) @ g_batch
        cov = second - mean_step[:, :, None] * mean_step[:, None, :]
        return -mean_step, root_eta * sqrtm_psd(cov)

    return SDEModel(name, matched_coefficients, problem.d)
