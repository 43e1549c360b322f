"""The information signal of Eq. 8: the entropy gap between student and self-teacher.

``I_k = mean over trained response tokens of H(student(.|x, y<t)) - H(teacher(.|x, f, y<t))``,
both entropies over the full vocabulary of temperature-scaled logits, in nats. It is an entropy
gap, not a mutual information: it is negative when the teacher is *less* certain than the
student, and then ``rho < 1``.

Logits are read in chunks of tokens, each chunk upcast to float32, so the extra memory is
``O(chunk_size x V)`` whatever the logits' dtype and the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgpo.reduction import (
    DEFAULT_CHUNK_SIZE,
    check_temperature,
    chunks,
    flatten,
    reduction_weights,
)

__all__ = ["EntropyGap", "entropy_from_log_probs", "entropy_gap", "token_entropy"]


def entropy_from_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last axis from log-probabilities, no gradient: ``[n, V] -> [n]``
    (nats). Finite log-probs only (a -inf would give 0 * -inf)."""
    log_p = log_p.detach()
    return -(log_p.exp() * log_p).sum(-1)


@torch.no_grad()
def token_entropy(
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token entropy ``H(softmax(logits / temperature))`` in nats.

    logits ``[..., T, V]`` (any float dtype), mask ``[..., T]`` -> float32 ``[..., T]``, 0 where
    the mask is 0 (those rows are not computed). No gradient.
    """
    check_temperature(temperature)
    flat, keep, token_shape = flatten(logits, mask)
    out = torch.zeros(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start, stop in chunks(flat.shape[0], chunk_size):
        rows = keep[start:stop].nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        x = flat[start:stop].index_select(0, rows).float()
        if temperature != 1.0:
            x.div_(temperature)
        out[start + rows] = entropy_from_log_probs(torch.log_softmax(x, dim=-1))
    return out.reshape(token_shape)


@dataclass(frozen=True)
class EntropyGap:
    """Result of :func:`entropy_gap`; tensors are 0-dim float32, in nats.

    ``num_tokens == 0`` means the mask selected nothing: there is no signal, and ``info`` and the
    entropies are 0 (so ``rho(info)`` is the multiplier's value at 0, 1 for ``paper``).
    """

    info: torch.Tensor
    entropy_student: torch.Tensor
    entropy_teacher: torch.Tensor
    num_tokens: int

    @property
    def has_signal(self) -> bool:
        return self.num_tokens > 0


def entropy_gap(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float = 1.0,
    reduction: str = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> EntropyGap:
    """Eq. 8: the masked mean of ``H_student - H_teacher`` over response tokens.

    student_logits, teacher_logits ``[..., T, V]`` over the same response tokens; mask
    ``[..., T]`` (nonzero = trained token). ``reduction``: ``token_mean`` (Eq. 8) or
    ``seq_mean`` (token mean per sequence, then mean over the sequences that have tokens).
    No gradient flows; nothing of size ``T x V`` beyond one chunk is allocated.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    if reduction not in ("token_mean", "seq_mean"):
        raise ValueError(f"reduction must be token_mean or seq_mean, got {reduction!r}")
    _, keep, token_shape = flatten(student_logits, mask)
    keep = keep.reshape(token_shape)
    h_student = token_entropy(student_logits, keep, temperature, chunk_size)
    h_teacher = token_entropy(teacher_logits, keep, temperature, chunk_size)
    weights = reduction_weights(keep, reduction, empty_sequences_count=False)
    mean_student = (weights * h_student.double()).sum().float()
    mean_teacher = (weights * h_teacher.double()).sum().float()
    return EntropyGap(
        info=mean_student - mean_teacher,
        entropy_student=mean_student,
        entropy_teacher=mean_teacher,
        num_tokens=int(keep.sum()),
    )
