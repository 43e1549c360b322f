"""The trainer's golden record: fixed ``tiny-cpu`` runs, what they log step by step and the
weights they end with.

``python tests/golden/record.py`` rewrites ``tests/golden/trainer.json`` from the code as
it stands; ``tests/test_tasks.py`` runs the same runs and compares. Regenerate only for a change
that is meant to alter these numbers, and say so in the commit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).with_name("trainer.json")
# Each run: the preset's overrides. premise-letter exercises the premise path (false positives,
# their records), the committed-letter verifier, letter positions and exact evaluation; the
# others SDPO, PGPO at step and token granularity, SFT, the trust-region teacher, LoRA and a
# resumed run.
RUNS = {
    "sdpo-pgpo": ["steps=3", "eval.every=3"],
    "premise-letter": [
        "steps=2", "eval.every=2", "eval.mode=exact", "eval.edge_questions=2",
        "reward.false_positive_rate=0.5", "reward.committed_letter=true",
        "loss.positions=letter", "teacher.fallback_demonstration=none", "rollout.n=2",
    ],
    "sft": ["steps=2", "eval.every=2", "objective=sft", "pgpo.enabled=false"],
    "sdpo": ["steps=2", "eval.every=2", "pgpo.enabled=false"],
    "pgpo-token": ["steps=2", "eval.every=2", "pgpo.granularity=token"],
    "trust-region": ["steps=2", "eval.every=2", "teacher.mode=trust_region"],
    "lora": ["steps=2", "eval.every=2", "model.lora.rank=4", "optim.lr=1e-2"],
    "resumed": ["steps=3", "eval.every=3"],  # 2 steps, then --resume to 3
}  # fmt: skip
RESUMED_AFTER = {"resumed": 2}
# What is compared: every number the step and the evaluation log, and the logged samples; not
# the wall-clock times.
TIMES = ("seconds", "tokens_per_second", "step_seconds_total")


def checksums(folder: Path) -> dict[str, list[float]]:
    """The last checkpoint's policy and teacher weights, each tensor as (sum, sum of squares)
    in float64."""
    from pgpo.train.run_folder import checkpoint

    state = checkpoint.load(checkpoint.candidates(folder / "checkpoints")[0])
    out = {}
    for role in ("policy", "teacher"):
        for name, t in sorted((state.get(role) or {}).items()):
            if hasattr(t, "double"):
                out[f"{role}.{name}"] = [float(t.double().sum()), float(t.double().square().sum())]
    return out


def record(overrides: list[str], folder: Path, resume_after: int | None = None) -> dict:
    """The run's logs (metrics, samples and, in a premise run, feedback records), times left
    out, and its final weights' checksums. ``resume_after``: stop after that step first, then
    continue with ``--resume``."""
    import torch

    from pgpo.train.config import load_config
    from pgpo.train.loop import train

    torch.set_num_threads(1)
    cfg = load_config("tiny-cpu", [*overrides, f"output.dir={folder}"])
    if resume_after is not None:
        train(load_config("tiny-cpu", [*overrides, f"steps={resume_after}",
                                       f"output.dir={folder}"]), progress=False)  # fmt: skip
    train(cfg, resume=resume_after is not None, progress=False)
    out: dict = {"weights": checksums(folder)}
    for log in ("metrics", "samples", "feedback"):
        file = folder / f"{log}.jsonl"
        if file.exists():
            rows = [json.loads(line) for line in file.read_text().splitlines()]
            out[log] = [{k: v for k, v in r.items() if not any(t in k for t in TIMES)}
                        for r in rows]  # fmt: skip
    return out


def record_all() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: record(o, Path(tmp) / name, RESUMED_AFTER.get(name))
                for name, o in RUNS.items()}  # fmt: skip


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(record_all(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
