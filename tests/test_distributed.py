"""FSDP2 under torchrun (gloo, 2 CPU processes) against a single process on the same batch.

The runs use ``sharp_model`` (conftest): a small Qwen3 with the real vocabulary whose weights are
scaled up, so that I_k (about 0.003-0.005 nats) is well above float32 noise and the gradient is
not negligible. Tolerances: both runs add the same float32
numbers in a different order (sharded reductions, other micro-batch padding), so they agree to a
few float32 ulps of the values involved, not bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgpo.cli import main as pgpo_main
from pgpo.train.run_folder import checkpoint

COMMON = [
    "batch_size=8",  # 4 questions x 2 rollouts: 2 questions per rank
    "rollout.seed_per_prompt=true",  # rollouts independent of how prompts are split
    "fsdp.compute_dtype=float32",
    "loss.micro_batch=2",
    "eval.every=2",  # the last step of every run: evaluation under FSDP, once a run
    "output.save_every=1",
]


def launch(out: Path, model: Path, procs: int, steps: int, *extra: str) -> Path:
    """``python -m pgpo.train`` (1 process) or ``torchrun --nproc-per-node procs -m ...``."""
    args = ["--config", "tiny-cpu", f"model.path={model}", f"output.dir={out}", f"steps={steps}"]
    args += COMMON + list(extra)
    if procs == 1:
        cmd = [sys.executable, "-m", "pgpo.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={procs}", "-m", "pgpo.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PGPO_DEBUG": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(out: Path) -> dict:
    return checkpoint.load(checkpoint.latest(out / "checkpoints"))


@pytest.fixture(scope="module")
def runs(sharp_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    out = {
        "single": launch(root / "single", sharp_model, 1, 2),
        "fsdp": launch(root / "fsdp", sharp_model, 2, 2),
        # One step: its test reads step 1's I_k and gradient norm, and the dtypes after a step.
        "bf16": launch(root / "bf16", sharp_model, 2, 1, "fsdp.compute_dtype=bfloat16"),
    }
    # --resume to step 2 from the whole-weights checkpoint the 2-rank run wrote after step 1
    # (a copy of its folder without the step-2 checkpoint: the log is cut back on resume).
    resumed = root / "resumed"
    shutil.copytree(out["fsdp"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000002")
    out["resumed"] = launch(resumed, sharp_model, 2, 2, "--resume")
    # The same with per-rank shards (torch.distributed.checkpoint) instead of whole tensors.
    sharded = launch(root / "sharded", sharp_model, 2, 1, "fsdp.checkpoint=sharded")
    out["sharded"] = launch(sharded, sharp_model, 2, 2, "fsdp.checkpoint=sharded", "--resume")
    return out


def close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.mark.slow
def test_two_ranks_match_one_process_in_rho_gradient_and_weights(runs):
    assert_matches_one_process(runs["single"], runs["fsdp"])


def assert_matches_one_process(single: Path, sharded: Path) -> None:
    """A 2-rank run equals the single process on the same global batch after 2 steps, to the
    float32 tolerances of a different summation order."""
    one, two = metrics(single), metrics(sharded)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert a["info"] > 1e-3  # a real signal, not float noise
        # I_k is a difference of entropies of about 12 nats: float32 leaves ~1e-6 of them.
        assert abs(a["info"] - b["info"]) < 1e-6
        assert abs(a["rho"] - b["rho"]) < 1e-6 and a["rho"] > 1.0
        assert close(a["loss"], b["loss"], 1e-5)
        # The global gradient norm catches a wrong loss scale across ranks (Adam would not).
        assert close(a["grad_norm"], b["grad_norm"], 1e-4)
        assert a["reward"] == b["reward"] and a["masked_share"] == b["masked_share"]
    s1, s2 = final_state(single), final_state(sharded)
    assert sorted(s1["policy"]) == sorted(s2["policy"])  # transformers' names, gathered whole
    moved = max((s1["policy"][k] - s2["policy"][k]).abs().max().item() for k in s1["policy"])
    # Two Adam steps of lr 1e-3 move weights by ~2e-3; the runs agree to float32 rounding of
    # weights of size ~1 (Adam's division amplifies tiny gradient differences a little).
    assert moved < 1e-5
    teacher = max((s1["teacher"][k] - s2["teacher"][k]).abs().max().item() for k in s1["teacher"])
    assert teacher < 1e-6
    for k, v in s1["optimizer"]["state"].items():
        assert torch.allclose(v["exp_avg"], s2["optimizer"]["state"][k]["exp_avg"], atol=1e-9)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_match_one_process(runs, sharp_model, tmp_path):
    """``torchrun --nnodes 2 --nproc-per-node 1``: two agents, as two nodes would start them,
    meeting at a c10d rendezvous on localhost (gloo), equal the single process after 2 steps, to
    the 2-rank test's tolerances. Then the run resumes on one node with 2 processes from the
    checkpoint the two nodes wrote once (rank 0 writes, the folder is shared here as it is on a
    cluster's shared filesystem)."""
    out = tmp_path / "nodes"
    args = ["--config", "tiny-cpu", f"model.path={sharp_model}", f"output.dir={out}", "steps=2"]
    args += COMMON
    port = free_port()
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=pgpo-test",
                "-m",
                "pgpo.train",
                *args,
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1", "PGPO_DEBUG": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    for agent in agents:
        _, err = agent.communicate(timeout=600)
        assert agent.returncode == 0, err[-3000:]
    assert_matches_one_process(runs["single"], out)
    # Checkpoints were written once (one state.pt per step), and resume on another shape.
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "step_000001", "step_000002"]  # fmt: skip
    resumed = launch(out, sharp_model, 2, 3, "--resume")
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3]


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_master_weights_and_the_signal(runs):
    fp32, bf16 = metrics(runs["single"])[0], metrics(runs["bf16"])[0]
    # bf16 keeps 8 bits of mantissa: entropies of ~12 nats are off by ~0.05 per token, mostly
    # cancelling in the mean; measured |dI| = 2e-4 and 1% on the gradient norm.
    assert abs(fp32["info"] - bf16["info"]) < 1e-3 and bf16["info"] > 1e-3
    assert close(fp32["grad_norm"], bf16["grad_norm"], 0.05)
    state = final_state(runs["bf16"])
    assert all(v.dtype == torch.float32 for v in state["policy"].values())
    moments = state["optimizer"]["state"].values()
    assert all(m["exp_avg"].dtype == torch.float32 for m in moments)


@pytest.mark.slow
def test_sharded_run_resumes_from_its_checkpoint(runs):
    straight, resumed = metrics(runs["fsdp"]), metrics(runs["resumed"])
    assert [r["step"] for r in resumed] == [1, 2]
    assert abs(straight[1]["rho"] - resumed[1]["rho"]) < 1e-6
    a, b = final_state(runs["fsdp"])["policy"], final_state(runs["resumed"])["policy"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_per_rank_shard_checkpoints_resume_like_whole_ones(runs, capsys):
    straight, resumed = metrics(runs["fsdp"]), metrics(runs["sharded"])
    assert [r["step"] for r in resumed] == [1, 2]
    for key in ("rho", "info", "loss", "grad_norm"):
        assert close(straight[1][key], resumed[1][key], 1e-6), key
    last = checkpoint.latest(runs["sharded"] / "checkpoints")
    state = checkpoint.load(last)
    assert state["sharded"] and "policy" not in state  # tensors only in the rank shards
    assert len(list((last / "shards").glob("*.distcp"))) == 2
    # A sharded checkpoint needs torchrun: a single process says so in one line, exit 2.
    # (Single-process commands run in this process: the same code without an interpreter's
    # 5 s of imports.)
    config = str(runs["sharded"] / "config.yaml")
    capsys.readouterr()
    assert pgpo_main(["train", "--config", config, "--resume", "steps=3"]) == 2
    assert "load it under torchrun" in capsys.readouterr().err
    # `pgpo consolidate` makes it whole: equal to the whole checkpoint of the same run.
    whole_dir = runs["sharded"] / "consolidated"
    code = pgpo_main(["consolidate", "--checkpoint", str(last), "--out", str(whole_dir)])
    assert code == 0, capsys.readouterr().err[-2000:]
    whole, reference = checkpoint.load(whole_dir / "step_000002"), final_state(runs["resumed"])
    assert set(whole) == set(reference)
    for part in ("policy", "teacher"):
        assert sorted(whole[part]) == sorted(reference[part])
        assert (
            max((whole[part][k] - reference[part][k]).abs().max().item() for k in whole[part])
            < 1e-6
        )
    for k, v in reference["optimizer"]["state"].items():
        assert torch.allclose(
            whole["optimizer"]["state"][k]["exp_avg_sq"], v["exp_avg_sq"], atol=1e-12
        )
    assert whole["sampler"] == reference["sampler"] and whole["step"] == 2
    assert torch.equal(whole["rng"]["torch"], state["rng"]["torch"])  # kept, not this process's
    capsys.readouterr()
    code = pgpo_main(["eval", "--config", config, "--checkpoint", str(whole_dir / "step_000002")])
    out, err = capsys.readouterr()  # one process reads it
    assert code == 0 and json.loads(out)["questions"] == 4, err[-2000:]
    # Under torchrun, `pgpo eval` reads it (printing the result once).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "pgpo.cli", "eval", "--config", config]
    cmd += ["--checkpoint", str(last)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("{")]
    assert json.loads(line)["questions"] == 4


@pytest.mark.slow
def test_sharded_checkpoint_exports_as_a_transformers_folder(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    last = checkpoint.latest(runs["sharded"] / "checkpoints")
    reference = final_state(runs["resumed"])  # the same run, whole tensors
    for role, flags in (("policy", []), ("teacher", ["--teacher"])):
        out = tmp_path / role
        code = pgpo_main(["export", "--checkpoint", str(last), "--out", str(out), *flags])
        assert code == 0, capsys.readouterr().err[-2000:]
        model = AutoModelForCausalLM.from_pretrained(out)
        exported = model.state_dict()
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        gap = max((exported[k] - v).abs().max().item() for k, v in reference[role].items())
        assert gap < 1e-6, role
        assert json.loads((out / "pgpo_export.json").read_text())["step"] == 2


def test_the_process_group_has_gloo_for_cpu_tensors_when_cuda_is_there():
    from pgpo.train.models.distributed import process_group_backend

    assert process_group_backend(cuda=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(cuda=False) == "gloo"
