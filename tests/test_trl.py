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
from trl.experimental.sdpo import SDPOConfig, SDPOTrainer  # noqa: E402

from pgpo.information import entropy_gap  # noqa: E402
from pgpo.integrations.trl import PGPOSDPOTrainer, PGPOSettings  # noqa: E402
from pgpo.train.model import load_tokenizer  # noqa: E402

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


@pytest.mark.parametrize("accumulation", [1, 2])
def test_rho_one_is_plain_sdpo_bit_for_bit(tmp_path, model_dir, accumulation):
    args = dict(
        gradient_accumulation_steps=accumulation, per_device_train_batch_size=4 // accumulation
    )
    plain = trainer(SDPOTrainer, model_dir, config(tmp_path / "plain", **args))
    plain.train()
    ones = PGPOSettings(kind="floored", rho_max=1.0)
    pgpo = trainer(PGPOSDPOTrainer, model_dir, config(tmp_path / "pgpo", **args), pgpo=ones)
    pgpo.train()
    assert logged(pgpo, "pgpo/rho") == [1.0, 1.0]
    # I_k measured (float32 noise on a 12-nat entropy is ~1e-6), and rho clipped to 1.
    assert all(abs(i) > 1e-5 for i in logged(pgpo, "pgpo/info"))
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
    forced = trainer(ForcedRho, model_dir, config(tmp_path / "f", learning_rate=1e-3, **one))
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
    t = trainer(Recording, model_dir, args, pgpo=PGPOSettings(info_reduction=reduction))
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
    """The README's TRL example, executed verbatim (in a scratch folder)."""
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = page.split("## PGPO for TRL users")[1]
    code = section.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "example"})
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
