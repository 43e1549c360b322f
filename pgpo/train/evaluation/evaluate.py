"""A run's evaluation: avg@k of sampled answers (per question the mean reward over k samples,
then the mean over questions), or exact scores (:mod:`pgpo.train.evaluation.exact`), and the
teacher's edge. The ``run`` the functions take is a :class:`pgpo.train.run.Run`."""

from __future__ import annotations

from pgpo.train.evaluation.exact import (
    edge_report,
    edge_sums,
    exact_scores,
    p_correct,
    p_correct_taught,
)
from pgpo.train.rollout import RolloutEngine, prompt_seed
from pgpo.train.tasks import MultipleChoice, Task
from pgpo.train.tasks.data import Question
from pgpo.train.tasks.prompts import student_prompt
from pgpo.train.tasks.rewards import extract_answer


def evaluate(
    engine: RolloutEngine,
    tokenizer,
    questions: list[Question],
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    max_prompt_tokens: int,
    leading_letter: bool = False,
    seeds: list[int] | None = None,
    response_prefix: str = "",
    committed_letter: bool = False,
    task: Task | None = None,
) -> dict:
    """avg@k, format rate and question count of ``questions`` (k samples each; ``seeds``: one
    RNG seed per question, or None for the engine's own stream), each sample scored by ``task``
    (None: multiple choice read with ``leading_letter`` / ``committed_letter``)."""
    task = task or MultipleChoice(leading_letter, committed_letter)
    prompts = [student_prompt(tokenizer, q, max_prompt_tokens, response_prefix) for q in questions]
    completions = engine.generate(prompts, k, temperature, top_p, max_new_tokens, seeds)
    per_question, formatted = [], 0
    for q, group in zip(questions, completions):
        texts = [response_prefix + tokenizer.decode(c.tokens, skip_special_tokens=True)
                 for c in group]  # fmt: skip
        per_question.append(sum(task.score(q, t).score for t in texts) / k)
        formatted += sum(extract_answer(t).has_answer_tag for t in texts)
    return {
        "avg_at_k": sum(per_question) / len(per_question),
        "k": k,
        "questions": len(questions),
        "format_rate": formatted / (k * len(questions)),
    }


def evaluate_run(run, e) -> dict:
    """``run``'s evaluation under its ``eval`` settings ``e``: exact scores or avg@k on the
    test split, and with ``eval.edge_questions`` the teacher's edge."""
    result = exact_run(run, e) if e.mode == "exact" else sampled_run(run, e)
    if e.edge_questions:
        result.update(teacher_edge(run, e.edge_questions))
    return result


# Exact scores are computed by every rank on every question: under FSDP2 each forward is a
# collective, so all ranks must run the same ones (and the sums need no all-reduce).
def exact_run(run, e) -> dict:
    """Mean P(correct answer) over the test split, with its standard error (and, for multiple
    choice, the same given a letter, and the most likely letter's accuracy:
    pgpo.train.evaluation.exact)."""
    return exact_scores(run.policy, run.tokenizer, run.test_data.questions, e.answer_prefix,
                        run.cfg.rollout.max_prompt_tokens, e.per_question, run.task)  # fmt: skip


def teacher_edge(run, count: int) -> dict:
    """The teacher's paired edge on the first ``count`` training questions
    (pgpo.train.evaluation.exact), the current teacher network against the current policy."""
    questions = run.train_data.questions[:count]
    prefix, t = run.cfg.eval.answer_prefix, run.cfg.teacher
    p_s = p_correct(run.policy, run.tokenizer, questions, prefix,
                    run.cfg.rollout.max_prompt_tokens)  # fmt: skip
    p_t = p_correct_taught(run.teacher, run.policy, run.tokenizer, questions, prefix,
                           t.max_reprompt_tokens)  # fmt: skip
    report = edge_report(edge_sums(p_s, p_t))
    report.pop("has_edge")
    return report


def sampled_run(run, e) -> dict:
    """avg@k on the test split: each rank evaluates every size-th question, and the averages
    are combined by weight."""
    questions = run.test_data.questions
    mine = list(range(run.world.rank, len(questions), run.world.size))
    seeds = None
    if run.cfg.rollout.seed_per_prompt:
        seeds = [prompt_seed(run.cfg.seed, run.step, i, 1) for i in mine]
    result = evaluate(
        run.engine,
        run.tokenizer,
        [questions[i] for i in mine],
        e.n,
        e.temperature,
        e.top_p,
        e.max_new_tokens,
        run.cfg.rollout.max_prompt_tokens,
        run.cfg.reward.leading_letter,
        seeds,
        run.cfg.rollout.response_prefix,
        run.cfg.reward.committed_letter,
        run.task,
    )
    if run.world.distributed:
        count, score, formatted = run.world.sum(
            [
                result["questions"],
                result["avg_at_k"] * result["questions"],
                result["format_rate"] * result["questions"],
            ]
        )
        result.update(avg_at_k=score / count, format_rate=formatted / count, questions=int(count))
    return result
