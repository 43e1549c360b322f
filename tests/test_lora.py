"""LoRA through the real peft (``model.lora``) on ``tiny-cpu``: only the adapters train, the EMA
teacher is an EMA of the adapters over the shared base (and a frozen one is the base), a resumed
run is bit-identical to a straight one, and the exported model is the merged one.
(FSDP2 with LoRA: tests/test_launch.py; vLLM after a push: tests/test_vllm.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pgpo.train.config import ConfigError, load_config
from pgpo.train.loop import Run, train
from pgpo.train.models import lora
from pgpo.train.models.forward import head_weight, response_hidden
from pgpo.train.models.model import load_model
from pgpo.train.run_folder import checkpoint
from pgpo.train.run_folder.export import export

peft = pytest.importorskip("peft", reason='LoRA: pip install -e ".[lora]"')

# lr 1e-2: one Adam step moves every adapter entry by ~1e-2, far above float32 rounding.
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "optim.lr=1e-2"]


def tiny(tmp_path, *overrides):
    return load_config(
        "tiny-cpu",
        [f"output.dir={tmp_path}", "eval.every=1000", "output.save_every=1000", *LORA, *overrides],
    )


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}


def one_step(run: Run) -> dict:
    questions, seeds = run.next_questions()
    metrics = run.train_step(questions, seeds=seeds)
    assert not metrics["skipped"] and metrics["loss"] > 0
    return metrics


def test_only_the_adapters_train_and_the_ema_teacher_is_the_adapters_ema(tmp_path):
    run = Run(tiny(tmp_path, "teacher.mode=ema", "teacher.ema_rate=0.25"))
    names = {n for n, _ in lora.adapters(run.lm)}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    trained = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for _, p in lora.adapters(run.lm)}  # the optimizer sees adapters only
    # No second copy of the base: the teacher holds one tensor per adapter and nothing else.
    assert list(run.teacher.policy.parameters()) == []
    assert [v.shape for v in run.teacher.policy.values] == [
        p.shape for _, p in lora.adapters(run.lm)
    ]
    before, teacher_before = snapshot(run.lm), [v.clone() for v in run.teacher.policy.values]
    one_step(run)
    after = snapshot(run.lm)
    for name in before:
        if name in names:
            continue
        assert torch.equal(before[name], after[name]), f"base weight {name} changed"
    moved = [n for n in names if not torch.equal(before[n], after[n])]
    assert {n for n in moved if ".lora_B." in n} == {n for n in names if ".lora_B." in n}
    # theta_T <- (1 - r) theta_T + r theta_S on each adapter tensor, r = 0.25. torch.lerp and the
    # direct formula round differently: a few float32 ulps of values of size ~0.3.
    for value, old, (name, p) in zip(
        run.teacher.policy.values, teacher_before, lora.adapters(run.lm)
    ):
        expected = (1 - 0.25) * old + 0.25 * p.detach()
        assert torch.allclose(value, expected, rtol=0, atol=1e-6), name
        assert not torch.equal(value, old) or torch.equal(p.detach(), old)


def test_a_frozen_teacher_over_lora_is_the_base_model(tmp_path):
    run = Run(tiny(tmp_path, "teacher.mode=frozen"))
    one_step(run)
    base = load_model(run.cfg.model, run.cfg.seed).eval()  # the same seeded base, no adapters
    q = run.train_data.questions[0]
    prompt, response = run.tokenizer(q.prompt)["input_ids"][:40], [11, 12, 13, 14]
    pad = run.tokenizer.pad_token_id
    with torch.no_grad():
        teacher = run.teacher.policy([prompt], [response], pad)
        student = run.policy([prompt], [response], pad)
        plain = response_hidden(base, [prompt], [response], pad)
    assert torch.equal(teacher, plain)  # B = 0 adds exact zeros
    assert not torch.allclose(student, plain, atol=1e-4)  # while the student has moved
    # and the swap left the student's adapters as they were
    with torch.no_grad():
        assert torch.equal(run.policy([prompt], [response], pad), student)


def test_a_trust_region_teacher_over_lora_lerps_the_base_and_the_student(tmp_path):
    run = Run(tiny(tmp_path, "teacher.mode=trust_region", "teacher.trust_region_rate=0.3"))
    one_step(run)
    base = load_model(run.cfg.model, run.cfg.seed).eval()
    prompt = run.tokenizer(run.train_data.questions[0].prompt)["input_ids"][:40]
    response, pad = [11, 12, 13, 14], run.tokenizer.pad_token_id
    with torch.no_grad():
        hidden, head = run.teacher.hidden_and_head(run.policy, [prompt], [response], pad)
        z_ref = response_hidden(base, [prompt], [response], pad) @ head_weight(base).T
        z_student = run.policy([prompt], [response], pad) @ head_weight(run.lm).T
    expected = torch.lerp(z_ref, z_student, 0.3)
    assert not torch.allclose(z_ref, z_student, atol=1e-3)  # the two ends differ
    assert torch.allclose(hidden @ head.T, expected, rtol=0, atol=1e-5 * expected.abs().max())


@pytest.mark.slow
def test_a_resumed_lora_run_is_bit_identical_to_a_straight_one(tmp_path):
    straight = train(tiny(tmp_path / "a", "steps=4"), progress=False)
    train(tiny(tmp_path / "b", "steps=2", "output.save_every=2"), progress=False)
    resumed = train(tiny(tmp_path / "b", "steps=4"), resume=True, progress=False)
    a = checkpoint.load(checkpoint.latest(straight / "checkpoints"))
    b = checkpoint.load(checkpoint.latest(resumed / "checkpoints"))
    assert a["step"] == b["step"] == 4
    # the checkpoint holds the adapters only (the base is model.path's, or the seed's)
    assert a["policy"] and all(lora.is_adapter(k) for k in a["policy"])
    assert set(a["teacher"]) == set(a["policy"])
    for role in ("policy", "teacher"):
        for key in a[role]:
            assert torch.equal(a[role][key], b[role][key]), (role, key)
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])
    loss = lambda out: [
        json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert loss(straight) == loss(resumed)


def test_export_merges_the_adapters(tmp_path):
    from transformers import AutoModelForCausalLM

    out = train(tiny(tmp_path / "run", "steps=2"), progress=False)
    path = checkpoint.latest(out / "checkpoints")
    run = Run(tiny(tmp_path / "again", "steps=2"))
    run.restore(path)
    run.lm.eval()
    ours = dict(lora.merged_named_tensors(run.lm))
    exported = AutoModelForCausalLM.from_pretrained(export(path, tmp_path / "export")).eval()
    ids = torch.tensor([run.tokenizer(run.train_data.questions[0].prompt)["input_ids"][:48]])
    with torch.no_grad():
        adapted = run.lm(ids).logits  # adapters on, not merged
        served = exported(ids).logits
    # float32: (W + sBA) x against W x + s B (A x), the same sums in another order
    assert (adapted - served).abs().max() < 1e-5 * adapted.abs().max()
    # The weights are peft's own merge (LoraLayer.merge, W + s B A) bit for bit.
    merged = _peft_merge(run.lm)
    assert set(exported.state_dict()) == set(merged)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, merged[name]), name
        assert torch.equal(ours[name], merged[name]), name
    assert any(not torch.equal(merged[n], w) for n, w in _base(run).items())  # it did move


def _base(run: Run) -> dict[str, torch.Tensor]:
    return load_model(run.cfg.model, run.cfg.seed).state_dict()


def _peft_merge(lm) -> dict[str, torch.Tensor]:
    """peft's own merge of ``lm``'s adapters into its base (``LoraLayer.merge``), as a plain
    state dict."""
    from peft.tuners.lora import LoraLayer

    for module in lm.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return {
        k.replace(".base_layer", ""): v
        for k, v in lm.state_dict().items()
        if not lora.is_adapter(k)
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [("model.lora.target_modules=[q_proj,lm_head]", "model.lora.target_modules: must be linear"),
     ("teacher.dtype=bfloat16", "teacher.dtype: must be null with model.lora"),
     ("fsdp.checkpoint=sharded", "fsdp.checkpoint: must be full with model.lora"),
     ("model.lora.rank=-1", "model.lora.rank: must be"),
     ("model.lora.alpha=0", "model.lora.alpha: must be")],
)  # fmt: skip
def test_lora_settings_that_cannot_work_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-cpu", ["model.lora.rank=4", override])


def test_lora_without_peft_is_refused_before_any_model_loads(tmp_path):
    code = ("import sys; sys.modules['peft'] = None\nfrom pgpo.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")  # fmt: skip
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", code, "train", "--config", "tiny-cpu", "model.lora.rank=8",
         f"output.dir={out}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "pgpo: error: model.lora.rank: must be positive only with peft installed (pip install "
        '"pgpo[lora]"), got 8'
    ]
    assert not out.exists()


def test_a_frozen_lora_teacher_exports_as_the_base(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny(tmp_path / "run", "steps=1", "teacher.mode=frozen")
    path = checkpoint.latest(train(cfg, progress=False) / "checkpoints")
    teacher = AutoModelForCausalLM.from_pretrained(export(path, tmp_path / "t", role="teacher"))
    policy = AutoModelForCausalLM.from_pretrained(export(path, tmp_path / "p"))
    base = load_model(cfg.model, cfg.seed).state_dict()
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in base.items())  # W + s 0 A
    assert any(not torch.equal(policy.state_dict()[k], v) for k, v in base.items())
