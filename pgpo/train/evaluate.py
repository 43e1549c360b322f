"""avg@k: per question the mean reward over k samples, then the mean over questions."""

from __future__ import annotations

from pgpo.train.data import Question
from pgpo.train.prompts import student_prompt
from pgpo.train.rewards import extract_answer
from pgpo.train.rollout import RolloutEngine
from pgpo.train.tasks import MultipleChoice, Task


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
