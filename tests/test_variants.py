"""The SDPO reference's remaining variants, each against its direct formula: the sampled-token
loss (``loss.mode: sampled_token``) and the trust-region teacher (``teacher.mode:
trust_region``), then both end to end in the trainer."""

import json

import pytest
import torch

from pgpo.distill import DivergenceSpec, head_divergence
from pgpo.train.config import ConfigError, load_config
from pgpo.train.loop import Run, train
from pgpo.train.models.forward import Policy
from pgpo.train.models.model import small_qwen3
from pgpo.train.models.teacher import Teacher
from pgpo.train.run_folder import checkpoint

SAMPLED = DivergenceSpec(1.0, mode="sampled_token")

B, T, H, H_T, V = 2, 5, 8, 16, 11


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, H, generator=g, requires_grad=True)
    w_s = torch.randn(V, H, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(B, T, H_T, generator=g), torch.randn(V, H_T, generator=g)
    weights = torch.rand(B, T, generator=g)
    weights[1, 3:] = 0  # padding: not trained
    targets = torch.randint(0, V, (B, T), generator=g)
    return h_s, w_s, h_t, w_t, weights, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_token_loss_and_gradient_are_the_formula(temperature):
    """sum_t w_t (lp_S - lp_T).detach() lp_S at the sampled tokens, from full logits and
    autograd; the teacher has another width (a trust-region pair is 2H wide)."""
    h_s, w_s, h_t, w_t, weights, targets = _inputs()
    spec = DivergenceSpec(1.0, topk=3, temperature=temperature, mode="sampled_token")
    loss, _, _ = head_divergence(h_s, w_s, h_t, w_t, weights, spec, chunk_size=3,
                                 targets=targets)  # fmt: skip
    grads = torch.autograd.grad(loss, (h_s, w_s))
    lp_s = torch.log_softmax(h_s @ w_s.T / temperature, -1).gather(-1, targets[..., None])[..., 0]
    lp_t = torch.log_softmax(h_t @ w_t.T / temperature, -1).gather(-1, targets[..., None])[..., 0]
    direct = (weights * (lp_s - lp_t).detach() * lp_s).sum()
    direct_grads = torch.autograd.grad(direct, (h_s, w_s))
    # float32 throughout, summed in another order: a few ulps of values of size ~10
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, direct_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sampled_token_gradient_is_unbiased_for_reverse_kl():
    """Averaged over the token y ~ p_S (every y, weighted p_S(y)), the sampled-token gradient is
    the gradient of KL(p_S || p_T): sum_y p_S(y) grad log p_S(y) = 0 removes the rest."""
    h_s, w_s, h_t, w_t, _, _ = _inputs(1)
    h_s = h_s[:1, :1].detach().double().requires_grad_()  # one token
    w_s, h_t, w_t = w_s.detach().double(), h_t[:1, :1].double(), w_t.double()
    p_s = torch.softmax(h_s @ w_s.T, -1)[0, 0].detach()
    expected = torch.zeros_like(h_s)
    for y in range(V):
        loss, _, _ = head_divergence(h_s, w_s, h_t, w_t, torch.ones(1, 1), SAMPLED,
                                     targets=torch.tensor([[y]]))  # fmt: skip
        expected += p_s[y] * torch.autograd.grad(loss, h_s)[0]
    kl, _, _ = head_divergence(h_s, w_s, h_t, w_t, torch.ones(1, 1), DivergenceSpec(1.0))
    # the chunk loop computes in float32: agreement to float32 rounding
    torch.testing.assert_close(expected, torch.autograd.grad(kl, h_s)[0], rtol=1e-5, atol=1e-6)


def test_sampled_token_needs_reverse_kl_and_targets():
    h_s, w_s, h_t, w_t, weights, targets = _inputs()
    with pytest.raises(ValueError, match="beta must be 1"):
        DivergenceSpec(0.5, mode="sampled_token")
    with pytest.raises(ValueError, match="needs targets"):
        head_divergence(h_s, w_s, h_t, w_t, weights, SAMPLED)
    with pytest.raises(ConfigError, match="loss.beta"):
        load_config("tiny-cpu", ["loss.mode=sampled_token"])  # the preset's beta is 0.5


def _lm(seed):
    return small_qwen3(300, 32, 2, 2, 1, 16, True, (0, 1, 0), 128, seed=seed)


def _logits(lm, prompt, response):
    """Full logits ``[T, V]`` at the positions predicting the response, one plain forward."""
    with torch.no_grad():
        out = lm(torch.tensor([prompt + response])).logits[0]
    return out[len(prompt) - 1 : len(prompt) - 1 + len(response)]


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_trust_region_teacher_logits_are_the_lerp_of_reference_and_student(rate):
    student = Policy(_lm(0))
    teacher = Teacher(student, "trust_region", 0.05, trust_region_rate=rate)
    with torch.no_grad():  # the student trains away from the frozen reference
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts, responses = [[5, 6, 7, 8], [9, 10, 11]], [[12, 13, 14], [15, 16, 17]]
    hidden, head = teacher.hidden_and_head(student, prompts, responses, pad=0)
    assert hidden.shape == (2, 3, 64) and head.shape == (300, 64)  # one pair of width 2H
    got = hidden @ head.T
    for i, (p, r) in enumerate(zip(prompts, responses)):
        want = torch.lerp(_logits(teacher.lm, p, r), _logits(student.lm, p, r), rate)
        # float32 forwards of logits of size ~1, the product summed in another order
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(teacher.lm, [5], [6]), _logits(student.lm, [5], [6]))


def test_trust_region_and_sampled_token_train_end_to_end(tmp_path):
    """Both variants in the trainer: the loss is finite, I_k is measured, the policy moves and
    the trust-region reference stays the initial weights."""
    cfg = load_config("tiny-cpu", [
        f"output.dir={tmp_path}", "eval.every=1000", "steps=2", "teacher.mode=trust_region",
        "teacher.trust_region_rate=0.3", "loss.mode=sampled_token", "loss.beta=1",
    ])  # fmt: skip
    before = {k: v.detach().clone() for k, v in Run(cfg).lm.state_dict().items()}
    out = train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(not r["skipped"] and abs(r["loss"]) < 1e3 and r["info"] != 0 for r in rows)
    state = checkpoint.load(checkpoint.latest(out / "checkpoints"))
    assert all(torch.equal(before[k], state["teacher"][k]) for k in before)
    assert any(not torch.equal(before[k], state["policy"][k]) for k in before)


def test_a_response_prefix_is_written_for_student_teacher_and_reward(tmp_path):
    """rollout.response_prefix: every rollout prompt and every teacher prompt ends with the
    prefix's tokens, and the reward reads the prefix as part of the response."""
    from pgpo.train.step import sample_rollouts, score, with_demonstrations

    cfg = load_config("tiny-cpu", [f"output.dir={tmp_path}", "rollout.response_prefix=<answer>",
                                   "teacher.fallback_demonstration=gold"])  # fmt: skip
    run = Run(cfg)
    questions, _ = run.next_questions()
    prefix = run.tokenizer("<answer>", add_special_tokens=False)["input_ids"]
    rollouts = sample_rollouts(questions, run.tokenizer, run.engine, cfg, None)
    assert all(p[-len(prefix) :] == prefix for p in rollouts.prompts)
    assert all(t.startswith("<answer>") for group in rollouts.texts for t in group)
    rollouts.texts[0][0] = f"<answer>{questions[0].answer}</answer>"  # the prefix + "B</answer>"
    assert score(questions, rollouts, cfg)[0][0] == 1.0
    samples = with_demonstrations(questions, rollouts, score(questions, rollouts, cfg),
                                  run.tokenizer, cfg)  # fmt: skip
    assert all(s.teacher_prompt[-len(prefix) :] == prefix for s in samples)


@pytest.mark.parametrize("rollout_temperature", [1.0, 0.8])
def test_clipped_importance_weight_on_old_logprobs_is_the_formula(rollout_temperature):
    """With several updates per batch each token's loss carries min(p_now / p_old, is_cap),
    detached: the loss and its gradients equal the divergence with those weights, computed
    directly (p_now from the full logits at the rollout temperature)."""
    from pgpo.train.loss import distill_loss

    cfg = load_config("tiny-cpu", ["loss.is_cap=2", f"rollout.temperature={rollout_temperature}",
                                   "loss.topk=3", "loss.chunk_size=3"])  # fmt: skip
    h_s, w_s, h_t, w_t, weights, targets = _inputs(2)
    logits = h_s.detach() @ w_s.detach().T / rollout_temperature
    lp_now = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    shift = torch.linspace(-1.5, 1.5, B * T).reshape(B, T)  # ratios e^shift in [0.22, 4.5]
    out = distill_loss(h_s, w_s, teacher_hidden=h_t, teacher_head=w_t, weights=weights,
                       targets=targets, behaviour=None, spec=cfg.loss.divergence(), cfg=cfg,
                       with_entropies=False,
                       old=lp_now - shift)  # fmt: skip
    grads = torch.autograd.grad(out.loss, (h_s, w_s))
    capped = weights * shift.exp().clamp(max=2.0)
    spec = DivergenceSpec(cfg.loss.beta, cfg.loss.topk, cfg.loss.add_tail, cfg.loss.temperature)
    direct, _, _ = head_divergence(h_s, w_s, h_t, w_t, capped, spec,
                                   chunk_size=cfg.loss.chunk_size)  # fmt: skip
    direct_grads = torch.autograd.grad(direct, (h_s, w_s))
    torch.testing.assert_close(out.loss, direct, rtol=1e-5, atol=1e-6)  # float32 rounding
    for got, want in zip(grads, direct_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    on = weights != 0
    # the sums over trained tokens: exp(shift) up to float32 rounding of lp_now - (lp_now - s)
    assert abs(out.is_ratio_sum - float(shift.exp()[on].sum())) < 1e-4
    assert out.is_clipped == float((shift.exp()[on] > 2.0).sum()) > 0


def test_two_updates_per_batch_take_two_steps_with_clipped_weights(tmp_path):
    """optim.updates_per_batch=2: the batch's first mini-batch is trained at the rollout
    weights (ratio 1 to float32), the second after one AdamW step (ratios move), and AdamW
    has stepped twice."""
    from pgpo.train.loss import old_logprobs
    from pgpo.train.step import loss_and_entropies, sample_rollouts, score, with_demonstrations

    cfg = load_config("tiny-cpu", [f"output.dir={tmp_path}", "eval.every=1000",
                                   "optim.updates_per_batch=2", "optim.lr=1e-2"])  # fmt: skip
    run = Run(cfg)
    questions, _ = run.next_questions()
    with torch.random.fork_rng(devices=[]):  # the same rollouts as the step below
        rollouts = sample_rollouts(questions, run.tokenizer, run.engine, cfg, None)
        samples = with_demonstrations(questions, rollouts, score(questions, rollouts, cfg),
                                      run.tokenizer, cfg)  # fmt: skip
        pad = run.tokenizer.pad_token_id
        old = old_logprobs(samples, run.policy, pad, cfg)
        first = loss_and_entropies(samples, run.policy, run.teacher, pad, cfg, run.world,
                                   with_entropies=False, old=old)  # fmt: skip
        run.optimizer.zero_grad()
    assert first.trained_tokens > 0 and first.is_clipped == 0
    # p_now / p_old at the same weights: 1 up to float32 log-prob rounding (~1e-6)
    assert abs(first.is_ratio_sum / first.trained_tokens - 1.0) < 1e-5
    metrics = run.train_step(questions)
    assert metrics["updates_skipped"] == 0 and not metrics["skipped"]
    steps = {float(s["step"]) for s in run.optimizer.optimizer.state.values()}
    assert steps == {2.0}  # two AdamW steps in one batch
    # the second half's ratios saw one step of lr 1e-2: away from 1, but a ratio, not noise
    assert 1e-4 < abs(metrics["is_ratio_mean"] - 1.0) < 0.5


def test_updates_per_batch_must_divide_the_batch():
    with pytest.raises(ConfigError, match="optim.updates_per_batch: must be a divisor of"):
        load_config("tiny-cpu", ["optim.updates_per_batch=3"])
