"""The TRL add-on against the real ``trl.experimental.sdpo.SDPOTrainer`` (CPU, a tiny Qwen3 with
the real tokenizer): rho = 1 is plain SDPO bit for bit, a forced rho is plain SDPO at lr x rho,
the logged I_k is Eq. 8 on the logits TRL used (pooled over accumulation steps), and schedulers
are not compounded."""

from __future__ import annotations

import ast
import math
import os
import sys
import warnings

import pytest
import torch

if sys.version_info < (3, 11):  # TRL needs Python 3.11; everywhere else a missing TRL fails
    pytest.skip("TRL needs Python >= 3.11", allow_module_level=True)
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl.experimental.sdpo import SDPOConfig, SDPOTrainer  # noqa: E402

from pgpo.information import entropy_gap  # noqa: E402
from pgpo.integrations.trl import PGPOSDPOTrainer, PGPOSettings  # noqa: E402
from pgpo.train.models.model import load_tokenizer  # noqa: E402

warnings.filterwarnings("ignore", message=".*experimental.*")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3 (real vocabulary, weights x12 so that student and teacher differ clearly)."""
    from tests.conftest import save_sharp_qwen3

    folder = save_sharp_qwen3(tmp_path_factory.mktemp("trl-qwen3"), 32, 1, 16, 12.0)
    load_tokenizer("qwen3").save_pretrained(folder)
    return folder


def every_other(completions, **kwargs) -> list[float]:
    """Half the rollouts succeed: every group has a demonstration for the others."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def dataset() -> Dataset:
    return Dataset.from_dict({"prompt": [f"What is {i} + {i}? Answer:" for i in range(16)]})


def config(tmp_path, **overrides) -> SDPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,  # SDPOConfig defaults to bf16, also on a CPU
        use_cpu=True,
        seed=0,
        teacher_model_kind="ema",
        shuffle_dataset=False,
    )
    settings.update(overrides)
    return SDPOConfig(**settings)


def trainer(cls, model_dir, args, **kwargs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return cls(model=str(model_dir), reward_funcs=every_other, args=args,
               train_dataset=dataset(), processing_class=tok, **kwargs)  # fmt: skip


def adam_state(t) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in t.model.named_parameters()}
    return {names[id(p)]: s for p, s in t.optimizer.state.items()}


def assert_identical(a, b) -> None:
    pa, pb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    sa, sb = adam_state(a), adam_state(b)
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[name][key], sb[name][key]), (name, key)


def logged(t, key) -> list[float]:
    return [row[key] for row in t.state.log_history if key in row]


def assert_close_weights(a, b, start) -> None:
    """The same weights up to the gradients' float32 rounding: AdamW moves a weight by about
    lr g / (|g| + eps), so a gradient near eps carries its rounding into the step almost whole;
    the bound is 1 % of the largest move from ``start``."""
    pa, pb = a.model.state_dict(), b.model.state_dict()
    moved = max((pb[k] - start[k]).abs().max().item() for k in pb)
    apart = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert moved > 1e-4 and apart <= 1e-2 * moved


@pytest.mark.parametrize("fused", [False, True], ids=["trl-loss", "fused"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_rho_one_is_plain_sdpo(tmp_path, model_dir, accumulation, fused):
    """With TRL's own loss, bit for bit; with the fused loss, to the gradients' rounding."""
    from transformers import AutoModelForCausalLM

    args = dict(
        gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // accumulation
    )
    plain = trainer(SDPOTrainer, model_dir, config(tmp_path / "plain", **args))
    plain.train()
    ones = PGPOSettings(kind="floored", rho_max=1.0, fused_loss=fused)
    pgpo = trainer(PGPOSDPOTrainer, model_dir, config(tmp_path / "pgpo", **args), pgpo=ones)
    pgpo.train()
    assert logged(pgpo, "pgpo/rho") == [1.0, 1.0]
    # I_k measured (float32 noise on a 12-nat entropy is ~1e-6), and rho clipped to 1.
    assert all(abs(i) > 1e-5 for i in logged(pgpo, "pgpo/info"))
    if fused:
        assert_close_weights(
            pgpo, plain, AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
        )
    else:
        assert_identical(plain, pgpo)


class ForcedRho(PGPOSDPOTrainer):
    """The add-on with rho forced to a value (the rest of it unchanged)."""

    forced = 2.5

    def step_multiplier(self, info):
        return float("nan"), self.forced


def test_a_forced_rho_equals_plain_sdpo_at_lr_times_rho(tmp_path, model_dir):
    one = dict(max_steps=1)
    plain = trainer(SDPOTrainer, model_dir, config(tmp_path / "p", learning_rate=2.5e-3, **one))
    plain.train()
    forced = trainer(ForcedRho, model_dir, config(tmp_path / "f", learning_rate=1e-3, **one),
                     pgpo=PGPOSettings(fused_loss=False))  # fmt: skip
    forced.train()
    assert logged(forced, "pgpo/rho") == [2.5]
    assert logged(forced, "learning_rate") == [1e-3]  # the logged rate is the unscaled one
    assert_identical(plain, forced)


class Recording(PGPOSDPOTrainer):
    """Keeps the logits TRL hands to the distillation loss, per micro-batch."""

    def _compute_self_distillation_loss(self, model, inputs, distillation_logits):
        d = distillation_logits
        self.seen.append((d.student_logits.detach().clone(), d.teacher_logits.detach().clone(),
                          d.loss_mask.detach().clone()))  # fmt: skip
        return super()._compute_self_distillation_loss(model, inputs, distillation_logits)


def _joined(parts):
    """Micro-batches padded to one length and stacked: the same samples in one batch."""
    t_max = max(s.shape[1] for s, _, _ in parts)
    pad = lambda x, value: torch.nn.functional.pad(x, (0, 0, 0, t_max - x.shape[1]), value=value)
    student = torch.cat([pad(s, 0.0) for s, _, _ in parts])
    teacher = torch.cat([pad(t, 0.0) for _, t, _ in parts])
    mask = torch.cat([torch.nn.functional.pad(m, (0, t_max - m.shape[1])) for _, _, m in parts])
    return student, teacher, mask


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
def test_logged_info_is_eq8_on_trls_logits_pooled_over_accumulation(tmp_path, model_dir, reduction):
    args = config(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    t = trainer(Recording, model_dir, args,
                pgpo=PGPOSettings(info_reduction=reduction, fused_loss=False))  # fmt: skip
    t.seen = []
    t.train()
    infos, rhos = logged(t, "pgpo/info"), logged(t, "pgpo/rho")
    assert len(infos) == 2 and len(t.seen) == 4  # 2 optimizer steps of 2 micro-batches each
    for step in range(2):
        parts = t.seen[2 * step : 2 * step + 2]
        direct = entropy_gap(*_joined(parts), reduction=reduction)
        # float32 entropies of ~12 nats: ~1.4e-6 each; the float64 sums add nothing.
        assert infos[step] == pytest.approx(direct.info.item(), abs=2e-6)
        assert abs(direct.info.item()) > 1e-5
        expected = min(float(torch.tensor(direct.info.item()).exp()), 2.0)
        assert rhos[step] == pytest.approx(expected, rel=1e-5)


def test_a_scheduler_that_reads_the_rate_is_not_compounded(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    tok = AutoTokenizer.from_pretrained(model_dir)
    t = ForcedRho(
        model=model,
        reward_funcs=every_other,
        args=config(tmp_path, max_steps=3),
        train_dataset=dataset(),
        processing_class=tok,
        optimizers=(optimizer, step_lr),
    )
    t.train()
    assert logged(t, "learning_rate") == [1e-3, 5e-4, 2.5e-4]  # not x2.5 per step
    assert optimizer.param_groups[0]["lr"] == 1.25e-4


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(distillation_weight=0.0), "distillation_weight=0"),
        (
            dict(
                use_teacher_server=True,
                use_vllm=True,
                vllm_mode="server",
                teacher_model_kind="live",
            ),
            "use_teacher_server",
        ),  # fmt: skip
    ],
)
def test_settings_where_pgpo_cannot_work_are_refused(tmp_path, model_dir, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        trainer(PGPOSDPOTrainer, model_dir, config(tmp_path, **overrides))


def test_the_documented_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/trl.md's example, executed verbatim (in a scratch folder)."""
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "trl.md").read_text()
    section = page.split("## Example")[1]
    code = section.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/trl.md", "exec"), {"__name__": "example"})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    rows = ast.literal_eval(printed)  # the example prints [(info, rho), ...]
    assert len(rows) == 2
    for info, rho in rows:
        assert rho == pytest.approx(min(math.exp(info), 2.0), rel=1e-9)


def test_on_python_3_10_the_add_on_says_that_trl_needs_3_11(monkeypatch):
    """pgpo[trl] installs nothing on Python 3.10 (TRL needs 3.11): importing the add-on there
    says so, instead of asking to install what cannot be installed."""
    import sys

    import pgpo.integrations.trl as addon

    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    with pytest.raises(ImportError, match=r"TRL needs Python >= 3.11; this is Python 3.10"):
        addon._check_trl()


# The fused loss: TRL's distillation loss from hidden states through pgpo's head.


def prepared(t, old_logps_shift: float | None = None):
    """One training batch as TRL prepares it (rollouts, rewards, teacher context), with the
    model in training mode; ``old_logps_shift``: rollout log-probs that differ from the current
    ones by a seeded shift of this size, so that the IS clip acts on some tokens."""
    t.model.train()
    t.current_gradient_accumulation_steps = 1
    inputs = t._prepare_inputs(next(iter(t.get_train_dataloader())))
    if old_logps_shift is not None:
        with torch.no_grad():
            d = SDPOTrainer._compute_teacher_student_logits(t, t.model, t.teacher_model, inputs)
            now = torch.log_softmax(d.student_logits, -1).gather(
                -1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)  # fmt: skip
        g = torch.Generator().manual_seed(0)
        inputs["old_per_token_logps"] = now + old_logps_shift * torch.randn(now.shape, generator=g)
    return inputs


def loss_and_grads(t, inputs, compute_loss):
    t.model.zero_grad()
    loss = compute_loss(t, t.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    metric = t._metrics["train"]["self_distillation/distillation_loss"][-1]
    return loss.item(), grads, metric


def assert_same_loss_and_grads(t, inputs) -> None:
    """The fused path against TRL's own ``SDPOTrainer.compute_loss`` on the same batch and
    weights: the loss to 1e-5 relative, each gradient to 1e-4 of its largest entry, TRL's
    logged distillation loss to 1e-5."""
    assert t._fused
    fused, fused_grads, fused_metric = loss_and_grads(t, inputs, PGPOSDPOTrainer.compute_loss)
    assert t._fused  # the first batch's check of the hidden states passed
    stock, stock_grads, stock_metric = loss_and_grads(t, inputs, SDPOTrainer.compute_loss)
    assert abs(stock) > 1e-4  # a loss that can differ
    assert fused == pytest.approx(stock, rel=1e-5)
    assert fused_metric == pytest.approx(stock_metric, rel=1e-5)
    assert fused_grads.keys() == stock_grads.keys() and fused_grads
    for name, g in stock_grads.items():
        scale = g.abs().max().item()
        assert (fused_grads[name] - g).abs().max().item() <= 1e-4 * scale + 1e-12, name


@pytest.mark.parametrize(
    "overrides",
    [
        dict(distillation_mode="full_logits", distillation_alpha=0.0),
        dict(distillation_mode="full_logits", distillation_alpha=0.5),
        dict(distillation_mode="full_logits", distillation_alpha=1.0),
        dict(distillation_mode="topk_logits", distillation_topk=8, distillation_add_tail=True),
        dict(
            distillation_mode="topk_logits",
            distillation_topk=8,
            distillation_add_tail=False,
            distillation_alpha=0.5,
        ),  # fmt: skip
        dict(distillation_mode="sampled_token"),
        dict(distillation_mode="full_logits", temperature=0.7, loss_type="grpo"),
    ],
    ids=["full-a0", "full-a0.5", "full-a1", "topk-tail", "topk-no-tail-a0.5", "sampled", "temp"],
)
@pytest.mark.parametrize("is_clip", [None, 1.2], ids=["no-clip", "clip"])
def test_the_fused_loss_equals_trls_loss_and_gradients(tmp_path, model_dir, overrides, is_clip):
    args = config(tmp_path, distillation_is_clip=is_clip, **overrides)
    t = trainer(PGPOSDPOTrainer, model_dir, args)
    inputs = prepared(t, old_logps_shift=0.5)
    if is_clip is not None:  # the clip binds on some tokens and not on others
        assert inputs["old_per_token_logps"] is not None
    assert_same_loss_and_grads(t, inputs)


def test_the_fused_loss_equals_trls_with_lora_and_a_base_teacher(tmp_path, model_dir):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = config(tmp_path, teacher_model_kind="base", distillation_mode="full_logits")
    t = trainer(PGPOSDPOTrainer, model_dir, args, peft_config=lora)
    inputs = prepared(t)
    assert_same_loss_and_grads(t, inputs)
    assert all("lora" in n for n in loss_and_grads(t, inputs, PGPOSDPOTrainer.compute_loss)[1])


class Events(TrainerCallback):
    """Records TRL's self-distillation callbacks' tensors."""

    def __init__(self):
        self.seen = []

    def on_teacher_context_built(self, **payload):
        self.seen.append(("teacher", {k: v.clone() for k, v in payload.items()
                                      if isinstance(v, torch.Tensor)}))  # fmt: skip

    def on_self_distillation_batch_prepared(self, **payload):
        self.seen.append(("batch", {k: v.clone() for k, v in payload.items()
                                    if isinstance(v, torch.Tensor)}))  # fmt: skip


def with_feedback(data: Dataset) -> Dataset:
    """Environment feedback (TRL's ``privileged_context`` column) on every other prompt."""
    notes = [f"Earlier attempt {i} was off by {i}." if i % 2 else None for i in range(len(data))]
    return data.add_column("privileged_context", notes)


def test_under_the_fused_loss_trls_training_is_otherwise_unchanged(tmp_path, model_dir):
    """One optimizer step of two accumulated micro-batches, fused and TRL's own loss, with
    environment feedback in the teacher's reprompts and an evaluation after the step: the same
    callbacks with the same tensors (teacher context: the reprompt text with its feedback;
    batch), the same reprompt and feedback shares, the same I_k, rho and logged distillation
    loss, the same evaluation (its rollouts grouped as TRL groups them, and its loss), and the
    same weights up to the gradients' float32 rounding."""
    from transformers import AutoTokenizer

    runs = {}
    for fused in (True, False):
        events = Events()
        args = config(tmp_path / str(fused), gradient_accumulation_steps=2, max_steps=1,
                      per_device_train_batch_size=2, distillation_mode="full_logits",
                      include_environment_feedback=True, eval_strategy="steps", eval_steps=1,
                      per_device_eval_batch_size=4, num_generations_eval=2)  # fmt: skip
        tok = AutoTokenizer.from_pretrained(model_dir)
        t = PGPOSDPOTrainer(model=str(model_dir), reward_funcs=every_other, args=args,
                            train_dataset=with_feedback(dataset()),
                            eval_dataset=with_feedback(dataset().select(range(4))),
                            processing_class=tok, pgpo=PGPOSettings(fused_loss=fused),
                            callbacks=[events])  # fmt: skip
        t.train()
        assert t._fused == fused
        runs[fused] = (t, events.seen)
    (fused, seen_f), (stock, seen_s) = runs[True], runs[False]
    assert [k for k, _ in seen_f] == [k for k, _ in seen_s] and len(seen_f) >= 2
    for (_, a), (_, b) in zip(seen_f, seen_s):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    teacher_ids = [p["teacher_input_ids"] for k, p in seen_f if k == "teacher"]
    said = tok.batch_decode(torch.cat([t.flatten() for t in teacher_ids])[None])[0]
    assert "was off by" in said  # the feedback reached the teacher's reprompt
    for key in ("feedback_used_fraction", "reprompt_sample_fraction"):
        used = logged(fused, f"self_distillation/{key}")
        assert used == logged(stock, f"self_distillation/{key}") and used[0] > 0, key
    evals = [[r for r in t.state.log_history if "eval_loss" in r] for t in (fused, stock)]
    assert len(evals[0]) == len(evals[1]) == 1
    for key, value in evals[1][0].items():
        if key.startswith("eval_") and "runtime" not in key and "per_second" not in key:
            assert evals[0][0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert logged(fused, "pgpo/info") == pytest.approx(logged(stock, "pgpo/info"), abs=2e-6)
    assert logged(fused, "pgpo/rho") == pytest.approx(logged(stock, "pgpo/rho"), rel=1e-5)
    loss_f = logged(fused, "self_distillation/distillation_loss")
    assert loss_f == pytest.approx(logged(stock, "self_distillation/distillation_loss"), rel=1e-5)
    from transformers import AutoModelForCausalLM

    assert_close_weights(fused, stock, AutoModelForCausalLM.from_pretrained(model_dir).state_dict())


def test_a_setting_without_a_fused_path_warns_and_runs_trls_loss(tmp_path, model_dir):
    args = config(tmp_path, distillation_weight=0.5, max_steps=1)
    with pytest.warns(UserWarning, match=r"TRL's own distillation loss: distillation_weight=0.5"):
        t = trainer(PGPOSDPOTrainer, model_dir, args)
    assert not t._fused
    t.train()
    assert len(logged(t, "pgpo/rho")) == 1
