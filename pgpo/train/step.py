"""One SDPO / PGPO training step (Algorithm 1), top to bottom.

1. sample n rollouts per question from the current policy (temperature 1.0);
2. score them (the letter in the last <answer>...</answer>, or \\boxed{});
3. build the teacher's prompt: question + a successful sibling's answer (Sec. 3, reprompting);
   samples without a demonstration are masked out;
4. student forward (with grad) and teacher forward (no grad) over the same response tokens; the
   loss is the divergence between them (Eq. 2 for beta = 1; the reference's JSD for 0.5), the LM
   head applied chunk by chunk inside it (logits never held for a whole sequence);
5. from the same logits, per-token entropies -> I_k (Eq. 8) -> rho_k (Eq. 9);
6. AdamW step scaled by rho_k (theta_{k+1} = theta_k - eta rho_k h_k), then the EMA teacher.
A NaN/inf loss, gradient or I_k skips the step: weights, optimizer and teacher stay untouched.

Under torchrun each rank runs this on its slice of the questions; the loss weights and I_k are
normalised over the whole batch (denominators summed over ranks), so the gradient, I_k and
rho_k are those of a single process holding the whole batch.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch

from pgpo.distill import head_divergence, head_token_logprobs
from pgpo.multiplier import MultiplierConfig
from pgpo.optim import ModulatedOptimizer
from pgpo.reduction import reduction_denominator, reduction_weights
from pgpo.train.config import TrainConfig
from pgpo.train.data import Question
from pgpo.train.distributed import World, full
from pgpo.train.forward import Policy, head_weight
from pgpo.train.prompts import student_prompt, teacher_prompt
from pgpo.train.rewards import extract_answer, reward, strip_thinking
from pgpo.train.rollout import Completion, RolloutEngine
from pgpo.train.teacher import Teacher, choose_demonstrations


@dataclass
class Sample:
    """One rollout prepared for the loss: prompts for both roles and the shared response."""

    student_prompt: list[int]
    teacher_prompt: list[int]
    response: list[int]
    trained: bool  # False: no demonstration, masked out of loss and I_k
    engine_logprobs: list[float] | None = None  # the rollout engine's, per response token


def response_mask(samples: list[Sample]) -> torch.Tensor:
    """``[B, T]``: 1 on the response tokens of trained samples."""
    t_max = max(len(s.response) for s in samples)
    mask = torch.zeros((len(samples), t_max))
    for i, s in enumerate(samples):
        if s.trained:
            mask[i, : len(s.response)] = 1.0
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


def distill_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    weights: torch.Tensor,
    targets: torch.Tensor,
    behaviour: torch.Tensor | None,
    cfg: TrainConfig,
    with_entropies: bool,
    tis: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A micro-batch's loss and per-token entropies (the ``loss_fn`` of :class:`Policy`: it runs
    inside the policy's forward, where FSDP2 has the LM head gathered). Hidden states
    ``[B, T, H]``, heads ``[V, H]``, weights / targets / behaviour log-probs ``[B, T]``;
    ``tis`` accumulates [sum of importance ratios, number clipped] over trained tokens."""
    w = weights.to(student_hidden.device)
    if behaviour is not None:
        # Truncated importance sampling (the reference's rollout correction): the engine
        # sampled with its own numerics, so each token's loss is multiplied by
        # min(p_trainer / p_engine, cap), detached.
        trainer_lp = head_token_logprobs(
            student_hidden.detach(), student_head.detach(), targets, cfg.loss.chunk_size
        )
        ratio = (trainer_lp - behaviour.to(w.device)).exp()
        on = w != 0
        tis[0] += float(ratio[on].double().sum())
        tis[1] += float((ratio[on] > cfg.rollout.tis_cap).sum())
        w = w * ratio.clamp(max=cfg.rollout.tis_cap)
    # Eq. 2 (beta = 1) or the reference's JSD, weighted by the step's reduction weights, with
    # the LM head applied chunk by chunk; with I_k wanted, the per-token entropies of Eq. 8 come
    # out of the same pass over the logits (no extra forward).
    return head_divergence(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        w,
        cfg.loss.beta,
        cfg.loss.topk,
        cfg.loss.add_tail,
        cfg.loss.temperature,
        cfg.loss.chunk_size,
        return_entropies=with_entropies,
    )


def train_step(
    questions: list[Question],
    policy: Policy,
    teacher: Teacher,
    tokenizer,
    engine: RolloutEngine,
    optimizer: ModulatedOptimizer,
    scheduler,
    cfg: TrainConfig,
    multiplier: MultiplierConfig | None,
    world: World | None = None,
    seeds: list[int] | None = None,
) -> dict:
    """One step on this rank's ``questions``; returns the step's metrics (over all ranks).
    ``multiplier=None`` is SDPO (rho = 1). ``seeds``: one RNG seed per question for its
    rollouts (``rollout.seed_per_prompt``)."""
    t0 = time.perf_counter()
    world = world or World()
    n = cfg.rollout.n

    # 1. Rollouts from the current policy.
    prompts = [student_prompt(tokenizer, q, cfg.rollout.max_prompt_tokens) for q in questions]
    completions: list[list[Completion]] = engine.generate(
        prompts, n, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens, seeds
    )
    texts = [
        [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in group]
        for group in completions
    ]
    t_rollout = time.perf_counter() - t0

    # 2. Rewards (1 when the extracted letter is right).
    lenient = cfg.reward.leading_letter
    rewards = [[reward(t, q.answer, lenient) for t in group] for q, group in zip(questions, texts)]
    formatted = [extract_answer(t).has_answer_tag for group in texts for t in group]

    # 3. Demonstrations: the first successful sibling's answer, thinking stripped.
    demos = choose_demonstrations(
        rewards, texts, cfg.teacher.success_threshold, cfg.teacher.reprompt_on_own_success
    )
    samples = []
    for q, prompt, group, group_demos in zip(questions, prompts, completions, demos):
        for completion, demo in zip(group, group_demos):
            if demo is None and cfg.teacher.fallback_demonstration == "gold":
                demo = f"<answer>{q.answer}</answer>"
            if demo is not None and cfg.teacher.strip_thinking:
                demo = strip_thinking(demo)
            tprompt = (
                prompt
                if demo is None
                else teacher_prompt(tokenizer, q, demo, cfg.teacher.max_reprompt_tokens)
            )
            # An empty response (stopped at once) has nothing to train on.
            samples.append(
                Sample(
                    prompt,
                    tprompt,
                    completion.tokens or [tokenizer.pad_token_id],
                    demo is not None and len(completion.tokens) > 0,
                    completion.logprobs if completion.tokens else [0.0],
                )
            )

    # 4-5. Forwards in micro-batches: divergence (loss) and entropies (I_k) from the same logits.
    # Weights are computed over the whole step (all ranks' denominators summed) so that
    # neither micro-batching nor the number of ranks changes the sums.
    mask = response_mask(samples)
    loss_den, info_den, trained_tokens = world.sum(
        [
            reduction_denominator(mask, cfg.loss.reduction, empty_sequences_count=True),
            reduction_denominator(mask, cfg.pgpo.info_reduction, empty_sequences_count=False),
            mask.sum(),
        ]
    )
    loss_w = reduction_weights(mask, cfg.loss.reduction, True, loss_den).float()
    info_w = reduction_weights(mask, cfg.pgpo.info_reduction, False, info_den)
    # The engine's log-probs, for the truncated importance-sampling correction (vLLM).
    behaviour = engine_logprobs(samples) if cfg.rollout.tis_cap is not None else None
    tis = [0.0, 0.0]  # sum of ratios, number clipped (over trained tokens)
    loss_total, info_total, h_student, h_teacher = 0.0, 0.0, 0.0, 0.0
    pad = tokenizer.pad_token_id
    need_info = multiplier is not None or cfg.pgpo.track_info
    optimizer.zero_grad()
    for start in range(0, len(samples), cfg.loss.micro_batch):
        mb = samples[start : start + cfg.loss.micro_batch]
        rows = slice(start, start + len(mb))
        t_mb = max(len(s.response) for s in mb)
        responses = [s.response for s in mb]
        with torch.no_grad():
            teacher_hidden = teacher.net([s.teacher_prompt for s in mb], responses, pad)
            teacher_head = full(head_weight(teacher.model)).to(teacher_hidden.dtype)
        targets = torch.tensor([r + [pad] * (t_mb - len(r)) for r in responses])
        student_loss = functools.partial(
            distill_loss,
            teacher_hidden=teacher_hidden,
            teacher_head=teacher_head,
            weights=loss_w[rows, :t_mb],
            targets=targets,
            behaviour=None if behaviour is None else behaviour[rows, :t_mb],
            cfg=cfg,
            with_entropies=need_info,
            tis=tis,
        )
        loss, hs, ht = policy([s.student_prompt for s in mb], responses, pad, student_loss)
        # FSDP2 averages gradients over ranks; this rank's loss is its share of the batch's.
        (loss * world.size).backward()
        loss_total += loss.item()
        if need_info:  # Eq. 8: I_k = mean over trained tokens of H(student) - H(teacher)
            w = info_w[rows, :t_mb]
            hs, ht = hs.double().cpu(), ht.double().cpu()
            info_total += float((w * (hs - ht)).sum())
            h_student += float((w * hs).sum())
            h_teacher += float((w * ht).sum())
        del teacher_hidden, teacher_head

    # 6. The modulated step, unless anything is non-finite. Every rank holds the same totals.
    loss_total, info_total, h_student, h_teacher, tis_sum, tis_clipped = world.sum(
        [loss_total, info_total, h_student, h_teacher, *tis]
    )
    grad_norm = float(
        full(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip))
    )
    has_signal = trained_tokens > 0 and need_info
    info = info_total if has_signal else 0.0  # no trained token (or not tracked): I = 0
    rho = 1.0 if multiplier is None else float(multiplier(info))  # Eq. 9
    finite = all(math.isfinite(v) for v in (loss_total, grad_norm, info, rho))
    if finite:
        optimizer.step(rho)
        scheduler.step()
        teacher.update(policy)
    optimizer.zero_grad()

    seconds = time.perf_counter() - t0
    lengths = [len(c.tokens) for group in completions for c in group]
    flat_rewards = [r for group in rewards for r in group]
    threshold = cfg.teacher.success_threshold
    (count, reward_sum, correct, formatted_sum, length_sum, trained, groups, success_groups) = (
        world.sum(
            [
                len(flat_rewards),
                sum(flat_rewards),
                sum(r >= threshold for r in flat_rewards),
                sum(formatted),
                sum(lengths),
                sum(s.trained for s in samples),
                len(rewards),
                sum(any(r >= threshold for r in g) for g in rewards),
            ]
        )
    )
    metrics = {
        "reward": reward_sum / count,
        "accuracy": correct / count,
        "format_rate": formatted_sum / count,
        "loss": loss_total,
        "info": info,
        "rho": rho,
        "entropy_student": h_student if has_signal else 0.0,
        "entropy_teacher": h_teacher if has_signal else 0.0,
        "grad_norm": grad_norm,
        "skipped": not finite,
        "lr": optimizer.param_groups[0]["lr"],
        "response_length_mean": length_sum / count,
        "response_length_max": int(world.max(max(lengths))),
        "masked_share": 1.0 - trained / count,
        "success_group_fraction": success_groups / groups,
        "empty_target_batch": not has_signal,
        "rollout_seconds": t_rollout,
        "train_seconds": seconds - t_rollout,
        "step_seconds": seconds,
        "tokens_per_second": sum(lengths) / max(t_rollout, 1e-9),
        "samples": [
            {
                "question": q.prompt[:200],
                "answer": q.answer,
                "response": texts[i][0],
                "reward": rewards[i][0],
            }
            for i, q in enumerate(questions[:2])
        ],
    }
    if torch.cuda.is_available():  # the step's peak, then start the next step's count afresh
        metrics["gpu_peak_gib"] = world.max(torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()
    if behaviour is not None and trained_tokens > 0:
        metrics["tis_ratio_mean"] = tis_sum / trained_tokens
        metrics["tis_clipped_share"] = tis_clipped / trained_tokens
    return metrics
