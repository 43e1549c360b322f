"""Euler-Maruyama on many paths at once, with Brownian increments as an input.

Our integrator is the main one (NumPy, float64, batched over paths); :func:`integrate_torchsde`
runs the same :class:`~sde.models.SDEModel` through ``torchsde.sdeint(method="euler")`` as a
cross-check and as the speed baseline of ``benchmarks/bench_sde.py``.

Coupling: :class:`BrownianPath` produces, for outer step k of length ``eta``, the increments of one
Brownian path on a grid of ``fine`` sub-steps, drawn from a generator seeded by ``(seed, k)``.
Coarser grids (m sub-steps, m dividing ``fine``) sum the fine increments, so integrations at
different step sizes, and a chain that uses the whole step's increment, see the same path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sde.models import SDEModel

BLOWUP = 1e8  # |theta| beyond this marks a path as diverged


@dataclass(frozen=True)
class BrownianPath:
    """A d-dimensional Brownian path on ``paths`` paths, outer steps of length ``eta``."""

    seed: int
    paths: int
    dim: int
    eta: float
    fine: int = 4  # sub-steps per outer step on the finest grid

    def increments(self, k: int, substeps: int) -> np.ndarray:
        """Increments over outer step k on a grid of ``substeps``: ``[substeps, paths, dim]``."""
        if self.fine % substeps:
            raise ValueError(f"substeps {substeps} must divide the finest grid {self.fine}")
        # SFC64: a fast, well-tested generator (normals are most of the integrator's time).
        rng = np.random.Generator(np.random.SFC64([self.seed, k]))
        fine = rng.standard_normal((self.fine, self.paths, self.dim))
        fine *= np.sqrt(self.eta / self.fine)
        if substeps == self.fine:
            return fine
        return fine.reshape(substeps, self.fine // substeps, self.paths, self.dim).sum(axis=1)


@dataclass
class Solution:
    """Endpoint ``theta [P, d]``, the ``diverged [P]`` mask, and optionally the path
    ``[steps + 1, P, d]`` at outer-step times."""

    theta: np.ndarray
    diverged: np.ndarray
    path: np.ndarray | None = None


def _mark_diverged(theta: np.ndarray, diverged: np.ndarray) -> None:
    if np.abs(theta).max() <= BLOWUP:  # fast path: one reduction (NaN compares False)
        return
    bad = ~np.isfinite(theta).all(axis=1) | (np.abs(theta).max(axis=1) > BLOWUP)
    diverged |= bad
    theta[diverged] = np.nan  # frozen: never silently averaged


def euler_maruyama(
    model: SDEModel,
    theta0: np.ndarray,
    steps: int,
    brownian: BrownianPath,
    substeps: int = 1,
    record: bool = False,
) -> Solution:
    """Integrate ``model`` over ``steps`` outer steps of length ``brownian.eta``, each split into
    ``substeps`` Euler-Maruyama steps. ``theta0``: ``[d]`` or ``[P, d]``."""
    theta0 = np.asarray(theta0, dtype=np.float64)
    theta = np.array(np.broadcast_to(theta0, (brownian.paths, theta0.shape[-1])))
    if not model.is_ode and model.noise_dim != brownian.dim:
        raise ValueError(
            f"model noise dimension {model.noise_dim} != Brownian dimension {brownian.dim}"
        )
    h = brownian.eta / substeps
    diverged = np.zeros(brownian.paths, dtype=bool)
    path = [theta.copy()] if record else None
    with np.errstate(all="ignore"):
        for k in range(steps):
            dw = None if model.is_ode else brownian.increments(k, substeps)
            for j in range(substeps):
                if model.time_dependent:
                    drift, diffusion = model.coefficients(theta, (k + j / substeps) * brownian.eta)
                else:
                    drift, diffusion = model.coefficients(theta)
                theta += drift * h
                if dw is None:
                    continue
                if diffusion.ndim == 2:  # additive noise, shared by all paths: one BLAS product
                    theta += dw[j] @ diffusion.T
                else:
                    theta += (diffusion @ dw[j][:, :, None])[:, :, 0]
            # NaN/inf persist once there, so checking every few steps loses nothing; recorded
            # paths are checked every step so that a diverged path reads NaN from then on.
            if record or k % 8 == 7 or k == steps - 1:
                _mark_diverged(theta, diverged)
            if record:
                path.append(theta.copy())
    return Solution(theta, diverged, np.stack(path) if record else None)


def integrate_torchsde(
    model: SDEModel,
    theta0: np.ndarray,
    steps: int,
    eta: float,
    paths: int,
    seed: int,
    substeps: int = 1,
) -> Solution:
    """The same integration through ``torchsde.sdeint(method="euler")`` with torchsde's own
    Brownian motion (independent draws: agreement is within Monte Carlo error)."""
    import torch
    import torchsde

    d = np.shape(theta0)[-1]
    noise_dim = max(model.noise_dim, 1)

    class _SDE(torch.nn.Module):
        noise_type = "general"
        sde_type = "ito"

        def f(self, t, y):
            return torch.from_numpy(model.drift(y.detach().numpy()))

        def g(self, t, y):
            if model.is_ode:
                return torch.zeros(y.shape[0], d, noise_dim, dtype=y.dtype)
            g = model.diffusion(y.detach().numpy())
            return torch.from_numpy(np.broadcast_to(g, (y.shape[0], *g.shape[-2:])).copy())

    t_end = steps * eta
    y0 = torch.from_numpy(np.array(np.broadcast_to(theta0, (paths, d)), dtype=np.float64))
    bm = torchsde.BrownianInterval(
        t0=0.0, t1=t_end, size=(paths, noise_dim), dtype=torch.float64, entropy=seed
    )
    with torch.no_grad():
        ys = torchsde.sdeint(
            _SDE(),
            y0,
            torch.tensor([0.0, t_end], dtype=torch.float64),
            bm=bm,
            method="euler",
            dt=eta / substeps,
        )
    theta = ys[-1].numpy().copy()
    diverged = np.zeros(paths, dtype=bool)
    _mark_diverged(theta, diverged)
    return Solution(theta, diverged)
