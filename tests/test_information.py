import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pgpo.information import entropy_gap, token_entropy
from tests import reference as ref

# float32 entropies of V <= 64 terms: relative rounding ~1e-6; 1e-5 absolute leaves margin.
ATOL = 1e-5


@st.composite
def batches(draw):
    b, t, v = draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(2, 64))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, v, generator=g) * scale
    te = torch.randn(b, t, v, generator=g) * scale
    mask = torch.rand(b, t, generator=g) < draw(st.floats(0.0, 1.0))
    if draw(st.booleans()):
        mask[0] = False  # an empty row
    return s, te, mask


@given(
    batch=batches(),
    temperature=st.sampled_from([0.6, 1.0, 2.0]),
    chunk=st.integers(1, 9),
    reduction=st.sampled_from(["token_mean", "seq_mean"]),
)
def test_entropy_gap_matches_direct_formula(batch, temperature, chunk, reduction):
    s, t, mask = batch
    got = entropy_gap(s, t, mask, temperature, reduction, chunk_size=chunk)
    h_s, h_t = ref.entropy(s.numpy(), temperature), ref.entropy(t.numpy(), temperature)
    exp_s = ref.reduce(h_s, mask.numpy(), reduction, empty_sequences_count=False)
    exp_t = ref.reduce(h_t, mask.numpy(), reduction, empty_sequences_count=False)
    assert got.num_tokens == int(mask.sum())
    assert got.entropy_student.item() == pytest.approx(exp_s, abs=ATOL)
    assert got.entropy_teacher.item() == pytest.approx(exp_t, abs=ATOL)
    assert got.info.item() == pytest.approx(exp_s - exp_t, abs=2 * ATOL)
    assert got.info.dtype == torch.float32


def test_token_entropy_matches_direct_and_zeroes_masked_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 40, generator=g) * 3
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    got = token_entropy(x, mask, chunk_size=4)
    expected = ref.entropy(x.numpy()) * mask.numpy()
    np.testing.assert_allclose(got.numpy(), expected, atol=ATOL)


def test_bfloat16_logits_are_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(2, 6, 500, generator=g) * 4).bfloat16()
    t = (torch.randn(2, 6, 500, generator=g) * 4).bfloat16()
    mask = torch.ones(2, 6)
    got = entropy_gap(s, t, mask, chunk_size=5)
    # The reference sees exactly the bf16 values, upcast: only float32 rounding separates them
    # (a bf16 computation would be off by ~1e-2).
    exp = ref.entropy(s.float().numpy()).mean() - ref.entropy(t.float().numpy()).mean()
    assert got.info.dtype == torch.float32
    assert got.info.item() == pytest.approx(exp, abs=1e-4)


def test_all_zero_mask_is_no_signal_not_nan():
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    for reduction in ("token_mean", "seq_mean"):
        got = entropy_gap(s, t, torch.zeros(2, 3), reduction=reduction)
        assert not got.has_signal and got.num_tokens == 0
        assert got.info.item() == 0.0 and not torch.isnan(got.entropy_student)


def test_single_token_and_2d_input():
    s, t = torch.randn(1, 17), torch.randn(1, 17)
    got = entropy_gap(s, t, None)
    assert got.num_tokens == 1
    assert got.info.item() == pytest.approx(
        float(ref.entropy(s.numpy())[0] - ref.entropy(t.numpy())[0]), abs=ATOL
    )


def test_extreme_logits_are_finite_and_exact():
    s = torch.zeros(2, 4, 30)
    s[..., 3] = 1e4  # a one-hot student: entropy 0
    t = torch.randn(2, 4, 30) * 1e4  # near one-hot teacher, huge spread
    got = entropy_gap(s, t, torch.ones(2, 4))
    assert torch.isfinite(got.info)
    exp = ref.entropy(s.numpy()).mean() - ref.entropy(t.numpy()).mean()
    assert got.info.item() == pytest.approx(exp, abs=ATOL)


def test_negative_gap_when_teacher_is_less_certain():
    s = torch.tensor([[5.0, 0.0, 0.0]])
    t = torch.zeros(1, 3)  # uniform teacher: maximal entropy
    assert entropy_gap(s, t, None).info.item() < 0


def test_no_gradient_flows():
    s = torch.randn(2, 3, 8, requires_grad=True)
    got = entropy_gap(s, torch.randn(2, 3, 8), None)
    assert not got.info.requires_grad


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="differ in shape"):
        entropy_gap(torch.randn(2, 3, 8), torch.randn(2, 3, 9), None)
    with pytest.raises(ValueError, match="mask shape"):
        entropy_gap(torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.ones(3, 2))
    with pytest.raises(ValueError, match="temperature"):
        entropy_gap(torch.randn(2, 3, 8), torch.randn(2, 3, 8), None, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        entropy_gap(torch.randn(2, 3, 8), torch.randn(2, 3, 8), None, reduction="mean")
