"""Answer extraction and the 0/1 multiple-choice reward.

The reference reads the text after the last ``<answer>`` up to ``</answer>``; the PGPO paper's
template uses ``\\boxed{...}`` (braces may nest). Without either, the whole response is compared
(which is almost always wrong), as in the reference; ``leading_letter`` (config
``reward.leading_letter``) also accepts a response that opens with the option letter.
``reward.committed_letter`` reads instead the one option letter a response commits to, in the
forms small models write (``<answer>A: 73``, ``A: 73``, ``(A)``, ``<answer>A</answer>``), and
scores a response that names two letters, or none, as wrong.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
# "B:", "B)", "B.", "(B)" or "B" alone on the first line, opening a response (what small
# instruct models write); not "A cell ...": a capital followed by a space is a word.
_LEADING_LETTER = re.compile(r"\s*\(?([A-H])(?:[:).]|[ \t]*(?:\n|$))")


def answer_tags(text: str) -> list[re.Match]:
    """Every ``<answer>...</answer>`` tag of ``text``; a match's group 1 is its content."""
    return list(_ANSWER.finditer(text))


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, nested braces balanced; None if absent/unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    begin = i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
        i += 1
    return None


@dataclass(frozen=True)
class Extraction:
    """The answer read from a response, and whether it came from an ``<answer>`` tag."""

    answer: str
    has_answer_tag: bool


def extract_answer(response: str, *, leading_letter: bool = False) -> Extraction:
    """The last ``<answer>`` tag, else the last ``\\boxed{}``, else (with ``leading_letter``) an
    option letter opening the response as in "B: ..." or "B) ...", else the whole response."""
    tags = _ANSWER.findall(response)
    if tags:
        return Extraction(tags[-1].strip(), True)
    boxed = last_boxed(response)
    if boxed is not None:
        return Extraction(boxed.strip(), False)
    if leading_letter:
        match = _LEADING_LETTER.match(response)
        if match:
            return Extraction(match.group(1), False)
    return Extraction(response.strip(), False)


# An option letter that an answer commits to, where an answer starts (after <answer>, or at the
# start of a line): "A", "A:", "A)", "A." or "(A)". A bare letter must end its line or its tag:
# "A cell", "Apple" and "A, B" are words or lists, not a commitment; "73" names no letter.
_COMMITTED = re.compile(r"[ \t]*\(?([A-H])(?:[:).]|(?=[ \t]*(?:\n|</answer>|$)))")


def committed_letters(response: str) -> list[tuple[str, int]]:
    """Each option letter ``response`` commits to, with its character index: one read right
    after every ``<answer>`` and at the start of every line (where the forms of
    :data:`_COMMITTED` stand)."""
    starts = {m.end() for m in re.finditer("<answer>", response)}
    starts |= {0} | {m.end() for m in re.finditer("\n", response)}
    found = []
    for start in sorted(starts):
        match = _COMMITTED.match(response, start)
        if match:
            found.append((match.group(1), match.start(1)))
    return found


def committed_letter(response: str) -> str | None:
    """The one option letter ``response`` commits to; None when it commits to none, or to two
    different ones (copying every option line, or ``<answer>B: 8 <answer>A:``, names no answer)."""
    letters = {letter for letter, _ in committed_letters(response)}
    return letters.pop() if len(letters) == 1 else None


def stated_answer(text: str, *, committed: bool = False) -> str | None:
    """The answer ``text`` states, upper-cased, as the verifier reads it: :func:`extract_answer`'s
    (the reference's reading), or with ``committed`` the letter it commits to (None: none)."""
    if committed:
        return committed_letter(text)
    return extract_answer(text).answer.upper()


def reward(
    response: str, answer: str, *, leading_letter: bool = False, committed: bool = False
) -> float:
    """1.0 when the answer read from ``response`` is the answer letter (case-insensitive), else
    0.0. Read as the reference does (:func:`extract_answer`), or, with ``committed``
    (``reward.committed_letter``), as the one letter the response commits to
    (:func:`committed_letter`)."""
    if committed:
        return float(committed_letter(response) == answer.strip().upper())
    extracted = extract_answer(response, leading_letter=leading_letter).answer
    return float(extracted.upper() == answer.strip().upper())


def with_false_positives(
    rewards: list[list[float]], rate: float, rng: random.Random
) -> list[list[float]]:
    """A verifier with false positives: each reward below 1 becomes 1 with probability ``rate``
    (one uniform draw per such reward, in order), and a success is never turned into a failure.
    ``rewards``: ``[questions][rollouts]``, the same shape out."""
    if rate == 0:
        return [list(group) for group in rewards]
    return [[1.0 if r < 1 and rng.random() < rate else r for r in group] for group in rewards]


def with_answer(text: str, letter: str) -> str | None:
    """``text`` with the answer :func:`extract_answer` reads (the last ``<answer>`` tag, else the
    last ``\\boxed{}``) replaced by ``letter``, and nothing else changed; None when it has
    neither."""
    tags = answer_tags(text)
    if tags:
        last = tags[-1]
        return text[: last.start(1)] + letter + text[last.end(1) :]
    start = text.rfind("\\boxed{")
    if start >= 0 and last_boxed(text) is not None:
        begin = start + len("\\boxed{")
        return text[:begin] + letter + text[begin + len(last_boxed(text)) :]
    return None


def letter_span(text: str) -> tuple[int, int] | None:
    """The characters ``[start, end)`` of the option letter ``text`` commits to (its first
    occurrence; :func:`committed_letter`); None when it commits to no single letter."""
    letter = committed_letter(text)
    if letter is None:
        return None
    index = next(i for found, i in committed_letters(text) if found == letter)
    return index, index + 1


def answer_span(text: str) -> tuple[int, int] | None:
    """The characters ``[start, end)`` that give the answer: the last ``<answer>`` tag's content
    and its closing ``</answer>`` (to the text's end when unclosed); None without an
    ``<answer>``."""
    opening = text.rfind("<answer>")
    if opening < 0:
        return None
    start = opening + len("<answer>")
    end = text.find("</answer>", start)
    return start, len(text) if end < 0 else end + len("</answer>")


def strip_thinking(text: str) -> str:
    """Remove ``<think>...</think>`` blocks (demonstrations show the answer, not the thinking)."""
    return _THINK.sub("", text).strip()
