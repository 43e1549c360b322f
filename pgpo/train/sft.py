"""The supervised yardstick (``objective: sft``): cross-entropy on the gold answer.

A step takes the same questions as a self-distillation step (``batch_size / rollout.n`` of
them, in the same order for the same seed) and trains the student to write the gold
demonstration, ``<answer>X</answer>`` (:func:`pgpo.train.evaluation.exact.gold_demonstration`),
after its prompt and ``rollout.response_prefix``: what self-distillation could at best teach if its
teacher copied the gold answer exactly. With ``loss.positions: answer`` only the answer's tokens
carry the loss, as in self-distillation; with ``letter`` only the letter's (plain supervised
training on the answer: with ``loss.reduction: token_mean``, the strongest simple yardstick).
The rollouts are still sampled and scored, so that the training reward is logged as in any
run; they do not enter the loss.

    loss = - sum_i sum_t w_it log p_S(y_it | x_i, y_i<t)     (w: loss.reduction's weights)
"""

from __future__ import annotations

import functools
import math
import time

import torch

from pgpo.reduction import chunks, reduction_denominator, reduction_weights
from pgpo.train.batch import padded
from pgpo.train.config import TrainConfig
from pgpo.train.evaluation.exact import gold_demonstration
from pgpo.train.metrics import rollout_metrics, time_and_lr
from pgpo.train.models.forward import LossFn, backward_micro_batches
from pgpo.train.step import RunParts, modulated_step, sample_rollouts, score
from pgpo.train.tasks.data import Question
from pgpo.train.tasks.prompts import student_prompt, trained_tokens


def gold_response(tokenizer, question: Question, response_prefix: str) -> list[int]:
    """The gold demonstration's tokens as the student would write them after
    ``response_prefix`` (the prefix's own characters are already in the prompt)."""
    text = gold_demonstration(question)
    if response_prefix and text.startswith(response_prefix):
        text = text[len(response_prefix) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cross_entropy(
    hidden: torch.Tensor,
    head: torch.Tensor,
    *,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """``- sum_t w_t log softmax(hidden_t @ head.T)[y_t]``, differentiable, the LM head applied
    ``chunk_size`` positions at a time. Hidden ``[B, T, H]``, head ``[V, H]``, targets and
    weights ``[B, T]``; a scalar (the :class:`Policy` ``loss_fn``)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).to(h.device)
    w = weights.reshape(-1).to(h.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start, stop in chunks(h.shape[0], chunk_size):
        if not bool(w[start:stop].any()):
            continue
        logp = torch.log_softmax((h[start:stop] @ head.T).float(), -1)
        picked = logp.gather(-1, y[start:stop].unsqueeze(-1)).squeeze(-1)
        total = total - (w[start:stop] * picked).sum()
    return total


def sft_step(
    questions: list[Question], run: RunParts, cfg: TrainConfig, seeds: list[int] | None = None
) -> dict:
    """One supervised step on this rank's ``questions`` with ``run``'s parts; the metrics a
    self-distillation step logs that apply (the rollouts', the loss, rho 1; no I_k)."""
    t0 = time.perf_counter()
    policy, tokenizer, world, task = run.policy, run.tokenizer, run.world, run.task
    prefix, pad = cfg.rollout.response_prefix, tokenizer.pad_token_id
    rollouts = sample_rollouts(questions, tokenizer, run.engine, cfg, seeds)  # the training reward
    rewards = score(questions, rollouts, cfg, task)
    prompts = [student_prompt(tokenizer, q, cfg.rollout.max_prompt_tokens, prefix)
               for q in questions]  # fmt: skip
    responses = [gold_response(tokenizer, q, prefix) for q in questions]
    mask = torch.zeros((len(questions), max(len(r) for r in responses)))
    for i, r in enumerate(responses):
        first, last = trained_tokens(tokenizer, r, prefix, cfg.loss.positions, task.answer_span)
        mask[i, first:last] = 1.0
    (denominator,) = world.sum([reduction_denominator(mask, cfg.loss.reduction,
                                                      empty_sequences_count=True)])  # fmt: skip
    weights = reduction_weights(mask, cfg.loss.reduction, empty_sequences_count=True,
                                denominator=denominator).float()  # fmt: skip

    def loss_for(rows: list[int], width: int) -> LossFn:
        targets = padded([responses[i] for i in rows], width, pad)
        return functools.partial(cross_entropy, targets=targets, weights=weights[rows, :width],
                                 chunk_size=cfg.loss.chunk_size)  # fmt: skip

    micro_batches = backward_micro_batches(policy, prompts, responses, pad,
                                           list(range(len(questions))), cfg.loss.micro_batch,
                                           loss_for, world.size)  # fmt: skip
    loss_sum = sum(float(loss.detach()) for _, loss in micro_batches)
    (loss_sum,) = world.sum([loss_sum])
    grad_norm, stepped = modulated_step(policy, run.teacher, run.optimizer, run.scheduler, cfg,
                                        rho=1.0, finite_so_far=math.isfinite(loss_sum))  # fmt: skip
    metrics = rollout_metrics(questions, rollouts, rewards, world, cfg)
    metrics.update(loss=loss_sum, rho=1.0, grad_norm=grad_norm, skipped=not stepped)
    metrics.update(time_and_lr(rollouts, time.perf_counter() - t0,
                               run.optimizer.param_groups[0]["lr"]))  # fmt: skip
    return metrics
