import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pgpo.distill import DivergenceSpec as Spec
from pgpo.distill import divergence, head_token_logprobs, token_divergence
from pgpo.reduction import reduction_denominator, reduction_weights
from tests import reference as ref

# Per-token divergences of float32 log-probs over <= 64 terms: rounding ~1e-6 relative.
ATOL, RTOL = 2e-5, 1e-4
betas = st.sampled_from([0.0, 0.25, 0.5, 1.0])


@st.composite
def batches(draw):
    b, t, v = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(2, 48))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.3, 1.0, 4.0]))
    s = torch.randn(b, t, v, generator=g, dtype=torch.float64).float() * scale
    te = torch.randn(b, t, v, generator=g, dtype=torch.float64).float() * scale
    mask = torch.rand(b, t, generator=g) < 0.7
    if draw(st.booleans()):
        mask[-1] = False  # an empty row
    return s, te, mask


@given(
    batch=batches(),
    beta=betas,
    temperature=st.sampled_from([0.7, 1.0]),
    topk_frac=st.sampled_from([None, 0.1, 0.5, 1.0]),
    add_tail=st.booleans(),
    chunk=st.integers(1, 8),
)
def test_per_token_divergence_matches_direct_formula(
    batch, beta, temperature, topk_frac, add_tail, chunk
):
    s, t, mask = batch
    v = s.shape[-1]
    topk = None if topk_frac is None else max(1, int(topk_frac * v))
    got = token_divergence(s, t, mask, Spec(beta, topk, add_tail, temperature), chunk_size=chunk)
    exp = ref.token_divergence(s.numpy(), t.numpy(), beta, topk, add_tail, temperature)
    np.testing.assert_allclose(got.numpy(), exp * mask.numpy(), atol=ATOL, rtol=RTOL)
    assert (got[~mask] == 0).all()


@given(
    batch=batches(),
    beta=betas,
    topk_frac=st.sampled_from([None, 0.3, 1.0]),
    add_tail=st.booleans(),
    reduction=st.sampled_from(["token_mean", "seq_mean", "sum"]),
)
def test_gradient_matches_float64_autograd_of_direct_formula(
    batch, beta, topk_frac, add_tail, reduction
):
    s, t, mask = batch
    v = s.shape[-1]
    topk = None if topk_frac is None else max(1, int(topk_frac * v))
    student = s.clone().requires_grad_(True)
    teacher = t.clone().requires_grad_(True)
    loss = divergence(student, teacher, mask, Spec(beta, topk, add_tail), reduction=reduction,
                      chunk_size=3)  # fmt: skip
    loss.backward()
    assert teacher.grad is None  # stop-gradient on the teacher

    s64 = s.double().requires_grad_(True)
    per_token = ref.torch_divergence_float64(s64, t.double(), beta, topk, add_tail)
    m = mask.double()
    if reduction == "sum":
        exp_loss = (per_token * m).sum()
    elif reduction == "token_mean":
        exp_loss = (per_token * m).sum() / m.sum().clamp(min=1)
    else:  # seq_mean as in the reference: empty sequences count in the denominator
        exp_loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    exp_loss.backward()
    assert loss.item() == pytest.approx(exp_loss.item(), abs=ATOL, rel=RTOL)
    np.testing.assert_allclose(student.grad.numpy(), s64.grad.numpy(), atol=ATOL, rtol=1e-3)


def test_reductions_match_reference_loops():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 5, 12, generator=g), torch.randn(4, 5, 12, generator=g)
    mask = torch.rand(4, 5, generator=g) < 0.6
    mask[2] = False
    per = ref.token_divergence(s.numpy(), t.numpy(), 0.5)
    for reduction in ("token_mean", "seq_mean", "sum"):
        got = divergence(s, t, mask, Spec(0.5), reduction=reduction).item()
        exp = ref.reduce(per, mask.numpy(), reduction, empty_sequences_count=True)
        assert got == pytest.approx(exp, abs=ATOL), reduction
    none = divergence(s, t, mask, Spec(0.5), reduction="none")
    assert none.shape == (4, 5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
def test_topk_equal_to_vocabulary_is_the_full_vocabulary_result(beta, add_tail):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 4, 257, generator=g, requires_grad=True)
    t = torch.randn(3, 4, 257, generator=g)
    full = divergence(s, t, None, Spec(beta))
    (g_full,) = torch.autograd.grad(full, s)
    top = divergence(s, t, None, Spec(beta, 257, add_tail))
    (g_top,) = torch.autograd.grad(top, s)
    assert top.item() == pytest.approx(full.item(), abs=ATOL)
    torch.testing.assert_close(g_top, g_full, atol=1e-6, rtol=1e-4)


def test_bfloat16_logits():
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(2, 5, 300, generator=g) * 3).bfloat16().requires_grad_(True)
    t = (torch.randn(2, 5, 300, generator=g) * 3).bfloat16()
    loss = divergence(s, t, torch.ones(2, 5), Spec(0.5, 300))
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    exp = ref.token_divergence(s.detach().float().numpy(), t.float().numpy(), 0.5).mean()
    assert loss.item() == pytest.approx(exp, abs=1e-4)  # float32 math on the bf16 values
    s64 = s.detach().double().requires_grad_(True)
    ref.torch_divergence_float64(s64, t.double(), 0.5).mean().backward()
    # The gradient is computed in float32 and stored in bf16: rounding to 8 mantissa bits costs
    # <= 2^-9 relative; float32 cancellation in the small entries costs ~1e-7 relative to the
    # largest entry (x10 margin: 2e-3 of it absolute).
    scale = s64.grad.abs().max().item()
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=2e-3 * scale, rtol=2**-8)


def test_extreme_logits_give_finite_loss_and_gradient():
    s = torch.randn(2, 3, 50) * 1e4
    t = torch.randn(2, 3, 50) * 1e4
    for beta in (0.0, 0.5, 1.0):
        for topk in (None, 5):
            student = s.clone().requires_grad_(True)
            loss = divergence(student, t, None, Spec(beta, topk))
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
            exp = ref.token_divergence(s.numpy(), t.numpy(), beta, topk).mean()
            assert loss.item() == pytest.approx(exp, rel=1e-4)


def test_single_token_identical_distributions_is_zero():
    s = torch.randn(1, 1, 9)
    for beta in (0.0, 0.5, 1.0):
        assert divergence(s, s.clone(), None, Spec(beta)).item() == pytest.approx(0.0, abs=1e-7)


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    s = torch.randn(2, 3, 9, requires_grad=True)
    for reduction in ("token_mean", "seq_mean"):
        loss = divergence(
            s, torch.randn(2, 3, 9), torch.zeros(2, 3), Spec(0.5), reduction=reduction
        )
        loss.backward()
        assert loss.item() == 0.0 and (s.grad == 0).all()
        s.grad = None


def test_second_backward_fails_loudly():
    s = torch.randn(2, 3, 9, requires_grad=True)
    loss = divergence(s, torch.randn(2, 3, 9), None, Spec(0.5))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_no_grad_mode_stores_nothing():
    s = torch.randn(2, 3, 9, requires_grad=True)
    with torch.no_grad():
        loss = divergence(s, torch.randn(2, 3, 9), None, Spec(0.5))
    assert not loss.requires_grad


@pytest.mark.parametrize(
    "spec,kwargs,match",
    [
        (dict(beta=1.5), {}, "beta"),
        (dict(beta=0.5, topk=0), {}, "topk"),
        (dict(beta=0.5, topk=10), {}, "topk"),  # over the vocabulary of 9
        (dict(beta=0.5, temperature=-1.0), {}, "temperature"),
        (dict(beta=0.5, mode="tokens"), {}, "mode"),
        (dict(beta=0.5, mode="sampled_token"), {}, "reverse KL only"),
        (dict(beta=1.0, mode="sampled_token"), {}, "head_divergence"),  # no sampled tokens here
        (dict(beta=0.5), dict(reduction="avg"), "reduction"),
    ],
)
def test_bad_arguments(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        divergence(torch.randn(2, 3, 9), torch.randn(2, 3, 9), None, Spec(**spec), **kwargs)


def test_loose_settings_in_place_of_a_spec_are_refused():
    with pytest.raises(TypeError, match="DivergenceSpec"):
        divergence(torch.randn(2, 3, 9), torch.randn(2, 3, 9), None, 0.5)


@pytest.mark.parametrize("topk", [None, 7])
def test_fused_entropies_match_the_direct_formula(topk):
    g = torch.Generator().manual_seed(9)
    s = torch.randn(2, 5, 40, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 40, generator=g)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    d, h_s, h_t = token_divergence(
        s, t, mask, Spec(0.5, topk, temperature=0.7), chunk_size=3, return_entropies=True
    )
    assert not h_s.requires_grad and d.requires_grad
    np.testing.assert_allclose(
        h_s.numpy(), ref.entropy(s.detach().numpy(), 0.7) * mask.numpy(), atol=1e-5
    )
    np.testing.assert_allclose(h_t.numpy(), ref.entropy(t.numpy(), 0.7) * mask.numpy(), atol=1e-5)
    plain = token_divergence(s, t, mask, Spec(0.5, topk, temperature=0.7), chunk_size=3)
    assert torch.equal(plain, d)
    (d * torch.rand(2, 5, generator=g)).sum().backward()  # the gradient path still works
    assert torch.isfinite(s.grad).all()


# Every divergence takes a gradient written out (pgpo.distill._closed_form_full for the full
# vocabulary, _closed_form_topk, _closed_form_sampled): all against float64 autograd of the
# direct formula.
@pytest.mark.parametrize(
    "beta,topk,add_tail",
    [
        (0.5, 5, True),
        (0.5, None, True),
        (1.0, None, True),
        (0.0, None, True),
        (0.0, 30, True),
        (0.0, 5, True),
        (1.0, 5, True),
        (0.5, 5, False),
        (1.0, 5, False),
    ],  # fmt: skip
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_divergence_equals_logits_then_divergence(beta, topk, add_tail, dtype):
    from pgpo.distill import head_divergence

    g = torch.Generator().manual_seed(11)
    b, t, h, v = 2, 6, 8, 30
    hs = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * 0.7).to(dtype).requires_grad_(True)
    ht = torch.randn(b, t, h, generator=g).to(dtype)
    wt = (torch.randn(v, h, generator=g) * 0.7).to(dtype)
    mask = torch.rand(b, t, generator=g) < 0.7
    weights = mask.double() / mask.sum()
    loss, h_s, h_t = head_divergence(
        hs, w, ht, wt, weights.float(), Spec(beta, topk, add_tail, 0.8), chunk_size=4
    )
    loss.backward()
    # Direct: logits for every token in float64, the divergence, autograd.
    hs64, w64 = hs.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    logits = hs64 @ w64.T
    per = ref.torch_divergence_float64(
        logits, ht.double() @ wt.double().T, beta, topk, add_tail, temperature=0.8
    )
    (per * weights).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert loss.item() == pytest.approx((per * weights).sum().item(), abs=tol["atol"] * 10)
    torch.testing.assert_close(hs.grad.double(), hs64.grad, **tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol)
    # Both entropies, each from buffers the divergence then reuses.
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    expected_hs = ref.entropy((hs64 @ w64.T).detach().numpy(), 0.8) * mask.numpy()
    np.testing.assert_allclose(h_s.numpy(), expected_hs, atol=atol)
    expected_ht = ref.entropy((ht.double() @ wt.double().T).numpy(), 0.8) * mask.numpy()
    np.testing.assert_allclose(h_t.numpy(), expected_ht, atol=atol)


@pytest.mark.parametrize("spec", [Spec(1.0), Spec(0.5), Spec(0.0), Spec(0.5, 5)])
def test_a_caller_held_workspace_changes_no_value_of_any_call(spec):
    # One workspace across calls of different sizes (its buffers sliced to each call's chunks,
    # left holding the previous call's values) gives each call's loss, gradients and
    # entropies bit for bit as buffers of the call's own do.
    from pgpo.distill import head_divergence
    from pgpo.reduction import ChunkBuffers

    g = torch.Generator().manual_seed(4)
    h, v, chunk = 8, 30, 4
    w = torch.randn(v, h, generator=g)
    workspace = ChunkBuffers(chunk, v)
    for tokens in (9, 3, 7):  # partial last chunks; a call smaller than one chunk
        hs = torch.randn(1, tokens, h, generator=g)
        ht = torch.randn(1, tokens, h, generator=g)
        weights = torch.rand(1, tokens, generator=g)
        results = []
        for held in (None, workspace):
            hs_, w_ = hs.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out = head_divergence(hs_, w_, ht, w, weights, spec, chunk_size=chunk,
                                  workspace=held)  # fmt: skip
            out[0].backward()
            results.append((*out, hs_.grad, w_.grad))
        for own, reused in zip(*results):
            assert torch.equal(own, reused)


def test_a_workspace_of_the_wrong_size_is_refused_in_one_line():
    from pgpo.distill import head_divergence
    from pgpo.reduction import ChunkBuffers

    hs, w = torch.randn(1, 6, 4), torch.randn(10, 4)
    args = (hs, w, hs, w, torch.ones(1, 6), Spec(1.0))
    with pytest.raises(ValueError, match=r"workspace holds \[4, 10\].*needs \[5, 10\]"):
        head_divergence(*args, chunk_size=5, workspace=ChunkBuffers(4, 10))
    with pytest.raises(ValueError, match=r"workspace holds \[8, 12\].*needs \[5, 10\]"):
        head_divergence(*args, chunk_size=5, workspace=ChunkBuffers(8, 12))
    # More rows than a chunk needs are enough.
    loss, _, _ = head_divergence(*args, chunk_size=5, workspace=ChunkBuffers(8, 10))
    assert torch.isfinite(loss)


def test_head_token_logprobs_equal_log_softmax_of_full_logits():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    head = torch.randn(50, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 50, (2, 7), generator=g)
    direct = torch.log_softmax(hidden @ head.T, -1).gather(-1, targets.unsqueeze(-1))[..., 0]
    # chunk 3 does not divide 14 tokens: the last chunk is partial. Float32 output of float64
    # inputs: agreement to float32 rounding of values ~5.
    got = head_token_logprobs(hidden, head, targets, chunk_size=3)
    assert got.shape == (2, 7) and got.dtype == torch.float32
    assert torch.allclose(got.double(), direct, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("empty_count", [True, False])
def test_weights_of_a_split_batch_with_summed_denominators_are_the_whole_batchs(
    reduction, empty_count
):
    # What ranks do under FSDP: each holds some sequences, denominators are summed.
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(6, 9, generator=g) > 0.4).float()
    mask[2] = 0  # a fully masked sequence
    whole = reduction_weights(mask, reduction, empty_count)
    parts = [mask[:2], mask[2:5], mask[5:]]
    total = sum(reduction_denominator(m, reduction, empty_count) for m in parts)
    split = torch.cat([reduction_weights(m, reduction, empty_count, total) for m in parts])
    assert torch.equal(split, whole)
    assert (
        abs(float(whole.sum()) - (1.0 if reduction == "token_mean" or not empty_count else 5 / 6))
        < 1e-12
    )


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_head_token_logprobs_are_of_the_sampling_distribution(temperature, top_p):
    """Log-probs after temperature and top-p (what vLLM's processed_logprobs return): the
    nucleus is the most likely tokens whose mass reaches top_p, renormalised."""
    from pgpo.distill import head_token_logprobs

    g = torch.Generator().manual_seed(3)
    hidden, head = torch.randn(2, 5, 8, generator=g), torch.randn(40, 8, generator=g)
    logits = (hidden @ head.T).double() / temperature
    probs = torch.softmax(logits, -1)
    expected = torch.empty(2, 5, dtype=torch.float64)
    targets = torch.empty(2, 5, dtype=torch.long)
    for i in range(2):
        for t in range(5):
            p = probs[i, t]
            order = p.argsort(descending=True).tolist()
            nucleus, mass = [], 0.0
            for v in order:  # add tokens until the mass reaches top_p
                nucleus.append(v)
                mass += float(p[v])
                if mass >= top_p - 1e-12:
                    break
            target = nucleus[len(nucleus) // 2]  # a token inside the nucleus
            targets[i, t] = target
            expected[i, t] = math.log(float(p[target]) / sum(float(p[v]) for v in nucleus))
    got = head_token_logprobs(hidden, head, targets, 3, temperature, top_p)
    assert torch.allclose(got.double(), expected, atol=1e-5)  # float32 log-probs of ~3 nats


@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0], ids=["near-uniform", "spread", "sharp"])
def test_the_tail_bucket_is_accurate_to_float32_over_a_real_vocabulary(scale):
    """The top-k tail log(1 - P_k) over Qwen3's 151,936 tokens from float32 log-probs, against
    float64. Near uniform the tail is ~1e-4: summing the ~V terms outside the top-k would carry
    the log-probs' own float32 error (~1e-6 absolute) into it whole, 1 % of its value (a KL of
    1e-7 between two such rows then moves by percents). Sharp, 1 - P_k cancels. Bound: 1e-4 of
    the tail, at every scale."""
    from pgpo.distill import _tail

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 151_936, generator=g, dtype=torch.float64) * scale
    index = logits.topk(8, dim=-1).indices
    log_p = torch.log_softmax(logits, -1)
    exact = log_p.scatter(-1, index, -math.inf).logsumexp(-1)  # float64: no cancellation here
    log_p32 = torch.log_softmax(logits.float(), -1)
    before = log_p32.clone()
    inside = log_p32.gather(-1, index).logsumexp(-1, keepdim=True)
    got = _tail(log_p32, index, inside).squeeze(-1).double()
    assert torch.equal(log_p32, before)  # masked in place for the sum, and restored
    assert ((got - exact).abs() / exact.abs()).max().item() <= 1e-4
