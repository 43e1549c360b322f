"""Where modulation acts, and how strongly: granularity (step, sequence, token) and adaptive alpha.

**Scaling a loss is not scaling a step.** Under AdamW the update is ``m_hat / (sqrt(v_hat) +
eps)``: multiplying the whole loss by ``c`` multiplies ``m`` by ``c`` and ``v`` by ``c^2``, so the
update is unchanged (up to ``eps``), and gradient clipping at norm 1 removes the rest. So the
batch's ``rho_k`` scales the *step* (Eq. 9, :class:`pgpo.optim.ModulatedOptimizer`). Weights
*inside* the loss change the update's direction, not its size. Normalised so that their sum is
unchanged, they reallocate credit between tokens or responses:

- ``step``: Eq. 9, ``theta_{k+1} = theta_k - eta rho(I_k) h_k``;
- ``token``: ``w_t <- w_t rho(I_t) (sum_s w_s) / (sum_s w_s rho(I_s))`` with
  ``I_t = H_S,t - H_T,t`` over the step's trained tokens;
- ``sequence``: the same with ``I_i``, response i's own entropy gap (the token mean of its
  ``I_t``), for each of its tokens.

Either of the last two may also scale the step by ``rho(I_k)`` (``combine_step``).

**Adaptive alpha** (:class:`AlphaSchedule`), state that checkpoints carry:

- ``constant``: ``alpha_k = alpha``;
- ``target_rho``: ``alpha_{k+1} = clip(alpha_k exp(c (rho_target - rhobar_k)), alpha_min,
  alpha_max)``, ``rhobar_k`` the running mean of ``rho`` (the shape of PPO's adaptive KL
  coefficient): ``alpha`` grows while steps are smaller than the target and shrinks while larger;
- ``normalized``: ``alpha_k = alpha / max(mean_k |I|, floor)``, ``mean_k |I|`` the running mean
  of ``|I|`` including this step, so that ``alpha`` means the same thing across tasks whose
  ``I`` differ in scale.

Running means are exponential with horizon ``window`` steps, ``m <- m + (x - m) / min(n, window)``
(the plain mean over the first ``window`` steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from pgpo.multiplier import DEFAULT_SHARPNESS, Kind, MultiplierConfig

if TYPE_CHECKING:  # the functions take tensors; importing this module does not import torch
    import torch

Granularity = Literal["step", "sequence", "token"]
Schedule = Literal["constant", "target_rho", "normalized"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
SCHEDULES: tuple[str, ...] = get_args(Schedule)

__all__ = [
    "AlphaSchedule",
    "Modulation",
    "gap_per_token",
    "modulated_weights",
    "reallocated_weights",
]


def gap_per_token(
    h_student: torch.Tensor, h_teacher: torch.Tensor, keep: torch.Tensor, granularity: Granularity
) -> torch.Tensor:
    """The entropy gap each trained token is modulated by, float64 ``[B, T]`` (0 off ``keep``):
    ``I_t = H_S,t - H_T,t`` (``token``), or its token mean over the response (``sequence``).

    h_student, h_teacher ``[B, T]`` per-token entropies (nats); keep ``[B, T]`` trained tokens."""
    if granularity not in ("token", "sequence"):
        raise ValueError(f"granularity must be token or sequence here, got {granularity!r}")
    on = (keep != 0).double()
    gap = (h_student.double() - h_teacher.double()).to(on.device) * on
    if granularity == "token":
        return gap
    per_sequence = gap.sum(-1, keepdim=True) / on.sum(-1, keepdim=True).clamp(min=1.0)
    return per_sequence * on


def modulated_weights(
    weights: torch.Tensor, gaps: torch.Tensor, multiplier
) -> tuple[torch.Tensor, float, float]:
    """``(w_t rho(I_t), sum_t w_t, sum_t w_t rho(I_t))``: the weights before normalisation and
    the two sums whose ratio normalises them. Parts of a batch (micro-batches, ranks) add their
    sums; scaling the summed gradient by ``sum w / sum w rho`` then equals training on
    :func:`reallocated_weights` of the whole batch. ``weights`` ``[B, T]`` (0 = not trained),
    ``gaps`` ``[B, T]`` in nats, ``multiplier(I)`` elementwise (a MultiplierConfig)."""
    rho = multiplier(gaps.double())
    scaled = weights.double() * rho.to(weights.device)
    return scaled.to(weights.dtype), float(weights.double().sum()), float(scaled.sum())


def reallocated_weights(weights: torch.Tensor, gaps: torch.Tensor, multiplier) -> torch.Tensor:
    """``w_t rho(I_t) (sum_s w_s) / (sum_s w_s rho(I_s))``: the same total weight, reallocated
    towards the tokens (or responses) whose teacher knows more. ``[B, T]`` in, ``[B, T]`` out."""
    scaled, total, modulated = modulated_weights(weights, gaps, multiplier)
    return scaled * (total / modulated) if modulated > 0 else scaled


@dataclass
class AlphaSchedule:
    """The alpha each step uses (``current(info)``), updated after the step (``update(rho)``).

    ``alpha`` is the base value; ``rho_target``, ``rate`` (c), ``alpha_min``, ``alpha_max`` are
    the ``target_rho`` controller's; ``floor`` (nats) bounds ``mean |I|`` away from 0 for
    ``normalized``; ``window`` is the running means' horizon in steps."""

    kind: Schedule = "constant"
    alpha: float = 1.0
    rho_target: float = 1.1
    rate: float = 1.0
    alpha_min: float = 0.05
    alpha_max: float = 20.0
    floor: float = 1e-3
    window: int = 10
    state: dict = field(default_factory=lambda: {"alpha": None, "mean_rho": 0.0,
                                                 "mean_abs_info": 0.0, "steps": 0})  # fmt: skip

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"alpha_schedule must be one of {', '.join(SCHEDULES)}: {self.kind!r}")
        if self.state["alpha"] is None:
            self.state["alpha"] = self.alpha

    def _running(self, mean: float, value: float, count: int) -> float:
        return mean + (value - mean) / min(count, self.window)

    def current(self, info: float | None = None) -> float:
        """The alpha of this step. ``normalized`` divides by the running mean of ``|I|``
        including this step's ``info``; without it (token and sequence weights, set before the
        step's ``I_k`` is known), by the earlier steps' mean, and at the first step it is
        ``alpha`` itself."""
        if self.kind == "constant":
            return self.alpha
        if self.kind == "target_rho":
            return self.state["alpha"]
        if info is None:
            if self.state["steps"] == 0:
                return self.alpha
            return self.alpha / max(self.state["mean_abs_info"], self.floor)
        count = self.state["steps"] + 1
        mean = self._running(self.state["mean_abs_info"], abs(info), count)
        return self.alpha / max(mean, self.floor)

    def update(self, info: float, rho: float) -> None:
        """After a step that was taken, with its ``I_k`` and ``rho_k`` (skipped steps are not
        counted: their values may be NaN)."""
        if not (math.isfinite(info) and math.isfinite(rho)):
            return
        s = self.state
        s["steps"] += 1
        s["mean_abs_info"] = self._running(s["mean_abs_info"], abs(info), s["steps"])
        s["mean_rho"] = self._running(s["mean_rho"], rho, s["steps"])
        if self.kind == "target_rho":
            moved = s["alpha"] * math.exp(self.rate * (self.rho_target - s["mean_rho"]))
            s["alpha"] = min(max(moved, self.alpha_min), self.alpha_max)

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = {**self.state, **state}


@dataclass
class Modulation:
    """Everything PGPO modulates with: the multiplier's cap and kind, the granularity, whether a
    token or sequence reallocation also scales the step, and the alpha schedule."""

    rho_max: float
    kind: Kind = "paper"
    sharpness: float = DEFAULT_SHARPNESS
    granularity: Granularity = "step"
    combine_step: bool = False
    schedule: AlphaSchedule = field(default_factory=AlphaSchedule)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}")

    def multiplier(self, alpha: float) -> MultiplierConfig:
        """Eq. 9's rho with this step's ``alpha``."""
        return MultiplierConfig(alpha, self.rho_max, self.kind, self.sharpness)

    def rho(self, info: float) -> tuple[float, float]:
        """This step's ``(alpha, rho_k)`` from its ``I_k`` (nats): alpha from the schedule, then
        Eq. 9, ``rho_k = min(exp(alpha I_k), rho_max)`` (or the configured kind)."""
        alpha = self.schedule.current(info)
        return alpha, float(self.multiplier(alpha)(info))

    def observe(self, info: float, rho_k: float) -> None:
        """After a step was taken: the schedule's state for the next one (adaptive alpha)."""
        self.schedule.update(info, rho_k)

    @property
    def scales_step(self) -> bool:
        """Whether the optimizer step is scaled by the batch's ``rho_k``."""
        return self.granularity == "step" or self.combine_step
