"""The multiple-choice path's golden record: fixed ``tiny-cpu`` runs, what they log step by step.

``python tests/golden/record.py`` rewrites ``tests/golden/multiple_choice.json`` from the code as
it stands; ``tests/test_tasks.py`` runs the same runs and compares. Regenerate only for a change
that is meant to alter these numbers, and say so in the commit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).with_name("multiple_choice.json")
# Each run: the preset's overrides. The second exercises the premise path (false positives,
# their records), the committed-letter verifier, letter positions and exact evaluation.
RUNS = {
    "sdpo-pgpo": ["steps=3", "eval.every=3"],
    "premise-letter": [
        "steps=2", "eval.every=2", "eval.mode=exact", "eval.edge_questions=2",
        "reward.false_positive_rate=0.5", "reward.committed_letter=true",
        "loss.positions=letter", "teacher.fallback_demonstration=none", "rollout.n=2",
    ],
    "sft": ["steps=2", "eval.every=2", "objective=sft", "pgpo.enabled=false"],
}  # fmt: skip
# What is compared: every number the step and the evaluation log, and the logged samples; not
# the wall-clock times.
TIMES = ("seconds", "tokens_per_second", "step_seconds_total")


def record(overrides: list[str], folder: Path) -> dict[str, list[dict]]:
    """The run's logs (metrics, samples and, in a premise run, feedback records), times left
    out."""
    import torch

    from pgpo.train.config import load_config
    from pgpo.train.loop import train

    torch.set_num_threads(1)
    cfg = load_config("tiny-cpu", [*overrides, f"output.dir={folder}"])
    train(cfg, progress=False)
    out = {}
    for log in ("metrics", "samples", "feedback"):
        file = folder / f"{log}.jsonl"
        if file.exists():
            rows = [json.loads(line) for line in file.read_text().splitlines()]
            out[log] = [{k: v for k, v in r.items() if not any(t in k for t in TIMES)}
                        for r in rows]  # fmt: skip
    return out


def record_all() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: record(o, Path(tmp) / name) for name, o in RUNS.items()}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(record_all(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
