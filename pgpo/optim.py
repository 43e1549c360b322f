"""The modulated step: ``theta_{k+1} = theta_k - eta * rho_k * h_k``.

``h_k`` is the wrapped optimizer's own update direction (AdamW in the paper). ``rho_k`` scales the
*step* (that step's learning rate), never the loss: Adam normalises the gradient, so a scaled
loss would cancel out. Moment estimates are exactly those of the unwrapped optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ModulatedOptimizer"]


class ModulatedOptimizer:
    """Wraps a ``torch.optim.Optimizer``; ``step(rho)`` applies its update scaled by ``rho``.

    For the duration of one step every parameter group's ``lr`` is multiplied by ``rho`` and then
    restored, so LR schedulers attached to the wrapped optimizer (``.optimizer``) keep working and
    the wrapped optimizer's state is the same as without the wrapper. Decoupled weight decay,
    which AdamW multiplies by ``lr``, is scaled with the rest of the step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, rho: float, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the wrapped optimizer with every group's ``lr`` times ``rho`` (>= 0)."""
        rho = float(rho)
        if not math.isfinite(rho) or rho < 0:
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
        saved = [group["lr"] for group in self.optimizer.param_groups]
        try:
            for group, lr in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr * rho
            result = self.optimizer.step(closure)
        finally:
            for group, lr in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr
        return result

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (loadable into the bare optimizer as well)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"ModulatedOptimizer({self.optimizer!r})"
