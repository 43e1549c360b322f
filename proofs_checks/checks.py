"""Regularity checks: the multiplier rho, a problem's drift, and observed I values.

Each check returns a :class:`Check` with a verdict (``holds``, ``fails``, ``conditional``,
``not measured``), a one-line summary with its numbers, and the numbers themselves (grid sizes and
sample sizes included, so every figure says how it was measured).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pgpo.multiplier import MultiplierConfig
from sde.models import full_drift
from sde.problems import Problem
from sde.weak_error import TEST_FUNCTIONS

HOLDS, FAILS, CONDITIONAL, NOT_MEASURED = "holds", "fails", "conditional", "not measured"

RhoFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class Check:
    """One verdict with its evidence."""

    id: str
    title: str
    verdict: str
    summary: str
    numbers: dict = field(default_factory=dict)
    figure: str | None = None


# --- the multiplier ---------------------------------------------------------------------------


def _grid(center: float, half_width: float, points: int) -> np.ndarray:
    return np.linspace(center - half_width, center + half_width, points)


def rho_checks(
    rho_fn: RhoFn,
    claimed_bounds: tuple[float, float],
    claimed_lipschitz: float,
    claimed_kinks: Sequence[float] = (),
    center: float = 0.0,
    half_width: float = 20.0,
    points: int = 2_000_001,
) -> list[Check]:
    """Bounded, Lipschitz, continuous, monotone and differentiable, measured on a dense grid.

    ``rho_fn`` may be any callable (tests pass crafted multipliers); the claimed values are what
    the analysis assumes: the checks compare measurement and claim.
    """
    grid = _grid(center, half_width, points)
    h = grid[1] - grid[0]
    values = np.asarray(rho_fn(grid), dtype=float)
    steps = np.diff(values)
    slopes = np.abs(steps) / h
    lo, hi = claimed_bounds
    out = []

    inf, sup = float(values.min()), float(values.max())
    tol = 1e-9 * max(1.0, abs(hi))
    ok = lo - tol <= inf and sup <= hi + tol and np.isfinite(values).all()
    out.append(
        Check(
            "rho.bounded",
            "rho is bounded",
            HOLDS if ok else FAILS,
            f"measured [{inf:.6g}, {sup:.6g}] on {points:,} points of [{grid[0]:g}, {grid[-1]:g}] "
            f"against claimed [{lo:.6g}, {hi:.6g}]",
            dict(measured_inf=inf, measured_sup=sup, claimed_inf=lo, claimed_sup=hi, points=points),
        )
    )

    # Continuity: on a continuous function the largest jump shrinks with the grid spacing.
    coarse = np.abs(np.diff(values[::10])).max()
    fine = np.abs(steps).max()
    continuous = fine <= 0.5 * coarse or fine < 1e-9
    out.append(
        Check(
            "rho.continuous",
            "rho is continuous",
            HOLDS if continuous else FAILS,
            f"largest jump {fine:.3g} at spacing {h:.2g} vs {coarse:.3g} at spacing {10 * h:.2g}"
            + ("" if continuous else " (does not shrink with the spacing: a discontinuity)"),
            dict(jump_fine=float(fine), jump_coarse=float(coarse), spacing=float(h)),
        )
    )

    measured_l = float(slopes.max())
    ok = continuous and measured_l <= claimed_lipschitz * (1 + 1e-6) + 1e-12
    out.append(
        Check(
            "rho.lipschitz",
            "rho is Lipschitz with constant alpha * rho_max",
            HOLDS if ok else FAILS,
            f"largest slope {measured_l:.6g} (grid spacing {h:.2g}) against the analytic "
            f"{claimed_lipschitz:.6g}; ratio {measured_l / max(claimed_lipschitz, 1e-300):.4f}",
            dict(measured=measured_l, claimed=claimed_lipschitz, spacing=float(h), points=points),
        )
    )

    monotone = bool((steps >= -1e-12).all())
    out.append(
        Check(
            "rho.monotone",
            "rho is non-decreasing in I",
            HOLDS if monotone else FAILS,
            f"smallest increment {steps.min():.3g} over {points:,} points",
            dict(min_increment=float(steps.min())),
        )
    )

    # Differentiability: one-sided difference quotients at every claimed kink, and a scan for
    # unclaimed ones (a jump in the slope between neighbouring grid cells).
    eps = 1e-6
    kink_rows = []
    for k in claimed_kinks:
        left = float((rho_fn(np.array([k])) - rho_fn(np.array([k - eps])))[0] / eps)
        right = float((rho_fn(np.array([k + eps])) - rho_fn(np.array([k])))[0] / eps)
        kink_rows.append(dict(at=float(k), left=left, right=right))
    slope_jumps = np.abs(np.diff(steps / h))
    suspicious = grid[1:-1][slope_jumps > 1e3 * max(h, 1e-12) * max(measured_l, 1.0) + 1e-3]
    suspicious = [s for s in suspicious if all(abs(s - k) > 3 * h for k in claimed_kinks)]
    differentiable = not kink_rows and len(suspicious) == 0
    if differentiable:
        summary = f"no kink: slope changes smoothly on {points:,} points"
    else:
        where = (
            ", ".join(
                f"I={r['at']:.4g} (left {r['left']:.4g}, right {r['right']:.4g})" for r in kink_rows
            )
            or f"near I={suspicious[0]:.4g}"
        )
        summary = f"not differentiable at {where}; C^1 or C^2 assumptions on the drift fail there"
    out.append(
        Check(
            "rho.differentiable",
            "rho is differentiable",
            HOLDS if differentiable else FAILS,
            summary,
            dict(kinks=kink_rows, unclaimed_kinks=[float(x) for x in suspicious[:5]]),
        )
    )
    return out


def rho_at_least_one(rho_fn: RhoFn, infos: np.ndarray, source: str) -> Check:
    """The paper's claim "rho_k >= 1": measured on a sample of I values."""
    infos = np.asarray(infos, float)
    infos = infos[np.isfinite(infos)]
    values = rho_fn(infos)
    share_neg = float((infos < 0).mean()) if len(infos) else float("nan")
    share_below = float((values < 1 - 1e-12).mean()) if len(infos) else float("nan")
    se = math.sqrt(max(share_below * (1 - share_below), 0) / max(len(infos), 1))
    verdict = HOLDS if share_below == 0 else FAILS
    return Check(
        "claim.rho_ge_1",
        "rho_k >= 1 (each step at least as large as the baseline's)",
        verdict,
        f"{100 * share_below:.1f} % +- {100 * se:.1f} % of {len(infos):,} I values from {source} "
        f"give rho < 1 ({100 * share_neg:.1f} % have I < 0); the formula gives rho >= 1 exactly "
        "when I >= 0 (the floored kind makes it hold)",
        dict(
            n=len(infos),
            share_I_negative=share_neg,
            share_rho_below_1=share_below,
            se=se,
            min_rho=float(values.min()) if len(infos) else None,
        ),
    )


# --- a problem's drift (Theorem A.2's assumptions) --------------------------------------------


def _sample_ball(rng, center, radius, n):
    d = len(center)
    u = rng.standard_normal((n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = radius * rng.random((n, 1)) ** (1 / d)
    return center + r * u


def _jacobian(f, theta, h=1e-6):
    """Finite-difference Jacobians of f: [n, d] -> [n, d], as [n, d, d]."""
    cols = [(f(theta + h * e) - f(theta - h * e)) / (2 * h) for e in np.eye(theta.shape[1])]
    return np.stack(cols, axis=-1)


def problem_checks(
    problem: Problem,
    multiplier: MultiplierConfig,
    samples: int = 2000,
    radius: float = 3.0,
    seed: int = 0,
) -> list[Check]:
    """Lipschitz and linear growth of the drift, growth of the test functions, rho(I(theta)),
    and whether the update field is a gradient; all by sampling (sample sizes reported)."""
    rng = np.random.default_rng(seed)
    drift = full_drift(problem, multiplier)
    center = problem.theta0
    name = problem.name
    out = []

    x = _sample_ball(rng, center, radius, samples)
    y = x + 1e-3 * rng.standard_normal(x.shape)
    ratio = np.linalg.norm(drift(x) - drift(y), axis=1) / np.linalg.norm(x - y, axis=1)
    far = _sample_ball(rng, center, 10 * radius, samples)
    ratio_far = np.linalg.norm(drift(far) - drift(far + 1e-3), axis=1) / (
        1e-3 * math.sqrt(problem.d)
    )
    lip_near, lip_far = float(ratio.max()), float(np.nanmax(ratio_far))
    ok = np.isfinite(lip_far) and lip_far <= 5 * lip_near + 1e-9
    out.append(
        Check(
            f"{name}.drift_lipschitz",
            f"{name}: drift -rho(I) grad L is Lipschitz",
            HOLDS if ok else FAILS,
            f"largest difference quotient {lip_near:.3g} within radius {radius:g} of theta0, "
            f"{lip_far:.3g} within radius {10 * radius:g} ({samples:,} sampled pairs each)",
            dict(near=lip_near, far=lip_far, samples=samples, radius=radius),
        )
    )

    growth = []
    for r in (radius, 10 * radius, 100 * radius):
        pts = _sample_ball(rng, center, r, samples)
        growth.append(
            float((np.linalg.norm(drift(pts), axis=1) / (1 + np.linalg.norm(pts, axis=1))).max())
        )
    ok = growth[-1] <= 2 * growth[0] + 1e-9 or growth[-1] <= growth[1] * 1.05
    out.append(
        Check(
            f"{name}.drift_growth",
            f"{name}: drift grows at most linearly",
            HOLDS if ok else FAILS,
            "max |b(theta)| / (1 + |theta|) = "
            + ", ".join(
                f"{g:.3g} (radius {r:g})"
                for g, r in zip(growth, (radius, 10 * radius, 100 * radius))
            )
            + f"; {samples:,} samples each",
            dict(ratios=growth, samples=samples),
        )
    )

    pts = _sample_ball(rng, center, 100 * radius, samples)
    norms = np.linalg.norm(pts, axis=1)
    rows = {
        fn: float((np.abs(TEST_FUNCTIONS[fn](pts)) / (1 + norms**2)).max()) for fn in TEST_FUNCTIONS
    }
    out.append(
        Check(
            f"{name}.test_fn_growth",
            "test functions have polynomial growth (degree 2)",
            HOLDS if max(rows.values()) <= 1.0 + 1e-9 else FAILS,
            "max |g| / (1 + |theta|^2): "
            + ", ".join(f"{k} {v:.3g}" for k, v in rows.items())
            + f" ({samples:,} samples up to radius {100 * radius:g})",
            rows,
        )
    )

    rho_theta = multiplier(problem.infos(x).mean(axis=1))
    rho_y = multiplier(problem.infos(y).mean(axis=1))
    lip_rho = float((np.abs(rho_theta - rho_y) / np.linalg.norm(x - y, axis=1)).max())
    lo, hi = float(rho_theta.min()), float(rho_theta.max())
    out.append(
        Check(
            f"{name}.rho_of_theta",
            f"{name}: theta -> rho(I(theta)) is bounded and Lipschitz",
            HOLDS if hi <= multiplier.rho_max + 1e-12 and np.isfinite(lip_rho) else FAILS,
            f"rho(I(theta)) in [{lo:.3g}, {hi:.3g}], largest difference quotient {lip_rho:.3g} "
            f"({samples:,} sampled pairs within radius {radius:g})",
            dict(min=lo, max=hi, lipschitz=lip_rho, samples=samples),
        )
    )

    def mean_field(theta):
        return problem.fields(theta).mean(axis=1)

    jac = _jacobian(mean_field, x[:200])
    asym = np.linalg.norm(jac - np.swapaxes(jac, 1, 2), axis=(1, 2)) / np.maximum(
        np.linalg.norm(jac, axis=(1, 2)), 1e-300
    )
    is_gradient = float(asym.max()) < 1e-5
    out.append(
        Check(
            f"{name}.gradient_field",
            f"{name}: the update field is the gradient of a loss L",
            HOLDS if is_gradient else FAILS,
            f"Jacobian asymmetry |J - J^T| / |J|: median {np.median(asym):.2g}, "
            f"max {asym.max():.2g} (200 points, finite differences, noise ~1e-8)"
            + (
                ""
                if is_gradient
                else ": no potential L exists, so 'grad L' in the theorem is only "
                "a name for the field"
            ),
            dict(median=float(np.median(asym)), max=float(asym.max()), points=200),
        )
    )
    return out


# --- training logs ---------------------------------------------------------------------------


def read_metrics(path) -> dict[str, np.ndarray]:
    """The trainer's metrics file (JSON lines with ``info``, ``rho``, ``entropy_student``,
    ``entropy_teacher`` per step). Bad lines raise ValueError naming file and line."""
    import json

    cols: dict[str, list] = {"info": [], "rho": [], "entropy_student": [], "entropy_teacher": []}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text file (byte {err.start} is not UTF-8)") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or "info" not in row:
            continue  # eval or other rows
        for key in cols:
            value = row.get(key)
            number_like = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and not number_like:
                raise ValueError(f"{path}:{number}: {key} is {value!r}, not a number")
            cols[key].append(float(value) if value is not None else math.nan)
    if not cols["info"]:
        raise ValueError(f"{path}: no rows with an 'info' field")
    return {k: np.asarray(v, float) for k, v in cols.items()}


def log_checks(
    metrics: dict[str, np.ndarray], multiplier: MultiplierConfig, source: str
) -> list[Check]:
    """Regularity checks on observed I values: share below 0, share at the cap."""
    info = metrics["info"][np.isfinite(metrics["info"])]
    cap = multiplier.cap_point
    at_cap = float((info >= cap).mean())
    out = [rho_at_least_one(multiplier, info, source)]
    out.append(
        Check(
            "log.at_cap",
            "share of steps at the cap rho_max (where d rho / d I = 0)",
            CONDITIONAL if at_cap > 0 else HOLDS,
            f"{100 * at_cap:.1f} % of {len(info):,} steps have I >= I* = {cap:.3g} (rho = rho_max: "
            "the signal is clipped there); I ranges over "
            f"[{info.min():.3g}, {info.max():.3g}], median {np.median(info):.3g}",
            dict(
                n=len(info),
                share_at_cap=at_cap,
                min=float(info.min()),
                max=float(info.max()),
                median=float(np.median(info)),
            ),
        )
    )
    return out
