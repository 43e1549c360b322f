"""Time of a PGPO step over an SDPO step: the paper's "negligible overhead" claim (C6).

Same model (a tiny random Qwen3ForCausalLM with the real 151,936-token vocabulary), same batch and
the same sampled rollouts: every trial restores one snapshot (weights, optimizer, teacher, RNG)
before each variant, and the variants are interleaved so that machine noise hits them alike.

Variants: ``sdpo`` (rho = 1, no entropy passes: the baseline), ``sdpo+info`` (rho = 1 but I_k
computed and logged, pgpo's default), ``pgpo`` (I_k -> rho_k -> scaled step).

    python benchmarks/bench_train_step.py [--trials 5]

Prints median times and ratios, and writes benchmarks/results/train_step.json (read by
``pgpo-check report`` for claim C6). Target: pgpo / sdpo <= 1.02.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from pgpo.outputs import json_text
from pgpo.train.config import load_config
from pgpo.train.run import Run, modulation
from pgpo.train.run_folder import checkpoint

RESULTS = Path(__file__).parent / "results" / "train_step.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=None, help="loss.chunk_size (tokens)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(
        "tiny-cpu",
        [
            f"model.tiny_hidden_size={args.hidden}",
            f"model.tiny_layers={args.layers}",
            f"batch_size={args.batch_size}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            "output.dir=/tmp/pgpo-bench-train-step",
            *([f"loss.chunk_size={args.chunk_size}"] if args.chunk_size else []),
        ],
    )
    run = Run(cfg)
    questions = run.sampler.next(cfg.questions_per_step)
    # Everything a checkpoint holds: each variant starts from exactly this state.
    snapshot = copy.deepcopy({**run.state(), "step": 0, "rng": checkpoint.rng_state()})
    pgpo_mult = modulation(cfg)
    variants = {
        "sdpo": (None, False),
        "sdpo+info": (None, True),
        "pgpo": (pgpo_mult, True),
    }
    times = {name: [] for name in variants}
    train_times = {name: [] for name in variants}
    for trial in range(args.trials + 1):  # the first round warms up and is not counted
        for name, (mult, track) in variants.items():
            run.load_state(snapshot)
            cfg.pgpo.track_info = track
            run.modulation = mult
            start = time.perf_counter()
            metrics = run.train_step(questions)
            if trial > 0:
                times[name].append(time.perf_counter() - start)
                train_times[name].append(metrics["train_seconds"])
    med = {k: statistics.median(v) for k, v in times.items()}
    med_train = {k: statistics.median(v) for k, v in train_times.items()}
    print(
        f"tiny Qwen3 (hidden {args.hidden}, {args.layers} layers, vocab 151,936), "
        f"{args.batch_size} responses of <= {args.max_new_tokens} tokens, {args.trials} trials"
    )
    print(f"{'variant':10s} {'step s':>8s} {'loss+update s':>14s}")
    for name in variants:
        print(f"{name:10s} {med[name]:8.3f} {med_train[name]:14.3f}")
    ratio = med["pgpo"] / med["sdpo"]
    ratio_train = med_train["pgpo"] / med_train["sdpo"]
    print(
        f"time ratio pgpo / sdpo: {ratio:.3f} whole step, {ratio_train:.3f} loss+update only "
        f"(target <= 1.02) {'OK' if ratio <= 1.02 else 'MISSED'}"
    )
    print(f"time ratio pgpo / sdpo+info: {med['pgpo'] / med['sdpo+info']:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json_text(
            {
                "time_ratio": ratio,
                "time_ratio_loss_update": ratio_train,
                "median_seconds": med,
                "median_train_seconds": med_train,
                "trials": args.trials,
                "settings": vars(args),
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
