import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pgpo.multiplier import KINDS, MultiplierConfig, bounds, drho, kinks, lipschitz, rho

alphas = st.floats(0.05, 5.0)
rho_maxes = st.floats(1.0, 10.0)
infos = st.floats(-20.0, 20.0)


def direct(I, alpha, rho_max, kind, p=4.0):
    """The definitions, written out in float64 (moderate I only: exp must not overflow)."""
    I = np.asarray(I, dtype=np.float64)
    if kind == "paper":
        return np.minimum(np.exp(alpha * I), rho_max)
    if kind == "floored":
        return np.maximum(1.0, np.minimum(np.exp(alpha * I), rho_max))
    return (np.exp(alpha * I) ** (-p) + rho_max ** (-p)) ** (-1.0 / p)


@given(I=infos, alpha=alphas, rho_max=rho_maxes, kind=st.sampled_from(KINDS))
def test_rho_matches_definition_for_float_numpy_torch(I, alpha, rho_max, kind):
    expected = float(direct(I, alpha, rho_max, kind))
    got_float = rho(I, alpha, rho_max, kind)
    assert isinstance(got_float, float)
    assert got_float == pytest.approx(expected, rel=1e-12, abs=1e-300)
    got_np = rho(np.array([I, I]), alpha, rho_max, kind)
    assert isinstance(got_np, np.ndarray) and got_np.shape == (2,)
    np.testing.assert_allclose(got_np, expected, rtol=1e-12)
    got_t = rho(torch.tensor([I], dtype=torch.float64), alpha, rho_max, kind)
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.float64
    assert got_t.item() == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_torch_dtype_and_device_preserved():
    x = torch.linspace(-2, 2, 7, dtype=torch.float32)
    for kind in KINDS:
        out = rho(x, 1.0, 2.0, kind)
        assert out.dtype == torch.float32 and out.shape == x.shape


@pytest.mark.parametrize("kind", KINDS)
def test_no_overflow_and_limits(kind):
    big = np.array([1e6, 1e300, np.inf])
    with np.errstate(over="raise", invalid="raise"):  # overflow or NaN would raise
        top = rho(big, 3.0, 2.5, kind)
    np.testing.assert_allclose(top, 2.5, rtol=1e-12)
    low = rho(-np.inf, 3.0, 2.5, kind)
    assert low == (1.0 if kind == "floored" else 0.0)
    assert math.isnan(rho(math.nan, 1.0, 2.0, kind))
    t = rho(torch.tensor([1e30, -1e30]), 1.0, 2.0, kind)
    assert torch.isfinite(t).all()


@given(I=infos, alpha=alphas, rho_max=st.floats(1.05, 10.0), kind=st.sampled_from(KINDS))
def test_drho_matches_central_difference_away_from_kinks(I, alpha, rho_max, kind):
    h = 1e-6
    if any(abs(I - k) < 10 * h for k in kinks(alpha, rho_max, kind)):
        return
    fd = (direct(I + h, alpha, rho_max, kind) - direct(I - h, alpha, rho_max, kind)) / (2 * h)
    got = drho(I, alpha, rho_max, kind)
    assert got == pytest.approx(float(fd), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["paper", "floored"])
def test_drho_at_kinks_nan_and_one_sided(kind):
    alpha, rho_max = 2.0, math.e  # kink at I* = 0.5 exactly representable
    h = 1e-7
    for k in kinks(alpha, rho_max, kind):
        assert math.isnan(drho(k, alpha, rho_max, kind))
        left = (direct(k, alpha, rho_max, kind) - direct(k - h, alpha, rho_max, kind)) / h
        right = (direct(k + h, alpha, rho_max, kind) - direct(k, alpha, rho_max, kind)) / h
        assert drho(k, alpha, rho_max, kind, side="left") == pytest.approx(
            float(left), rel=1e-5, abs=1e-6
        )
        assert drho(k, alpha, rho_max, kind, side="right") == pytest.approx(
            float(right), rel=1e-5, abs=1e-6
        )
        assert drho(k, alpha, rho_max, kind, side="left") != drho(
            k, alpha, rho_max, kind, side="right"
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha,rho_max", [(1.0, 2.0), (0.5, 3.0), (1.5, 1.2), (2.0, 1.0)])
def test_lipschitz_constant_is_tight(kind, alpha, rho_max):
    grid = np.linspace(-10, 10, 2_000_001)
    values = direct(grid, alpha, rho_max, kind)
    slopes = np.abs(np.diff(values) / np.diff(grid))
    L = lipschitz(alpha, rho_max, kind)
    assert slopes.max() <= L * (1 + 1e-9)
    if L > 0:  # the grid gets within 1e-3 of the supremum
        assert slopes.max() >= L * (1 - 1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_bounds_match_grid_extremes(kind):
    alpha, rho_max = 1.3, 2.5
    grid = np.linspace(-40, 40, 100_001)
    values = direct(grid, alpha, rho_max, kind)
    lo, hi = bounds(alpha, rho_max, kind)
    assert lo <= values.min() and values.max() <= hi
    assert hi == pytest.approx(values.max(), rel=1e-6)
    assert values.min() - lo < 1e-12
    lo2, hi2 = bounds(alpha, rho_max, kind, I_range=(-1.0, 0.2))
    assert lo2 == pytest.approx(float(direct(-1.0, alpha, rho_max, kind)))
    assert hi2 == pytest.approx(float(direct(0.2, alpha, rho_max, kind)))


def test_floored_claim_rho_at_least_one_only_for_floored():
    I = np.linspace(-3, 3, 61)
    assert (rho(I, 1.0, 2.0, "floored") >= 1).all()
    paper = rho(I, 1.0, 2.0, "paper")
    assert ((paper < 1) == (I < 0)).all()


def test_kinks_locations():
    assert kinks(2.0, math.e, "paper") == pytest.approx((0.5,))
    assert kinks(2.0, math.e, "floored") == pytest.approx((0.0, 0.5))
    assert kinks(2.0, math.e, "smooth") == ()
    assert kinks(2.0, 1.0, "floored") == ()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(alpha=0.0, rho_max=2.0), "alpha"),
        (dict(alpha=-1.0, rho_max=2.0), "alpha"),
        (dict(alpha=math.nan, rho_max=2.0), "alpha"),
        (dict(alpha=math.inf, rho_max=2.0), "alpha"),
        (dict(alpha=1.0, rho_max=0.5), "rho_max"),
        (dict(alpha=1.0, rho_max=math.nan), "rho_max"),
        (dict(alpha=1.0, rho_max=2.0, kind="cubic"), "kind"),
        (dict(alpha=1.0, rho_max=2.0, sharpness=0.0), "sharpness"),
        (dict(alpha="1", rho_max=2.0), "alpha"),
    ],
)
def test_config_refuses_bad_fields_with_one_line_naming_them(kwargs, field):
    with pytest.raises(ValueError) as err:
        MultiplierConfig(**kwargs)
    message = str(err.value)
    assert f"MultiplierConfig.{field}" in message and "\n" not in message
    with pytest.raises(ValueError, match=field):
        rho(0.0, **kwargs)


def test_config_is_frozen_and_callable():
    cfg = MultiplierConfig(alpha=1.0, rho_max=2.0)
    assert cfg(0.5) == pytest.approx(math.exp(0.5))
    assert cfg.lipschitz == 2.0 and cfg.kinks == pytest.approx((math.log(2.0),))
    with pytest.raises(AttributeError):
        cfg.alpha = 3.0  # type: ignore[misc]


def test_import_does_not_pull_torch_or_transformers():
    code = (
        "import sys, pgpo.multiplier; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
