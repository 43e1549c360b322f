"""Per-token divergences between the student and the self-teacher (SDPO's distillation loss).

Generalized Jensen-Shannon with mix ``beta`` (named so to keep PGPO's ``alpha`` free), per token:

- ``beta = 0``: ``KL(p_T || p_S)``;
- ``beta = 1``: ``KL(p_S || p_T)``, the paper's Eq. 2 with the teacher under stop-gradient;
- ``0 < beta < 1``: with ``M = (1 - beta) p_S + beta p_T``,
  ``(1 - beta) KL(p_S || M) + beta KL(p_T || M)`` (0.5 in the SDPO reference's Science-QA runs).

The end points are special cases, as in the reference (the mixed form tends to 0, not to a KL,
as beta -> 0 or 1).

``mode="sampled_token"`` (the reference's token-level variant, reverse KL only): per token
``(log p_S(y) - log p_T(y)).detach() * log p_S(y)`` at the sampled token y. Its gradient is the
single-sample estimate of ``grad KL(p_S || p_T)`` along the sampled response; its value is that
surrogate's, not a KL.

Over the full vocabulary, or over the student's top-k tokens (indices of the student's
temperature-scaled logits, teacher gathered at the same indices, true log-probs normalised over
the full vocabulary) with an optional tail bucket holding the remaining mass
``log(1 - sum_k p)``, computed as ``log1p(-sum_k p)`` where the top-k hold less than half the mass
and as the log-sum-exp of the log-probs outside them elsewhere (exact even when the top-k mass
rounds to 1); without the tail both top-k sets are renormalised. Logits must
be finite.

Memory: logits are processed in chunks of tokens. When the student needs a gradient, each
chunk's gradient is computed right away and stored in the student's dtype, so the extra memory
is ``O(chunk_size x V)`` plus one gradient buffer of the logits' size (which backpropagation
into the LM head needs anyway), instead of the dozen float32 ``T x V`` intermediates of the
direct formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pgpo.information import entropy_from_log_probs
from pgpo.reduction import (
    DEFAULT_CHUNK_SIZE,
    ChunkBuffers,
    check_temperature,
    chunks,
    flatten,
    kept_chunks,
    log_probs_into,
    reduction_weights,
)

__all__ = [
    "DivergenceSpec",
    "divergence",
    "head_divergence",
    "head_token_logprobs",
    "token_divergence",
    "top_p_log_probs",
]


def _tail(log_p: torch.Tensor, index: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``index``: ``[n, V], [n, k], [n, 1] -> [n, 1]``
    (k < V), where ``inside`` is the log-sum-exp of ``log_p`` at ``index``.

    Each row from whichever form does not cancel: ``log1p(-P_k)`` where the top-k hold less
    than half the mass (a sum of the ~V small terms outside would carry float32's error ~V
    times), the log-sum-exp of the log-probs outside where they hold more (``1 - P_k`` cancels
    there, and is 0 where P_k rounds to 1). For that sum the top-k entries of ``log_p`` (no
    gradient) are set to -inf in place and restored after: no ``[n, V]`` copy."""
    small = torch.log1p(-inside.clamp(max=-math.log(2.0)).exp())
    if not bool((inside >= -math.log(2.0)).any()):
        return small
    kept = log_p.gather(-1, index)
    outside = log_p.scatter_(-1, index, float("-inf")).logsumexp(-1, keepdim=True)
    log_p.scatter_(-1, index, kept)
    return torch.where(inside < -math.log(2.0), small, outside)


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


MODES = ("logits", "sampled_token")


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence: JSD mix ``beta``, student top-k (None: full vocabulary) with or without
    the tail bucket, and the logits' temperature; ``mode`` ``sampled_token`` uses the sampled
    tokens instead (beta 1 only; top-k does not apply)."""

    beta: float
    topk: int | None = None
    add_tail: bool = True
    temperature: float = 1.0
    mode: str = "logits"

    def __post_init__(self) -> None:
        """One-line ValueErrors for settings no vocabulary makes valid."""
        if not (0.0 <= self.beta <= 1.0):
            raise ValueError(f"beta must be in [0, 1], got {self.beta!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "sampled_token" and self.beta != 1.0:
            raise ValueError(
                f"mode sampled_token is reverse KL only: beta must be 1, got {self.beta}"
            )
        if self.topk is not None and not (isinstance(self.topk, int) and self.topk >= 1):
            raise ValueError(f"topk must be a positive integer or None, got {self.topk!r}")
        check_temperature(self.temperature)


# A chunk's per-row divergence [n] and its gradient [n, V] w.r.t. the student's logits (or None).
_Rowwise = tuple[torch.Tensor, torch.Tensor | None]


def _row_dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``sum_v a[i, v] b[i, v]``: ``[n, V], [n, V] -> [n]``, the product written into
    ``scratch`` ``[n, V]`` (on CPU, product-then-sum into a reused buffer measured about twice
    as fast as ``linalg.vecdot``, which runs as a batched matrix product)."""
    return torch.mul(a, b, out=scratch).sum(-1)


def _bucket_gradient(
    a: torch.Tensor, b: torch.Tensor, beta: float, per_mass: bool = False
) -> torch.Tensor:
    """``dD/da`` ``[n, K]`` of the divergence D over K buckets of student log-probs ``a`` and
    teacher log-probs ``b`` (:func:`_generalized_jsd`), each bucket's log-prob taken as its own
    variable, with p = exp(a), q = exp(b), m = log((1 - beta) p + beta q):

    - 0 < beta < 1: ``(1 - beta) p (a - m)`` (the terms through m cancel);
    - beta = 1, ``KL(p || q)``: ``p (a - b + 1)``;
    - beta = 0, ``KL(q || p)``: ``-q``.

    ``per_mass``: divided by p (beta > 0 only), finite where p underflows to 0."""
    if beta == 0.0:
        if per_mass:
            raise ValueError("beta 0's gradient per unit of mass is -q / p: take it in log space")
        return -b.exp()
    if beta == 1.0:
        factor = a - b + 1.0
    else:
        factor = (1.0 - beta) * (a - torch.logaddexp(a + math.log1p(-beta), b + math.log(beta)))
    return factor if per_mass else a.exp() * factor


@dataclass
class _LogProbs:
    """One chunk's float32 ``[n, V]`` arrays of the temperature-scaled logits x_s, x_t: both
    roles' log-probs and the probabilities (``p_t``: None where nothing reads it). The closed
    forms overwrite them in place."""

    log_s: torch.Tensor
    log_t: torch.Tensor
    p_s: torch.Tensor
    p_t: torch.Tensor | None


def _entropies(x: _LogProbs, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both roles' full-vocabulary entropies ``[n]`` (Eq. 8), the products written into
    ``scratch`` ``[n, V]``, which may be ``x.p_t`` where nothing reads it afterwards (the
    teacher's entropy is taken first)."""
    h_t = entropy_from_log_probs(x.log_t, x.p_t, scratch)
    return entropy_from_log_probs(x.log_s, x.p_s, scratch), h_t


def _closed_form_topk(x: _LogProbs, spec: DivergenceSpec, weights, need_grad: bool) -> _Rowwise:
    """Per-row divergence ``[n]`` on the student's top-k (the tail bucket or the renormalised
    top-k, as the spec says) and the gradient ``[n, V]`` of ``sum_i w_i d_i`` w.r.t. ``x_s``
    (None without ``need_grad``), written out: no autograd graph over ``[n, V]``, and the
    student's probabilities' buffer becomes it. ``weights`` ``[n]`` (None: all 1).
    With s = softmax(x_s), I the top-k, g the bucket gradient (:func:`_bucket_gradient`, times
    w) and G its sum over the buckets:

    - with the tail bucket (log-prob ``a_tail = log sum_{v not in I} s_v``):
      ``g_v - s_v G`` for v in I, ``s_v (g_tail / s_tail - G)`` outside;
    - renormalised top-k (r = the top-k's renormalised probabilities): ``g_v - r_v G`` in I,
      0 outside.

    The tests check it against float64 autograd of the direct formula."""
    # log-softmax shifts each row by a constant: the same top-k as the logits'.
    index = x.log_s.topk(spec.topk, dim=-1).indices
    a, b = x.log_s.gather(-1, index), x.log_t.gather(-1, index)
    # With k = V the tail is empty (mass 0): no bucket, and nothing outside the top-k.
    tail = spec.add_tail and spec.topk < x.log_s.shape[-1]
    if tail:
        a_tail = _tail(x.log_s, index, a.logsumexp(-1, keepdim=True))
        b_tail = _tail(x.log_t, index, b.logsumexp(-1, keepdim=True))
        a_all, b_all = torch.cat([a, a_tail], dim=-1), torch.cat([b, b_tail], dim=-1)
    elif not spec.add_tail:
        a_all = a - a.logsumexp(-1, keepdim=True)
        b_all = b - b.logsumexp(-1, keepdim=True)
    else:
        a_all, b_all = a, b
    d = _generalized_jsd(a_all, b_all, spec.beta)
    if not need_grad:
        return d, None
    g = _bucket_gradient(a_all, b_all, spec.beta)
    if weights is not None:
        g = g * weights.unsqueeze(-1)
    total = g.sum(-1, keepdim=True)  # G
    k = spec.topk
    if not spec.add_tail:
        grad = x.p_s.zero_()  # nothing outside the top-k
        return d, grad.scatter_(-1, index, g - a_all.exp() * total)
    if not tail:
        outside = torch.zeros_like(total)
    elif spec.beta == 0.0:
        # g_tail / s_tail = -w q_tail / s_tail: in log space, as s_tail may underflow.
        w = 1.0 if weights is None else weights.unsqueeze(-1)
        grad = torch.add(x.log_s, b_tail - a_tail, out=x.log_t).exp_().mul_(-w)
        grad.sub_(x.p_s.mul_(total))
        return d, grad.scatter_(-1, index, g[:, :k] - a.exp() * total)
    else:  # g_tail / s_tail, computed without the division (s_tail may underflow)
        outside = _bucket_gradient(a_tail, b_tail, spec.beta, per_mass=True)
        if weights is not None:
            outside = outside * weights.unsqueeze(-1)
    grad = x.p_s.mul_(outside - total)
    return d, grad.scatter_(-1, index, g[:, :k] - a.exp() * total)


def _closed_form_full(
    x: _LogProbs, beta: float, weights, need_grad: bool, scratch: torch.Tensor | None
) -> _Rowwise:
    """Per-row full-vocabulary divergence ``[n]`` and the gradient ``[n, V]`` of
    ``sum_i w_i d_i`` w.r.t. ``x_s`` (None without ``need_grad``), written out instead of
    differentiated, with p = softmax and ``weights`` ``[n]`` (None: all 1):

    - beta 1, ``d = KL(p_S || p_T)``: ``dd/dx_s = p_S (log p_S - log p_T - d)``;
    - beta 0, ``d = KL(p_T || p_S)``: ``dd/dx_s = p_S - p_T``;
    - 0 < beta < 1, the JSD of :func:`_generalized_jsd` with ``m = log((1 - beta) p_S +
      beta p_T)``: ``g = (1 - beta) p_S (log p_S - m)`` (:func:`_bucket_gradient`, one bucket
      a token) through the softmax, ``dd/dx_s = g - p_S sum_v g_v``.

    ``x.p_t`` is needed for beta < 1, ``scratch`` ``[n, V]`` for 0 < beta < 1. The same values as
    the direct formula (the tests check them against float64 autograd), without an autograd
    graph over ``[n, V]`` and with no array beyond ``x``'s and ``scratch``."""
    if beta == 1.0:
        diff = x.log_s.sub_(x.log_t)  # log p_S - log p_T, in log_s's buffer
        d = _row_dot(x.p_s, diff, x.log_t)  # the product in log_t's buffer, which is done with
        grad = diff.sub_(d.unsqueeze(-1)).mul_(x.p_s) if need_grad else None
    elif beta == 0.0:
        diff = x.log_t.sub_(x.log_s)  # log p_T - log p_S, in log_t's buffer
        d = _row_dot(x.p_t, diff, x.log_s)  # the product in log_s's buffer, which is done with
        grad = x.p_s.sub_(x.p_t) if need_grad else None
    else:
        # m = logaddexp(log p_S + log(1 - beta), log p_T + log beta), in scratch; log p_T is
        # shifted by log beta in place for it and the shift taken off again below.
        shift_s, shift_t = math.log1p(-beta), math.log(beta)
        m = torch.logaddexp(torch.add(x.log_s, shift_s, out=scratch), x.log_t.add_(shift_t),
                            out=scratch)  # fmt: skip
        s_term = x.log_s.sub_(m)  # log p_S - m
        t_term = x.log_t.sub_(m).sub_(shift_t)  # log p_T - m
        kl_s = _row_dot(x.p_s, s_term, scratch)  # KL(p_S || M), m no longer needed
        d = (1.0 - beta) * kl_s + beta * _row_dot(x.p_t, t_term, scratch)
        grad = None
        if need_grad:
            g = s_term.mul_(x.p_s).mul_(1.0 - beta)  # the per-token term, in log_s's buffer
            grad = g.sub_(x.p_s.mul_(((1.0 - beta) * kl_s).unsqueeze(-1)))
    if grad is not None and weights is not None:
        grad.mul_(weights.unsqueeze(-1))
    return d, grad


def _closed_form_sampled(x: _LogProbs, targets: torch.Tensor, weights, need_grad: bool) -> _Rowwise:
    """The sampled-token surrogate ``d = sg(c) log p_S(y)`` per row ``[n]``, ``c = log p_S(y) -
    log p_T(y)`` at the sampled tokens ``targets`` ``[n]``, and its gradient ``[n, V]`` w.r.t.
    ``x_s`` (None without ``need_grad``): ``w c (onehot(y) - p_S)``, written out in the
    student's probabilities' buffer. ``weights`` ``[n]`` (None: all 1)."""
    y = targets.unsqueeze(-1)
    lp_s = x.log_s.gather(-1, y).squeeze(-1)
    c = lp_s - x.log_t.gather(-1, y).squeeze(-1)
    if not need_grad:
        return c * lp_s, None
    cw = (c if weights is None else c * weights).unsqueeze(-1)
    return c * lp_s, x.p_s.mul_(-cw).scatter_add_(-1, y, cw)


def _closed_form_chunk(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    student_head: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    spec: DivergenceSpec,
    weights: torch.Tensor | None,
    with_entropy: bool,
    need_grad: bool,
    workspace: ChunkBuffers,
    targets: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """One chunk of the divergence, its gradient written out (full vocabulary, top-k, sampled
    token): the per-row divergence ``[n]``, both entropies ``[n]`` (with ``with_entropy``) and
    the gradient ``[n, V]`` w.r.t. the student's logits, every ``[n, V]`` array one of
    ``workspace``'s buffers. Rows are logits, or hidden states under their heads; ``targets``
    ``[n]``: the sampled tokens (sampled_token mode)."""
    n, t = student_rows.shape[0], spec.temperature
    full = spec.mode == "logits" and spec.topk is None
    full_reads_p_t = full and spec.beta < 1.0  # KL(p_T || p_S) and the JSD
    # The student's probabilities always (they become the gradient), the teacher's where read.
    p_s = workspace("p_s", n)
    p_t = workspace("p_t", n) if with_entropy or full_reads_p_t else None
    x = _LogProbs(
        log_probs_into(workspace("log_s", n), student_rows, student_head, t, p_s),
        log_probs_into(workspace("log_t", n), teacher_rows, teacher_head, t, p_t),
        p_s,
        p_t,
    )
    mixed = full and 0.0 < spec.beta < 1.0  # the full JSD needs a fifth buffer
    scratch = workspace("scratch", n) if mixed or (with_entropy and full_reads_p_t) else None
    entropies = None
    if with_entropy:  # where nothing reads p_T after, its buffer takes the products
        entropies = _entropies(x, scratch if full_reads_p_t else p_t)
    if spec.mode == "sampled_token":
        d, grad = _closed_form_sampled(x, targets, weights, need_grad)
    elif full:
        d, grad = _closed_form_full(x, spec.beta, weights, need_grad, scratch)
    else:
        d, grad = _closed_form_topk(x, spec, weights, need_grad)
    if grad is not None and t != 1.0:
        grad.div_(t)  # d/dx of f(x / T)
    return d, entropies, grad


@dataclass
class _Chunk:
    """One chunk of the pass: global row indices ``[n]``, the student's input rows, the
    per-row divergence ``[n]``, its (weighted) sum, the sum's gradient w.r.t. the student's
    float32 logits ``[n, V]`` (None without one), and the two entropies ``[n]`` (or None)."""

    rows: torch.Tensor
    student_rows: torch.Tensor
    divergence: torch.Tensor
    total: torch.Tensor
    grad: torch.Tensor | None
    entropies: tuple[torch.Tensor, torch.Tensor] | None


def _divergence_chunks(
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep: torch.Tensor,
    spec: DivergenceSpec,
    chunk_size: int,
    *,
    weights: torch.Tensor | None = None,
    student_head: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    need_grad: bool,
    with_entropy: bool,
    workspace: ChunkBuffers | None = None,
) -> Iterator[_Chunk]:
    """The one chunk loop of both divergence forms. ``student`` / ``teacher`` ``[N, D]`` are
    logits (``D = V``, no heads) or hidden states multiplied by ``*_head`` ``[V, D]`` one chunk
    at a time, so logits never exist for more than ``chunk_size`` rows. Only rows with ``keep``
    ``[N]`` are computed; ``weights`` ``[N]`` (None: all 1) weight the sum whose gradient is
    taken; ``targets`` ``[N]`` are the sampled tokens (sampled_token mode); ``workspace``: the
    caller's buffers (None: this pass's own)."""
    if workspace is None:
        vocab = student.shape[1] if student_head is None else student_head.shape[0]
        workspace = ChunkBuffers(min(chunk_size, student.shape[0]), vocab, student.device)
    for rows in kept_chunks(keep, chunk_size):
        student_rows = student.index_select(0, rows)
        teacher_rows = teacher.index_select(0, rows)
        w = None if weights is None else weights.index_select(0, rows).float()
        y = None if targets is None else targets.index_select(0, rows)
        d, entropies, grad = _closed_form_chunk(
            student_rows.detach(), teacher_rows, student_head, teacher_head, spec, w,
            with_entropy, need_grad, workspace, y,
        )  # fmt: skip
        total = d.sum() if w is None else (w * d).sum()
        yield _Chunk(rows, student_rows, d, total, grad, entropies)


class _RowwiseDivergence(torch.autograd.Function):
    """Per-token divergence ``[N]`` with each row's gradient computed chunk by chunk in forward.

    Row i of the output depends on row i of the student logits only, so the backward pass is
    ``grad_out[:, None] * G`` with ``G[i] = d d_i / d x_i`` stored during forward. With
    ``with_entropy`` it also returns both roles' per-token entropies (not differentiable).
    """

    @staticmethod
    def forward(ctx, student, teacher, keep, spec, chunk_size, with_entropy):
        needs_grad = ctx.needs_input_grad[0]
        n = student.shape[0]
        out = torch.zeros(n, dtype=torch.float32, device=student.device)
        h_s = torch.zeros(n, dtype=torch.float32, device=student.device)
        h_t = torch.zeros(n, dtype=torch.float32, device=student.device)
        grad = torch.zeros_like(student) if needs_grad else None
        for chunk in _divergence_chunks(
            student,
            teacher,
            keep,
            spec,
            chunk_size,
            need_grad=needs_grad,
            with_entropy=with_entropy,
        ):
            if needs_grad:
                grad[chunk.rows] = chunk.grad.to(grad.dtype)
            out[chunk.rows] = chunk.divergence
            if with_entropy:
                h_s[chunk.rows], h_t[chunk.rows] = chunk.entropies
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
        return grad, None, None, None, None, None


def _check_arguments(
    what, student, teacher, spec: DivergenceSpec, vocab, same_width: bool = True
) -> None:
    """One-line ValueErrors for the shared arguments of the divergence functions
    (``same_width=False``: only the token axes must agree, as for hidden states of two widths);
    the spec checked its own settings when it was made."""
    n = None if same_width else -1
    if student.shape[:n] != teacher.shape[:n]:
        raise ValueError(
            f"student and teacher {what} differ in shape: "
            f"{tuple(student.shape)} vs {tuple(teacher.shape)}"
        )
    if not isinstance(spec, DivergenceSpec):
        raise TypeError(f"spec must be a DivergenceSpec, got {type(spec).__name__}")
    if spec.topk is not None and spec.topk > vocab:
        raise ValueError(f"topk must be an integer in [1, {vocab}] or None, got {spec.topk!r}")


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    spec: DivergenceSpec,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_entropies: bool = False,
):
    """Per-token divergence ``spec``, float32 ``[..., T]`` (0 where the mask is 0), in nats.

    Differentiable with respect to ``student_logits`` only; ``teacher_logits`` is treated as a
    constant (stop-gradient). Shapes: logits ``[..., T, V]``, mask ``[..., T]``.
    With ``return_entropies``: ``(divergence, H_student, H_teacher)``, the entropies per token
    over the full vocabulary of the same temperature-scaled logits (what Eq. 8 averages), from
    the same pass.
    """
    _check_arguments("logits", student_logits, teacher_logits, spec, student_logits.shape[-1])
    if spec.mode != "logits":
        raise ValueError("mode sampled_token needs the sampled tokens: use head_divergence")
    vocab = student_logits.shape[-1]
    student, keep, token_shape = flatten(student_logits, mask)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    per_token, h_s, h_t = _RowwiseDivergence.apply(
        student, teacher, keep, spec, chunk_size, return_entropies
    )
    if return_entropies:
        return per_token.reshape(token_shape), h_s.reshape(token_shape), h_t.reshape(token_shape)
    return per_token.reshape(token_shape)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    spec: DivergenceSpec,
    *,
    reduction: str = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Masked, reduced divergence ``spec`` between student and teacher (the distillation loss).

    ``reduction``: ``token_mean`` (over all masked tokens), ``seq_mean`` (the SDPO reference:
    token mean within each sequence, then mean over *all* sequences, empty ones adding 0),
    ``sum``, or ``none`` (the per-token tensor of :func:`token_divergence`).
    Returns a 0-dim float32 tensor (or ``[..., T]`` for ``none``).
    """
    per_token = token_divergence(student_logits, teacher_logits, mask, spec, chunk_size=chunk_size)
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
    def forward(ctx, h_s, weight, h_t, weight_t, token_w, targets, spec, chunk_size, with_entropy,
                workspace):  # fmt: skip
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n = h_s.shape[0]
        loss = torch.zeros((), dtype=torch.float64, device=h_s.device)
        h_stu = torch.zeros(n, dtype=torch.float32, device=h_s.device)
        h_tea = torch.zeros(n, dtype=torch.float32, device=h_s.device)
        per_token = torch.zeros(n, dtype=torch.float32, device=h_s.device)
        grad_h = torch.zeros_like(h_s) if needs_grad else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if needs_grad
            else None
        )
        for chunk in _divergence_chunks(
            h_s,
            h_t,
            token_w != 0,
            spec,
            chunk_size,
            weights=token_w,
            student_head=weight,
            teacher_head=weight_t,
            targets=targets,
            need_grad=needs_grad,
            with_entropy=with_entropy,
            workspace=workspace,
        ):
            if needs_grad:
                g = chunk.grad  # [n, V] float32
                grad_h[chunk.rows] = (g.to(weight.dtype) @ weight).to(grad_h.dtype)
                grad_w.addmm_(g.T, chunk.student_rows.float())  # in place: no [V, H] temporary
            loss += chunk.total.double()
            per_token[chunk.rows] = chunk.divergence.float()
            if with_entropy:
                h_stu[chunk.rows], h_tea[chunk.rows] = chunk.entropies
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(h_stu, h_tea, per_token)
        return loss.float(), h_stu, h_tea, per_token

    @staticmethod
    def backward(ctx, grad_out, _grad_h_stu, _grad_h_tea, _grad_per_token):
        grad_h, grad_w = ctx.saved_tensors
        # One gradient per forward input: hidden states and head weight; the rest are constants.
        # Scaled in place: the stored buffers become the gradients (no second [V, H] array; a
        # second backward through the same graph fails loudly on the version counter).
        grad_out = grad_out.to(grad_w.dtype)
        return (grad_h.mul_(grad_out.to(grad_h.dtype)), grad_w.mul_(grad_out).to(ctx.weight_dtype),
                *(None,) * 8)  # fmt: skip


def head_divergence(
    student_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    token_weights: torch.Tensor,
    spec: DivergenceSpec,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_entropies: bool = True,
    targets: torch.Tensor | None = None,
    return_per_token: bool = False,
    workspace: ChunkBuffers | None = None,
) -> tuple[torch.Tensor, ...]:
    """The weighted divergence ``sum_t w_t d_t`` (``spec``) from hidden states, the LM head
    fused in.

    student_hidden ``[..., T, H]`` and head ``[V, H]`` (no bias); teacher_hidden
    ``[..., T, H']`` and its head ``[V, H']`` (H' may differ: a trust-region teacher is one pair
    of width 2H); ``targets`` ``[..., T]``: the sampled tokens, for ``spec.mode`` ``sampled_token``;
    token_weights ``[..., T]`` (0 = not trained; the reduction's weights, so the result is the
    loss). Returns (loss, H_student ``[..., T]``, H_teacher ``[..., T]``): the scalar loss,
    differentiable w.r.t. the student's hidden states and head weight, and the per-token
    full-vocabulary entropies (Eq. 8, no gradient; zeros without ``return_entropies``, which
    skips their pass). With ``return_per_token`` a fourth tensor ``[..., T]``: each token's
    divergence ``d_t`` (no gradient; 0 where ``w_t = 0``), for logging. Peak extra memory is
    O(chunk_size x V), whatever T is: full-vocabulary logits never exist for a whole sequence.
    ``workspace``: a :class:`~pgpo.reduction.ChunkBuffers` of at least ``[chunk_size, V]`` that
    the caller passes to every call, so that the chunks' buffers are allocated once, not once
    a call (None: allocated for this call and freed after it).
    """
    vocab = head_weight.shape[0]
    _check_arguments("hidden states", student_hidden, teacher_hidden, spec, vocab, False)
    if tuple(teacher_head_weight.shape) != (vocab, teacher_hidden.shape[-1]):
        raise ValueError(
            f"teacher head {tuple(teacher_head_weight.shape)} does not match vocabulary {vocab} "
            f"and teacher width {teacher_hidden.shape[-1]}"
        )
    token_shape = tuple(student_hidden.shape[:-1])
    if tuple(token_weights.shape) != token_shape:
        raise ValueError(
            f"token_weights shape {tuple(token_weights.shape)} does not match {token_shape}"
        )
    if spec.mode == "sampled_token" and (targets is None or tuple(targets.shape) != token_shape):
        raise ValueError(f"mode sampled_token needs targets of shape {token_shape}")
    if workspace is not None:
        rows = min(chunk_size, math.prod(token_shape))
        workspace.check(rows, vocab, student_hidden.device)
    loss, h_s, h_t, per_token = _HeadDivergence.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        head_weight,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        teacher_head_weight.detach(),
        token_weights.reshape(-1),
        None if targets is None else targets.reshape(-1).to(student_hidden.device),
        spec,
        chunk_size,
        return_entropies,
        workspace,
    )
    out = (loss, h_s.reshape(token_shape), h_t.reshape(token_shape))
    return (*out, per_token.reshape(token_shape)) if return_per_token else out


def top_p_log_probs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Log-probs ``[n, V]`` of nucleus sampling: ``softmax(logits)`` restricted to the smallest
    set of most likely tokens whose mass reaches ``top_p`` and renormalised; ``-inf`` outside.
    As vLLM does it: sorted ascending, the tokens whose cumulative mass is at most
    ``1 - top_p`` are dropped, the most likely token always kept."""
    log_p = torch.log_softmax(logits, dim=-1)
    if top_p >= 1.0:
        return log_p
    sorted_log_p, order = log_p.sort(dim=-1)
    drop = sorted_log_p.exp().cumsum(dim=-1) <= 1.0 - top_p
    drop[..., -1] = False
    kept = sorted_log_p.masked_fill(drop, float("-inf"))
    kept = kept - kept.logsumexp(dim=-1, keepdim=True)
    return torch.empty_like(kept).scatter_(-1, order, kept)


@torch.no_grad()
def head_token_logprobs(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """The log-prob of each target token under the distribution it was sampled from:
    ``softmax(hidden @ head_weight.T / temperature)``, restricted to the top-p nucleus
    (:func:`top_p_log_probs`). Float32 ``[..., T]`` from hidden states ``[..., T, H]``, a head
    ``[V, H]`` and target ids ``[..., T]``; chunked like :func:`head_divergence` (no gradient).
    The trainer's side of the rollout importance ratio."""
    check_temperature(temperature)
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    buffers = ChunkBuffers(min(chunk_size, h.shape[0]), head_weight.shape[0], h.device)
    for start, stop in chunks(h.shape[0], chunk_size):
        log_p = log_probs_into(buffers("log_p", stop - start), h[start:stop], head_weight,
                               temperature)  # fmt: skip
        if top_p < 1.0:
            log_p = top_p_log_probs(log_p, top_p)  # log-softmax leaves log-probs as they are
        out[start:stop] = log_p.gather(-1, t[start:stop].unsqueeze(-1)).squeeze(-1)
    return out.reshape(targets.shape)
