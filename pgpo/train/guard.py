"""The collapse guard and the best checkpoint: what a long run watches between steps.

A *collapse* (the failure the paper says PGPO prevents) is read off the training reward: the mean
reward of the last ``window`` steps at or below ``threshold``. The guard records the first step
where that holds (``collapsed_at`` in the metrics from then on); with ``collapse.stop`` the run
ends there, with a checkpoint. The best evaluation so far (``eval_avg_at_k``) marks the step
kept in ``checkpoints/best/``.
"""

from __future__ import annotations

from collections import deque


class CollapseGuard:
    """Running window of step rewards; ``observe`` returns True at the step a collapse is first
    seen. ``improved`` says whether an evaluation beats every earlier one (ties keep the first).
    Its state is part of every checkpoint, so a resumed run judges the same window."""

    def __init__(self, window: int, threshold: float) -> None:
        self.window, self.threshold = window, threshold
        self.rewards: deque[float] = deque(maxlen=window)
        self.collapsed_at: int | None = None
        self.best_eval: float | None = None
        self.best_step: int | None = None

    def window_mean(self) -> float | None:
        """Mean reward over the last ``window`` steps (None until that many were seen)."""
        if len(self.rewards) < self.window:
            return None
        return sum(self.rewards) / self.window

    def observe(self, step: int, reward: float) -> bool:
        self.rewards.append(float(reward))
        mean = self.window_mean()
        if self.collapsed_at is None and mean is not None and mean <= self.threshold:
            self.collapsed_at = step
            return True
        return False

    def improved(self, step: int, eval_score: float) -> bool:
        if self.best_eval is not None and not eval_score > self.best_eval:
            return False
        self.best_eval, self.best_step = float(eval_score), step
        return True

    def state_dict(self) -> dict:
        return {
            "rewards": list(self.rewards),
            "collapsed_at": self.collapsed_at,
            "best_eval": self.best_eval,
            "best_step": self.best_step,
        }

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:  # a checkpoint from before the guard: start watching afresh
            return
        self.rewards = deque(state["rewards"], maxlen=self.window)
        self.collapsed_at, self.best_eval = state["collapsed_at"], state["best_eval"]
        self.best_step = state["best_step"]
