"""The PGPO step multiplier, Eq. 9: ``rho(I) = min(exp(alpha * I), rho_max)``.

One implementation shared by the trainer (``pgpo``) and the SDE toolkit (``sde``,
``proofs_checks``). Every function accepts a Python float, a NumPy array or a torch tensor and
returns the same kind. Importing this module imports NumPy only (torch is used when a tensor is
passed in and is therefore already imported).

Kinds (``kind=``):

``paper``
    ``min(exp(alpha*I), rho_max)``, as printed. Continuous, monotone, bounded in
    ``(0, rho_max]``; one kink at ``I* = ln(rho_max) / alpha``; Lipschitz constant
    ``alpha * rho_max`` (the slope just left of the kink). ``rho < 1`` exactly when ``I < 0``.
``floored``
    ``max(1, paper)``: what the paper's text claims ("rho_k >= 1"). Bounded in
    ``[1, rho_max]``; kinks at ``0`` and ``I*``.
``smooth``
    ``exp(softmin_p(alpha*I, ln rho_max))`` with ``softmin_p(u, c) = -log(e^{-pu} + e^{-pc})/p``,
    i.e. ``rho = (exp(alpha I)^{-p} + rho_max^{-p})^{-1/p}``. C-infinity, same limits as
    ``paper`` (0 as I -> -inf, rho_max as I -> +inf) and approaches it as ``sharpness`` p grows;
    a regularity control. Lipschitz constant ``alpha * rho_max * p * (p+1)^{-(p+1)/p}``.

NaN in ``I`` propagates to NaN in ``rho``; callers decide (the trainer skips the step and counts
it, the toolkit marks the path diverged). ``I = +inf`` gives ``rho_max``, ``I = -inf`` gives 0
(1 for ``floored``). The exponent is capped *before* exponentiating, so nothing overflows.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

Kind = Literal["paper", "floored", "smooth"]
KINDS: tuple[str, ...] = get_args(Kind)
DEFAULT_SHARPNESS = 4.0
# The largest alpha and rho_max a setting takes (the trainer's config, every CLI). alpha * I_k is
# log rho_k and |I_k| is a fraction of a nat: past 100, rho is only 0 or rho_max.
MAX_ALPHA = 100.0
MAX_RHO_MAX = 100.0

__all__ = [
    "KINDS",
    "MultiplierConfig",
    "bounds",
    "cap_point",
    "check_params",
    "drho",
    "kinks",
    "lipschitz",
    "rho",
]


def check_params(
    alpha: float, rho_max: float, kind: str = "paper", sharpness: float = DEFAULT_SHARPNESS
) -> None:
    """Raise ``ValueError`` (one line, naming the field) unless the parameters are valid."""
    for name, value in (("alpha", alpha), ("rho_max", rho_max), ("sharpness", sharpness)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"{name} must be a real number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if rho_max < 1:
        raise ValueError(f"rho_max must be >= 1, got {rho_max!r}")
    if sharpness <= 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")


def _namespace(x: Any):
    """(module, converter) for x: torch for tensors, NumPy otherwise."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return torch, (lambda v: v)
    if isinstance(x, (float, int)) and not isinstance(x, bool):
        return np, float
    return np, (lambda v: v)


def _as_array(x: Any, xp):
    if xp is np:
        return np.asarray(x, dtype=np.float64)
    return x if x.is_floating_point() else x.double()


def _clip(u, lo, hi, xp):
    if xp is not np:
        return xp.clamp(u, min=lo, max=hi)
    # np.minimum/np.maximum: several times faster than np.clip on small arrays
    if lo is not None:
        u = np.maximum(u, lo)
    return u if hi is None else np.minimum(u, hi)


def _full_like(u, value, xp):
    return xp.full_like(u, value)


def _softplus(z, xp):
    # log(1 + e^z) without overflow.
    return _clip(z, 0.0, None, xp) + xp.log1p(xp.exp(-xp.abs(z)))


def _sigmoid(z, xp):
    return 0.5 * (1.0 + xp.tanh(0.5 * z))


def rho(
    I: Any,  # noqa: E741 - the paper's name
    alpha: float,
    rho_max: float,
    kind: Kind = "paper",
    sharpness: float = DEFAULT_SHARPNESS,
):
    """The multiplier rho(I), elementwise. Same type and shape as ``I`` (float in, float out).

    ``I`` is the information signal in nats (Eq. 8); ``rho`` is dimensionless.
    """
    check_params(alpha, rho_max, kind, sharpness)
    xp, out = _namespace(I)
    u = alpha * _as_array(I, xp)
    cap = math.log(rho_max)
    if kind == "paper":
        return out(xp.exp(_clip(u, None, cap, xp)))
    if kind == "floored":
        return out(xp.exp(_clip(u, 0.0, cap, xp)))
    # smooth: log rho = c - softplus(p (c - u)) / p   (a soft minimum of u and c)
    log_rho = cap - _softplus(sharpness * (cap - u), xp) / sharpness
    return out(xp.exp(log_rho))


def drho(
    I: Any,  # noqa: E741
    alpha: float,
    rho_max: float,
    kind: Kind = "paper",
    sharpness: float = DEFAULT_SHARPNESS,
    side: Literal["left", "right"] | None = None,
):
    """d rho / d I (per nat), elementwise, where it exists.

    At a kink (see :func:`kinks`) the derivative does not exist: the result is NaN unless
    ``side`` asks for the one-sided derivative. ``smooth`` has no kinks.
    """
    check_params(alpha, rho_max, kind, sharpness)
    if side not in (None, "left", "right"):
        raise ValueError(f"side must be None, 'left' or 'right', got {side!r}")
    xp, out = _namespace(I)
    u = alpha * _as_array(I, xp)
    cap = math.log(rho_max)
    if kind == "smooth":
        r = rho(I, alpha, rho_max, "smooth", sharpness)
        return out(alpha * _as_array(r, xp) * _sigmoid(sharpness * (cap - u), xp))
    lo = 0.0 if kind == "floored" else -math.inf
    hi = cap
    if kind == "floored" and cap == 0.0:  # rho == 1 everywhere
        return out(_full_like(u, 0.0, xp))
    inside = (u > lo) & (u < hi)
    d = xp.where(inside, alpha * xp.exp(_clip(u, None, cap, xp)), _full_like(u, 0.0, xp))
    # At a kink u == edge: the left derivative is the inside one for the upper edge, etc.
    at_hi = u == hi
    at_lo = u == lo
    slope_hi = alpha * rho_max
    slope_lo = alpha
    # One-sided derivatives at a kink: coming from inside the exponential branch the slope is
    # alpha*rho_max (upper kink, from the left) or alpha (floored's lower kink, from the right);
    # from the flat side it is 0, which `d` already holds there.
    if side == "left":
        d = xp.where(at_hi, _full_like(u, slope_hi, xp), d)
    elif side == "right":
        d = xp.where(at_lo, _full_like(u, slope_lo, xp), d)
    else:
        d = xp.where(at_hi | at_lo, _full_like(u, math.nan, xp), d)
    return out(d)


def cap_point(alpha: float, rho_max: float) -> float:
    """``I* = ln(rho_max) / alpha`` (nats): where ``exp(alpha I)`` reaches ``rho_max``. For
    ``I >= I*`` the ``paper`` and ``floored`` kinds sit at the cap (``d rho / d I = 0``); it is
    the kink of ``min(.)``, and the point ``smooth`` rounds off."""
    check_params(alpha, rho_max)
    return math.log(rho_max) / alpha


def kinks(alpha: float, rho_max: float, kind: Kind = "paper") -> tuple[float, ...]:
    """Values of I (nats) where rho is not differentiable, in increasing order."""
    check_params(alpha, rho_max, kind)
    if kind == "smooth":
        return ()
    if kind == "floored":
        return () if rho_max == 1.0 else (0.0, cap_point(alpha, rho_max))
    return (cap_point(alpha, rho_max),)


def bounds(
    alpha: float,
    rho_max: float,
    kind: Kind = "paper",
    sharpness: float = DEFAULT_SHARPNESS,
    I_range: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[float, float]:
    """(inf, sup) of rho over ``I`` in ``I_range`` (rho is non-decreasing, so the ends decide).

    Over the whole real line: ``paper`` and ``smooth`` (0, rho_max), ``floored`` (1, rho_max).
    """
    lo, hi = I_range
    if not lo <= hi:
        raise ValueError(f"I_range must be (low, high) with low <= high, got {I_range!r}")
    return (
        float(rho(float(lo), alpha, rho_max, kind, sharpness)),
        float(rho(float(hi), alpha, rho_max, kind, sharpness)),
    )


def lipschitz(
    alpha: float, rho_max: float, kind: Kind = "paper", sharpness: float = DEFAULT_SHARPNESS
) -> float:
    """The smallest Lipschitz constant of rho over the real line (per nat of I)."""
    check_params(alpha, rho_max, kind, sharpness)
    if kind == "smooth":
        p = sharpness
        return alpha * rho_max * p * (p + 1.0) ** (-(p + 1.0) / p)
    if kind == "floored" and rho_max == 1.0:
        return 0.0
    return alpha * rho_max


@dataclass(frozen=True)
class MultiplierConfig:
    """Validated multiplier settings. ``rho_max`` has no value in the paper: set it explicitly.

    Calling the config evaluates rho: ``MultiplierConfig(1.0, 2.0)(0.3)``.
    """

    alpha: float
    rho_max: float
    kind: Kind = "paper"
    sharpness: float = DEFAULT_SHARPNESS

    def __post_init__(self) -> None:
        try:
            check_params(self.alpha, self.rho_max, self.kind, self.sharpness)
        except ValueError as err:
            raise ValueError(f"MultiplierConfig.{err}") from None

    def __call__(self, I: Any):  # noqa: E741
        return rho(I, self.alpha, self.rho_max, self.kind, self.sharpness)

    def derivative(self, I: Any, side: Literal["left", "right"] | None = None):  # noqa: E741
        return drho(I, self.alpha, self.rho_max, self.kind, self.sharpness, side)

    @property
    def lipschitz(self) -> float:
        return lipschitz(self.alpha, self.rho_max, self.kind, self.sharpness)

    @property
    def kinks(self) -> tuple[float, ...]:
        return kinks(self.alpha, self.rho_max, self.kind)

    @property
    def cap_point(self) -> float:
        return cap_point(self.alpha, self.rho_max)

    def bounds(self, I_range: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float]:
        return bounds(self.alpha, self.rho_max, self.kind, self.sharpness, I_range)
