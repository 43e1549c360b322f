"""Misleading feedback: the premise study's settings and what the step records about them.

PGPO's premise (the paper's Sec. 1 and 3) is that a high ``I_k`` marks a batch whose feedback is
informative. Two settings make some feedback wrong on purpose, so that the premise can be tested
where the truth is known:

- ``reward.false_positive_rate`` q: the verifier lets a failing rollout through with probability
  q (:func:`pgpo.train.tasks.rewards.with_false_positives`), and a wrong answer becomes a sibling's
  demonstration;
- ``teacher.wrong_demo_share`` p: a share p of demonstrations has its answer replaced by a wrong
  answer (another option's letter, or another number: :func:`misleading`).

In such runs the step logs, besides ``I_k`` (Eq. 8) over the whole batch, ``I_k`` over the samples
whose demonstration states the gold answer and over those whose demonstration states a wrong one
(:func:`gap_by_demonstration`), and writes one record per trained sample to ``feedback.jsonl``
(:func:`feedback_records`): the demonstration's truth, the sample's entropy gap, the teacher's
probability of the letter it is shown and of the gold letter, and two signals that need no gold
answer and might tell a right demonstration from a wrong one: the student's own prior
probability of the shown letter, and the share of the group's successes (as the verifier counted
them) that state it. ``pgpo.signal: agreement`` makes the latter PGPO's signal
(:func:`agreement_signal`).
"""

from __future__ import annotations

import functools
import random

import torch

from pgpo.information import weighted_entropy_gap
from pgpo.modulation import gap_per_token
from pgpo.train.config import TrainConfig
from pgpo.train.evaluation.exact import letter_probabilities, policy_network
from pgpo.train.models.distributed import World
from pgpo.train.tasks.data import Question
from pgpo.train.tasks.rewards import stated_answer, with_answer

# Where the teacher's letter probabilities are read: after the demonstrations' own answer tag.
ANSWER_PREFIX = "<answer>"


def misleading_feedback(cfg: TrainConfig) -> bool:
    """Some demonstrations may be wrong on purpose: a verifier with false positives or
    demonstrations with a swapped answer (the premise study's settings)."""
    return bool(cfg.reward.false_positive_rate or cfg.teacher.wrong_demo_share)


def misleading(demo: str, question: Question, task) -> str:
    """``demo`` with its answer replaced by a wrong one (``task``'s
    :meth:`~pgpo.train.tasks.Task.wrong_answer`: another option's letter, or another number;
    Python's seeded generator); unchanged when it states no answer in a tag or a box."""
    return with_answer(demo, task.wrong_answer(question, random)) or demo


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


def letter_signals(
    questions: list[Question], samples: list, teacher, student, tokenizer, batch: int,
    world: World | None = None,
) -> dict[str, list]:  # fmt: skip
    """Per sample, read after ``<answer>`` before the step's update
    (:func:`pgpo.train.evaluation.exact.letter_probabilities`): the teacher's probability, on the
    sample's teacher prompt, of the letter its demonstration states (``p_shown``) and of the gold
    letter (``p_gold``), and the student's probability of the shown letter on its own prompt
    (``p_student_shown``: a prior that needs no gold answer). Samples without a demonstration,
    or whose demonstration states no letter, get None."""
    per_question = len(samples) // len(questions)
    gold = [q.answer for q in questions for _ in range(per_question)]
    shown = [s.shown if s.shown else g for s, g in zip(samples, gold)]
    teacher_prompts = [s.teacher_prompt for s in samples]
    taught = letter_probabilities(
        functools.partial(teacher.hidden_and_head, student), tokenizer,
        teacher_prompts + teacher_prompts, shown + gold, ANSWER_PREFIX, batch, world,
    ).tolist()  # fmt: skip
    prior = letter_probabilities(
        policy_network(student), tokenizer, [s.student_prompt for s in samples], shown,
        ANSWER_PREFIX, batch, world,
    ).tolist()  # fmt: skip
    n = len(samples)
    has_letter = [bool(s.shown) for s in samples]  # None (no demo) and "" (no letter) are out
    return {
        "p_shown": [p if ok else None for p, ok in zip(taught[:n], has_letter)],
        "p_gold": [p if s.shown is not None else None for p, s in zip(taught[n:], samples)],
        "p_student_shown": [p if ok else None for p, ok in zip(prior, has_letter)],
    }


def success_agreement(
    texts: list[str],
    rewards: list[float],
    threshold: float,
    shown: str | None,
    stated=stated_answer,
) -> float | None:
    """The share of a group's successes (``rewards`` as the verifier gave them, at or above
    ``threshold``) whose answer, as ``stated`` reads it (a task's
    :meth:`~pgpo.train.tasks.Task.stated`), is ``shown``; None without a success or a shown
    answer."""
    answers = [stated(t) for t, r in zip(texts, rewards) if r >= threshold]
    return sum(a == shown for a in answers) / len(answers) if answers and shown else None


def agreement_signal(samples: list, world: World) -> tuple[float, bool]:
    """``pgpo.signal: agreement``'s I_k, over all ranks: the trained samples' mean
    :func:`success_agreement` (``Sample.agreement``) minus 1/2, in [-1/2, 1/2]; and whether any
    sample had one (else 0)."""
    values = [s.agreement for s in samples if s.trained and s.agreement is not None]
    total, count = world.sum([sum(values), len(values)])
    return (total / count - 0.5, True) if count else (0.0, False)


def feedback_records(
    questions: list[Question], verified, samples: list, gaps: list, signals: dict[str, list],
    threshold: float,
) -> list[dict]:  # fmt: skip
    """One row per trained sample (``samples`` in question order, ``len(samples) //
    len(questions)`` per question; ``verified``: the rollouts' true rewards ``[questions]
    [rollouts]``): the question's id, whether the rollout itself is correct, whether its
    demonstration states the gold answer, its entropy gap (nats), the :func:`letter_signals`
    and the group's :func:`success_agreement` with its demonstration's letter."""
    per_question = len(samples) // len(questions)
    rows = []
    for i, s in enumerate(samples):
        if not s.trained:
            continue
        k, j = divmod(i, per_question)
        rows.append({
            "question": questions[k].id,
            "correct": verified[k][j] >= threshold,
            "demo_right": s.demo_right,
            "gap": gaps[i],
            **{name: values[i] for name, values in signals.items()},
            "success_agreement": s.agreement,
        })  # fmt: skip
    return rows


def misleading_metrics(verified, rewards, samples: list, world: World, by_demo) -> dict:
    """Over all ranks: the verifier-free reward, the share of rollouts the verifier let through
    wrongly, the share of trained samples whose demonstration states a wrong answer, and I_k
    over the samples with a right demonstration and over those with a wrong one (None where a
    group is empty or I_k was not computed). ``by_demo``: the step's
    :func:`gap_by_demonstration` sums, over all ranks."""
    flat = [(v, r) for vs, rs in zip(verified, rewards) for v, r in zip(vs, rs)]
    demos = [s.demo_right for s in samples if s.trained]
    true_sum, flipped, count, wrong, trained = world.sum(
        [sum(v for v, _ in flat), sum(r != v for v, r in flat), len(flat),
         sum(not right for right in demos), len(demos)]
    )  # fmt: skip
    info_right, weight_right, info_wrong, weight_wrong = by_demo
    return {
        "reward_true": true_sum / count,
        "false_positive_share": flipped / count,
        "demo_wrong_share": wrong / trained if trained else 0.0,
        "info_demo_right": info_right / weight_right if weight_right else None,
        "info_demo_wrong": info_wrong / weight_wrong if weight_wrong else None,
    }


class PremiseRecord:
    """The premise study's record of one step, in runs with misleading feedback
    (:func:`misleading_feedback`): built before the update, it reads :func:`letter_signals`
    (step 3b); during it, :meth:`observe` takes each micro-batch's per-token entropies; after
    it, :meth:`metrics` gives :func:`misleading_metrics` and the step's
    :func:`feedback_records` (gathered over ranks, under ``"feedback"``). In other runs
    :func:`premise_record` gives :class:`NoRecord`, which records nothing."""

    def __init__(self, questions, verified, rewards, samples, teacher, student, tokenizer,
                 cfg: TrainConfig, world: World) -> None:  # fmt: skip
        self.questions, self.verified, self.rewards = questions, verified, rewards
        self.samples = samples
        self.threshold, self.world = cfg.teacher.success_threshold, world
        self.signals = letter_signals(questions, samples, teacher, student, tokenizer,
                                      cfg.loss.micro_batch, world)  # fmt: skip
        # This rank's (sum w gap, sum w) over right and over wrong demonstrations, and each
        # sample's gap (by the sample's identity: an update may hold a slice of the batch).
        self.by_demo = (0.0, 0.0, 0.0, 0.0)
        self.gaps: dict[int, float | None] = {}

    def observe(self, samples: list, h_student, h_teacher, info_weights, mask) -> None:
        """After a micro-batch of step 4 (``samples``), from its per-token entropies, Eq. 8's
        weights and its mask ``[B, T]``."""
        by_demo = gap_by_demonstration(h_student, h_teacher, info_weights,
                                       [s.demo_right for s in samples])  # fmt: skip
        self.by_demo = tuple(a + float(b) for a, b in zip(self.by_demo, by_demo))
        for sample, gap in zip(samples, sample_gaps(h_student, h_teacher, mask)):
            self.gaps[id(sample)] = gap

    def metrics(self) -> dict:
        """The step's premise metrics and records."""
        by_demo = self.world.sum(list(self.by_demo))
        out = misleading_metrics(self.verified, self.rewards, self.samples, self.world, by_demo)
        gaps = [self.gaps.get(id(s)) for s in self.samples]
        records = feedback_records(self.questions, self.verified, self.samples, gaps,
                                   self.signals, self.threshold)  # fmt: skip
        return {**out, "feedback": self.world.gather(records)}


class NoRecord:
    """A run without misleading feedback: no premise record."""

    def observe(self, *args) -> None:
        pass

    def metrics(self) -> dict:
        return {}


def premise_record(cfg: TrainConfig, *args) -> PremiseRecord | NoRecord:
    """:class:`PremiseRecord` (``args`` as its constructor's, after ``cfg``) in runs with
    misleading feedback, else :class:`NoRecord`."""
    if not misleading_feedback(cfg):
        return NoRecord()
    questions, verified, rewards, samples, teacher, student, tokenizer, world = args
    return PremiseRecord(questions, verified, rewards, samples, teacher, student, tokenizer,
                         cfg, world)  # fmt: skip
