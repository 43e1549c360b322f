"""Where modulation acts (token, sequence) and adaptive alpha: each against its direct formula,
and in the trainer (micro-batching, resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pgpo.modulation import AlphaSchedule, gap_per_token, modulated_weights, reallocated_weights
from pgpo.multiplier import MultiplierConfig
from pgpo.train.config import load_config
from pgpo.train.loop import train
from pgpo.train.run_folder import checkpoint

MULT = MultiplierConfig(1.5, 2.0)


def batch():
    g = torch.Generator().manual_seed(0)
    h_s, h_t = torch.rand(3, 5, generator=g) * 4, torch.rand(3, 5, generator=g) * 4
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    weights = keep / keep.sum(-1, keepdim=True).clamp(min=1) / 2  # seq_mean over 2 sequences
    return h_s, h_t, keep, weights


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_reallocated_weights_equal_the_direct_formula_and_keep_the_total(granularity):
    h_s, h_t, keep, w = batch()
    got = reallocated_weights(w, gap_per_token(h_s, h_t, keep, granularity), MULT)
    # Direct: loops over tokens.
    gaps = {}
    for i in range(3):
        trained = [t for t in range(5) if keep[i, t]]
        mean = sum(float(h_s[i, t] - h_t[i, t]) for t in trained) / max(len(trained), 1)
        for t in trained:
            gaps[i, t] = float(h_s[i, t] - h_t[i, t]) if granularity == "token" else mean
    rho = {k: min(math.exp(1.5 * v), 2.0) for k, v in gaps.items()}
    total = sum(float(w[k]) for k in gaps)
    norm = total / sum(float(w[k]) * rho[k] for k in gaps)
    for i in range(3):
        for t in range(5):
            expected = float(w[i, t]) * rho[i, t] * norm if (i, t) in gaps else 0.0
            assert float(got[i, t]) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert float(got.sum()) == pytest.approx(float(w.sum()), rel=1e-6)  # the same total
    if granularity == "sequence":  # one factor per response
        assert torch.allclose(got[1] / w[1], (got[1] / w[1])[0].expand(5))


def test_modulated_weights_of_parts_add_up_to_the_whole():
    h_s, h_t, keep, w = batch()
    gaps = gap_per_token(h_s, h_t, keep, "token")
    whole = modulated_weights(w, gaps, MULT)
    parts = [modulated_weights(w[i : i + 1], gaps[i : i + 1], MULT) for i in range(3)]
    assert sum(p[1] for p in parts) == pytest.approx(whole[1], rel=1e-12)
    assert sum(p[2] for p in parts) == pytest.approx(whole[2], rel=1e-12)


def test_the_target_rho_controller_follows_its_formula():
    s = AlphaSchedule("target_rho", 1.0, rho_target=1.2, rate=0.5, alpha_min=0.1, alpha_max=3.0,
                      window=3)  # fmt: skip
    alpha, mean, seen = 1.0, 0.0, 0
    for info, rho in [(0.1, 1.05), (0.3, 1.4), (-0.2, 0.8), (0.05, 1.0), (0.0, 1.0)]:
        assert s.current(info) == alpha
        s.update(info, rho)
        seen += 1
        mean = mean + (rho - mean) / min(seen, 3)
        alpha = min(max(alpha * math.exp(0.5 * (1.2 - mean)), 0.1), 3.0)
        assert s.state["mean_rho"] == pytest.approx(mean, rel=1e-15)
        assert s.state["alpha"] == pytest.approx(alpha, rel=1e-15)
    s.update(float("nan"), float("nan"))  # a skipped step does not count
    assert s.state["steps"] == 5


def test_the_normalized_schedule_divides_by_the_running_mean_of_abs_info():
    s = AlphaSchedule("normalized", 2.0, floor=1e-3, window=10)
    assert s.current() == 2.0  # before any step, without this step's I: alpha itself
    assert s.current(0.5) == pytest.approx(2.0 / 0.5)
    s.update(0.5, 1.0)
    assert s.current(-0.1) == pytest.approx(2.0 / 0.3)  # mean of |0.5|, |-0.1|
    assert s.current() == pytest.approx(2.0 / 0.5)
    s.update(-0.1, 1.0)
    assert AlphaSchedule("normalized", 1.0, floor=0.01).current(1e-9) == pytest.approx(100.0)


def tiny(out, *overrides):
    return load_config("tiny-cpu", [f"output.dir={out}", "eval.every=100", *overrides])


def final(out):
    return checkpoint.load(checkpoint.latest(out / "checkpoints"))


def test_token_granularity_does_not_depend_on_micro_batching(tmp_path, sharp_model):
    """Each micro-batch trains on w rho (unnormalised) and the step's gradient is rescaled by
    sum w / sum w rho: the same as one pass over the whole batch with normalised weights."""
    common = [f"model.path={sharp_model}", "steps=1", "batch_size=6", "pgpo.enabled=true",
              "pgpo.granularity=token", "pgpo.alpha=50"]  # fmt: skip
    one = train(tiny(tmp_path / "one", *common, "loss.micro_batch=6"), progress=False)
    many = train(tiny(tmp_path / "many", *common, "loss.micro_batch=1"), progress=False)
    a, b = (
        json.loads((one / "metrics.jsonl").read_text()),
        json.loads((many / "metrics.jsonl").read_text()),
    )
    assert a["rho_weight_mean"] > 1.01  # the weights really were reallocated
    assert a["rho"] == b["rho"] == 1.0  # no step scaling without combine_step
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_token_granularity_with_rho_one_is_sdpo_bit_for_bit(tmp_path):
    sdpo = train(tiny(tmp_path / "s", "steps=2", "pgpo.enabled=false"), progress=False)
    token = train(tiny(tmp_path / "t", "steps=2", "pgpo.granularity=token", "pgpo.kind=floored",
                       "pgpo.rho_max=1", "pgpo.combine_step=true"), progress=False)  # fmt: skip
    a, b = final(sdpo)["policy"], final(token)["policy"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ("pgpo.alpha_schedule=target_rho", "pgpo.rho_target=1.5"),
        # The random tiny model's |I| is ~1e-5 nats: a floor below it lets alpha move.
        ("pgpo.alpha_schedule=normalized", "pgpo.info_floor=1e-9"),
        (
            "pgpo.granularity=sequence",
            "pgpo.alpha_schedule=normalized",
            "pgpo.info_floor=1e-9",
            "pgpo.combine_step=true",
        ),  # fmt: skip
    ],
)
def test_a_resumed_run_equals_a_straight_one_with_each_schedule(tmp_path, overrides):
    straight = train(tiny(tmp_path / "a", "steps=4", *overrides), progress=False)
    half = tiny(tmp_path / "b", "steps=2", "output.save_every=2", *overrides)
    train(half, progress=False)
    resumed = train(tiny(tmp_path / "b", "steps=4", *overrides), resume=True, progress=False)
    rows = lambda out: [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["alpha"], r["rho"], r["loss"]) for r in rows(straight)] == [
        (r["alpha"], r["rho"], r["loss"]) for r in rows(resumed)
    ]
    assert len({r["alpha"] for r in rows(straight)}) > 1  # the schedule moved alpha
    a, b = final(straight), final(resumed)
    assert a["alpha_schedule"] == b["alpha_schedule"]
    assert all(torch.equal(a["policy"][k], b["policy"][k]) for k in a["policy"])
