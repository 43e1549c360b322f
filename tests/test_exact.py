"""Exact scores (pgpo.train.evaluation.exact): ``eval.mode: exact`` against a direct computation,
the teacher's edge in the training log, and ``pgpo teacher-check`` on a model built to have an edge
and on one built to have none."""

import json

import pytest
import torch

from pgpo.cli import main as pgpo_main
from pgpo.demo.warmstart import WarmStartConfig, warm_start
from pgpo.train.config import load_config
from pgpo.train.evaluation.exact import answer_ids
from pgpo.train.loop import Run, train
from pgpo.train.tasks.data import make_splits, option_letters, write_jsonl
from pgpo.train.tasks.prompts import student_prompt


def test_the_answer_is_split_where_the_tokenizer_writes_it():
    from transformers import AutoTokenizer

    from pgpo.train.models.model import qwen3_tokenizer_dir

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


def test_the_wrong_demo_diagnostic_is_a_direct_softmax(sharp_model, capsys):
    """``pgpo teacher-check --wrong-demo`` against a direct computation from the model's logits:
    the teacher's entropy where the letter is written, P(shown letter) and P(gold letter), with
    the gold demonstration and with a seeded wrong one, averaged over the questions."""
    from pgpo.train.evaluation.exact import wrong_demo_check, wrong_letter
    from pgpo.train.models.model import load_model, load_tokenizer
    from pgpo.train.tasks.prompts import teacher_prompt

    overrides = [f"model.path={sharp_model}", "data.train=synthetic"]
    cfg = load_config("tiny-cpu", overrides)
    report = wrong_demo_check(cfg, 6, "<answer>")
    tokenizer = load_tokenizer("qwen3")
    lm = load_model(cfg.model, cfg.seed).eval()
    from pgpo.train.tasks.data import load_split

    questions = load_split("synthetic", "train", cfg.seed, False, None).questions[:6]

    def direct(q, shown, scored):
        first, ids = answer_ids(tokenizer, "<answer>", scored)
        prompt = teacher_prompt(tokenizer, q, f"<answer>{shown}</answer>", 10240) + first
        with torch.no_grad():
            logits = lm(torch.tensor([prompt + ids])).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(ids)], -1)
        p = float(sum(logp[i, t] for i, t in enumerate(ids)).exp())
        entropy = float(-(logp[0].exp() * logp[0]).sum())
        return p, entropy

    rows = []
    for q in questions:
        wrong = wrong_letter(q, cfg.seed)
        assert wrong != q.answer and wrong in option_letters(q.prompt)
        p_gold, h_gold = direct(q, q.answer, q.answer)
        p_gold_w, h_wrong = direct(q, wrong, q.answer)
        p_shown_w, _ = direct(q, wrong, wrong)
        rows.append((h_gold, h_wrong, p_gold, p_shown_w, p_gold_w))
    mean = lambda i: sum(r[i] for r in rows) / len(rows)  # noqa: E731
    # float32 forward passes of different batch shapes: entropies to 1e-4 nats, probabilities
    # to 1e-5 absolute
    assert report["entropy_gold"] == pytest.approx(mean(0), abs=1e-4)
    assert report["entropy_wrong"] == pytest.approx(mean(1), abs=1e-4)
    assert report["gap_right_minus_wrong"] == pytest.approx(mean(1) - mean(0), abs=2e-4)
    assert report["p_shown_gold"] == pytest.approx(mean(2), abs=1e-5)
    assert report["p_shown_wrong"] == pytest.approx(mean(3), abs=1e-5)
    assert report["p_gold_given_wrong"] == pytest.approx(mean(4), abs=1e-5)
    # The two prompts differ by one letter, and the sharp model's entropies see it.
    assert max(abs(r[1] - r[0]) for r in rows) > 1e-3
    argv = ["teacher-check", "--config", "tiny-cpu", *overrides, "--questions", "6", "--wrong-demo"]
    assert pgpo_main(argv) == 0
    assert "I(right demo) - I(wrong demo)" in capsys.readouterr().out
