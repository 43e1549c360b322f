"""Exact scores (pgpo.train.exact): ``eval.mode: exact`` against a direct computation, the
teacher's edge in the training log, and ``pgpo teacher-check`` on a model built to have an edge
and on one built to have none."""

import json

import pytest
import torch

from pgpo.cli import main as pgpo_main
from pgpo.demo.task import make_splits, write_jsonl
from pgpo.demo.warmstart import WarmStartConfig, warm_start
from pgpo.train.config import load_config
from pgpo.train.data import option_letters
from pgpo.train.exact import answer_ids
from pgpo.train.loop import Run, train
from pgpo.train.prompts import student_prompt


def test_the_answer_is_split_where_the_tokenizer_writes_it():
    from transformers import AutoTokenizer

    from pgpo.train.model import qwen3_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    for prefix, answer in (("<answer>", "B"), ("", "C"), ("The answer is ", "D")):
        given, scored = answer_ids(tok, prefix, answer)
        assert scored and tok.decode(given + scored) == prefix + answer
        assert tok.decode(given) == prefix[: len(tok.decode(given))]  # a start of the prefix


def _mean_se(values):
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def test_exact_evaluation_is_the_mean_probability_of_the_correct_letter(tmp_path):
    cfg = load_config("tiny-cpu", [f"output.dir={tmp_path}", "eval.mode=exact", "data.max_test=5",
                                   "eval.edge_questions=0"])  # fmt: skip
    run = Run(cfg)
    result = run.evaluate()
    correct, given_letter, best = [], [], []
    for q in run.test_data.questions:  # one plain forward per option, full softmax
        probs = {}
        for letter in option_letters(q.prompt):
            given, scored = answer_ids(run.tokenizer, "<answer>", letter)
            ids = student_prompt(run.tokenizer, q, cfg.rollout.max_prompt_tokens) + given
            with torch.no_grad():
                logits = run.lm(torch.tensor([ids + scored])).logits[0].double()
            logp = torch.log_softmax(logits[len(ids) - 1 : -1], -1)
            probs[letter] = logp.gather(-1, torch.tensor(scored)[:, None]).sum().exp().item()
        correct.append(probs[q.answer])
        given_letter.append(probs[q.answer] / sum(probs.values()))
        best.append(float(max(probs, key=probs.get) == q.answer))
    assert result["questions"] == 5
    # float32 forwards: relative agreement to ~1e-5 of probabilities of any size
    for name, values in (("p_correct", correct), ("p_correct_given_letter", given_letter),
                         ("letter_accuracy", best)):  # fmt: skip
        mean, se = _mean_se(values)
        assert result[name] == pytest.approx(mean, rel=1e-4), name
        assert result[f"{name}_se"] == pytest.approx(se, rel=1e-3, abs=1e-12), name


def test_the_training_log_carries_the_teachers_edge(tmp_path):
    cfg = load_config("tiny-cpu", [f"output.dir={tmp_path}", "steps=1", "eval.every=1",
                                   "eval.edge_questions=4"])  # fmt: skip
    out = train(cfg, progress=False)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["eval_edge_questions"] == 4
    assert 0 <= row["eval_p_student"] <= 1 and 0 <= row["eval_p_teacher"] <= 1
    edge = row["eval_p_teacher"] - row["eval_p_student"]
    assert row["eval_teacher_edge"] == pytest.approx(edge, abs=1e-12)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two warm starts on the demo's largest-number task, both right only by chance on the
    student's prompt (random labels there): one also trained to copy the answer of a reprompt
    (an edge by construction), one never shown a reprompt (none)."""
    root = tmp_path_factory.mktemp("edge")
    train_q, test_q = make_splits(60, 10, seed=3)
    write_jsonl(train_q, root / "train.jsonl")
    out = {"data": root / "train.jsonl"}
    for name, share in (("edge", 0.5), ("none", 0.0)):
        cfg = WarmStartConfig(hidden_size=64, steps=120, batch_size=16, label_accuracy=0.25,
                              teacher_share=share)  # fmt: skip
        out[name] = warm_start(train_q, train_q + test_q, root / name, cfg, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["edge", "none"])
def test_teacher_check_tells_an_edge_from_none(models, name, tmp_path, capsys):
    folder = models[name]
    args = ["teacher-check", "--config", "tiny-cpu", "--questions", "30", "--json",
            str(tmp_path / "check"), f"model.path={folder}", f"model.tokenizer={folder}",
            f"data.train={models['data']}"]  # fmt: skip
    assert pgpo_main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "check" / "teacher_check.json").read_text())
    assert report["edge_questions"] == 30
    assert 0.1 < report["p_student"] < 0.4  # random labels on the student's prompt
    if name == "edge":
        assert report["has_edge"] and report["teacher_edge"] > 0.2
        assert "verdict: edge" in printed
    else:
        assert not report["has_edge"] and "verdict: no edge" in printed
