"""The step's rollout and reward metrics, over all ranks (the loss side: :mod:`pgpo.train.step`)."""

from __future__ import annotations

import torch

from pgpo.train.batch import Rollouts, Sample, StepSums, engine_logprobs
from pgpo.train.config import TrainConfig
from pgpo.train.models.distributed import World
from pgpo.train.tasks.data import Question
from pgpo.train.tasks.rewards import extract_answer


def step_metrics(
    questions: list[Question],
    rollouts: Rollouts,
    rewards: list[list[float]],
    samples: list[Sample],
    sums: StepSums,
    world: World,
    cfg: TrainConfig,
) -> dict:
    """A self-distillation step's rollout and reward metrics over all ranks: those of
    :func:`rollout_metrics`, the share of samples masked out of the loss, and the truncated-IS
    means (the loss side is added by the caller)."""
    metrics = rollout_metrics(questions, rollouts, rewards, world, cfg)
    trained, count = world.sum([sum(s.trained for s in samples), len(samples)])
    metrics["masked_share"] = 1.0 - trained / count
    corrected = cfg.rollout.tis_cap is not None and engine_logprobs(samples) is not None
    if corrected and sums.trained_tokens > 0:
        metrics["tis_ratio_mean"] = sums.tis_ratio_sum / sums.trained_tokens
        metrics["tis_clipped_share"] = sums.tis_clipped / sums.trained_tokens
    return metrics


def rollout_metrics(
    questions: list[Question],
    rollouts: Rollouts,
    rewards: list[list[float]],
    world: World,
    cfg: TrainConfig,
) -> dict:
    """What every step logs of its rollouts, over all ranks: the mean reward, the share of
    rollouts at or above the success threshold (accuracy), the share with an answer tag,
    response lengths, the share of questions with a success, rollout throughput, and the
    logged samples (and the step's peak GPU memory on a GPU)."""
    lengths = [len(c.tokens) for group in rollouts.completions for c in group]
    flat_rewards = [r for group in rewards for r in group]
    formatted = [extract_answer(t).has_answer_tag for group in rollouts.texts for t in group]
    threshold = cfg.teacher.success_threshold
    count, reward_sum, correct, formatted_sum, length_sum, groups, success_groups = world.sum(
        [
            len(flat_rewards),
            sum(flat_rewards),
            sum(r >= threshold for r in flat_rewards),
            sum(formatted),
            sum(lengths),
            len(rewards),
            sum(any(r >= threshold for r in g) for g in rewards),
        ]
    )
    metrics = {
        "reward": reward_sum / count,
        "accuracy": correct / count,
        "format_rate": formatted_sum / count,
        "response_length_mean": length_sum / count,
        "response_length_max": int(world.max(max(lengths))),
        "success_group_fraction": success_groups / groups,
        "tokens_per_second": sum(lengths) / max(rollouts.seconds, 1e-9),
        "samples": logged_samples(questions, rollouts, rewards),
    }
    if torch.cuda.is_available():  # the step's peak, then start the next step's count afresh
        metrics["gpu_peak_gib"] = world.max(torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()
    return metrics


def time_and_lr(rollouts: Rollouts, seconds: float, lr: float) -> dict:
    """Where the step's ``seconds`` went (rollouts, the rest) and its learning rate."""
    return {"lr": lr, "rollout_seconds": rollouts.seconds,
            "train_seconds": seconds - rollouts.seconds, "step_seconds": seconds}  # fmt: skip


def logged_samples(
    questions: list[Question], rollouts: Rollouts, rewards: list[list[float]]
) -> list[dict]:
    """The first rollout of the step's first two questions, for ``samples.jsonl``."""
    return [
        {"question": q.prompt[:200], "answer": q.answer, "response": rollouts.texts[i][0],
         "reward": rewards[i][0]}
        for i, q in enumerate(questions[:2])
    ]  # fmt: skip
