"""Chat prompts for the student and the solution-conditioned self-teacher."""

from __future__ import annotations

from pgpo.train.tasks.data import SYSTEM_PROMPT, Question
from pgpo.train.tasks.rewards import answer_span, letter_span

SOLUTION = "\nCorrect solution:\n\n{solution}"
# Environment feedback on the sample's own failed attempt (teacher.feedback), in the wording of
# SDPO's reference and TRL.
FEEDBACK = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}\n\n"
REPROMPT = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."


def messages(question: Question, user: str | None = None) -> list[dict]:
    system = question.system if question.system is not None else SYSTEM_PROMPT
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": question.prompt if user is None else user},
    ]


def teacher_messages(
    question: Question, demonstration: str | None, feedback: str | None = None
) -> list[dict]:
    """The reprompt: question + 'Correct solution:' + demonstration (None: no solution) +
    the feedback on the attempt (None: none) + instruction."""
    user = REPROMPT.format(
        prompt=question.prompt,
        solution="" if demonstration is None else SOLUTION.format(solution=demonstration),
        feedback="" if feedback is None else FEEDBACK.format(feedback=feedback),
    )
    return messages(question, user)


def chat_text(tokenizer, msgs: list[dict]) -> str:
    """The chat template's text with a generation prompt and thinking disabled."""
    return tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )


def render(tokenizer, msgs: list[dict]) -> list[int]:
    """Token ids of :func:`chat_text`."""
    return tokenizer(chat_text(tokenizer, msgs), add_special_tokens=False)["input_ids"]


def prefixed(tokenizer, ids: list[int], response_prefix: str) -> list[int]:
    """A prompt followed by the start of the response written for the model
    (``rollout.response_prefix``)."""
    if not response_prefix:
        return ids
    return ids + tokenizer(response_prefix, add_special_tokens=False)["input_ids"]


def student_prompt(
    tokenizer, question: Question, max_tokens: int, response_prefix: str = ""
) -> list[int]:
    ids = render(tokenizer, messages(question))
    if len(ids) > max_tokens:  # keep the end: the question's options and the generation prompt
        ids = ids[-max_tokens:]
    return prefixed(tokenizer, ids, response_prefix)


def teacher_prompt(
    tokenizer,
    question: Question,
    demonstration: str | None,
    max_tokens: int,
    response_prefix: str = "",
    feedback: str | None = None,
) -> list[int]:
    """The reprompt: question + 'Correct solution:' + demonstration + feedback + instruction
    (:func:`teacher_messages`). When too long, the demonstration is cut (not the instruction,
    which the reference's right truncation can lose)."""
    ids = _reprompt(tokenizer, question, demonstration, max_tokens, feedback)
    return prefixed(tokenizer, ids, response_prefix)


def _reprompt(
    tokenizer, question: Question, demonstration: str | None, max_tokens: int, feedback
) -> list[int]:
    def build(demo: str | None) -> list[int]:
        return render(tokenizer, teacher_messages(question, demo, feedback))

    ids = build(demonstration)
    if len(ids) <= max_tokens or demonstration is None:
        return ids[-max_tokens:]
    demo_ids = tokenizer(demonstration, add_special_tokens=False)["input_ids"]
    keep = max(0, len(demo_ids) - (len(ids) - max_tokens))
    ids = build(tokenizer.decode(demo_ids[:keep]))
    return ids[-max_tokens:] if len(ids) > max_tokens else ids


def answer_tokens(tokenizer, response: list[int], response_prefix: str = "") -> tuple[int, int]:
    """The response tokens ``[first, last)`` that write the answer: those overlapping the last
    ``<answer>`` tag's content and its closing tag in ``response_prefix`` + the decoded
    response. The whole response ``(0, len(response))`` when it has no such tag, so that the
    format is still learned."""
    text = response_prefix + tokenizer.decode(response, skip_special_tokens=True)
    return span_tokens(tokenizer, response, response_prefix, answer_span(text))


def letter_tokens(
    tokenizer, response: list[int], response_prefix: str = "", answer_span=letter_span
) -> tuple[int, int]:
    """The response tokens ``[first, last)`` that write the answer itself: the option letter the
    response commits to (:func:`~pgpo.train.tasks.rewards.letter_span`), or what a task's
    ``answer_span`` finds (a number); :func:`answer_tokens` when there is none."""
    text = response_prefix + tokenizer.decode(response, skip_special_tokens=True)
    span = answer_span(text)
    if span is None or span[1] <= len(response_prefix):  # none, or written for the model
        return answer_tokens(tokenizer, response, response_prefix)
    return span_tokens(tokenizer, response, response_prefix, span)


def trained_tokens(
    tokenizer, response: list[int], response_prefix: str, positions: str, answer_span=letter_span
) -> tuple[int, int]:
    """The response tokens ``[first, last)`` that ``loss.positions`` trains (``letter``: those
    of ``answer_span``, the task's reading of the answer)."""
    if positions == "letter":
        return letter_tokens(tokenizer, response, response_prefix, answer_span)
    if positions == "answer":
        return answer_tokens(tokenizer, response, response_prefix)
    return 0, len(response)


def span_tokens(
    tokenizer, response: list[int], response_prefix: str, span: tuple[int, int] | None
) -> tuple[int, int]:
    """The response tokens ``[first, last)`` that overlap the characters ``span`` of
    ``response_prefix`` + the decoded response; the whole response when ``span`` is None or no
    token overlaps it. A token's characters are found by decoding the response's prefixes (a
    binary search: O(log T) decodes)."""
    if span is None:
        return 0, len(response)

    def chars_before(i: int) -> int:  # characters written before token i
        return len(response_prefix) + len(tokenizer.decode(response[:i], skip_special_tokens=True))

    def first_index(pred) -> int:  # the least i in [0, T] with pred(i), pred monotone
        low, high = 0, len(response)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if pred(mid) else (mid + 1, high)
        return low

    first = first_index(lambda i: chars_before(i + 1) > span[0])  # ends past the start
    last = first_index(lambda i: chars_before(i) >= span[1])  # starts at or past the end
    return (first, last) if first < last else (0, len(response))
