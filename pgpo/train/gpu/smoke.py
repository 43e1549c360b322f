"""GPU smoke test of the paper's configuration: the Qwen3-8B presets for a few steps.

    python -m pgpo.train.gpu.smoke --model /models/Qwen3-8B [--gpus 4] [--steps 3]
        [--data mmlu-science] [--out runs/gpu-smoke] [--dry-run] [key=value ...]
    python -m pgpo.train.gpu.smoke --no-vllm [--gpu-gib 139] [--dry-run]

``--no-vllm`` needs no model folder and no vLLM: a randomly initialised Qwen3 of the largest size
whose full fine-tuning state fits one GPU (:func:`largest_random_qwen3`), trained for 3 steps with
transformers rollouts under ``torchrun --nproc-per-node 1`` (FSDP2, bf16 compute).

For ``qwen3-8b-sdpo`` and then ``qwen3-8b-pgpo`` it launches
``torchrun --nproc-per-node GPUS -m pgpo.train --config PRESET steps=STEPS ...`` (FSDP2, vLLM
colocated) and checks what the run wrote: one row per step, finite loss and gradient norm,
``rho = min(exp(alpha I), rho_max)`` for PGPO and 1 for SDPO, importance ratios near 1 (vLLM
in sync with the trainer), the evaluation at the last step and a checkpoint. It prints a table
with seconds per step, rollout tokens/s and peak GPU memory. Without a GPU it stops with exit
code 2 (``--dry-run`` prints the commands on any machine).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from pgpo.cli_util import ArgumentParser, UserError, positive_int, run
from pgpo.multiplier import MultiplierConfig
from pgpo.outputs import json_text

PRESETS = ("qwen3-8b-sdpo", "qwen3-8b-pgpo")


def commands(args) -> list[tuple[str, Path, list[str]]]:
    """(preset, output folder, torchrun command) for each preset."""
    out = []
    for preset in PRESETS:
        folder = Path(args.out) / preset
        overrides = [
            f"model.path={args.model}",
            f"model.tokenizer={args.tokenizer or args.model}",
            f"steps={args.steps}",
            f"eval.every={args.steps}",
            f"output.save_every={args.steps}",
            "collapse.keep_best=false",  # one checkpoint of an 8B run is enough for a smoke test
            f"output.dir={folder}",
        ]
        if args.data:
            # in place of the presets' SciKnowEval domain
            overrides += [f"data.train={args.data}", f"data.test={args.data}", "data.domain=null"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={args.gpus}", "-m", "pgpo.train", "--config", preset]
        out.append((preset, folder, cmd + overrides + list(args.overrides)))
    return out


# Bytes a parameter under --no-vllm: fp32 weights, gradients and both AdamW moments (16), the fp32
# EMA teacher (4), and the transformers engine's whole fp32 copy for sampling (4).
BYTES_PER_PARAMETER = 24
HEADROOM_GIB = 12  # activations, gathered bf16 layers, chunked logits, allocator slack
WIDTH = dict(hidden=4096, heads=32, head_dim=128)  # Qwen3-8B's width, one KV head, MLP 2 x H


def random_qwen3_parameters(hidden: int, layers: int, heads: int, head_dim: int) -> int:
    """Parameters of the trainer's ``tiny-random-qwen3`` (tied embedding of Qwen3's 151,936
    tokens, one KV head, MLP width 2 x hidden): ``V H + H + L (2 H h d + 2 H d + 6 H^2 + 2 H +
    2 d)``."""
    from pgpo.train.models.model import QWEN3_VOCAB

    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * head_dim + 6 * hidden**2
    per_layer += 2 * hidden + 2 * head_dim  # the two RMSNorms and q/k norms
    return QWEN3_VOCAB * hidden + hidden + layers * per_layer


def largest_random_qwen3(gpu_gib: float) -> dict:
    """The most decoder layers at Qwen3-8B's width whose training state fits ``gpu_gib``."""
    budget = (gpu_gib - HEADROOM_GIB) * 2**30 / BYTES_PER_PARAMETER
    layers = 0
    while random_qwen3_parameters(layers=layers + 1, **WIDTH) <= budget:
        layers += 1
    if layers == 0:
        raise UserError(f"--gpu-gib {gpu_gib:g}: not even one layer of width 4096 fits")
    params = random_qwen3_parameters(layers=layers, **WIDTH)
    return {"layers": layers, "parameters": params, **WIDTH,
            "state_gib": params * BYTES_PER_PARAMETER / 2**30}  # fmt: skip


def no_vllm_command(args, plan: dict) -> list[str]:
    """torchrun, one rank, of that model for ``args.steps`` steps with transformers rollouts."""
    folder = Path(args.out) / "no-vllm"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    cmd += ["-m", "pgpo.train", "--config", "tiny-cpu", "model.path=tiny-random-qwen3"]
    cmd += [f"model.tiny_hidden_size={plan['hidden']}", f"model.tiny_layers={plan['layers']}"]
    cmd += [f"model.tiny_heads={plan['heads']}", f"model.tiny_head_dim={plan['head_dim']}"]
    cmd += [f"steps={args.steps}", f"eval.every={args.steps}"]
    cmd += ["batch_size=16", "rollout.n=4", "rollout.max_new_tokens=32", "eval.max_new_tokens=32"]
    cmd += ["data.max_test=8", "eval.n=2", "fsdp.compute_dtype=bfloat16", "rollout.engine=hf"]
    # No checkpoint: the whole state (20 bytes a parameter) would not fit the disk.
    cmd += ["output.save_every=100000", "output.save_last=false"]
    cmd += ["output.overwrite=true", f"output.dir={folder}", *args.overrides]
    return cmd


def check_run(preset: str, folder: Path, steps: int, checkpoint: bool = True) -> dict:
    """What a healthy run wrote; raises AssertionError naming the first thing that is wrong."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "missing steps"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    p = config["pgpo"]
    multiplier = MultiplierConfig(p["alpha"], p["rho_max"], p["kind"], p["sharpness"])
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), f"step {r['step']}"
        expected = float(multiplier(r["info"])) if p["enabled"] else 1.0
        assert abs(r["rho"] - expected) < 1e-9, f"step {r['step']}: rho {r['rho']}"
        if "tis_ratio_mean" in r:
            assert abs(r["tis_ratio_mean"] - 1) < 0.05, f"vLLM out of sync: {r['tis_ratio_mean']}"
    assert "eval_avg_at_k" in rows[-1], "no evaluation at the last step"
    if checkpoint:
        assert (folder / "checkpoints" / f"step_{steps:06d}" / "state.pt").exists(), "no checkpoint"
    return {
        "preset": preset,
        "seconds_per_step": sum(r["step_seconds"] for r in rows) / len(rows),
        "rollout_tokens_per_second": sum(r["tokens_per_second"] for r in rows) / len(rows),
        "peak_gpu_gib": max(r.get("gpu_peak_gib", float("nan")) for r in rows),
        "avg_at_k": rows[-1]["eval_avg_at_k"],
    }


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m pgpo.train.gpu.smoke", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a local Qwen3-8B folder (or a hub id)")
    p.add_argument("--no-vllm", action="store_true", help="a random Qwen3 that fills one GPU")
    p.add_argument("--gpu-gib", type=float, default=None, help="--no-vllm: GPU memory (GiB)")
    p.add_argument("--tokenizer", default=None, help="default: the model's")
    p.add_argument("--gpus", type=positive_int, default=None, help="default: all visible")
    p.add_argument("--steps", type=positive_int, default=3)
    p.add_argument("--data", default=None, help="e.g. mmlu-science (default: the presets')")
    p.add_argument("--out", default="runs/gpu-smoke")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="trainer key=value for both runs")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.no_vllm:
        return _no_vllm(args)
    if args.model is None:
        raise UserError("--model is required (or --no-vllm)")
    if args.gpus is None:
        args.gpus = max(torch.cuda.device_count(), 1)
    plan = commands(args)
    if args.dry_run:
        for _, _, cmd in plan:
            print(shlex.join(cmd))
        return 0
    if not torch.cuda.is_available():
        raise UserError("no GPU visible: this smoke test needs CUDA (use --dry-run to see it)")
    results = []
    for preset, folder, cmd in plan:
        print(f"== {preset}: {shlex.join(cmd)}", flush=True)
        done = subprocess.run(cmd, env=os.environ.copy())
        if done.returncode != 0:
            print(f"{preset}: torchrun exited {done.returncode}", file=sys.stderr)
            return 1
        try:
            results.append(check_run(preset, folder, args.steps))
        except AssertionError as err:
            print(f"{preset}: FAILED: {err}", file=sys.stderr)
            return 1
    print(f"{'preset':<16} {'s/step':>8} {'rollout tok/s':>14} {'peak GiB':>9} {'avg@k':>6}")
    for r in results:
        print(
            f"{r['preset']:<16} {r['seconds_per_step']:8.1f} "
            f"{r['rollout_tokens_per_second']:14.0f} {r['peak_gpu_gib']:9.1f} {r['avg_at_k']:6.3f}"
        )
    return 0


def _no_vllm(args) -> int:
    import torch

    gib = args.gpu_gib
    if gib is None:
        if not torch.cuda.is_available():
            raise UserError("no GPU visible: give --gpu-gib to plan, with --dry-run")
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = largest_random_qwen3(gib)
    cmd = no_vllm_command(args, plan)
    print(
        f"random Qwen3: {plan['layers']} layers of width {plan['hidden']}, "
        f"{plan['parameters'] / 1e9:.2f} B parameters, training state {plan['state_gib']:.0f} GiB "
        f"of {gib:.0f} GiB"
    )
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    if not torch.cuda.is_available():
        raise UserError("no GPU visible: this smoke test needs CUDA (use --dry-run to see it)")
    done = subprocess.run(cmd, env=os.environ.copy())
    if done.returncode != 0:
        print(f"no-vllm: torchrun exited {done.returncode}", file=sys.stderr)
        return 1
    result = check_run("tiny-cpu", Path(args.out) / "no-vllm", args.steps, checkpoint=False)
    print(json_text({**plan, **result}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_main, "gpu_smoke", argv)


if __name__ == "__main__":
    sys.exit(main())
