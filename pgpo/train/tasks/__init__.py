"""Tasks: what the trainer needs to know about a kind of question, in one place.

A task says
- how a data row's answer is checked and written (:meth:`Task.gold`), and the system prompt of a
  row that brings none (:attr:`Task.system`);
- the reward of a response, a score in [0, 1] with optional feedback text that says why an
  attempt failed (:meth:`Task.score`; ``teacher.feedback`` puts it in the teacher's prompt);
- the answer a text states and where it stands (:meth:`Task.stated`, :meth:`Task.answer_span`),
  which demonstrations, the premise study and ``loss.positions: letter`` read;
- the answers exact evaluation teacher-forces (:meth:`Task.candidates`): every option's letter,
  or the gold number as written with and without a leading space.

Two are built in (``task: multiple_choice`` and ``task: numeric``). ``reward.function`` replaces a
task's reward with the user's own Python, named in their own config (:class:`UserReward`, built
by :func:`task_of`); nothing read from data, checkpoints or exports is ever run.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from pgpo.train.tasks.data import NUMERIC_SYSTEM, DataError, Question, check_letter, option_letters
from pgpo.train.tasks.rewards import answer_tags, last_boxed, letter_span, reward, stated_answer


@dataclass(frozen=True)
class Scored:
    """A response's reward: ``score`` in [0, 1], and what went wrong in words (None: nothing to
    say)."""

    score: float
    feedback: str | None = None


class RewardError(ValueError):
    """A reward function that raised or returned something other than a score in [0, 1]; the
    message names the function and the row."""


class Task:
    """The interface; :class:`MultipleChoice` and :class:`Numeric` implement it."""

    name = ""
    system: str | None = None  # the system prompt of a row without one; None: SYSTEM_PROMPT

    def gold(self, answer, where: str, prompt: str) -> str:
        """A data row's answer, checked (``DataError`` naming ``where`` if unusable), as the
        task writes it."""
        raise NotImplementedError

    def score(self, question: Question, response: str) -> Scored:
        """The reward of ``response`` (the prefix written for the model included)."""
        raise NotImplementedError

    def stated(self, text: str) -> str | None:
        """The answer ``text`` states, written as :meth:`gold` writes answers; None: none."""
        raise NotImplementedError

    def answer_span(self, text: str) -> tuple[int, int] | None:
        """The characters ``[start, end)`` of the answer ``text`` states; None: none."""
        raise NotImplementedError

    def candidates(self, question: Question) -> list[str]:
        """The answers exact evaluation scores, the gold one among them (written as it may
        follow the prefix: :meth:`stated` reads each one right or wrong)."""
        raise NotImplementedError

    def wrong_answer(self, question: Question, rng: random.Random) -> str:
        """A wrong answer to ``question`` (misleading demonstrations of the premise study)."""
        raise NotImplementedError


class MultipleChoice(Task):
    """One option letter. The reward is 1 for the gold letter, read as the reference reads it
    (the last ``<answer>`` tag, else the last ``\\boxed{}``; ``leading_letter``: also a response
    opening with the letter), or with ``committed`` as the one letter a response commits to
    (:func:`pgpo.train.tasks.rewards.committed_letter`); no feedback."""

    name = "multiple_choice"

    def __init__(self, leading_letter: bool = False, committed: bool = False) -> None:
        self.leading_letter, self.committed = leading_letter, committed

    def gold(self, answer, where: str, prompt: str) -> str:
        return check_letter(answer, where, prompt)

    def score(self, question: Question, response: str) -> Scored:
        return Scored(reward(response, question.answer, leading_letter=self.leading_letter,
                             committed=self.committed))  # fmt: skip

    def stated(self, text: str) -> str | None:
        return stated_answer(text, committed=self.committed)

    def answer_span(self, text: str) -> tuple[int, int] | None:
        return letter_span(text)

    def candidates(self, question: Question) -> list[str]:
        return list(option_letters(question.prompt))

    def wrong_answer(self, question: Question, rng: random.Random) -> str:
        return rng.choice([x for x in option_letters(question.prompt) if x != question.answer])


# A number as people write it: a sign, digits with or without thousands separators ("1,000" or
# LaTeX's "1{,}000"), a decimal part, an exponent ("1e3").
_NUMBER = re.compile(
    r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][+-]?\d+)?|[+-]?\.\d+(?:[eE][+-]?\d+)?"
)


def parse_number(text: str) -> Decimal | None:
    """The number ``text`` is, exactly (a :class:`~decimal.Decimal`), or None. Accepted: a
    sign, thousands separators (``1,000``, ``1{,}000``), decimals, scientific notation, and
    around it whitespace, ``$...$`` and a closing period; nothing else (``12 apples`` is not a
    number)."""
    s = text.strip().replace("{,}", ",")
    if len(s) >= 2 and s[0] == s[-1] == "$":
        s = s[1:-1].strip()
    s = s.removesuffix(".") if not s.endswith("..") else s
    if not _NUMBER.fullmatch(s):
        return None
    try:
        value = Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def number_text(value: Decimal) -> str:
    """``value`` written plainly: no exponent, no trailing zeros, no sign on zero (``1e3`` ->
    ``1000``, ``2.50`` -> ``2.5``)."""
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _answer_region(text: str) -> tuple[int, int]:
    """The characters of what ``text`` gives as its answer: the last ``<answer>`` tag's content
    (when that tag is the last and unclosed, the rest of its line: a response that wrote its
    answer and went on without closing the tag, or was cut short), else the last
    ``\\boxed{}``'s, else (no tag, no box) the whole text."""
    tags = answer_tags(text)
    opening = text.rfind("<answer>")
    if opening >= 0 and (not tags or tags[-1].start() < opening):
        start = opening + len("<answer>")
        end = text.find("\n", start)
        return start, len(text) if end < 0 else end
    if tags:
        return tags[-1].start(1), tags[-1].end(1)
    start = text.rfind("\\boxed{")
    content = last_boxed(text)
    if start >= 0 and content is not None:
        begin = start + len("\\boxed{")
        return begin, begin + len(content)
    return 0, len(text)


class Numeric(Task):
    """A number, compared as a number (``1000``, ``1e3``, ``1,000`` and ``1000.0`` are equal;
    :func:`parse_number`), read from the last ``<answer>`` tag (an unclosed last one: the rest
    of its line), else the last ``\\boxed{}`` (braces may nest), else the whole response; what
    is read must be a number and nothing else (``<answer>25 + 61 = 86`` states none). A wrong
    answer's feedback says which way it is off ("Your answer 57 is too small."); a response
    with no number says that."""

    name = "numeric"
    system = NUMERIC_SYSTEM

    def gold(self, answer, where: str, prompt: str) -> str:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: answer must be a number, got {answer!r}")
        value = parse_number(str(answer))
        if value is None:
            raise DataError(f"{where}: answer must be a number, got {answer!r}")
        return number_text(value)

    def score(self, question: Question, response: str) -> Scored:
        stated = self.stated(response)
        if stated is None:
            return Scored(0.0, "Your response gives no number as its answer.")
        got, gold = Decimal(stated), Decimal(question.answer)
        if got == gold:
            return Scored(1.0)
        return Scored(0.0, f"Your answer {stated} is too {'small' if got < gold else 'large'}.")

    def stated(self, text: str) -> str | None:
        start, end = _answer_region(text)
        value = parse_number(text[start:end])
        return None if value is None else number_text(value)

    def answer_span(self, text: str) -> tuple[int, int] | None:
        start, end = _answer_region(text)
        if parse_number(text[start:end]) is None:
            return None
        inner = text[start:end]
        lead = len(inner) - len(inner.lstrip())
        return start + lead, start + len(inner.rstrip())

    def candidates(self, question: Question) -> list[str]:
        """The gold number as it may be written right after the prefix: as it is, and after a
        space (``<answer> 78``); exact evaluation adds their probabilities."""
        return [question.answer, f" {question.answer}"]

    def wrong_answer(self, question: Question, rng: random.Random) -> str:
        return number_text(Decimal(question.answer) + rng.choice((-2, -1, 1, 2)))


# A user's reward: fn(prompt, response, row) -> float | (float, feedback)
RewardFunction = Callable[[str, str, dict], object]


def load_function(spec: str) -> RewardFunction:
    """The callable ``spec`` names: ``path/to/file.py:name`` or ``package.module:name``.
    ``ValueError`` in one line when the file, module or name is missing or not callable."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"reward.function: expected path/to/file.py:name or module:name, "
                         f"got {spec!r}")  # fmt: skip
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise ValueError(f"reward.function: {path} is not a file")
            module_name = f"pgpo_user_reward.{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up here
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as err:  # the user's module failed to import: its own error, one line
        raise ValueError(f"reward.function {spec}: importing it raised {type(err).__name__}: "
                         f"{err}") from None  # fmt: skip
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward.function: {where} has no function {name!r}")
    return fn


class UserReward(Task):
    """``task`` with its reward replaced by the user's function ``fn(prompt, response, row)``
    (``prompt``: the question's user message; ``row``: its data row), which returns a score in
    [0, 1] or ``(score, feedback)``. Anything else stops the run: :class:`RewardError`."""

    def __init__(self, task: Task, fn: RewardFunction, spec: str) -> None:
        self.task, self.fn, self.spec = task, fn, spec
        self.name, self.system = task.name, task.system

    def score(self, question: Question, response: str) -> Scored:
        where = f"reward.function {self.spec} on row {question.id!r}"
        try:
            out = self.fn(question.prompt, response, question.data_row())
        except Exception as err:  # the user's code: its failure is reported, not a traceback
            raise RewardError(f"{where} raised {type(err).__name__}: {err}") from None
        value, feedback = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(f"{where} returned {out!r}: expected a number in [0, 1] or "
                              "(number, feedback text)")  # fmt: skip
        if not (feedback is None or isinstance(feedback, str)):
            raise RewardError(f"{where} returned feedback {feedback!r}: expected text or None")
        value = float(value)
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise RewardError(f"{where} returned {value!r}: a reward must be in [0, 1]")
        return Scored(value, feedback)

    def gold(self, answer, where: str, prompt: str) -> str:
        return self.task.gold(answer, where, prompt)

    def stated(self, text: str) -> str | None:
        return self.task.stated(text)

    def answer_span(self, text: str) -> tuple[int, int] | None:
        return self.task.answer_span(text)

    def candidates(self, question: Question) -> list[str]:
        return self.task.candidates(question)

    def wrong_answer(self, question: Question, rng: random.Random) -> str:
        return self.task.wrong_answer(question, rng)


def builtin_task(cfg) -> Task:
    """The task a config names (``task``), with its reward settings; no user code."""
    if cfg.task == "numeric":
        return Numeric()
    return MultipleChoice(cfg.reward.leading_letter, cfg.reward.committed_letter)


def task_of(cfg) -> Task:
    """The config's task, its reward replaced by ``reward.function`` when one is named (the
    user's own code, loaded here)."""
    task = builtin_task(cfg)
    if cfg.reward.function:
        return UserReward(task, load_function(cfg.reward.function), cfg.reward.function)
    return task
