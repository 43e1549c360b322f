"""What one training step passes between its stages: the rollouts (step 1), each sample as the
loss sees it (step 3), and the step's sums (step 4), with the tensors built from samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from pgpo.train.models.distributed import World
from pgpo.train.rollout import Completion


@dataclass(frozen=True)
class Rollouts:
    """Step 1's result: the student prompts, n completions per question and their texts."""

    prompts: list[list[int]]
    completions: list[list[Completion]]
    texts: list[list[str]]
    seconds: float


@dataclass
class Sample:
    """One rollout prepared for the loss: prompts for both roles and the shared response."""

    student_prompt: list[int]
    teacher_prompt: list[int]
    response: list[int]
    trained: bool  # False: no demonstration, masked out of loss and I_k
    engine_logprobs: list[float] | None = None  # the rollout engine's, per response token
    demo_right: bool | None = None  # its demonstration states the gold answer; None: no demo
    shown: str | None = None  # the answer its demonstration states ("": none); None: no demo
    agreement: float | None = None  # the share of its group's successes stating ``shown``
    positions: tuple[int, int] | None = None  # the response tokens [first, last) trained; None: all
    feedback: str | None = None  # the feedback on its attempt its teacher is shown; None: none


class StepSums(NamedTuple):
    """Step 4's sums over all ranks: the loss, Eq. 8's weighted sums (I_k and the two mean
    entropies), the truncated-IS ratio sum and clipped count, and the trained tokens."""

    loss: float
    info: float
    entropy_student: float
    entropy_teacher: float
    tis_ratio_sum: float
    tis_clipped: float
    weight_sum: float  # token / sequence granularity: sum of the loss weights w_t ...
    modulated_sum: float  # ... and of w_t rho(I_t), whose ratio renormalised the gradient
    is_ratio_sum: float  # several updates per batch: the clipped IS weights' ratio sum ...
    is_clipped: float  # ... and how many were clipped
    trained_tokens: float

    MEANS = ("loss", "info", "entropy_student", "entropy_teacher")  # the rest are counts

    @classmethod
    def zero(cls) -> StepSums:
        return cls(*([0.0] * len(cls._fields)))

    def plus(self, other: StepSums) -> StepSums:
        """Field by field, ``self + other`` (each as a float)."""
        return StepSums(*(a + float(b) for a, b in zip(self, other)))


def samples_to_run(samples: list[Sample], world: World) -> list[int]:
    """The indices of the samples step 4 runs forward and backward, in order: the trained ones
    (a masked sample adds 0 to the loss, its gradient and Eq. 8's sums), and under several ranks
    as many masked ones as it takes for every rank to run as many micro-batches as the busiest
    (FSDP2's forwards are collectives)."""
    trained = [i for i, s in enumerate(samples) if s.trained]
    extra = int(world.max(len(trained))) - len(trained)
    masked = [i for i, s in enumerate(samples) if not s.trained]
    return sorted(trained + masked[:extra])


def response_mask(samples: list[Sample]) -> torch.Tensor:
    """``[B, T]``: 1 on the trained response tokens of trained samples (all, or
    ``Sample.positions``)."""
    t_max = max(len(s.response) for s in samples)
    mask = torch.zeros((len(samples), t_max))
    for i, s in enumerate(samples):
        if s.trained:
            first, last = s.positions or (0, len(s.response))
            mask[i, first:last] = 1.0
    return mask


def engine_logprobs(samples: list[Sample]) -> torch.Tensor | None:
    """``[B, T]``: the rollout engine's log-probs of the response tokens (0 where padded), or
    None when the engine gave none (it samples from the trained weights themselves)."""
    if any(s.engine_logprobs is None for s in samples):
        return None
    t_max = max(len(s.response) for s in samples)
    out = torch.zeros((len(samples), t_max))
    for i, s in enumerate(samples):
        out[i, : len(s.engine_logprobs)] = torch.tensor(s.engine_logprobs)
    return out


def padded(tokens: list[list[int]], width: int, pad: int) -> torch.Tensor:
    """``[B, width]`` long: each token list right-padded with ``pad``."""
    return torch.tensor([t + [pad] * (width - len(t)) for t in tokens])
