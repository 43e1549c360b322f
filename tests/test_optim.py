import math

import pytest
import torch

from pgpo.optim import ModulatedOptimizer


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def set_grads(model, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def adamw(model, lr=1e-2):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.999))


def assert_same(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def assert_same_moments(opt_a, opt_b):
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_step_equals_adamw_with_scaled_lr_and_moments_untouched():
    rhos = [1.0, 0.37, 1.8, 2.0, 0.0]
    mod_model, ref_model = make_model(), make_model()
    mod = ModulatedOptimizer(adamw(mod_model))
    ref = adamw(ref_model)
    for k, r in enumerate(rhos):
        set_grads(mod_model, k)
        set_grads(ref_model, k)
        mod.step(r)
        for group in ref.param_groups:
            group["lr"] = 1e-2 * r
        ref.step()
        assert_same(mod_model, ref_model)
        assert_same_moments(mod.optimizer, ref)
        assert all(g["lr"] == 1e-2 for g in mod.param_groups)  # restored
    # And the scaling is not a no-op: a different rho gives different parameters.
    other_model = make_model()
    other = ModulatedOptimizer(adamw(other_model))
    for k in range(len(rhos)):
        set_grads(other_model, k)
        other.step(1.0)
    assert not all(
        torch.equal(p, q) for p, q in zip(other_model.parameters(), mod_model.parameters())
    )


def test_scheduler_on_wrapped_optimizer_keeps_working():
    mod_model, ref_model = make_model(), make_model()
    mod = ModulatedOptimizer(adamw(mod_model))
    ref = adamw(ref_model)
    warmup = lambda step: min(1.0, (step + 1) / 3)
    sched_mod = torch.optim.lr_scheduler.LambdaLR(mod.optimizer, warmup)
    sched_ref = torch.optim.lr_scheduler.LambdaLR(ref, warmup)
    for k in range(5):
        set_grads(mod_model, k)
        set_grads(ref_model, k)
        base = [g["lr"] for g in ref.param_groups]
        for g in ref.param_groups:
            g["lr"] *= 1.5
        ref.step()
        for g, lr in zip(ref.param_groups, base):
            g["lr"] = lr
        mod.step(1.5)
        sched_mod.step()
        sched_ref.step()
        assert sched_mod.get_last_lr() == sched_ref.get_last_lr()
        assert_same(mod_model, ref_model)


def test_state_dict_round_trip_resumes_exactly():
    straight_model = make_model()
    straight = ModulatedOptimizer(adamw(straight_model))
    for k in range(4):
        set_grads(straight_model, k)
        straight.step(1.0 + 0.1 * k)

    first_model = make_model()
    first = ModulatedOptimizer(adamw(first_model))
    for k in range(2):
        set_grads(first_model, k)
        first.step(1.0 + 0.1 * k)
    saved_opt, saved_model = first.state_dict(), first_model.state_dict()

    resumed_model = make_model(seed=99)
    resumed_model.load_state_dict(saved_model)
    resumed = ModulatedOptimizer(adamw(resumed_model))
    resumed.load_state_dict(saved_opt)
    for k in range(2, 4):
        set_grads(resumed_model, k)
        resumed.step(1.0 + 0.1 * k)
    assert_same(resumed_model, straight_model)
    assert_same_moments(resumed.optimizer, straight.optimizer)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.5])
def test_refuses_bad_rho_and_leaves_everything_untouched(bad):
    model = make_model()
    opt = ModulatedOptimizer(adamw(model))
    set_grads(model, 0)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="rho"):
        opt.step(bad)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)
    assert len(opt.state) == 0


def test_lr_restored_even_if_inner_step_raises():
    model = make_model()
    opt = ModulatedOptimizer(adamw(model))

    def closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(3.0, closure)
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)


def test_wraps_only_optimizers():
    with pytest.raises(TypeError):
        ModulatedOptimizer(object())  # type: ignore[arg-type]
