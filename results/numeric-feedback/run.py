"""SDPO on a numeric task, with and without environment feedback in the teacher's prompt.

SmolLM2-135M-Instruct on largest-value ("Which number is the largest: 37, 82, 15, 64?", the
number in <answer>...</answer>, task numeric), one seed, from the same start, 4 questions x 4
rollouts a step. The built-in numeric reward's feedback on a failed attempt says which way it is
off ("Your answer 64 is too small.") or that it gives no number.

    python results/numeric-feedback/run.py --out runs/numeric-feedback [--steps 30]

writes each run's folder and summary.json (held-out exact P(gold number) before and after,
mean I_k, the share of samples trained and of teachers told) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

RUNS = {  # name: overrides on the real-cpu preset
    "gold": ["teacher.fallback_demonstration=gold", "teacher.feedback=off"],
    "gold+feedback": ["teacher.fallback_demonstration=gold", "teacher.feedback=include"],
    "own": ["teacher.fallback_demonstration=none", "teacher.feedback=off"],
    "own+feedback": ["teacher.fallback_demonstration=none", "teacher.feedback=include"],
}
COMMON = ["task=numeric", "data.train=largest-value", "data.test=", "rollout.n=4",
          "batch_size=16", "rollout.max_new_tokens=8", "eval.every=10", "output.save_last=false",
          "seed=0"]  # fmt: skip


def overrides(name: str, out: Path, steps: int) -> list[str]:
    return [*COMMON, *RUNS[name], f"steps={steps}", f"output.dir={out / name}"]


def summarize(out: Path) -> dict:
    summary = {}
    for name in RUNS:
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "eval_p_correct" in r]
        steps = [r for r in rows if "loss" in r]

        def mean(key: str, steps: list[dict] = steps) -> float:
            return statistics.fmean(r[key] for r in steps if r.get(key) is not None)

        summary[name] = {
            "p_correct_before": evals[0]["eval_p_correct"],
            "p_correct_after": evals[-1]["eval_p_correct"],
            "p_correct_after_se": evals[-1]["eval_p_correct_se"],
            "curve": [[r["step"], r["eval_p_correct"]] for r in evals],
            "info_mean": mean("info"),  # over every step (0 where nothing was trained)
            "info_mean_trained": statistics.fmean(
                [r["info"] for r in steps if not r.get("empty_target_batch")] or [math.nan]
            ),  # over the steps that trained something
            "trained_share": 1 - mean("masked_share"),
            "feedback_share": mean("feedback_share") if "feedback_share" in steps[0] else 0.0,
            "reward_mean": mean("reward"),
            "reward_last10": statistics.fmean(r["reward"] for r in steps[-10:]),
            "minutes": steps[-1]["step_seconds_total"] / 60,
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from pgpo.demo.run import DemoPlan, quiet_transformers, run_all
    from pgpo.train.config import load_config

    quiet_transformers()
    start = time.perf_counter()
    configs = {n: load_config("real-cpu", overrides(n, args.out, args.steps)) for n in RUNS}
    run_all(DemoPlan(args.out, [], [], workers=args.workers), configs)
    summary = {"steps": args.steps, "seed": 0, "runs": summarize(args.out),
               "minutes": (time.perf_counter() - start) / 60}  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary["runs"], indent=1))


if __name__ == "__main__":
    main()
