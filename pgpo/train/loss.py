"""Step 4's loss on one micro-batch: the divergence between student and teacher from their hidden
states and LM heads (Eq. 2, or the reference's JSD), weighted per token, with the importance
weights that correct for a rollout engine's numerics (truncated IS) and for several updates per
batch (clipped IS), and, at token or sequence granularity, the modulated weights."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from pgpo.distill import DivergenceSpec, head_divergence, head_token_logprobs
from pgpo.information import head_token_entropy
from pgpo.modulation import gap_per_token, modulated_weights
from pgpo.multiplier import MultiplierConfig
from pgpo.reduction import ChunkBuffers
from pgpo.train.batch import padded
from pgpo.train.config import TrainConfig
from pgpo.train.models.forward import Policy


class DistillOutput(NamedTuple):
    """A micro-batch's loss (differentiable), per-token entropies ``[B, T]`` of both roles, and
    the truncated-IS sums over its trained tokens (ratio sum, number clipped)."""

    loss: torch.Tensor
    h_student: torch.Tensor
    h_teacher: torch.Tensor
    tis_ratio_sum: float
    tis_clipped: float
    weight_sums: tuple[float, float] = (0.0, 0.0)  # reweighted: sum w, sum w rho
    is_ratio_sum: float = 0.0  # the clipped IS weight on the old log-probs: ratio sum ...
    is_clipped: float = 0.0  # ... and number clipped


def distill_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    weights: torch.Tensor,
    targets: torch.Tensor,
    behaviour: torch.Tensor | None,
    spec: DivergenceSpec,
    cfg: TrainConfig,
    with_entropies: bool,
    reweight: tuple[str, MultiplierConfig] | None = None,
    old: torch.Tensor | None = None,
    workspace: ChunkBuffers | None = None,
) -> DistillOutput:
    """A micro-batch's loss and per-token entropies (the ``loss_fn`` of :class:`Policy`: it runs
    inside the policy's forward, where FSDP2 has the LM head gathered). Hidden states
    ``[B, T, H]``, heads ``[V, H]``, weights / targets / behaviour log-probs ``[B, T]``;
    ``spec``: the divergence (``cfg.loss.divergence()``, made once for all micro-batches).
    ``reweight``: (granularity, multiplier) for token or sequence modulation. ``old``: the
    policy's log-probs before the batch's first update ``[B, T]``, for the clipped IS weight.
    ``workspace``: the loss pass's ``[chunk, V]`` buffers, shared by the step's micro-batches."""
    w = weights.to(student_hidden.device)
    tis_sum = tis_clipped = is_sum = is_clipped = 0.0
    if old is not None:
        # The reference's clipped importance weight, for the second and later updates of one
        # batch: min(p_now / p_old, is_cap) per token, detached (1 at the first update).
        now = head_token_logprobs(student_hidden.detach(), student_head.detach(), targets,
                                  cfg.loss.chunk_size, cfg.rollout.temperature)  # fmt: skip
        w, is_sum, is_clipped = capped_ratio_weights(w, now, old, cfg.loss.is_cap)
    if behaviour is not None:
        # Truncated importance sampling (the reference's rollout correction): the engine
        # sampled with its own numerics, so each token's loss is multiplied by
        # min(p_trainer / p_engine, cap), detached.
        # Both sides are log-probs of what was sampled from: after the rollout temperature
        # and top-p (the engine returns processed log-probs).
        trainer_lp = head_token_logprobs(
            student_hidden.detach(),
            student_head.detach(),
            targets,
            cfg.loss.chunk_size,
            cfg.rollout.temperature,
            cfg.rollout.top_p,
        )
        w, tis_sum, tis_clipped = capped_ratio_weights(w, trainer_lp, behaviour,
                                                       cfg.rollout.tis_cap)  # fmt: skip
    weight_sums = (0.0, 0.0)
    entropies = None
    if reweight is not None:
        # The weights need each token's entropies first: a no-grad pass of both heads, whose
        # entropies then also serve Eq. 8 (the loss pass below skips its own).
        granularity, multiplier = reweight
        t = spec.temperature
        keep = w != 0
        h_s = head_token_entropy(student_hidden.detach(), student_head.detach(), keep, t,
                                 cfg.loss.chunk_size)  # fmt: skip
        h_t = head_token_entropy(teacher_hidden, teacher_head, keep, t, cfg.loss.chunk_size)
        w, *weight_sums = modulated_weights(w, gap_per_token(h_s, h_t, keep, granularity),
                                            multiplier)  # fmt: skip
        entropies, with_entropies = (h_s, h_t), False
    # Eq. 2 (beta = 1) or the reference's JSD, weighted by the step's reduction weights, with
    # the LM head applied chunk by chunk; with I_k wanted, the per-token entropies of Eq. 8 come
    # out of the same pass over the logits (no extra forward).
    loss, h_student, h_teacher = head_divergence(
        student_hidden, student_head, teacher_hidden, teacher_head, w, spec,
        chunk_size=cfg.loss.chunk_size, return_entropies=with_entropies, targets=targets,
        workspace=workspace,
    )  # fmt: skip
    if entropies is not None:
        h_student, h_teacher = entropies
    return DistillOutput(loss, h_student, h_teacher, tis_sum, tis_clipped, tuple(weight_sums),
                         is_sum, is_clipped)  # fmt: skip


def capped_ratio_weights(
    weights: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, cap: float
) -> tuple[torch.Tensor, float, float]:
    """``weights * min(exp(logp - logp_ref), cap)`` (all ``[B, T]``; the ratio carries no
    gradient), with the ratios' sum and the number above ``cap`` over the tokens of nonzero
    weight."""
    ratio = (logp.detach() - logp_ref.to(logp.device)).exp()
    on = weights != 0
    return (weights * ratio.clamp(max=cap), float(ratio[on].double().sum()),
            float((ratio[on] > cap).sum()))  # fmt: skip


def old_logprobs(samples: list, policy: Policy, pad: int, cfg: TrainConfig) -> torch.Tensor:
    """``[B, T]``: the policy's log-prob of each response token (at the rollout temperature),
    before the batch's first update; 0 where padded. No gradient."""
    out = torch.zeros((len(samples), max(len(s.response) for s in samples)))
    with torch.no_grad():
        for start in range(0, len(samples), cfg.loss.micro_batch):
            mb = samples[start : start + cfg.loss.micro_batch]
            t_mb = max(len(s.response) for s in mb)
            targets = padded([s.response for s in mb], t_mb, pad)
            logp_fn = functools.partial(
                head_token_logprobs,
                targets=targets,
                chunk_size=cfg.loss.chunk_size,
                temperature=cfg.rollout.temperature,
            )
            logp = policy([s.student_prompt for s in mb], [s.response for s in mb], pad, logp_fn)
            out[start : start + len(mb), :t_mb] = logp.cpu()
    return out
