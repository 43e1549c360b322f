"""The demo's task: 'which option is the largest number?', four two-digit options.

Records use Science Q&A's layout (prompt, answer letter, system prompt; ``<answer>X</answer>``
output), so the trainer reads them with :func:`pgpo.train.data.load_jsonl`. Generated from a
seed; the held-out split shares no option set with the training split.
"""

from __future__ import annotations

import random
from pathlib import Path

from pgpo.cli_util import json_text
from pgpo.train.data import LETTERS, Question

SYSTEM = "Give the letter of the correct option inside <answer>...</answer>."
QUESTION = "Which option is the largest number?"


def answer_text(letter: str) -> str:
    """The response the format asks for."""
    return f"<answer>{letter}</answer>"


def make_question(rng: random.Random, index: str) -> tuple[Question, tuple[int, ...]]:
    values = tuple(rng.sample(range(10, 100), 4))
    lines = "\n".join(f"{LETTERS[i]}: {v}" for i, v in enumerate(values))
    prompt = f"{QUESTION}\n\n{lines}\n\nAnswer with the letter."
    return Question(index, prompt, LETTERS[values.index(max(values))], SYSTEM), values


def make_splits(n_train: int, n_test: int, seed: int) -> tuple[list[Question], list[Question]]:
    """Disjoint train and test questions (no option set appears in both)."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    splits: list[list[Question]] = [[], []]
    for split, n in ((1, n_test), (0, n_train)):  # test first: its size never changes
        while len(splits[split]) < n:
            q, values = make_question(rng, f"{'train' if split == 0 else 'test'}-{seed}-")
            if values in seen:
                continue
            seen.add(values)
            splits[split].append(
                Question(f"{q.id}{len(splits[split])}", q.prompt, q.answer, q.system)
            )
    return splits[0], splits[1]


def write_jsonl(questions: list[Question], path: str | Path) -> Path:
    """The SDPO reference's JSON-lines layout (idx, prompt, answer, system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for q in questions:
            row = {"idx": q.id, "prompt": q.prompt, "answer": q.answer, "system": q.system}
            f.write(json_text(row) + "\n")
    return path
