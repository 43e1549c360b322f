"""One SDPO / PGPO training step (Algorithm 1), top to bottom.

1. sample n rollouts per question from the current policy (temperature 1.0);
2. score them with the task's reward (:mod:`pgpo.train.tasks`: the letter in the last
   <answer>...</answer>, or \\boxed{}; a number; or ``reward.function``), each failure with
   optional feedback; with ``reward.false_positive_rate`` q, a failing rollout counts as a
   success with probability q;
3. build the teacher's prompt: question + a successful sibling's answer (Sec. 3, reprompting),
   and with ``teacher.feedback`` the feedback on the sample's own failed attempt; samples with
   neither are masked out;
4. student forward (with grad) and teacher forward (no grad) over the same response tokens; the
   loss is the divergence between them (Eq. 2 for beta = 1; the reference's JSD for 0.5), the LM
   head applied chunk by chunk inside it (logits never held for a whole sequence), and the
   per-token entropies come out of the same pass;
5. I_k (Eq. 8, :func:`pgpo.information.weighted_entropy_gap`; with ``pgpo.signal: agreement``
   the demonstrations' agreement with their group's successes instead) and rho_k (Eq. 9);
6. AdamW step scaled by rho_k (theta_{k+1} = theta_k - eta rho_k h_k), then the EMA teacher.
With ``pgpo.granularity`` token or sequence, step 4 weights each token's loss by rho(I_t) (or
its response's rho(I_i)) instead, renormalised over the step (:mod:`pgpo.modulation`), and step
6 scales by rho_k only with ``combine_step``.
With misleading feedback (:mod:`pgpo.train.evaluation.feedback`) step 3b reads the teacher's and the
student's letter probabilities before the update, for a per-sample record of the premise study.
A NaN/inf loss, gradient or I_k skips the step: weights, optimizer and teacher stay untouched.
With ``optim.updates_per_batch`` M > 1, steps 4-6 run once on each of M mini-batches of the
batch, each token's loss weighted by the clipped importance weight min(p_now / p_old, cap).

Under torchrun each rank runs this on its slice of the questions; the loss weights and I_k are
normalised over the whole batch (denominators summed over ranks), so the gradient, I_k and
rho_k are those of a single process holding the whole batch.
"""

from __future__ import annotations

import functools
import math
import random
import time
from typing import Any, NamedTuple, Protocol

import torch

from pgpo.information import weighted_entropy_gap
from pgpo.modulation import Modulation
from pgpo.multiplier import MultiplierConfig
from pgpo.optim import ModulatedOptimizer
from pgpo.reduction import ChunkBuffers, reduction_denominator, reduction_weights
from pgpo.train.batch import (
    Rollouts,
    Sample,
    StepSums,
    engine_logprobs,
    padded,
    response_mask,
    samples_to_run,
)
from pgpo.train.config import TrainConfig
from pgpo.train.evaluation.exact import gold_demonstration
from pgpo.train.evaluation.feedback import (
    NoRecord,
    PremiseRecord,
    agreement_signal,
    misleading,
    premise_record,
    success_agreement,
)
from pgpo.train.loss import distill_loss, old_logprobs
from pgpo.train.metrics import step_metrics, time_and_lr
from pgpo.train.models.distributed import World, full
from pgpo.train.models.forward import LossFn, Policy, backward_micro_batches, head_weight
from pgpo.train.models.teacher import Teacher, choose_demonstrations
from pgpo.train.rollout import RolloutEngine
from pgpo.train.tasks import Scored, Task, task_of
from pgpo.train.tasks.data import Question
from pgpo.train.tasks.prompts import student_prompt, teacher_prompt, trained_tokens
from pgpo.train.tasks.rewards import strip_thinking, with_false_positives


class RunParts(Protocol):
    """What a step uses of its run (:class:`pgpo.train.run.Run` is one): the policy and its
    teacher, the tokenizer, the rollout engine, the optimizer and its learning-rate schedule,
    this process's place among the ranks, and the task."""

    policy: Policy
    teacher: Teacher
    tokenizer: Any
    engine: RolloutEngine
    optimizer: ModulatedOptimizer
    scheduler: Any
    world: World
    task: Task


def train_step(
    questions: list[Question],
    run: RunParts,
    cfg: TrainConfig,
    modulation: Modulation | None,
    seeds: list[int] | None = None,
) -> dict:
    """One step on this rank's ``questions``; returns the step's metrics (over all ranks).
    ``modulation=None`` is SDPO (rho = 1). ``seeds``: one RNG seed per question for its
    rollouts (``rollout.seed_per_prompt``)."""
    t0 = time.perf_counter()
    policy, teacher, tokenizer, world, task = (run.policy, run.teacher, run.tokenizer, run.world,
                                               run.task)  # fmt: skip
    rollouts = sample_rollouts(questions, tokenizer, run.engine, cfg, seeds)  # 1.
    verdicts = judge(questions, rollouts, task)  # 2.
    verified = [[v.score for v in group] for group in verdicts]
    # 2b. a verifier with false positives (reward.false_positive_rate; Python's seeded generator)
    rewards = with_false_positives(verified, cfg.reward.false_positive_rate, random)
    feedback = [[v.feedback for v in group] for group in verdicts]
    samples = with_demonstrations(questions, rollouts, rewards, tokenizer, cfg, task,  # 3.
                                  feedback)  # fmt: skip
    pad = tokenizer.pad_token_id
    # 3b. the premise study's record (misleading feedback only): letter probabilities now
    premise = premise_record(cfg, questions, verified, rewards, samples, teacher, policy,
                             tokenizer, world)  # fmt: skip
    parts = cfg.optim.updates_per_batch  # 4.-6. once per mini-batch (the reference: once)
    # Several updates: the policy's log-probs before the first, for the clipped IS weight.
    old = old_logprobs(samples, policy, pad, cfg) if parts > 1 else None
    size = len(samples) // parts
    updates = [
        update(samples[i * size : (i + 1) * size],
               None if old is None else old[i * size : (i + 1) * size],
               run, cfg, modulation, premise)
        for i in range(parts)
    ]  # fmt: skip
    seconds = time.perf_counter() - t0
    sums = sum_updates(updates)
    metrics = step_metrics(questions, rollouts, rewards, samples, sums, world, cfg)
    metrics.update(mean_over_updates(updates, sums))
    if cfg.teacher.feedback != "off":  # how many teachers were told why an attempt failed
        told, count = world.sum([sum(s.feedback is not None for s in samples), len(samples)])
        metrics["feedback_share"] = told / count
    if cfg.pgpo.signal != "entropy_gap":  # info is that signal; Eq. 8 is logged beside it
        metrics["entropy_gap"] = sums.info
    metrics.update(premise.metrics())
    metrics.update(time_and_lr(rollouts, seconds, run.optimizer.param_groups[0]["lr"]))
    return metrics


class Update(NamedTuple):
    """Steps 4-6 on one mini-batch: its sums, I_k, alpha, rho_k (Eq. 9), the rho the step was
    scaled by, the gradient norm, and whether the step was taken."""

    sums: StepSums
    info: float
    alpha: float | None
    rho_k: float
    rho: float
    grad_norm: float
    stepped: bool
    has_signal: bool


def update(
    samples: list[Sample],
    old: torch.Tensor | None,
    run: RunParts,
    cfg: TrainConfig,
    modulation: Modulation | None,
    record: PremiseRecord | NoRecord,
) -> Update:
    """Steps 4-6 on ``samples`` (the whole batch, or one of its mini-batches). ``old``: their
    log-probs before the batch's first update ``[B, T]`` (None: one update per batch)."""
    policy, teacher, world = run.policy, run.teacher, run.world
    need_info = modulation is not None or cfg.pgpo.track_info
    reweight = None  # token / sequence: (granularity, rho of this step's alpha) for the weights
    if modulation is not None and modulation.granularity != "step":
        reweight = modulation.granularity, modulation.multiplier(modulation.schedule.current())
    sums = loss_and_entropies(  # 4.: gradients accumulate in .grad
        samples, policy, teacher, run.tokenizer.pad_token_id, cfg, world,
        with_entropies=need_info, reweight=reweight, old=old, record=record,
    )  # fmt: skip
    has_signal = need_info and sums.trained_tokens > 0
    info = sums.info if has_signal else 0.0  # Eq. 8: I_k (0 without a trained token)
    if cfg.pgpo.signal == "agreement":  # instead: the demonstrations' agreement (no gold answer)
        info, has_signal = agreement_signal(samples, world)
    alpha, rho_k = (None, 1.0) if modulation is None else modulation.rho(info)  # Eq. 9
    rho = rho_k if modulation is not None and modulation.scales_step else 1.0
    finite = math.isfinite(sums.loss) and math.isfinite(info)
    grad_norm, stepped = modulated_step(  # 6.
        policy, teacher, run.optimizer, run.scheduler, cfg, rho=rho, finite_so_far=finite
    )
    if modulation is not None and stepped:
        modulation.observe(info, rho_k)  # adaptive alpha: state for the next step
    return Update(sums, info, alpha, rho_k, rho, grad_norm, stepped, has_signal)


def sum_updates(updates: list[Update]) -> StepSums:
    """The counts of all updates added (IS sums, trained tokens); their means averaged."""
    n = len(updates)
    fields = zip(*(u.sums for u in updates))
    return StepSums(*(sum(f) / n if name in StepSums.MEANS else sum(f)
                      for name, f in zip(StepSums._fields, fields)))  # fmt: skip


def mean_over_updates(updates: list[Update], sums: StepSums) -> dict:
    """The step's loss-side metrics: each a mean over its updates (one, by default); ``sums``:
    :func:`sum_updates` of them."""
    n = len(updates)
    mean = lambda values: sum(values) / n  # noqa: E731
    signal = [u.has_signal for u in updates]
    metrics = {
        "loss": mean([u.sums.loss for u in updates]),
        "info": mean([u.info for u in updates]),
        "rho": mean([u.rho for u in updates]),
        "entropy_student": mean([u.sums.entropy_student if s else 0.0
                                 for u, s in zip(updates, signal)]),
        "entropy_teacher": mean([u.sums.entropy_teacher if s else 0.0
                                 for u, s in zip(updates, signal)]),
        "grad_norm": mean([u.grad_norm for u in updates]),
        "skipped": not all(u.stepped for u in updates),
        "empty_target_batch": not any(signal),
    }  # fmt: skip
    if updates[0].alpha is not None:
        metrics.update(alpha=mean([u.alpha for u in updates]),
                       rho_batch=mean([u.rho_k for u in updates]))  # fmt: skip
    if n > 1:
        metrics["updates_skipped"] = sum(not u.stepped for u in updates)
        if sums.trained_tokens > 0:  # the clipped importance weights of the later updates
            metrics["is_ratio_mean"] = sums.is_ratio_sum / sums.trained_tokens
            metrics["is_clipped_share"] = sums.is_clipped / sums.trained_tokens
    if updates[0].alpha is not None and sums.weight_sum > 0:  # the loss weights' mean rho_t
        metrics["rho_weight_mean"] = sums.modulated_sum / sums.weight_sum
    return metrics


def sample_rollouts(
    questions: list[Question], tokenizer, engine: RolloutEngine, cfg: TrainConfig, seeds
) -> Rollouts:
    """Step 1: ``rollout.n`` samples per question from the current policy."""
    start = time.perf_counter()
    r = cfg.rollout
    prompts = [student_prompt(tokenizer, q, r.max_prompt_tokens, r.response_prefix)
               for q in questions]  # fmt: skip
    completions = engine.generate(prompts, r.n, r.temperature, r.top_p, r.max_new_tokens, seeds)
    texts = [  # what the response says, the prefix written for the model included
        [r.response_prefix + tokenizer.decode(c.tokens, skip_special_tokens=True) for c in group]
        for group in completions
    ]
    return Rollouts(prompts, completions, texts, time.perf_counter() - start)


def judge(questions: list[Question], rollouts: Rollouts, task: Task) -> list[list[Scored]]:
    """Step 2: each rollout's reward and feedback under ``task`` ``[questions][rollouts]``."""
    return [[task.score(q, t) for t in group] for q, group in zip(questions, rollouts.texts)]


def score(
    questions: list[Question], rollouts: Rollouts, cfg: TrainConfig, task: Task | None = None
) -> list[list[float]]:
    """Step 2's rewards alone ``[questions][rollouts]`` (``task``: None, the config's)."""
    verdicts = judge(questions, rollouts, task or task_of(cfg))
    return [[v.score for v in group] for group in verdicts]


def with_demonstrations(
    questions: list[Question],
    rollouts: Rollouts,
    rewards,
    tokenizer,
    cfg: TrainConfig,
    task: Task | None = None,
    feedback: list[list[str | None]] | None = None,
) -> list[Sample]:
    """Step 3: each rollout with its teacher prompt, the question plus the first successful
    sibling's answer (thinking stripped) and, with ``teacher.feedback``, the ``feedback`` on its
    own attempt when that failed; with neither it is kept but not trained."""
    t = cfg.teacher
    task = task or task_of(cfg)
    demos = choose_demonstrations(
        rewards, rollouts.texts, t.success_threshold, own_success_ok=t.reprompt_on_own_success
    )
    samples = []
    feedback = feedback or [[None] * len(group) for group in rollouts.completions]
    for q, prompt, group, group_demos, texts, group_rewards, group_feedback in zip(
        questions, rollouts.prompts, rollouts.completions, demos, rollouts.texts, rewards, feedback
    ):
        for completion, demo, r, said in zip(group, group_demos, group_rewards, group_feedback):
            if demo is None and t.fallback_demonstration == "gold":
                demo = gold_demonstration(q)
            if demo is not None and t.strip_thinking:
                demo = strip_thinking(demo)
            if demo is not None and t.wrong_demo_share and random.random() < t.wrong_demo_share:
                demo = misleading(demo, q, task)
            # The feedback on this sample's own attempt, when it failed (as the verifier says).
            told = said if r < t.success_threshold and said and said.strip() else None
            if t.feedback == "off" or (t.feedback == "only_without_solution" and demo is not None):
                told = None
            tprompt = (
                prompt
                if demo is None and told is None
                else teacher_prompt(
                    tokenizer, q, demo, t.max_reprompt_tokens, cfg.rollout.response_prefix, told
                )  # fmt: skip
            )
            shown = None if demo is None else task.stated(demo)
            positions, prefix = None, cfg.rollout.response_prefix
            if cfg.loss.positions != "response" and completion.tokens:
                positions = trained_tokens(tokenizer, completion.tokens, prefix,
                                           cfg.loss.positions, task.answer_span)  # fmt: skip
            # An empty response (stopped at once) has nothing to train on.
            samples.append(Sample(
                student_prompt=prompt,
                teacher_prompt=tprompt,
                response=completion.tokens or [tokenizer.pad_token_id],
                trained=(demo is not None or told is not None) and len(completion.tokens) > 0,
                engine_logprobs=completion.logprobs if completion.tokens else [0.0],
                demo_right=None if demo is None else shown == q.answer,
                shown=shown,
                agreement=success_agreement(texts, group_rewards, t.success_threshold, shown,
                                            task.stated),
                positions=positions,
                feedback=told,
            ))  # fmt: skip
    return samples


def loss_and_entropies(
    samples: list[Sample],
    policy: Policy,
    teacher: Teacher,
    pad: int,
    cfg: TrainConfig,
    world: World,
    *,
    with_entropies: bool,
    reweight: tuple[str, MultiplierConfig] | None = None,
    old: torch.Tensor | None = None,
    record: PremiseRecord | NoRecord | None = None,
) -> StepSums:
    """Step 4: forward and backward in micro-batches, gradients accumulated in ``.grad``.
    Returns the step's sums; ``record`` (misleading feedback, :mod:`pgpo.train.evaluation.feedback`)
    observes each micro-batch's per-token entropies (None: nothing does).

    The loss weights and Eq. 8's weights are those of the whole step (denominators summed over
    ranks), so neither micro-batching nor the number of ranks changes the sums. With
    ``reweight`` (token or sequence granularity) each micro-batch trains on ``w_t rho(I_t)``,
    and the summed gradient (and loss) is then scaled by ``sum w / sum w rho`` over the whole
    step: exactly the renormalised weights of :func:`pgpo.modulation.reallocated_weights`."""
    record = record or NoRecord()
    mask = response_mask(samples)
    loss_den, info_den, trained_tokens = world.sum(
        [
            reduction_denominator(mask, cfg.loss.reduction, empty_sequences_count=True),
            reduction_denominator(mask, cfg.pgpo.info_reduction, empty_sequences_count=False),
            mask.sum(),
        ]
    )
    loss_w = reduction_weights(
        mask, cfg.loss.reduction, empty_sequences_count=True, denominator=loss_den
    ).float()
    info_w = reduction_weights(
        mask, cfg.pgpo.info_reduction, empty_sequences_count=False, denominator=info_den
    )
    # The engine's log-probs, for the truncated importance-sampling correction (vLLM).
    behaviour = engine_logprobs(samples) if cfg.rollout.tis_cap is not None else None
    spec = cfg.loss.divergence()
    # The loss's [chunk, V] buffers, allocated once for all of the step's micro-batches (on
    # the device of the hidden states the loss first sees).
    workspace = ChunkBuffers(cfg.loss.chunk_size, head_weight(policy.lm).shape[0])
    responses = [s.response for s in samples]

    def student_loss(rows: list[int], width: int) -> LossFn:
        teacher_hidden, teacher_head = teacher.hidden_and_head(
            policy, [samples[i].teacher_prompt for i in rows], [responses[i] for i in rows], pad
        )
        return functools.partial(
            distill_loss,
            teacher_hidden=teacher_hidden,
            teacher_head=teacher_head,
            weights=loss_w[rows, :width],
            targets=padded([responses[i] for i in rows], width, pad),
            behaviour=None if behaviour is None else behaviour[rows, :width],
            spec=spec,
            old=None if old is None else old[rows, :width],
            cfg=cfg,
            with_entropies=with_entropies,
            reweight=reweight,
            workspace=workspace,
        )

    totals = StepSums.zero()
    prompts = [s.student_prompt for s in samples]
    run = samples_to_run(samples, world)  # a masked sample's loss and Eq. 8 weights are 0
    size = cfg.loss.micro_batch
    micro_batches = backward_micro_batches(
        policy, prompts, responses, pad, run, size, student_loss, world.size
    )
    for rows, out in micro_batches:
        t_mb = max(len(responses[i]) for i in rows)
        gap = (0.0, 0.0, 0.0)
        if with_entropies:
            gap = weighted_entropy_gap(out.h_student, out.h_teacher, info_w[rows, :t_mb])
            record.observe([samples[i] for i in rows], out.h_student, out.h_teacher,
                           info_w[rows, :t_mb], mask[rows, :t_mb])  # fmt: skip
        totals = totals.plus(StepSums(
            loss=out.loss.item(), info=gap[0], entropy_student=gap[1], entropy_teacher=gap[2],
            tis_ratio_sum=out.tis_ratio_sum, tis_clipped=out.tis_clipped,
            weight_sum=out.weight_sums[0], modulated_sum=out.weight_sums[1],
            is_ratio_sum=out.is_ratio_sum, is_clipped=out.is_clipped,
            trained_tokens=0.0,
        ))  # fmt: skip
    for p in policy.parameters():  # nothing trained here: a zero gradient, as a masked pass gives
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    totals = StepSums(*world.sum(totals[:-1]), trained_tokens=trained_tokens)
    if reweight is not None and totals.modulated_sum > 0:  # renormalise: the same total weight
        scale = totals.weight_sum / totals.modulated_sum
        for p in policy.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        totals = totals._replace(loss=totals.loss * scale)
    return totals


def modulated_step(
    policy: Policy,
    teacher: Teacher,
    optimizer: ModulatedOptimizer,
    scheduler,
    cfg: TrainConfig,
    *,
    rho: float,
    finite_so_far: bool,
) -> tuple[float, bool]:
    """Step 6: clip the accumulated gradient, then, unless anything is non-finite, AdamW's step
    scaled by ``rho`` (``theta <- theta - eta rho h``), the schedule and the EMA teacher.
    Returns (gradient norm before clipping, whether the step was taken)."""
    grad_norm = float(
        full(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip))
    )
    stepped = finite_so_far and math.isfinite(grad_norm) and math.isfinite(rho)
    if stepped:
        optimizer.step(rho)
        scheduler.step()
        teacher.update(policy)
    optimizer.zero_grad()
    return grad_norm, stepped
