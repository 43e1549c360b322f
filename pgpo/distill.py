"""Per-token divergences between the student and the self-teacher (SDPO's distillation loss).

Generalized Jensen-Shannon with mix ``beta`` (named so to keep PGPO's ``alpha`` free), per token:

- ``beta = 0``: ``KL(p_T || p_S)``;
- ``beta = 1``: ``KL(p_S || p_T)``, the paper's Eq. 2 with the teacher under stop-gradient;
- ``0 < beta < 1``: with ``M = (1 - beta) p_S + beta p_T``,
  ``(1 - beta) KL(p_S || M) + beta KL(p_T || M)`` (0.5 in the SDPO reference's Science-QA runs).

The end points are special cases, as in the reference (the mixed form tends to 0, not to a KL,
as beta -> 0 or 1).

Over the full vocabulary, or over the student's top-k tokens (indices of the student's
temperature-scaled logits, teacher gathered at the same indices, true log-probs normalised over
the full vocabulary) with an optional tail bucket holding the remaining mass
``log(1 - sum_k p)``, computed as the log-sum-exp of the log-probs outside the top-k (exact even
when the top-k mass rounds to 1); without the tail both top-k sets are renormalised. Logits must
be finite.

Memory: logits are processed in chunks of tokens. When the student needs a gradient, each
chunk's gradient is computed right away and stored in the student's dtype, so the extra memory
is ``O(chunk_size x V)`` plus one gradient buffer of the logits' size (which backpropagation
into the LM head needs anyway), instead of the dozen float32 ``T x V`` intermediates of the
direct formula.
"""

from __future__ import annotations

import math

import torch

from pgpo.information import entropy_from_log_probs
from pgpo.reduction import (
    DEFAULT_CHUNK_SIZE,
    check_temperature,
    chunks,
    flatten,
    reduction_weights,
)

__all__ = ["divergence", "head_divergence", "token_divergence"]


def _tail(log_p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``index``: ``[n, V], [n, k] -> [n, 1]`` (k < V)."""
    return log_p.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p (log p - log q) over the last axis."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _generalized_jsd(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    return (1.0 - beta) * _kl(log_s, log_m) + beta * _kl(log_t, log_m)


def _chunk_divergence(
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    beta: float,
    topk: int | None,
    add_tail: bool,
    entropies: list | None = None,
) -> torch.Tensor:
    """Per-row divergence of float32 temperature-scaled logits ``[n, V] -> [n]``. With
    ``entropies`` (a list), appends the full-vocabulary entropies of both rows (no gradient),
    read from the log-probs computed here anyway: the information signal costs no extra pass
    over the logits beyond one product and sum."""
    log_s = torch.log_softmax(x_s, dim=-1)
    log_t = torch.log_softmax(x_t, dim=-1)
    if entropies is not None:
        entropies.extend((entropy_from_log_probs(log_s), entropy_from_log_probs(log_t)))
    if topk is not None:
        index = x_s.detach().topk(topk, dim=-1).indices
        # With k = V the tail is empty (mass 0): it would add exactly 0 to every term.
        tails = (_tail(log_s, index), _tail(log_t, index)) if topk < x_s.shape[-1] else None
        log_s = log_s.gather(-1, index)
        log_t = log_t.gather(-1, index)
        if add_tail:
            if tails is not None:
                log_s = torch.cat([log_s, tails[0]], dim=-1)
                log_t = torch.cat([log_t, tails[1]], dim=-1)
        else:
            log_s = log_s - log_s.logsumexp(-1, keepdim=True)
            log_t = log_t - log_t.logsumexp(-1, keepdim=True)
    return _generalized_jsd(log_s, log_t, beta)


class _RowwiseDivergence(torch.autograd.Function):
    """Per-token divergence ``[N]`` with each row's gradient computed chunk by chunk in forward.

    Row i of the output depends on row i of the student logits only, so the backward pass is
    ``grad_out[:, None] * G`` with ``G[i] = d d_i / d x_i`` stored during forward. With
    ``with_entropy`` it also returns both roles' per-token entropies (not differentiable).
    """

    @staticmethod
    def forward(
        ctx, student, teacher, keep, beta, topk, add_tail, temperature, chunk_size, with_entropy
    ):
        needs_grad = ctx.needs_input_grad[0]
        n = student.shape[0]
        out = torch.zeros(n, dtype=torch.float32, device=student.device)
        h_s = torch.zeros(n, dtype=torch.float32, device=student.device)
        h_t = torch.zeros(n, dtype=torch.float32, device=student.device)
        grad = torch.zeros_like(student) if needs_grad else None
        for start, stop in chunks(n, chunk_size):
            rows = keep[start:stop].nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            x_t = teacher[start:stop].index_select(0, rows).float() / temperature
            x_s = student[start:stop].index_select(0, rows).float()
            entropies = [] if with_entropy else None
            if needs_grad:
                with torch.enable_grad():
                    x_s.requires_grad_(True)
                    d = _chunk_divergence(x_s / temperature, x_t, beta, topk, add_tail, entropies)
                    (g,) = torch.autograd.grad(d.sum(), x_s)
                grad[start + rows] = g.to(grad.dtype)
            else:
                d = _chunk_divergence(x_s / temperature, x_t, beta, topk, add_tail, entropies)
            out[start + rows] = d.detach()
            if with_entropy:
                h_s[start + rows], h_t[start + rows] = entropies
        if needs_grad:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(h_s, h_t)
        return out, h_s, h_t

    @staticmethod
    def backward(ctx, grad_out, _grad_h_s, _grad_h_t):
        (grad,) = ctx.saved_tensors
        # In place: the stored buffer becomes the returned gradient (no second T x V buffer).
        # A second backward through the same graph then fails loudly on the version counter.
        grad.mul_(grad_out.to(grad.dtype).unsqueeze(-1))
        return grad, None, None, None, None, None, None, None, None


def _check_arguments(what, student, teacher, beta, topk, vocab, temperature) -> None:
    """One-line ValueErrors for the shared arguments of the divergence functions."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} differ in shape: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}"
        )
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if topk is not None and not (isinstance(topk, int) and 1 <= topk <= vocab):
        raise ValueError(f"topk must be an integer in [1, {vocab}] or None, got {topk!r}")
    check_temperature(temperature)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    beta: float,
    topk: int | None = None,
    add_tail: bool = True,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_entropies: bool = False,
):
    """Per-token divergence, float32 ``[..., T]`` (0 where the mask is 0), in nats.

    Differentiable with respect to ``student_logits`` only; ``teacher_logits`` is treated as a
    constant (stop-gradient). Shapes: logits ``[..., T, V]``, mask ``[..., T]``.
    With ``return_entropies``: ``(divergence, H_student, H_teacher)``, the entropies per token
    over the full vocabulary of the same temperature-scaled logits (what Eq. 8 averages), from
    the same pass.
    """
    _check_arguments(
        "logits", student_logits, teacher_logits, beta, topk, student_logits.shape[-1], temperature
    )
    vocab = student_logits.shape[-1]
    student, keep, token_shape = flatten(student_logits, mask)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    per_token, h_s, h_t = _RowwiseDivergence.apply(
        student,
        teacher,
        keep,
        float(beta),
        topk,
        add_tail,
        float(temperature),
        chunk_size,
        return_entropies,
    )
    if return_entropies:
        return per_token.reshape(token_shape), h_s.reshape(token_shape), h_t.reshape(token_shape)
    return per_token.reshape(token_shape)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    beta: float,
    topk: int | None = None,
    add_tail: bool = True,
    temperature: float = 1.0,
    reduction: str = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Masked, reduced divergence between student and teacher (the distillation loss).

    ``reduction``: ``token_mean`` (over all masked tokens), ``seq_mean`` (the SDPO reference:
    token mean within each sequence, then mean over *all* sequences, empty ones adding 0),
    ``sum``, or ``none`` (the per-token tensor of :func:`token_divergence`).
    Returns a 0-dim float32 tensor (or ``[..., T]`` for ``none``).
    """
    per_token = token_divergence(
        student_logits, teacher_logits, mask, beta, topk, add_tail, temperature, chunk_size
    )
    if reduction == "none":
        return per_token
    keep = per_token.new_ones(per_token.shape, dtype=torch.bool) if mask is None else mask != 0
    weights = reduction_weights(keep, reduction, empty_sequences_count=True)
    return (weights.to(per_token.dtype) * per_token).sum()


class _HeadDivergence(torch.autograd.Function):
    """``sum_i w_i d_i`` with the LM head applied chunk by chunk: logits never exist for more
    than ``chunk_size`` tokens. Gradients for the student's hidden states and head weight are
    accumulated in forward (row i's loss depends on row i's hidden state and on the weight)."""

    @staticmethod
    def forward(
        ctx,
        h_s,
        weight,
        h_t,
        weight_t,
        token_w,
        beta,
        topk,
        add_tail,
        temperature,
        chunk_size,
        with_entropy,
    ):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n = h_s.shape[0]
        loss = torch.zeros((), dtype=torch.float64, device=h_s.device)
        h_stu = torch.zeros(n, dtype=torch.float32, device=h_s.device)
        h_tea = torch.zeros(n, dtype=torch.float32, device=h_s.device)
        grad_h = torch.zeros_like(h_s) if needs_grad else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if (needs_grad)
            else None
        )
        for start, stop in chunks(n, chunk_size):
            rows = (token_w[start:stop] != 0).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            hs = h_s[start:stop].index_select(0, rows)
            x_t = (h_t[start:stop].index_select(0, rows) @ weight_t.T).float() / temperature
            w = token_w[start:stop].index_select(0, rows).float()
            entropies = [] if with_entropy else None
            with torch.enable_grad():
                x_s = (hs @ weight.T).float().requires_grad_(needs_grad)
                d = _chunk_divergence(x_s / temperature, x_t, beta, topk, add_tail, entropies)
                chunk_loss = (w * d).sum()
                if needs_grad:
                    (g,) = torch.autograd.grad(chunk_loss, x_s)  # [n, V] float32
            if needs_grad:
                grad_h[start + rows] = (g.to(weight.dtype) @ weight).to(grad_h.dtype)
                grad_w.addmm_(g.T, hs.float())  # in place: no [V, H] temporary
            loss += chunk_loss.detach().double()
            if with_entropy:
                h_stu[start + rows], h_tea[start + rows] = entropies
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(h_stu, h_tea)
        return loss.float(), h_stu, h_tea

    @staticmethod
    def backward(ctx, grad_out, _grad_h_stu, _grad_h_tea):
        grad_h, grad_w = ctx.saved_tensors
        # One gradient per forward input: hidden states and head weight; the rest are constants.
        return (grad_out * grad_h, (grad_out * grad_w).to(ctx.weight_dtype)) + (None,) * 9


def head_divergence(
    student_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    token_weights: torch.Tensor,
    beta: float,
    topk: int | None = None,
    add_tail: bool = True,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_entropies: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weighted divergence ``sum_t w_t d_t`` from hidden states, the LM head fused in.

    student_hidden, teacher_hidden ``[..., T, H]``; head weights ``[V, H]`` (no bias);
    token_weights ``[..., T]`` (0 = not trained; the reduction's weights, so the result is the
    loss). Returns (loss, H_student ``[..., T]``, H_teacher ``[..., T]``): the scalar loss,
    differentiable w.r.t. the student's hidden states and head weight, and the per-token
    full-vocabulary entropies (Eq. 8, no gradient; zeros without ``return_entropies``, which
    skips their pass). Peak extra memory is O(chunk_size x V),
    whatever T is: full-vocabulary logits never exist for a whole sequence.
    """
    _check_arguments(
        "hidden states",
        student_hidden,
        teacher_hidden,
        beta,
        topk,
        head_weight.shape[0],
        temperature,
    )
    token_shape = tuple(student_hidden.shape[:-1])
    if tuple(token_weights.shape) != token_shape:
        raise ValueError(
            f"token_weights shape {tuple(token_weights.shape)} does not match {token_shape}"
        )
    hidden = student_hidden.shape[-1]
    loss, h_s, h_t = _HeadDivergence.apply(
        student_hidden.reshape(-1, hidden),
        head_weight,
        teacher_hidden.detach().reshape(-1, hidden),
        teacher_head_weight.detach(),
        token_weights.reshape(-1),
        float(beta),
        topk,
        add_tail,
        float(temperature),
        chunk_size,
        return_entropies,
    )
    return loss, h_s.reshape(token_shape), h_t.reshape(token_shape)


@torch.no_grad()
def head_token_logprobs(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``log softmax(hidden @ head_weight.T)[target]`` per token, float32 ``[..., T]``, from
    hidden states ``[..., T, H]``, a head ``[V, H]`` and target ids ``[..., T]``; chunked like
    :func:`head_divergence` (no gradient). The trainer's log-probs of sampled tokens."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for start, stop in chunks(h.shape[0], chunk_size):
        logits = (h[start:stop] @ head_weight.T).float()
        picked = logits.gather(-1, t[start:stop].unsqueeze(-1)).squeeze(-1)
        out[start:stop] = picked - logits.logsumexp(-1)
    return out.reshape(targets.shape)
