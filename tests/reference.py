"""Direct, unchunked float64 formulas that the chunked core is checked against.

Written independently of pgpo's code: full probability tensors, explicit sums, no log-space tricks
beyond subtracting the row maximum.
"""

import numpy as np
import torch


def probs(logits, temperature=1.0):
    x = np.asarray(logits, dtype=np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def entropy(logits, temperature=1.0):
    p = probs(logits, temperature)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def logsumexp(x):
    """log sum exp over the last axis, keepdims; -inf for an empty axis."""
    if x.shape[-1] == 0:
        return np.full(x.shape[:-1] + (1,), -np.inf)
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def log_probs(logits, temperature=1.0):
    x = np.asarray(logits, dtype=np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(log_p, log_q):
    """sum p (log p - log q), from log-probabilities (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(log_p > -np.inf, np.exp(log_p) * (log_p - log_q), 0.0).sum(-1)


def token_divergence(student, teacher, beta, topk=None, add_tail=True, temperature=1.0):
    """[..., V] -> [...]: the generalized JSD of SDPO, directly (log-space so that logits of
    1e4, whose probabilities underflow float64, still give the exact finite value)."""
    s = np.asarray(student, dtype=np.float64)
    lp_s, lp_t = log_probs(s, temperature), log_probs(teacher, temperature)
    if topk is not None:
        order = np.argsort(-s, axis=-1, kind="stable")
        idx, rest = order[..., :topk], order[..., topk:]
        with np.errstate(divide="ignore"):
            if add_tail:  # the tail's mass is the sum of the probabilities outside the top-k
                tails = [logsumexp(np.take_along_axis(lp, rest, -1)) for lp in (lp_s, lp_t)]
            lp_s = np.take_along_axis(lp_s, idx, -1)
            lp_t = np.take_along_axis(lp_t, idx, -1)
            if add_tail:
                lp_s = np.concatenate([lp_s, tails[0]], -1)
                lp_t = np.concatenate([lp_t, tails[1]], -1)
            else:
                lp_s = lp_s - np.log(np.exp(lp_s).sum(-1, keepdims=True))
                lp_t = lp_t - np.log(np.exp(lp_t).sum(-1, keepdims=True))
    if beta == 0:
        return kl(lp_t, lp_s)
    if beta == 1:
        return kl(lp_s, lp_t)
    lm = np.logaddexp(np.log(1 - beta) + lp_s, np.log(beta) + lp_t)
    return (1 - beta) * kl(lp_s, lm) + beta * kl(lp_t, lm)


def reduce(values, mask, reduction, empty_sequences_count):
    """Masked reductions over [B, T] arrays, written as loops."""
    values, mask = np.asarray(values, np.float64), np.asarray(mask) != 0
    if reduction == "sum":
        return float((values * mask).sum())
    if reduction == "token_mean":
        return float((values * mask).sum() / mask.sum()) if mask.sum() else 0.0
    per_seq = []
    for v, m in zip(values.reshape(-1, values.shape[-1]), mask.reshape(-1, mask.shape[-1])):
        if m.sum():
            per_seq.append((v * m).sum() / m.sum())
        elif empty_sequences_count:
            per_seq.append(0.0)
    return float(np.mean(per_seq)) if per_seq else 0.0


def torch_divergence_float64(student, teacher, beta, topk=None, add_tail=True, temperature=1.0):
    """The same formula in float64 torch autograd (for gradients), teacher detached."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.detach().double() / temperature, -1)
    if topk is not None:
        idx = student.detach().topk(topk, -1).indices
        p_s, p_t = p_s.gather(-1, idx), p_t.gather(-1, idx)
        if add_tail and topk < student.shape[-1]:
            p_s = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1)
            p_t = torch.cat([p_t, 1 - p_t.sum(-1, keepdim=True)], -1)
        else:
            p_s, p_t = p_s / p_s.sum(-1, keepdim=True), p_t / p_t.sum(-1, keepdim=True)

    def _kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if beta == 0:
        return _kl(p_t, p_s)
    if beta == 1:
        return _kl(p_s, p_t)
    m = (1 - beta) * p_s + beta * p_t
    return (1 - beta) * _kl(p_s, m) + beta * _kl(p_t, m)
