"""The supervised yardstick (objective: sft), the teacher's temperature and the one-forward
option scores: the pieces that make a small pretrained model learn (pgpo demo --real)."""

import json

import pytest
import torch

from pgpo.train.config import ConfigError, load_config
from pgpo.train.evaluation.exact import answer_ids, answer_probabilities, option_probabilities
from pgpo.train.loop import Run, train
from pgpo.train.models.model import load_tokenizer
from pgpo.train.sft import cross_entropy, gold_response
from pgpo.train.tasks.data import synthetic
from pgpo.train.tasks.prompts import student_prompt


@pytest.fixture(scope="module")
def tiny_run():
    """The tiny-cpu run's model, tokenizer and teacher, built once for this module's reads."""
    return Run(load_config("tiny-cpu"))


def test_cross_entropy_is_the_weighted_negative_log_likelihood():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 5, 8, requires_grad=True), torch.randn(30, 8)
    targets = torch.randint(0, 30, (2, 5))
    weights = torch.rand(2, 5) * (torch.rand(2, 5) > 0.3)
    loss = cross_entropy(hidden, head, targets=targets, weights=weights, chunk_size=3)
    direct = torch.nn.functional.cross_entropy(
        (hidden @ head.T).reshape(-1, 30), targets.reshape(-1), reduction="none"
    )
    expected = (direct * weights.reshape(-1)).sum()
    torch.testing.assert_close(loss, expected)  # float32, 10 terms of order 1
    (g,) = torch.autograd.grad(loss, hidden)
    (g_direct,) = torch.autograd.grad(expected, hidden)
    torch.testing.assert_close(g, g_direct)


def test_the_gold_response_continues_the_prefix_written_for_the_model():
    cfg = load_config("tiny-cpu")
    run_tok = load_tokenizer("qwen3")
    q = synthetic(1, seed=0).questions[0]
    prefix_ids = run_tok("<answer>", add_special_tokens=False)["input_ids"]
    ids = gold_response(run_tok, q, "<answer>")
    assert run_tok.decode(prefix_ids + ids) == f"<answer>{q.answer}</answer>"
    assert run_tok.decode(gold_response(run_tok, q, "")) == f"<answer>{q.answer}</answer>"
    assert cfg.objective == "sdpo"  # the default


@pytest.mark.parametrize(
    "positions", [(), ("loss.positions=letter", "loss.reduction=token_mean")], ids=["all", "letter"]
)
def test_sft_refuses_pgpo_and_trains_the_gold_answer(tmp_path, positions):
    """The supervised yardstick on every token of the gold answer, and on its letter alone (the
    letter-only yardstick): either way the gold letter gains on every question it trains on."""
    with pytest.raises(ConfigError, match="pgpo.enabled: must be false with objective sft"):
        load_config("tiny-cpu", ["objective=sft"])
    overrides = [*positions, "objective=sft", "pgpo.enabled=false",
                 "rollout.response_prefix=<answer>", "optim.lr=3e-3", "steps=6", "batch_size=4",
                 "rollout.n=1", "data.max_train=4",
                 "eval.mode=exact", "eval.before_train=true", "eval.every=6",
                 "eval.edge_questions=0", f"output.dir={tmp_path / 'sft'}"]  # fmt: skip
    cfg = load_config("tiny-cpu", overrides)

    # the gold letter's probability on the 4 training questions, before and after
    def p_gold(run):
        prompts, answers = [], []
        for q in run.train_data.questions:
            first, ids = answer_ids(run.tokenizer, "<answer>", q.answer)
            prompts.append(student_prompt(run.tokenizer, q, 256) + first)
            answers.append(ids)
        return answer_probabilities(run.policy, prompts, answers, run.tokenizer.pad_token_id)

    before = p_gold(Run(cfg))
    folder = train(cfg, progress=False)
    run = Run(cfg)
    run.restore(folder / "checkpoints" / "step_000006")
    after = p_gold(run)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6 and all(not r["skipped"] and r["rho"] == 1.0 for r in steps)
    assert "eval_p_correct" in rows[0] and "eval_p_correct" in rows[-1]
    # cross-entropy on the 4 questions it sees every step: the gold letter gains on each
    assert bool((after > before).all()), (before, after)
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_the_teachers_temperature_divides_its_logits(tiny_run):
    teacher = tiny_run.teacher
    prompts, responses = [[1, 2, 3, 4]], [[5, 6]]
    hidden, head = teacher.hidden_and_head(tiny_run.policy, prompts, responses, 0)
    teacher.temperature = 0.25
    try:
        hidden_t, head_t = teacher.hidden_and_head(tiny_run.policy, prompts, responses, 0)
    finally:
        teacher.temperature = 1.0
    torch.testing.assert_close(hidden_t @ head_t.T, (hidden @ head.T) / 0.25)


def test_one_forward_per_prompt_scores_every_one_token_answer_as_teacher_forcing_does(tiny_run):
    run = tiny_run
    tok = run.tokenizer
    prompts, answers = [], []
    for q in run.test_data.questions[:3]:
        base = student_prompt(tok, q, 256)
        for text in ("<answer>A", "<answer>B", "<answer>C", " The answer is B"):
            first, ids = answer_ids(tok, "<answer>", text[len("<answer>") :]) if text.startswith(
                "<answer>") else ([], tok(text, add_special_tokens=False)["input_ids"])  # fmt: skip
            prompts.append(base + first)
            answers.append(ids)
    assert any(len(a) == 1 for a in answers) and any(len(a) > 1 for a in answers)
    fast = option_probabilities(run.policy, prompts, answers, tok.pad_token_id)
    direct = answer_probabilities(run.policy, prompts, answers, tok.pad_token_id)
    # the same float32 logits read from a shorter sequence: agreement to float32 rounding
    torch.testing.assert_close(fast, direct, rtol=1e-4, atol=1e-9)


def test_the_teachers_edge_is_measured_at_its_temperature(tiny_run):
    """p_correct_taught at temperature tau is softmax(z / tau) of the letter, read directly."""
    from pgpo.train.evaluation.exact import p_correct_taught
    from pgpo.train.models.teacher import Teacher
    from pgpo.train.tasks.prompts import teacher_prompt

    run = tiny_run
    tok, questions = run.tokenizer, run.train_data.questions[:3]
    teacher = Teacher(run.policy, "live", 0.0, temperature=0.5)
    got = p_correct_taught(teacher, run.policy, tok, questions, "<answer>", 1024)
    for q, p in zip(questions, got):
        first, scored = answer_ids(tok, "<answer>", q.answer)
        ids = teacher_prompt(tok, q, f"<answer>{q.answer}</answer>", 1024) + first
        with torch.no_grad():
            logits = run.lm(torch.tensor([ids + scored])).logits[0].double() / 0.5
        logp = torch.log_softmax(logits[len(ids) - 1 : -1], -1)
        direct = logp.gather(-1, torch.tensor(scored)[:, None]).sum().exp().item()
        assert float(p) == pytest.approx(direct, rel=1e-4)  # float32 forwards


def test_the_logged_edge_scores_the_trust_region_teacher_the_loss_trains_toward(tmp_path):
    """Under teacher.mode trust_region the teacher is lerp(z_ref, z_S, r) / tau, z_ref the
    frozen start and z_S the current student, both on the teacher's prompt. After a step has
    moved the student, the evaluation's p_teacher is that blend's probability of the gold
    letter, read directly from both models' full logits; the frozen start alone gives
    another."""
    from pgpo.train.config import load_config
    from pgpo.train.loop import Run
    from pgpo.train.tasks.prompts import teacher_prompt

    r, tau = 0.5, 0.5
    cfg = load_config("tiny-cpu", [f"output.dir={tmp_path}", "teacher.mode=trust_region",
                                   f"teacher.trust_region_rate={r}", f"teacher.temperature={tau}",
                                   "optim.lr=0.05", "optim.warmup_steps=0"])  # fmt: skip
    run = Run(cfg)
    run.train_step(run.next_questions()[0])
    questions = run.train_data.questions[:3]
    got = run.teacher_edge(3)["p_teacher"]
    tok = run.tokenizer

    def p_gold(blend: bool) -> float:
        ps = []
        for q in questions:
            first, scored = answer_ids(tok, "<answer>", q.answer)
            ids = teacher_prompt(tok, q, f"<answer>{q.answer}</answer>", 10240) + first
            x = torch.tensor([ids + scored])
            with torch.no_grad():
                z = run.teacher.lm(x).logits[0].double()
                if blend:
                    z = torch.lerp(z, run.lm(x).logits[0].double(), r)
            logp = torch.log_softmax(z[len(ids) - 1 : -1] / tau, -1)
            ps.append(logp.gather(-1, torch.tensor(scored)[:, None]).sum().exp().item())
        return sum(ps) / len(ps)

    assert got == pytest.approx(p_gold(blend=True), rel=1e-4)  # float32 forwards
    assert abs(p_gold(blend=False) - p_gold(blend=True)) > 1e-3 * p_gold(blend=True)
