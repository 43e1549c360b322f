"""Launching: LoRA (peft) under torchrun against one process, per-rank sampling, a batch that
does not split over ranks, and the GPU smoke and check plans (their dry runs and their checkers
on real CPU runs). Split from test_distributed.py so that pytest-xdist runs the two files'
torchrun launches on both cores (``--dist loadfile`` keeps a file on one worker)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_distributed import close, final_state, launch, metrics

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "optim.lr=1e-2", "teacher.ema_rate=0.25"]


@pytest.fixture(scope="module")
def lora_runs(sharp_model, tmp_path_factory) -> dict[str, Path]:
    """LoRA (peft) on 1 process and on 2 ranks, and 2 ranks resumed after step 1 (from a copy of
    the 2-rank run's folder without its step-2 checkpoint: the log is cut back on resume)."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("fsdp-lora")
    out = {
        "single": launch(root / "single", sharp_model, 1, 2, *LORA),
        "fsdp": launch(root / "fsdp", sharp_model, 2, 2, *LORA),
    }
    resumed = root / "resumed"
    shutil.copytree(out["fsdp"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000002")
    out["resumed"] = launch(resumed, sharp_model, 2, 2, *LORA, "--resume")
    return out


@pytest.mark.slow
def test_lora_on_two_ranks_matches_one_process(lora_runs):
    one, two = metrics(lora_runs["single"]), metrics(lora_runs["fsdp"])
    for a, b in zip(one, two):
        assert a["info"] > 1e-3 and abs(a["info"] - b["info"]) < 1e-6
        assert close(a["loss"], b["loss"], 1e-5) and close(a["grad_norm"], b["grad_norm"], 1e-4)
    s1, s2, s3 = (final_state(lora_runs[k]) for k in ("single", "fsdp", "resumed"))
    assert s1["policy"] and all(".lora_" in k for k in s1["policy"])  # adapters, gathered whole
    assert sorted(s1["policy"]) == sorted(s2["policy"]) == sorted(s1["teacher"])
    for role in ("policy", "teacher"):
        # Two Adam steps of lr 1e-2 move adapters by ~2e-2; float32 reductions in another order
        # (and Adam's division) leave ~1e-6 of it.
        gap = max((s1[role][k] - s2[role][k]).abs().max().item() for k in s1[role])
        assert gap < 1e-5, role
        resumed = max((s2[role][k] - s3[role][k]).abs().max().item() for k in s2[role])
        assert resumed < 1e-6, role
    moved = max((s1["policy"][k]).abs().max().item() for k in s1["policy"] if ".lora_B." in k)
    assert moved > 1e-3  # B started at 0


def test_batch_that_does_not_split_over_ranks_is_refused(sharp_model, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "pgpo.train", "--config", "tiny-cpu", f"model.path={sharp_model}"]
    cmd += [f"output.dir={tmp_path}", "batch_size=6", "steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "do not split over 2 ranks" in done.stderr


def test_gpu_smoke_plans_torchrun_of_both_presets_and_checks_a_run(tmp_path, capsys):
    from pgpo.train.config import load_config
    from pgpo.train.gpu import smoke as gpu_smoke
    from pgpo.train.loop import train

    code = gpu_smoke.main(["--model", "/m/Qwen3-8B", "--gpus", "4", "--steps", "2", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 2
    for line, preset in zip(lines, gpu_smoke.PRESETS):
        assert "--nproc-per-node=4 -m pgpo.train --config " + preset in line
        assert "model.path=/m/Qwen3-8B" in line and "steps=2" in line
    if not torch.cuda.is_available():
        assert gpu_smoke.main(["--model", "/m/Qwen3-8B"]) == 2
        assert "no GPU visible" in capsys.readouterr().err

    # The checker, on a real (tiny) run's output, and on the same output with a wrong rho.
    cfg = load_config(
        "tiny-cpu", [f"output.dir={tmp_path}", "steps=2", "eval.every=2", "output.save_every=2"]
    )
    train(cfg, progress=False)
    result = gpu_smoke.check_run("tiny-cpu", tmp_path, 2)
    assert result["seconds_per_step"] > 0 and 0 <= result["avg_at_k"] <= 1
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    bad = json.loads(rows[0])
    bad["rho"] += 0.01
    (tmp_path / "metrics.jsonl").write_text("\n".join([json.dumps(bad), *rows[1:]]) + "\n")
    with pytest.raises(AssertionError, match="step 1: rho"):
        gpu_smoke.check_run("tiny-cpu", tmp_path, 2)


def rank_samples(tmp_path, *overrides: str) -> list[list[list[int]]]:
    """Every rank's samples of the same prompt (gpu_check's two-ranks probe, under torchrun)."""
    out = tmp_path / "samples.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "pgpo.train.gpu.check", "--rank-samples", str(out)]
    cmd += [f"output.dir={tmp_path / 'run'}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_ranks_given_the_same_prompt_draw_different_samples_with_hf(tmp_path):
    first, second = rank_samples(tmp_path, "fsdp.compute_dtype=float32")
    assert len(first) == len(second) == 4
    assert first != second  # before per-rank seeds both ranks drew the same noise


def test_gpu_check_plans_every_path_and_checks_a_run(tmp_path, capsys):
    from pgpo.train.gpu import check as gpu_check

    assert gpu_check.main(["--dry-run", "--gpus", "2", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split(":")[0] for line in lines]
    assert names == ["plain", "torchrun", "no-sleep", "runner-v1", "runner-v2", "two-ranks"]
    assert "VLLM_USE_V2_MODEL_RUNNER=1" in lines[4] and "--nproc-per-node=1" in lines[1]
    assert "rollout.vllm_sleep=false" in lines[2]
    assert gpu_check.main(["--dry-run", "--gpus", "1", "--out", str(tmp_path)]) == 0
    assert "two-ranks" not in capsys.readouterr().out  # needs 2 GPUs
    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path)]) == 2
        assert "no GPU visible" in capsys.readouterr().err

    folder = tmp_path / "plain"
    folder.mkdir()
    rows = [{"step": s, "loss": 0.1, "tis_ratio_mean": 1.01, "vllm_sleep_freed_gib": 3.2}
            for s in (1, 2)]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_check.check_training("plain", folder, "ok", sleep=True)["run"] == "plain"
    with pytest.raises(AssertionError, match="said 'Failed to load weights'"):
        gpu_check.check_training("plain", folder, "LMHead: Failed to load weights", sleep=True)
    rows[1]["tis_ratio_mean"] = 1.2
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AssertionError, match="importance ratios"):
        gpu_check.check_training("plain", folder, "ok", sleep=True)


def test_the_no_vllm_smoke_plans_the_largest_random_qwen3_that_fits(capsys):
    from pgpo.train.gpu import smoke as gpu_smoke
    from pgpo.train.models.model import small_qwen3

    # The parameter formula against the model itself (built on the meta device).
    with torch.device("meta"):
        lm = small_qwen3(151_936, 256, 3, 4, 1, 64, True, (0, 1, 0), 64, seed=0)
    counted = sum(p.numel() for p in lm.parameters())
    assert gpu_smoke.random_qwen3_parameters(256, 3, 4, 64) == counted
    plan = gpu_smoke.largest_random_qwen3(139.0)
    one_more = gpu_smoke.random_qwen3_parameters(layers=plan["layers"] + 1, **gpu_smoke.WIDTH)
    budget = (139.0 - gpu_smoke.HEADROOM_GIB) * 2**30 / gpu_smoke.BYTES_PER_PARAMETER
    assert plan["parameters"] <= budget < one_more  # the largest that fits
    assert gpu_smoke.main(["--no-vllm", "--gpu-gib", "139", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"model.tiny_layers={plan['layers']}" in out and "--nproc-per-node=1" in out
    assert "rollout.engine=hf" in out and "output.save_last=false" in out
