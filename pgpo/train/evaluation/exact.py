"""Exact scores: the probability of the correct answer, read off the model instead of sampled.

``P(answer | prompt + prefix)`` is the product of the answer tokens' probabilities under teacher
forcing (``prefix``, e.g. ``<answer>``, is written for the model: the letter is scored where the
format puts it). Two uses:

- ``eval.mode: exact``: the mean over held-out questions of P(correct letter | student prompt),
  with its standard error; no sampling noise.
- the teacher's *edge*: on the same question, P(correct | teacher prompt with a demonstration)
  minus P(correct | student prompt), paired. SDPO can only teach what the solution-conditioned
  teacher knows that the student does not: with no edge there is nothing to distil.
  ``pgpo teacher-check`` measures it before training, and the trainer logs it at each evaluation.
"""

from __future__ import annotations

import functools
import math
import random

import torch

from pgpo.distill import head_token_logprobs
from pgpo.information import token_entropy
from pgpo.train.models.distributed import full
from pgpo.train.models.forward import Policy, head_weight
from pgpo.train.tasks import MultipleChoice, builtin_task
from pgpo.train.tasks.data import Question
from pgpo.train.tasks.prompts import student_prompt, teacher_prompt

BATCH = 8  # sequences per forward pass
# The smallest edge called one: a difference of a few thousandths can be many standard errors
# above 0 on 100 questions and still leave nothing worth distilling.
MIN_EDGE = 0.05


def gold_demonstration(question: Question) -> str:
    """The demonstration built from the reference answer (``teacher.fallback_demonstration:
    gold``'s format)."""
    return f"<answer>{question.answer}</answer>"


def answer_ids(tokenizer, prefix: str, answer: str) -> tuple[list[int], list[int]]:
    """``prefix + answer`` tokenized as the model writes it, split into what is given and what
    is scored: the tokens shared with ``prefix`` alone, and the rest (a token that merges the
    prefix's end with the answer, such as ``>B``, is scored: it is how the letter is written)."""
    both = tokenizer(prefix + answer, add_special_tokens=False)["input_ids"]
    first = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    shared = 0
    while shared < min(len(first), len(both) - 1) and first[shared] == both[shared]:
        shared += 1
    return both[:shared], both[shared:]


def answer_probabilities(
    policy: Policy, prompts: list[list[int]], answers: list[list[int]], pad: int
) -> torch.Tensor:
    """``P(answer_i | prompt_i)`` ``[B]`` in float64: exp of the summed log-probs of each answer's
    tokens, teacher-forced (prompts and answers are token ids)."""
    return answer_scores(policy, prompts, answers, pad)[0]


@torch.no_grad()
def answer_scores(
    policy: Policy,
    prompts: list[list[int]],
    answers: list[list[int]],
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P(answer_i | prompt_i)`` ``[B]`` (float64, as :func:`answer_probabilities`) and the
    entropy in nats ``[B]`` of the next-token distribution where the answer's first token is
    written (Eq. 8's per-token entropy, :func:`pgpo.information.token_entropy`)."""
    probs, entropies = [], []
    for start in range(0, len(prompts), BATCH):
        p, a = prompts[start : start + BATCH], answers[start : start + BATCH]
        hidden = policy(p, a, pad)
        head = full(head_weight(policy.lm)).to(hidden.dtype)
        probs.append(_answer_probability(hidden, head, a, pad))
        entropies.append(token_entropy(hidden[:, 0] @ head.T).cpu().double())
    return torch.cat(probs), torch.cat(entropies)


@torch.no_grad()
def option_probabilities(
    policy: Policy, prompts: list[list[int]], answers: list[list[int]], pad: int
) -> torch.Tensor:
    """:func:`answer_probabilities`, with one forward per distinct prompt for one-token answers:
    the next-token distribution after a prompt scores every one-token answer to it at once
    (each option's letter after ``<answer>``, where a forward per option would repeat the
    same prompt). Longer answers are teacher-forced as there. ``[B]`` float64."""
    out = torch.zeros(len(prompts), dtype=torch.float64)
    single: dict[tuple[int, ...], list[int]] = {}  # prompt -> rows with a one-token answer
    longer = []
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        (single.setdefault(tuple(prompt), []) if len(answer) == 1 else longer).append(row)
    distinct = list(single)
    for start in range(0, len(distinct), BATCH):
        chunk = distinct[start : start + BATCH]
        # a one-token stand-in answer: the hidden state that predicts it reads the prompt only
        hidden = policy([list(p) for p in chunk], [[pad]] * len(chunk), pad)
        head = full(head_weight(policy.lm)).to(hidden.dtype)
        rows = [single[p] for p in chunk]
        width = max(len(r) for r in rows)
        targets = torch.tensor(
            [[answers[r][0] for r in rs] + [pad] * (width - len(rs)) for rs in rows]
        )
        # [K, width]: prompt k's hidden state against each of its answers' tokens
        logp = head_token_logprobs(hidden[:, :1].expand(-1, width, -1), head, targets)
        for k, rs in enumerate(rows):
            out[rs] = logp[k, : len(rs)].cpu().double().exp()
    if longer:
        out[longer] = answer_probabilities(
            policy, [prompts[r] for r in longer], [answers[r] for r in longer], pad
        )
    return out


def _answer_probability(
    hidden: torch.Tensor, head: torch.Tensor, answers: list[list[int]], pad: int
) -> torch.Tensor:
    """``[B]`` float64: the product of each answer's token probabilities, from the hidden
    states ``[B, T, H]`` that predict them and the head ``[V, H]``."""
    width = max(len(x) for x in answers)
    targets = torch.tensor([x + [pad] * (width - len(x)) for x in answers])
    mask = torch.tensor([[1.0] * len(x) + [0.0] * (width - len(x)) for x in answers])
    logp = head_token_logprobs(hidden, head, targets).cpu().double()
    return (logp * mask.double()).sum(-1).exp()


@torch.no_grad()
def letter_probabilities(
    network, tokenizer, prompts: list[list[int]], letters: list[str], prefix: str, batch: int,
    world=None,
) -> torch.Tensor:  # fmt: skip
    """``P(letter_i | prompt_i + prefix)`` ``[B]`` (float64) under ``network``, a function
    ``(prompts, answers, pad) -> (hidden [B, T, H], head [V, H])`` whose logits are
    ``hidden @ head.T`` (a :class:`pgpo.train.models.teacher.Teacher`'s ``hidden_and_head`` with the
    student bound, or :func:`policy_network`). Each distinct (prompt, letter) pair is scored
    once, in forwards of ``batch`` sequences; under ``world`` (FSDP2) every rank runs as many
    forwards as the busiest, so that all run the same collectives."""
    pad = tokenizer.pad_token_id
    pairs = list(dict.fromkeys((tuple(p), letter) for p, letter in zip(prompts, letters)))
    seqs, answers = [], []
    for prompt, letter in pairs:
        first, ids = answer_ids(tokenizer, prefix, letter)
        seqs.append(list(prompt) + first)
        answers.append(ids)
    needed = -(-len(seqs) // batch)
    chunks = needed if world is None else int(world.max(needed))
    out = []
    for k in range(chunks):
        start = min(k, needed - 1) * batch  # a rank with fewer chunks repeats its last one
        a = answers[start : start + batch]
        hidden, head = network(seqs[start : start + batch], a, pad)
        if k < needed:
            out.append(_answer_probability(hidden, head, a, pad))
    probability = dict(zip(pairs, torch.cat(out).tolist()))
    return torch.tensor(
        [probability[(tuple(p), letter)] for p, letter in zip(prompts, letters)],
        dtype=torch.float64,
    )


def policy_network(policy: Policy):
    """``policy`` as :func:`letter_probabilities`' ``network``."""

    def network(prompts: list[list[int]], answers: list[list[int]], pad: int):
        hidden = policy(prompts, answers, pad)
        return hidden, full(head_weight(policy.lm)).to(hidden.dtype)

    return network


def p_correct(
    policy: Policy, tokenizer, questions: list[Question], prefix: str, max_prompt_tokens: int
) -> torch.Tensor:
    """P(correct letter | student prompt + prefix) per question ``[n]``."""
    prompts, answers = [], []
    for q in questions:
        first, letter = answer_ids(tokenizer, prefix, q.answer)
        prompts.append(student_prompt(tokenizer, q, max_prompt_tokens) + first)
        answers.append(letter)
    return answer_probabilities(policy, prompts, answers, tokenizer.pad_token_id)


def exact_per_question(
    policy: Policy,
    tokenizer,
    questions: list[Question],
    prefix: str,
    max_prompt_tokens: int,
    task=None,
) -> dict[str, torch.Tensor]:
    """Per question ``[n]`` (float64): P(correct answer | student prompt + prefix), its tokens
    teacher-forced, summed over the task's right candidates (:meth:`Task.candidates`: one
    option letter; a number with and without a leading space). For multiple choice (``task``
    None, or one whose candidates include wrong answers) also the same conditional on answering
    with one of the options' letters (P(correct) / sum of the options' P), which format alone
    cannot raise, and whether the most likely letter is the correct one (1 or 0); every option
    of every question is scored (:func:`option_probabilities`)."""
    from pgpo.train.tasks.data import option_letters

    prompts, answers, owners = [], [], []
    for i, q in enumerate(questions):
        base = student_prompt(tokenizer, q, max_prompt_tokens)
        for answer in option_letters(q.prompt) if task is None else task.candidates(q):
            first, ids = answer_ids(tokenizer, prefix, answer)
            prompts.append(base + first)
            answers.append(ids)
            right = answer == q.answer if task is None else task.stated(answer) == q.answer
            owners.append((i, right))
    p = option_probabilities(policy, prompts, answers, tokenizer.pad_token_id)
    correct, given_letter, best = [], [], []
    for i in range(len(questions)):
        rows = [j for j, (owner, _) in enumerate(owners) if owner == i]
        right = [j for j in rows if owners[j][1]]
        total, p_right = float(p[rows].sum()), float(p[right].sum())
        correct.append(p_right)
        given_letter.append(p_right / total if total > 0 else 0.0)
        best.append(float(owners[max(rows, key=lambda j: float(p[j]))][1]))
    choices = not all(right for _, right in owners)  # some answer to choose against
    scores = (("p_correct", correct), ("p_correct_given_letter", given_letter),
              ("letter_accuracy", best))  # fmt: skip
    return {name: torch.tensor(values, dtype=torch.float64)
            for name, values in scores[: 3 if choices else 1]}  # fmt: skip


def exact_scores(
    policy: Policy,
    tokenizer,
    questions: list[Question],
    prefix: str,
    max_prompt_tokens: int,
    per_question: bool = False,
    task=None,
) -> dict:
    """``eval.mode: exact`` on ``questions``: the means of :func:`exact_per_question`, each
    with its standard error; with ``per_question``, also each question's scores
    (``per_question``: name -> list)."""
    out: dict = {"questions": len(questions)}
    scores = exact_per_question(policy, tokenizer, questions, prefix, max_prompt_tokens, task)
    for name, x in scores.items():
        out[name], out[f"{name}_se"] = mean_and_se((len(x), float(x.sum()), float((x * x).sum())))
    if per_question:
        out["per_question"] = {name: x.tolist() for name, x in scores.items()}
    return out


def p_correct_taught(
    teacher,
    student: Policy,
    tokenizer,
    questions: list[Question],
    prefix: str,
    max_reprompt_tokens: int,
    demonstrations: list[str] | None = None,
) -> torch.Tensor:
    """P(correct answer | teacher prompt with a demonstration + prefix) per question ``[n]``,
    as the loss sees the teacher: through :meth:`pgpo.train.models.teacher.Teacher.hidden_and_head`,
    its temperature and (trust region) its blend with ``student`` applied there. The gold
    demonstration unless ``demonstrations`` are given."""
    prompts = []
    for i, q in enumerate(questions):
        demo = gold_demonstration(q) if demonstrations is None else demonstrations[i]
        prompts.append(teacher_prompt(tokenizer, q, demo, max_reprompt_tokens))
    network = functools.partial(teacher.hidden_and_head, student)
    return letter_probabilities(network, tokenizer, prompts, [q.answer for q in questions],
                                prefix, BATCH)  # fmt: skip


def mean_and_se(sums: tuple[float, float, float]) -> tuple[float, float]:
    """Mean and standard error from (n, sum x, sum x^2)."""
    n, s, s2 = sums
    mean = s / n
    var = max(s2 - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def edge_sums(p_student: torch.Tensor, p_teacher: torch.Tensor) -> list[float]:
    """(n, sum p_S, sum p_T, sum d, sum d^2) with ``d = p_T - p_S``."""
    d = p_teacher - p_student
    return [len(d), float(p_student.sum()), float(p_teacher.sum()), float(d.sum()),
            float((d * d).sum())]  # fmt: skip


def edge_report(sums: list[float]) -> dict:
    """The paired edge from :func:`edge_sums`, with its verdict: *edge*
    when the mean difference is more than 2 standard errors above 0 and at least
    :data:`MIN_EDGE`."""
    n, s_student, s_teacher, s_d, s_d2 = sums
    edge, se = mean_and_se((n, s_d, s_d2))
    return {
        "p_student": s_student / n,
        "p_teacher": s_teacher / n,
        "teacher_edge": edge,
        "teacher_edge_se": se,
        "edge_questions": int(n),
        "has_edge": bool(edge > 2 * se and edge >= MIN_EDGE),
    }


def _starting_model(cfg, count: int):
    """A config's first ``count`` training questions, their source, the tokenizer and the
    starting model (student and teacher are then the same weights)."""
    from pgpo.train.models.model import load_model, load_tokenizer
    from pgpo.train.tasks.data import load_split, split_specs

    d = cfg.data
    train_spec, _ = split_specs(d.train, d.test, d.sciknoweval, d.domain)
    data = load_split(train_spec, "train", cfg.seed, d.skip_bad_rows, d.max_train,
                      builtin_task(cfg))  # fmt: skip
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    policy = Policy(load_model(cfg.model, cfg.seed)).eval()
    return data.questions[:count], data.source, tokenizer, policy


def teacher_check(cfg, count: int, prefix: str) -> dict:
    """The edge of a config's starting model (student and teacher are then the same weights)
    on its first ``count`` training questions, before any training (``pgpo teacher-check``);
    the teacher at ``teacher.temperature``, as the loss sees it."""
    from pgpo.train.models.teacher import Teacher

    questions, source, tokenizer, policy = _starting_model(cfg, count)
    t = cfg.teacher
    p_s = p_correct(policy, tokenizer, questions, prefix, cfg.rollout.max_prompt_tokens)
    # Before training every teacher mode is the starting weights (a trust region's blend of two
    # equal networks too): the live teacher at the run's temperature is that teacher.
    teacher = Teacher(policy, "live", 0.0, temperature=t.temperature)
    p_t = p_correct_taught(teacher, policy, tokenizer, questions, prefix, t.max_reprompt_tokens)
    return {**edge_report(edge_sums(p_s, p_t)), "prefix": prefix, "source": source,
            "teacher_temperature": t.temperature}  # fmt: skip


def edge_lines(report: dict) -> list[str]:
    """What ``pgpo teacher-check`` prints: the two probabilities, the edge and a verdict."""
    n, prefix = report["edge_questions"], report["prefix"]
    edge, se = report["teacher_edge"], report["teacher_edge_se"]
    if report["has_edge"]:
        verdict = (
            "edge: the teacher, shown the answer, gives it more probability than the student; "
            "self-distillation has something to pass on"
        )
    else:
        why = (
            f"{edge:+.3f} is above 0 but below {MIN_EDGE:g}"
            if edge > 2 * se
            else "the teacher is not reliably more likely to give the right answer"
        )
        verdict = (
            f"no edge: {why}; self-distillation has little or nothing to pass on (try a format "
            "the teacher copies from its demonstration, or a warm start)"
        )
    shown = "its prompt shows the gold answer"
    if report.get("teacher_temperature", 1) != 1:  # the teacher as the loss sees it
        shown += f"; at temperature {report['teacher_temperature']:g}"
    return [
        f"teacher-check: {n} training questions of {report['source']}, scored at the answer "
        f"letter after {prefix!r}",
        f"  student P(correct)  {report['p_student']:.3f}",
        f"  teacher P(correct)  {report['p_teacher']:.3f}  ({shown})",
        f"  edge                {report['teacher_edge']:+.3f} +- {report['teacher_edge_se']:.3f}"
        "  (paired difference, 1 standard error)",
        f"verdict: {verdict}",
    ]


def wrong_letter(question: Question, seed: int, task=None) -> str:
    """A wrong answer for ``question`` (``task``'s; None: another option's letter), drawn by a
    generator seeded by (seed, id)."""
    return (task or MultipleChoice()).wrong_answer(question, random.Random(f"{seed}:{question.id}"))


def _paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``a - b`` over questions and its standard error."""
    d = (a - b).double()
    return mean_and_se((len(d), float(d.sum()), float((d * d).sum())))


def wrong_demo_check(cfg, count: int, prefix: str) -> dict:
    """Does the teacher mark a misleading demonstration? On a config's first ``count`` training
    questions, the starting model as teacher, shown the gold answer and shown a wrong option's
    (``pgpo teacher-check --wrong-demo``), both written ``<answer>X</answer>``:

    - ``entropy_gold``, ``entropy_wrong``: its entropy where the letter is written (nats);
      ``gap_right_minus_wrong`` = entropy_wrong - entropy_gold is Eq. 8's I for a sample with a
      right demonstration minus I for the same sample with a wrong one (the student's entropy is
      the same in both and cancels): the premise that a high I marks informative feedback needs
      it above 0;
    - ``p_shown_gold``, ``p_shown_wrong``: its probability of the letter it is shown (copying);
    - ``p_gold_given_wrong``: of the gold letter when shown a wrong one (what it knows anyway);
    - ``p_student``: the student's probability of the gold letter, for scale.
    Every mean comes with its standard error over questions (paired where it is a difference)."""
    questions, source, tokenizer, policy = _starting_model(cfg, count)
    pad, limit = tokenizer.pad_token_id, cfg.teacher.max_reprompt_tokens
    wrong = [wrong_letter(q, cfg.seed, builtin_task(cfg)) for q in questions]

    def taught(demos: list[str], letters: list[str]):
        prompts, answers = [], []
        for q, demo, letter in zip(questions, demos, letters):
            first, ids = answer_ids(tokenizer, prefix, letter)
            prompts.append(teacher_prompt(tokenizer, q, f"<answer>{demo}</answer>", limit) + first)
            answers.append(ids)
        return answer_scores(policy, prompts, answers, pad)

    gold = [q.answer for q in questions]
    p_gold, h_gold = taught(gold, gold)  # shown gold, scored at gold
    p_gold_w, h_wrong = taught(wrong, gold)  # shown wrong, scored at gold
    p_shown_w, _ = taught(wrong, wrong)  # shown wrong, scored at the shown letter
    p_student = p_correct(policy, tokenizer, questions, prefix, cfg.rollout.max_prompt_tokens)
    zero = torch.zeros_like(p_gold)
    out = {"questions": len(questions), "prefix": prefix, "source": source}
    for name, a, b in (
        ("gap_right_minus_wrong", h_wrong, h_gold), ("entropy_gold", h_gold, zero),
        ("entropy_wrong", h_wrong, zero), ("p_shown_gold", p_gold, zero),
        ("p_shown_wrong", p_shown_w, zero), ("p_gold_given_wrong", p_gold_w, zero),
        ("p_student", p_student, zero),
    ):  # fmt: skip
        out[name], out[f"{name}_se"] = _paired(a, b)
    return out


def wrong_demo_lines(report: dict) -> list[str]:
    """What ``pgpo teacher-check --wrong-demo`` prints."""
    r = report
    gap, se = r["gap_right_minus_wrong"], r["gap_right_minus_wrong_se"]
    if gap > 2 * se:
        verdict = "less sure when shown a wrong answer: a higher I_k marks a right demonstration"
    elif gap < -2 * se:
        verdict = "MORE sure when shown a wrong answer: a higher I_k marks a wrong demonstration"
    else:
        verdict = "as sure either way: I_k does not tell a right demonstration from a wrong one"
    line = lambda label, key: f"  {label:36s}{r[key]:.3f} +- {r[key + '_se']:.3f}"  # noqa: E731
    return [
        f"teacher-check --wrong-demo: {r['questions']} training questions of {r['source']}, "
        f"at the answer letter after {r['prefix']!r}",
        line("teacher entropy, shown the gold", "entropy_gold") + " nats",
        line("teacher entropy, shown a wrong one", "entropy_wrong") + " nats",
        f"  I(right demo) - I(wrong demo)       {gap:+.3f} +- {se:.3f} nats (paired)",
        line("P(shown letter), shown the gold", "p_shown_gold"),
        line("P(shown letter), shown a wrong one", "p_shown_wrong"),
        line("P(gold letter), shown a wrong one", "p_gold_given_wrong"),
        line("student P(gold letter)", "p_student"),
        f"verdict: the teacher is {verdict}",
    ]
