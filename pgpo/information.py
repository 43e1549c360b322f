"""The information signal of Eq. 8: the entropy gap between student and self-teacher.

``I_k = mean over trained response tokens of H(student(.|x, y<t)) - H(teacher(.|x, f, y<t))``,
both entropies over the full vocabulary of temperature-scaled logits, in nats. It is an entropy
gap, not a mutual information: it is negative when the teacher is *less* certain than the
student, and then ``rho < 1``.

This module is Eq. 8's one home, in two steps that every caller shares:

1. per-token entropies: :func:`token_entropy` from logits, or, inside the trainer's fused loss
   pass, :func:`entropy_from_log_probs` on the log-probs that pass computes anyway;
2. the reduction: :func:`weighted_entropy_gap`, ``sum_t w_t (H_S,t - H_T,t)`` with the
   reduction's weights (:func:`pgpo.reduction.reduction_weights`). Sums over parts of a batch
   (micro-batches, ranks, gradient-accumulation steps) add up to the whole batch's.

:func:`entropy_gap` is both steps on a batch of logits. Logits are read in chunks of tokens, each
chunk upcast to float32, so the extra memory is ``O(chunk_size x V)`` whatever the logits' dtype
and the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgpo.reduction import (
    DEFAULT_CHUNK_SIZE,
    ChunkBuffers,
    check_temperature,
    flatten,
    kept_chunks,
    log_probs_into,
    reduction_weights,
)

__all__ = [
    "EntropyGap",
    "entropy_from_log_probs",
    "entropy_gap",
    "head_token_entropy",
    "token_entropy",
    "weighted_entropy_gap",
]


def entropy_from_log_probs(
    log_p: torch.Tensor, p: torch.Tensor | None = None, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """``-sum p log p`` over the last axis from log-probabilities, no gradient: ``[n, V] -> [n]``
    (nats); ``p``: ``exp(log_p)``, where the caller has it already; ``scratch`` ``[n, V]``: a
    buffer for the product, where the caller reuses one. Finite log-probs only (a -inf would
    give 0 * -inf)."""
    log_p = log_p.detach()
    p = log_p.exp() if p is None else p.detach()
    return -torch.mul(p, log_p, out=scratch).sum(-1)


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
    return _chunked_entropy(flat, None, keep, temperature, chunk_size).reshape(token_shape)


@torch.no_grad()
def head_token_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """:func:`token_entropy` of ``hidden @ head_weight.T``, the LM head applied chunk by chunk
    (logits never exist for more than ``chunk_size`` tokens). hidden ``[..., T, H]``, head
    ``[V, H]``, mask ``[..., T]`` -> float32 ``[..., T]`` (0 where the mask is 0). No gradient."""
    check_temperature(temperature)
    token_shape = tuple(hidden.shape[:-1])
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = (mask != 0).reshape(-1).to(flat.device)
    return _chunked_entropy(flat, head_weight, keep, temperature, chunk_size).reshape(token_shape)


def _chunked_entropy(
    flat: torch.Tensor,
    head: torch.Tensor | None,
    keep: torch.Tensor,
    temperature: float,
    chunk_size: int,
) -> torch.Tensor:
    """float32 ``[N]``: the entropy of ``softmax(flat @ head.T / temperature)`` (``flat`` are
    logits ``[N, V]`` without a head, hidden states ``[N, H]`` with one) at the rows kept by
    ``keep`` ``[N]``, 0 elsewhere, ``chunk_size`` rows at a time in reused buffers."""
    vocab = flat.shape[1] if head is None else head.shape[0]
    out = torch.zeros(flat.shape[0], dtype=torch.float32, device=flat.device)
    buffers = ChunkBuffers(min(chunk_size, flat.shape[0]), vocab, flat.device)
    for rows in kept_chunks(keep, chunk_size):
        n = rows.shape[0]
        p = buffers("p", n)
        log_p = log_probs_into(buffers("log_p", n), flat.index_select(0, rows), head,
                               temperature, p)  # fmt: skip
        out[rows] = entropy_from_log_probs(log_p, p, buffers("scratch", n))
    return out


@torch.no_grad()
def weighted_entropy_gap(
    h_student: torch.Tensor, h_teacher: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 8's reduction: ``(sum_t w_t (H_S,t - H_T,t), sum_t w_t H_S,t, sum_t w_t H_T,t)``.

    Per-token entropies ``[..., T]`` (nats, any float dtype, any device) and weights ``[..., T]``
    (0 = not trained; with the weights of :func:`pgpo.reduction.reduction_weights` the sums are
    ``I_k`` and the two mean entropies). Returns three float64 0-dim tensors on the weights'
    device. The gap is summed as one difference per token, not as a difference of two means."""
    w = weights.double()
    h_s, h_t = h_student.double().to(w.device), h_teacher.double().to(w.device)
    return (w * (h_s - h_t)).sum(), (w * h_s).sum(), (w * h_t).sum()


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
    info, mean_student, mean_teacher = weighted_entropy_gap(h_student, h_teacher, weights)
    return EntropyGap(
        info=info.float(),
        entropy_student=mean_student.float(),
        entropy_teacher=mean_teacher.float(),
        num_tokens=int(keep.sum()),
    )
