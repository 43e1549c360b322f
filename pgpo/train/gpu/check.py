"""``python -m pgpo.train.gpu.check``: the first thing to run on a GPU machine (minutes, one GPU).

It trains the tiny model for 2 steps with vLLM rollouts in each way the GPU path can be taken,
each a real ``pgpo train``, and checks what the CPU tests cannot:

- ``plain``: one process (``python -m pgpo.train``), vLLM in sleep mode between rollouts;
- ``torchrun``: the same under ``torchrun --nproc-per-node 1`` (FSDP2, gloo beside NCCL);
- ``no-sleep``: ``rollout.vllm_sleep=false``;
- ``runner-v1`` / ``runner-v2``: vLLM's model runners (``VLLM_USE_V2_MODEL_RUNNER=0`` / ``1``);
- ``two-ranks`` (with 2 GPUs or more): two ranks given the same prompt draw different samples.

For each run it reports: the memory sleep mode freed (``vllm_sleep_freed_gib``), the mean
importance ratio (within a bf16 tolerance of 1: vLLM samples from the trainer's weights), and
that no "weights not loaded" warning followed a weight push. ``--dry-run`` prints the plan.

``--rank-samples OUT.json [key=value ...]`` (under torchrun) is the two-ranks probe itself.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from pgpo.cli_util import ArgumentParser, UserError, run
from pgpo.outputs import json_text

TINY = ["--config", "tiny-cpu", "steps=2", "eval.every=2", "rollout.engine=vllm"]
TINY += ["model.tiny_head_dim=64", "rollout.max_new_tokens=16", "output.overwrite=true"]
BF16_RATIO = 0.05  # |mean ratio - 1|: bf16 log-probs of a few nats are off by ~1e-2
STALE = ("Failed to load weights", "were not loaded", "weights not loaded")


def plan(out: Path, gpus: int) -> list[tuple[str, dict, list[str]]]:
    """(name, extra environment, command) of every check run."""
    python = [sys.executable, "-m", "pgpo.train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    runs = [
        ("plain", {}, python + TINY),
        ("torchrun", {}, torchrun + ["--nproc-per-node=1", "-m", "pgpo.train", *TINY]),
        ("no-sleep", {}, python + TINY + ["rollout.vllm_sleep=false"]),
        ("runner-v1", {"VLLM_USE_V2_MODEL_RUNNER": "0"}, python + TINY),
        ("runner-v2", {"VLLM_USE_V2_MODEL_RUNNER": "1"}, python + TINY),
    ]
    runs = [(n, e, c + [f"output.dir={out / n}"]) for n, e, c in runs]
    if gpus >= 2:
        probe = torchrun + ["--nproc-per-node=2", "-m", "pgpo.train.gpu.check", "--rank-samples"]
        probe += [str(out / "two-ranks.json"), "rollout.engine=vllm", "model.tiny_head_dim=64"]
        runs.append(("two-ranks", {}, probe + [f"output.dir={out / 'two-ranks'}"]))
    return runs


def check_training(name: str, folder: Path, output: str, sleep: bool) -> dict:
    """What a healthy GPU run wrote; raises AssertionError naming the first thing wrong."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2, f"{name}: {len(steps)} steps logged"
    ratios = [r["tis_ratio_mean"] for r in steps]
    assert all(abs(r - 1) < BF16_RATIO for r in ratios), f"{name}: importance ratios {ratios}"
    stale = [s for s in STALE if s in output]
    assert not stale, f"{name}: vLLM said {stale[0]!r} after a weight push"
    freed = [r.get("vllm_sleep_freed_gib") for r in steps]
    if sleep:
        assert all(f is not None and f > 0 for f in freed), f"{name}: sleep freed {freed}"
    return {"run": name, "tis_ratio_mean": ratios, "sleep_freed_gib": freed}


def check_rank_samples(path: Path) -> dict:
    ranks = json.loads(path.read_text())
    assert len(ranks) >= 2 and ranks[0] != ranks[1], "two ranks drew the same samples"
    return {"run": "two-ranks", "distinct": True}


def rank_samples(out: str, overrides: list[str]) -> None:
    """Under torchrun: every rank samples one prompt with the run's engine; rank 0 writes all."""
    import torch
    import torch.distributed as dist

    from pgpo.train.config import load_config
    from pgpo.train.loop import Run
    from pgpo.train.models.distributed import init_world
    from pgpo.train.tasks.prompts import student_prompt

    torch.set_num_threads(1)
    world = init_world()
    trainer = Run(load_config("tiny-cpu", overrides), world)
    prompt = student_prompt(trainer.tokenizer, trainer.test_data.questions[0], 256)
    samples = [c.tokens for c in trainer.engine.generate([prompt], 4, 1.0, 1.0, 8)[0]]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, samples)
    if world.main:
        Path(out).write_text(json_text(gathered))
    if hasattr(trainer.engine, "close"):
        trainer.engine.close()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m pgpo.train.gpu.check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu-check")
    p.add_argument("--gpus", type=int, default=None, help="default: all visible")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--rank-samples", default=None, metavar="OUT.json", help="(under torchrun)")
    p.add_argument("overrides", nargs="*", help="--rank-samples: trainer key=value")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.rank_samples:
        rank_samples(args.rank_samples, args.overrides)
        return 0
    import torch

    gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
    runs = plan(Path(args.out), gpus)
    for name, env, cmd in runs:
        print(f"{name}: {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(cmd)}".strip())
    if args.dry_run:
        return 0
    if not torch.cuda.is_available():
        raise UserError("no GPU visible: gpu_check needs CUDA (use --dry-run to see the plan)")
    results = []
    for name, env, cmd in runs:
        done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: FAILED (exit {done.returncode}): {done.stderr[-2000:]}")
            return 1
        try:
            if name == "two-ranks":
                results.append(check_rank_samples(Path(args.out) / "two-ranks.json"))
            else:
                sleep = name != "no-sleep"
                output = done.stdout + done.stderr
                results.append(check_training(name, Path(args.out) / name, output, sleep))
        except AssertionError as err:
            print(f"{name}: FAILED: {err}")
            return 1
        print(json_text(results[-1]))
    print(f"gpu_check: all {len(results)} runs passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_main, "gpu_check", argv)


if __name__ == "__main__":
    sys.exit(main())
