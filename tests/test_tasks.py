"""Tasks (pgpo/train/tasks/): numeric answers, a user's reward function, environment
feedback in the teacher's prompt, and the multiple-choice path unchanged against its golden
record."""

import json
import math
import re
import shlex
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from pgpo.cli import main as pgpo_main
from pgpo.train.config import ConfigError, load_config
from pgpo.train.tasks import (
    MultipleChoice,
    Numeric,
    RewardError,
    UserReward,
    number_text,
    parse_number,
)
from pgpo.train.tasks.data import DataError, load_split

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from record import GOLDEN, RESUMED_AFTER, RUNS, record  # noqa: E402


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1000", "1000"), ("1e3", "1000"), ("1,000", "1000"), ("1000.0", "1000"),
        ("1{,}000", "1000"), ("+5", "5"), ("-5", "-5"), ("-0", "0"), ("0.50", "0.5"), (".5", "0.5"),
        ("-2.5E-1", "-0.25"), ("1,234,567.89", "1234567.89"), (" 42 ", "42"), ("$42$", "42"),
        ("42.", "42"), ("12 apples", None), ("1,00", None), ("1,0000", None), ("", None),
        ("one", None), ("4 2", None), ("1e", None), ("--1", None), ("nan", None), ("inf", None),
        ("12,", None), ("0x1A", None),
    ],
)  # fmt: skip
def test_numbers_are_read_as_people_write_them_and_nothing_else(text, value):
    got = parse_number(text)
    assert got == (None if value is None else Decimal(value))
    if value is not None:  # and written plainly, as gold answers are
        assert number_text(got) == value


@pytest.mark.parametrize(
    ("response", "gold", "score"),
    [
        ("<answer>1000</answer>", "1000", 1.0), ("<answer>1e3</answer>", "1000", 1.0),
        ("<answer>1,000</answer>", "1000", 1.0), ("<answer>1000.0</answer>", "1000", 1.0),
        ("So \\boxed{1{,}000}.", "1000", 1.0), ("\\boxed{\\frac{1}{2}} or \\boxed{-3}", "-3", 1.0),
        ("<answer>-3</answer>", "3", 0.0), ("<answer>2.50</answer>", "2.5", 1.0),
        ("<answer>25 + 61 = 86</answer>", "86", 0.0), ("no answer at all", "86", 0.0),
        ("<answer>12</answer> then <answer>86</answer>", "86", 1.0),
        ("<answer>86", "86", 1.0), ("<answer>86 is it", "86", 0.0), ("86", "86", 1.0),
        ("<answer> 86\n\nThe answer is", "86", 1.0), ("<answer> = 86\n86", "86", 0.0),
        ("<answer></answer>", "0", 0.0),
    ],
)  # fmt: skip
def test_the_numeric_reward_compares_numbers(response, gold, score):
    from pgpo.train.tasks.data import Question

    got = Numeric().score(Question("q", "?", gold), response)
    assert got.score == score
    if score == 1.0:
        assert got.feedback is None
    else:  # a failure says why: which way it is off, or that no number was given
        stated = Numeric().stated(response)
        if stated is None:
            assert got.feedback == "Your response gives no number as its answer."
        else:
            way = "small" if Decimal(stated) < Decimal(gold) else "large"
            assert got.feedback == f"Your answer {stated} is too {way}."


def test_numeric_exact_evaluation_adds_the_gold_numbers_written_forms(tmp_path):
    """eval.mode exact on a numeric task: P(gold number | prompt + <answer>), the probability of
    writing it as it is plus that of writing it after a space, each teacher-forced over its
    tokens; no per-letter scores, as there are no options."""
    from pgpo.train.evaluation.exact import answer_ids, answer_probabilities, exact_per_question
    from pgpo.train.loop import Run
    from pgpo.train.tasks.prompts import student_prompt

    data = Path(__file__).resolve().parent.parent / "examples" / "own_task" / "sums.jsonl"
    cfg = load_config("tiny-cpu", ["task=numeric", f"data.train={data}", f"data.test={data}",
                                   f"output.dir={tmp_path}"])  # fmt: skip
    run = Run(cfg)
    questions, tok = run.test_data.questions, run.tokenizer
    got = exact_per_question(run.policy, tok, questions, "<answer>", 256, run.task)
    assert list(got) == ["p_correct"]
    for q, p in zip(questions, got["p_correct"]):
        total = 0.0
        for form in (q.answer, f" {q.answer}"):
            first, ids = answer_ids(tok, "<answer>", form)
            prompt = student_prompt(tok, q, 256) + first
            total += float(answer_probabilities(run.policy, [prompt], [ids], tok.pad_token_id)[0])
        assert float(p) == pytest.approx(total, rel=1e-4)  # float32 forwards


def test_the_numeric_answer_span_is_the_number_itself():
    task = Numeric()
    for text, number in [("<answer> 86 </answer>", "86"), ("x \\boxed{1,000} y", "1,000"),
                         ("<answer>-2.5", "-2.5")]:  # fmt: skip
        start, end = task.answer_span(text)
        assert text[start:end] == number
    assert task.answer_span("<answer>none</answer>") is None


def test_numeric_rows_are_checked_and_multiple_choice_sets_refused(tmp_path):
    rows = [{"idx": i, "prompt": f"What is {i} + 1?", "answer": a}
            for i, a in enumerate(["2", 3, "1,000", "4.0"])]  # fmt: skip
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_split(str(good), "train", 0, False, None, Numeric())
    assert [q.answer for q in data.questions] == ["2", "3", "1000", "4"]
    assert all(q.system == Numeric.system for q in data.questions)  # the task's own prompt
    assert data.questions[2].data_row() == rows[2]  # the row a reward function receives
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "What?", "answer": "many"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: answer must be a number, got 'many'"):
        load_split(str(bad), "train", 0, False, None, Numeric())
    with pytest.raises(DataError, match="largest-number does not suit task numeric"):
        load_split("largest-number", "train", 0, False, None, Numeric())
    with pytest.raises(DataError, match="largest-value does not suit task multiple_choice"):
        load_split("largest-value", "train", 0, False, None, MultipleChoice())
    with pytest.raises(ConfigError, match="reward.committed_letter: must be false with task"):
        load_config("tiny-cpu", ["task=numeric", "reward.committed_letter=true"])


def test_the_largest_value_task_has_disjoint_splits_and_its_answer_is_the_largest():
    task = Numeric()
    train = load_split("largest-value", "train", 0, False, None, task).questions
    test = load_split("largest-value", "test", 0, False, None, task).questions
    assert (len(train), len(test)) == (400, 100)
    sets = [frozenset(q.prompt.split(": ")[1].rstrip("?").split(", ")) for q in train + test]
    assert not set(sets[:400]) & set(sets[400:])
    for q in train + test:
        values = [int(v) for v in q.prompt.split(": ")[1].rstrip("?").split(", ")]
        assert q.answer == str(max(values))
        assert task.candidates(q) == [q.answer, f" {q.answer}"]  # both forms state it
        assert {task.stated(c) for c in task.candidates(q)} == {q.answer}


def _samples_with_feedback(mode: str, fallback: str = "none"):
    """Two questions x two rollouts on the real Qwen3 tokenizer, through with_demonstrations:
    question 0 has one success and one failure, question 1 two failures; every failure carries
    feedback naming its question and rollout."""
    from pgpo.train.models.model import load_tokenizer
    from pgpo.train.rollout import Completion
    from pgpo.train.step import Rollouts, with_demonstrations
    from pgpo.train.tasks.data import Question
    from pgpo.train.tasks.prompts import student_prompt

    tokenizer = load_tokenizer("qwen3")
    questions = [Question(f"q{i}", f"Which number is the largest: {i}1, {i}9?", f"{i}9")
                 for i in range(2)]  # fmt: skip
    texts = [["<answer>09</answer>", "<answer>01</answer>"],
             ["<answer>11</answer>", "<answer>12</answer>"]]  # fmt: skip
    rewards = [[1.0, 0.0], [0.0, 0.0]]
    feedback = [[None, "FEEDBACK-0-1"], ["FEEDBACK-1-0", "FEEDBACK-1-1"]]
    prompts = [student_prompt(tokenizer, q, 512) for q in questions]
    completions = [[Completion(tokenizer(t)["input_ids"]) for t in group] for group in texts]
    cfg = load_config("tiny-cpu", ["task=numeric", f"teacher.feedback={mode}",
                                   f"teacher.fallback_demonstration={fallback}"])  # fmt: skip
    samples = with_demonstrations(questions, Rollouts(prompts, completions, texts, 0.0), rewards,
                                  tokenizer, cfg, Numeric(), feedback)  # fmt: skip
    return [tokenizer.decode(s.teacher_prompt) for s in samples], samples


def test_feedback_reaches_the_teachers_prompt_only_where_switched_on():
    intro = "The following is feedback from your unsuccessful earlier attempt:"
    # include: every failed attempt's teacher is told, with a solution or without one
    decoded, samples = _samples_with_feedback("include")
    assert "FEEDBACK" not in decoded[0]  # a success gets none (and has no other success)
    assert f"{intro}\n\nFEEDBACK-0-1\n\n" in decoded[1] and "Correct solution" in decoded[1]
    for j in (2, 3):  # no sibling succeeded: the feedback alone, and the sample is trained
        assert f"{intro}\n\nFEEDBACK-1-{j - 2}\n\n" in decoded[j]
        assert "Correct solution" not in decoded[j] and samples[j].trained
        assert samples[j].feedback == f"FEEDBACK-1-{j - 2}"
    assert decoded[1].index("Correct solution") < decoded[1].index(intro)  # solution, feedback
    reprompt = (
        f"Correct solution:\n\n<answer>09</answer>\n{intro}\n\nFEEDBACK-0-1\n\n\n\n"
        "Correctly solve the original question.<|im_end|>"
    )
    assert reprompt in decoded[1]
    # only_without_solution: where a sibling succeeded, the solution alone
    decoded, samples = _samples_with_feedback("only_without_solution")
    assert "FEEDBACK" not in decoded[1] and "FEEDBACK-1-0" in decoded[2]
    # off: no feedback anywhere; without a solution the sample is masked, as before
    decoded, samples = _samples_with_feedback("off")
    assert not any("FEEDBACK" in d or intro in d for d in decoded)
    assert [s.trained for s in samples] == [False, True, False, False]
    # a gold fallback is a solution: only_without_solution then never tells
    decoded, _ = _samples_with_feedback("only_without_solution", "gold")
    assert not any("FEEDBACK" in d for d in decoded)


REWARD_FILE = '''
import json, math, os

CALLS = []
if os.environ.get("PGPO_TEST_IMPORTS"):  # a trace of every import of this file
    with open(os.environ["PGPO_TEST_IMPORTS"], "a") as f:
        f.write("imported\\n")


def reward(prompt, response, row):
    """A quarter point for any response, a whole one for a response stating the row's answer."""
    CALLS.append(1)
    value = 1.0 if row["answer"] in response else 0.25
    with open(os.environ["PGPO_TEST_CALLS"], "a") as f:
        f.write(json.dumps({"prompt": prompt, "row": row, "value": value}) + "\\n")
    return (value, None if value == 1.0 else "try again")


def bad(prompt, response, row):
    CALLS.append(1)
    if len(CALLS) <= 4:  # the first step (4 responses) goes through
        return 0.5
    kind = os.environ["PGPO_TEST_BAD"]
    if kind == "raises":
        raise KeyError("no such field")
    return {"nan": math.nan, "range": 1.5, "type": "0.5", "feedback": (0.5, 7)}[kind]
'''


# The supervised yardstick samples and scores rollouts too, and logs them as every run does.
@pytest.mark.parametrize("objective", [[], ["objective=sft", "pgpo.enabled=false"]])
def test_a_users_reward_function_from_a_file_scores_a_tiny_cpu_run(
    tmp_path, monkeypatch, objective
):
    (tmp_path / "my_reward.py").write_text(REWARD_FILE)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PGPO_TEST_CALLS", str(calls))
    out = tmp_path / "run"
    argv = ["train", "--config", "tiny-cpu", "steps=2", "eval.every=2", "rollout.n=2",
            f"reward.function={tmp_path / 'my_reward.py'}:reward", f"output.dir={out}",
            *objective]  # fmt: skip
    assert pgpo_main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    seen = [json.loads(x) for x in calls.read_text().splitlines()]
    train = load_split("synthetic", "train", 0, False, None).questions
    by_prompt = {q.prompt: q for q in train}
    for call in seen[:8]:  # the two steps' 2 x 2 x 2 responses: their own questions' rows
        q = by_prompt[call["prompt"]]
        assert call["row"] == {"idx": q.id, "prompt": q.prompt, "answer": q.answer,
                               "system": q.system}  # fmt: skip
    assert len(seen) == 8 + 4 * 2  # and the evaluation's 4 questions x eval.n 2
    for step, r in enumerate(rows[:2]):  # the step's reward: the mean of what it returned
        values = [c["value"] for c in seen[4 * step : 4 * step + 4]]
        assert r["reward"] == pytest.approx(sum(values) / 4)
        assert r["accuracy"] == pytest.approx(values.count(1.0) / 4)  # 0.25 is a failure
    assert rows[1]["eval_avg_at_k"] == pytest.approx(sum(c["value"] for c in seen[8:]) / 8)


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("raises", "raised KeyError: 'no such field'"),
        ("nan", "returned nan: a reward must be in [0, 1]"),
        ("range", "returned 1.5: a reward must be in [0, 1]"),
        ("type", "returned '0.5': expected a number in [0, 1] or (number, feedback text)"),
        ("feedback", "returned feedback 7: expected text or None"),
    ],
)
def test_a_bad_reward_function_stops_the_run_in_one_line_and_keeps_its_checkpoint(
    tmp_path, monkeypatch, capsys, kind, says
):
    (tmp_path / "my_reward.py").write_text(REWARD_FILE)
    monkeypatch.setenv("PGPO_TEST_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("PGPO_TEST_BAD", kind)
    out = tmp_path / "run"
    spec = f"{tmp_path / 'my_reward.py'}:bad"
    argv = ["train", "--config", "tiny-cpu", "steps=3", "eval.every=10", "output.save_every=1",
            f"reward.function={spec}", f"output.dir={out}"]  # fmt: skip
    assert pgpo_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"pgpo: error: reward.function {spec} on row 'synthetic-7-")
    assert err.endswith(says)
    assert (out / "checkpoints" / "step_000001" / "state.pt").is_file()  # the first step's, kept
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_checkpoint_naming_a_reward_function_never_runs_it(tmp_path, monkeypatch):
    """The function runs where the user's own config names it, not where a checkpoint's or an
    export's recorded config does: pgpo eval with the preset, and pgpo export, import nothing."""
    (tmp_path / "my_reward.py").write_text(REWARD_FILE)
    imports = tmp_path / "imports.txt"
    monkeypatch.setenv("PGPO_TEST_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("PGPO_TEST_IMPORTS", str(imports))
    out = tmp_path / "run"
    argv = ["train", "--config", "tiny-cpu", "steps=1", "eval.every=5",
            f"reward.function={tmp_path / 'my_reward.py'}:reward", f"output.dir={out}"]  # fmt: skip
    assert pgpo_main(argv) == 0
    assert imports.read_text().count("imported") == 1  # once, when the run started
    ckpt = out / "checkpoints" / "step_000001"
    assert pgpo_main(["eval", "--config", "tiny-cpu", "--checkpoint", str(ckpt)]) == 0
    assert pgpo_main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m")]) == 0
    assert imports.read_text().count("imported") == 1


def test_a_reward_function_that_cannot_be_found_is_refused_before_a_model_loads(tmp_path, capsys):
    (tmp_path / "my_reward.py").write_text(REWARD_FILE)
    for spec, says in [
        (f"{tmp_path / 'missing.py'}:reward", "missing.py is not a file"),
        (f"{tmp_path / 'my_reward.py'}:nothing", "has no function 'nothing'"),
        ("no_such_module_here:reward", "importing it raised ModuleNotFoundError"),
        ("reward", "must be path/to/file.py:name or module:name"),
    ]:
        argv = ["train", "--config", "tiny-cpu", f"reward.function={spec}",
                f"output.dir={tmp_path / 'run'}"]  # fmt: skip
        assert pgpo_main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
        assert not (tmp_path / "run").exists()


def test_user_reward_checks_what_the_function_returns():
    from pgpo.train.tasks.data import Question

    q = Question("q7", "?", "B")
    cases = [(0, True), (1, True), (0.25, True), (True, False), (-0.0, True), (math.inf, False),
             (None, False), ((0.5, "why"), True), ((0.5,), False)]  # fmt: skip
    for value, ok in cases:
        task = UserReward(MultipleChoice(), lambda p, r, row, v=value: v, "f.py:f")
        if ok:
            got = task.score(q, "x")
            assert got.score == float(value[0] if isinstance(value, tuple) else value)
        else:
            with pytest.raises(RewardError, match=r"reward.function f.py:f on row 'q7' returned"):
                task.score(q, "x")


def _same(a, b, where: str) -> None:
    """``a`` equals ``b``: floats to float32's rounding on another CPU's kernels (a weight sum,
    to 1e-4 absolute: its terms cancel), everything else exactly."""
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4 if ".weights" in where else 1e-7), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", list(RUNS))
def test_the_trainer_equals_its_golden_record(tmp_path, name):
    """Fixed tiny-cpu runs (SDPO, PGPO at step and token granularity, SFT, the premise path with
    committed letters, letter positions and exact evaluation, the trust-region teacher, LoRA, a
    resumed run) log and end with what tests/golden/trainer.json records. On the machine
    that wrote it: the same bits."""
    golden = json.loads(GOLDEN.read_text())[name]
    got = json.loads(json.dumps(record(RUNS[name], tmp_path / name, RESUMED_AFTER.get(name))))
    _same(got, golden, name)


def test_the_documented_example_runs_as_written(tmp_path, monkeypatch):
    """docs/trainer.md's own-task example: the code it shows is the example file's, its data
    line is the data file's, and its command trains (the random model writes no number, so
    every sample fails and every teacher is told why)."""
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "trainer.md").read_text()
    section = page[page.index("### Your own task") :]
    python = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert python in (root / "examples" / "own_task" / "my_reward.py").read_text()
    row = re.search(r"```json\n(.*?)\n```", section, re.DOTALL).group(1)
    assert row in (root / "examples" / "own_task" / "sums.jsonl").read_text().splitlines()
    command = next(line.strip() for line in section.splitlines()
                   if line.startswith("    pgpo train"))  # fmt: skip
    argv = shlex.split(command)[1:]
    argv = [a for a in argv if not a.startswith("output.dir=")] + [f"output.dir={tmp_path}"]
    monkeypatch.chdir(root)
    assert pgpo_main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    assert all(r["feedback_share"] == 1.0 and r["masked_share"] == 0.0 for r in steps)
