"""Misleading feedback: the premise study's settings and what the step records about them.

PGPO's premise (the paper's Sec. 1 and 3) is that a high ``I_k`` marks a batch whose feedback is
informative. Two settings make some feedback wrong on purpose, so that the premise can be tested
where the truth is known:

- ``reward.false_positive_rate`` q: the verifier lets a failing rollout through with probability
  q (:func:`pgpo.train.rewards.with_false_positives`), and a wrong answer becomes a sibling's
  demonstration;
- ``teacher.wrong_demo_share`` p: a share p of demonstrations has its answer replaced by a wrong
  option's letter (:func:`misleading`).

In such runs the step logs, besides ``I_k`` (Eq. 8) over the whole batch, ``I_k`` over the samples
whose demonstration states the gold answer and over those whose demonstration states a wrong one
(:func:`gap_by_demonstration`), and writes one record per trained sample to ``feedback.jsonl``
(:func:`feedback_records`): the demonstration's truth, the sample's entropy gap, and the teacher's
probability of the letter it is shown and of the gold letter.
"""

from __future__ import annotations

import random

import torch

from pgpo.information import weighted_entropy_gap
from pgpo.modulation import gap_per_token
from pgpo.train.config import TrainConfig
from pgpo.train.data import Question, option_letters
from pgpo.train.distributed import World
from pgpo.train.exact import taught_letter_probabilities
from pgpo.train.rewards import with_answer

# Where the teacher's letter probabilities are read: after the demonstrations' own answer tag.
ANSWER_PREFIX = "<answer>"


def misleading_feedback(cfg: TrainConfig) -> bool:
    """Some demonstrations may be wrong on purpose: a verifier with false positives or
    demonstrations with a swapped answer (the premise study's settings)."""
    return bool(cfg.reward.false_positive_rate or cfg.teacher.wrong_demo_share)


def misleading(demo: str, question: Question) -> str:
    """``demo`` with its answer replaced by a wrong option's letter (Python's seeded
    generator); unchanged when it states no answer in a tag or a box."""
    wrong = [x for x in option_letters(question.prompt) if x != question.answer]
    return with_answer(demo, random.choice(wrong)) or demo


def gap_by_demonstration(
    h_student: torch.Tensor, h_teacher: torch.Tensor, weights: torch.Tensor, right: list
) -> tuple[float, float, float, float]:
    """Eq. 8's sums restricted to the samples whose demonstration states the gold answer and to
    those whose demonstration states a wrong one: ``(sum w gap, sum w)`` for each, from per-token
    entropies and weights ``[B, T]``; ``right`` ``[B]``: True, False or None (no demonstration).
    Their ratios are I_k over each group."""
    out = []
    for truth in (True, False):
        pick = torch.tensor([r is truth for r in right], dtype=weights.dtype)
        w = weights * pick.to(weights.device).unsqueeze(-1)
        out += [float(weighted_entropy_gap(h_student, h_teacher, w)[0]), float(w.sum())]
    return tuple(out)


def sample_gaps(h_student: torch.Tensor, h_teacher: torch.Tensor, keep: torch.Tensor) -> list:
    """Each sample's entropy gap, the token mean of ``H_S,t - H_T,t`` over its trained tokens
    (nats; Eq. 8 over one response), from per-token entropies and a mask ``[B, T]``; None for a
    sample with no trained token."""
    gaps = gap_per_token(h_student, h_teacher, keep, "sequence")[:, 0].tolist()
    return [g if bool(k.any()) else None for g, k in zip(gaps, keep != 0)]


def shown_and_gold_probabilities(
    samples: list, gold: list[str], teacher, student, tokenizer, batch: int
) -> tuple[list, list]:
    """The teacher's probability, on each sample's teacher prompt, of the letter its
    demonstration states (``shown``) and of the gold letter, read after ``<answer>``
    (:func:`pgpo.train.exact.taught_letter_probabilities`). Samples without a demonstration, or
    whose demonstration states no option's letter, get None. Before the step's update."""
    prompts = [s.teacher_prompt for s in samples]
    shown = [s.shown if s.shown else g for s, g in zip(samples, gold)]
    both = taught_letter_probabilities(
        teacher, student, tokenizer, prompts + prompts, shown + gold, ANSWER_PREFIX, batch
    ).tolist()
    n = len(samples)
    usable = [s.shown is not None and bool(s.shown) for s in samples]
    return ([p if ok else None for p, ok in zip(both[:n], usable)],
            [p if s.shown is not None else None for p, s in zip(both[n:], samples)])  # fmt: skip


def feedback_records(
    questions: list[Question], samples: list, correct: list[list[bool]], gaps: list,
    p_shown: list, p_gold: list,
) -> list[dict]:  # fmt: skip
    """One row per trained sample (``samples`` in question order, ``len(samples) //
    len(questions)`` per question): the question's id, whether the rollout itself is correct,
    whether its demonstration states the gold answer, its entropy gap (nats) and the teacher's
    probability of the shown and of the gold letter."""
    per_question = len(samples) // len(questions)
    rows = []
    for i, s in enumerate(samples):
        if not s.trained:
            continue
        q = questions[i // per_question]
        rows.append({
            "question": q.id,
            "correct": bool(correct[i // per_question][i % per_question]),
            "demo_right": s.demo_right,
            "gap": gaps[i],
            "p_shown": p_shown[i],
            "p_gold": p_gold[i],
        })  # fmt: skip
    return rows


def misleading_metrics(verified, rewards, samples: list, world: World, sums) -> dict:
    """Over all ranks: the verifier-free reward, the share of rollouts the verifier let through
    wrongly, the share of trained samples whose demonstration states a wrong answer, and I_k
    over the samples with a right demonstration and over those with a wrong one (None where a
    group is empty or I_k was not computed). ``sums``: the step's
    :class:`pgpo.train.step.StepSums`."""
    flat = [(v, r) for vs, rs in zip(verified, rewards) for v, r in zip(vs, rs)]
    demos = [s.demo_right for s in samples if s.trained]
    true_sum, flipped, count, wrong, trained = world.sum(
        [sum(v for v, _ in flat), sum(r != v for v, r in flat), len(flat),
         sum(not right for right in demos), len(demos)]
    )  # fmt: skip
    return {
        "reward_true": true_sum / count,
        "false_positive_share": flipped / count,
        "demo_wrong_share": wrong / trained if trained else 0.0,
        "info_demo_right": sums.info_right / sums.weight_right if sums.weight_right else None,
        "info_demo_wrong": sums.info_wrong / sums.weight_wrong if sums.weight_wrong else None,
    }
