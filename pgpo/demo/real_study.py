"""``pgpo study --real``: PGPO against SDPO on a real model, with a fair supervised yardstick.

SmolLM2-135M-Instruct (``model.path: smollm2-135m-instruct``) on the largest-number task, every
run ``pgpo train`` on the ``real-cpu`` preset from the same start, 3 paired seeds:

- ``sdpo-own``: self-distillation from the model's own successes, as in SDPO: 4 rollouts per
  question, a failed rollout's teacher shown a successful sibling (none: the sample is masked),
  the multiple-choice verifier reading the letter a response commits to
  (``reward.committed_letter``);
- ``sdpo-gold``: the teacher always shown the gold answer (one rollout per question);
- ``pgpo``: ``sdpo-own`` with the step scaled by ``rho_k``, alpha chosen so that the mean
  ``rho_k`` is about :data:`RHO_AIM`: ``alpha = ln(RHO_AIM) / mean I_k`` of ``sdpo-own``'s
  run at its chosen learning rate on the validation slice (:func:`alpha_for`);
- ``pgpo-adaptive``: the same start, alpha steered to a mean ``rho_k`` of :data:`RHO_AIM`
  (``pgpo.alpha_schedule: target_rho``);
- ``sdpo-matched``: ``sdpo-own`` at the learning rate times ``pgpo``'s mean ``rho_k`` (same
  seed): PGPO's mean step without its modulation;
- ``sft-letter``: supervised training on the gold letter alone (``loss.positions: letter``,
  token mean): the strongest simple yardstick; ``sft-answer``: the earlier yardstick, every
  token of ``X</answer>``, sequence mean.

Every run takes the same questions per step (:data:`QUESTIONS`). The learning rate of each
method that has one of its own (:data:`TUNED`) is chosen from :data:`LR_GRID` on a validation
slice of the training split, never the test split (:func:`choose_lr`): the first 300 training
questions train, the last 100 score. The others take ``sdpo-own``'s.

The premise on a real model: ``sdpo-own`` and ``pgpo`` again with a verifier that has false
positives (:data:`NOISY`), read by :func:`pgpo.demo.premise.premise_summary`. Output:
``summary.json``, ``summary.md``, ``curves.png``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pgpo.demo.premise import premise_summary
from pgpo.demo.real import CHANCE, LABELS, MODEL, PRESET, SCORES
from pgpo.demo.run import DemoPlan, quiet_transformers, run_all
from pgpo.locking import exclusive
from pgpo.outputs import json_text
from pgpo.train.config import TrainConfig, load_config
from pgpo.train.tasks.data import LARGEST_NUMBER, make_splits, write_jsonl

LR_GRID = (3e-5, 1e-4, 3e-4)
# The budget: the whole study (the grid included) in about 2 hours on a 2-core CPU, two runs at
# a time. Measured per step at 8 questions (2 runs at once): letter and answer SFT 7 s, gold-shown
# SDPO 9 s, own-success SDPO and its PGPO variants 21 s (4 rollouts a question, about half the
# samples masked and skipped); about 50 s per run for loading and scoring. 36 runs (12 in the
# grid at half the steps, 21 final, 3 premise) of 24 steps come to about 1 h 55 min.
STEPS = 24
GRID_STEPS = STEPS // 2  # the grid's runs: every method the same budget
QUESTIONS = 8  # per step, every method: the rate at which letter SFT learned the task
RHO_AIM = 1.2  # PGPO's mean rho_k: a modulation around a step 20 % larger
EVAL_EVERY = 10
FIT, VALIDATION = 300, 100  # the training split's 400 questions: fitted on, and scored on
BOOTSTRAP = 10_000
METHODS = ("sft-letter", "sft-answer", "sdpo-gold", "sdpo-own", "pgpo", "pgpo-adaptive",
           "sdpo-matched")  # fmt: skip


def method(name: str, questions: int = QUESTIONS) -> tuple[str, tuple[str, ...]]:
    """``name``'s (the method whose learning rate it takes, its overrides on the preset), at
    ``questions`` per step."""
    own = ("rollout.n=4", f"batch_size={4 * questions}", "teacher.fallback_demonstration=none",
           "reward.committed_letter=true", "rollout.max_new_tokens=6")  # fmt: skip
    one = ("rollout.n=1", f"batch_size={questions}", "reward.committed_letter=true")
    pgpo = (*own, "pgpo.enabled=true")
    return {
        "sft-letter": (
            "sft-letter",
            (*one, "objective=sft", "loss.positions=letter", "loss.reduction=token_mean"),
        ),  # fmt: skip
        "sft-answer": ("sft-answer", (*one, "objective=sft")),
        "sdpo-gold": ("sdpo-gold", (*one, "teacher.fallback_demonstration=gold")),
        "sdpo-own": ("sdpo-own", own),
        "pgpo": ("sdpo-own", pgpo),
        "pgpo-adaptive": (
            "sdpo-own",
            (*pgpo, "pgpo.alpha_schedule=target_rho", f"pgpo.rho_target={RHO_AIM}"),
        ),  # fmt: skip
        "sdpo-matched": ("sdpo-own", own),
    }[name]


TUNED = ("sft-letter", "sft-answer", "sdpo-gold", "sdpo-own")
BASELINE, MATCHED, PAIRED = "sdpo-own", "sdpo-matched", "pgpo"
ADAPTIVE = (0.05, 20.0)  # pgpo.alpha_min and alpha_max: target_rho starts within them
NOISY = ("reward.false_positive_rate=0.25",)  # a verifier's false positives: the premise
PREMISE_METHODS = ("sdpo-own",)  # 3 runs: the premise's CI over runs


@dataclass
class RealStudyPlan:
    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = STEPS
    grid_steps: int = GRID_STEPS
    questions: int = QUESTIONS  # per step
    lrs: tuple[float, ...] = LR_GRID
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    premise: bool = True
    workers: int = 2
    cache: Path | None = None
    overrides: list[str] = field(default_factory=list)  # every run, last
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
        if MATCHED in self.methods and PAIRED not in self.methods:
            raise ValueError(f"{MATCHED} needs its paired run: add {PAIRED} to --methods")
        if any(method(m)[0] not in self.methods for m in self.methods):
            borrowers = ", ".join(m for m in self.methods if method(m)[0] != m)
            raise ValueError(
                f"{borrowers} take {BASELINE}'s learning rate: add {BASELINE} to --methods"
            )


def split_files(out: Path) -> tuple[Path, Path]:
    """The validation slice of the training split, as JSON-lines files: the first :data:`FIT`
    training questions (fitted on) and the last :data:`VALIDATION` (scored on). The test split
    is not among them."""
    train, _ = make_splits(FIT + VALIDATION, 100, seed=3)  # largest-number's own split
    return (write_jsonl(train[:FIT], out / "data" / "fit.jsonl"),
            write_jsonl(train[FIT:], out / "data" / "validation.jsonl"))  # fmt: skip


def config(plan: RealStudyPlan, model: Path, name: str, folder: Path, *extra: str) -> TrainConfig:
    """A run of method ``name`` into ``folder``. No checkpoints (SmolLM2's, with AdamW's
    moments, are 2 GB each): the last evaluation logs each question's scores instead."""
    return load_config(PRESET, [
        f"model.path={model}", f"model.tokenizer={model}", f"steps={plan.steps}",
        "output.save_last=false", "eval.per_question=true",
        *method(name, plan.questions)[1], *extra, *plan.overrides, f"output.dir={folder}",
    ])  # fmt: skip


def grid_configs(plan: RealStudyPlan, model: Path, data: tuple[Path, Path]) -> dict:
    """``{(method, lr): config}``: each tuned method at each learning rate, seed 0, for
    ``plan.grid_steps`` steps, fitted on the first part of the training split and scored at
    the end on its validation slice."""
    fit, validation = data
    return {
        (m, lr): config(
            plan,
            model,
            m,
            plan.out / "grid" / f"{m}-lr{lr:g}",
            f"optim.lr={lr}",
            f"data.train={fit}",
            f"data.test={validation}",
            "seed=0",
            "eval.before_train=false",
            f"steps={plan.grid_steps}",
            f"eval.every={plan.grid_steps}",
        )  # fmt: skip
        for m in TUNED
        if m in plan.methods
        for lr in plan.lrs
    }


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def final_eval(folder: Path, score: str = SCORES[0]) -> float:
    """The run's last evaluation of ``score`` (its validation or test split)."""
    return [r for r in rows(folder) if f"eval_{score}" in r][-1][f"eval_{score}"]


def choose_lr(scores: dict[float, float]) -> float:
    """The learning rate whose run scored highest on the validation slice (ties: the smaller)."""
    return max(sorted(scores), key=lambda lr: (scores[lr], -lr))


def mean_of(folder: Path, key: str) -> float:
    """The mean of ``key`` over a run's training steps (those that log it)."""
    values = [r[key] for r in rows(folder) if r.get(key) is not None]
    return statistics.fmean(values) if values else float("nan")


def alpha_for(mean_info: float) -> float:
    """PGPO's alpha for a mean ``rho_k`` of about :data:`RHO_AIM`: ``ln(RHO_AIM) / mean I_k``
    (exp is convex, so the mean rho comes out a little above the aim); 1 where the mean
    ``I_k`` is not positive, since no alpha then raises the step."""
    if not (mean_info > 0):
        return 1.0
    return min(math.log(RHO_AIM) / mean_info, 100.0)


def paired_over_seeds_and_questions(a: dict, b: dict, seed: int = 0) -> dict:
    """``a[s]``, ``b[s]``: per-question scores ``[n]`` of two methods for seed s. The mean over
    seeds and questions of ``a - b`` and its 95 % bootstrap interval, resampling seeds and,
    within them, questions (the same questions in every seed)."""
    seeds = sorted(set(a) & set(b))
    d = np.array([np.asarray(a[s]) - np.asarray(b[s]) for s in seeds])  # [seeds, questions]
    rng = np.random.default_rng(seed)
    pick_s = rng.integers(0, d.shape[0], size=(BOOTSTRAP, d.shape[0]))
    pick_q = rng.integers(0, d.shape[1], size=(BOOTSTRAP, d.shape[1]))
    means = np.array([d[s][:, q].mean() for s, q in zip(pick_s, pick_q)])
    return {"mean": float(d.mean()), "ci_low": float(np.percentile(means, 2.5)),
            "ci_high": float(np.percentile(means, 97.5)), "seeds": len(seeds),
            "questions": int(d.shape[1])}  # fmt: skip


def verdict(gain: dict) -> str:
    if gain["ci_low"] > 0:
        return "beats"
    return "loses to" if gain["ci_high"] < 0 else "ties"


def run_real_study(plan: RealStudyPlan) -> dict:
    """The grid on the validation slice, the runs, the per-question scores, the report."""
    import torch

    torch.set_num_threads(1)
    quiet_transformers()
    plan.out.mkdir(parents=True, exist_ok=True)
    with exclusive(plan.out, "--out"):  # one study writes here at a time
        return _run(plan, time.perf_counter())


def _run(plan: RealStudyPlan, start: float) -> dict:
    from pgpo.train.models import smollm2

    model = smollm2.folder(plan.cache)
    demo = DemoPlan(plan.out, [], [], workers=plan.workers, progress=plan.progress)
    # 1. Each tuned method's learning rate, on the validation slice.
    grid = grid_configs(plan, model, split_files(plan.out))
    run_all(demo, {f"grid/{m}-lr{lr:g}": c for (m, lr), c in grid.items()})
    grid_scores = {m: {lr: final_eval(Path(c.output.dir)) for (m2, lr), c in grid.items()
                       if m2 == m} for m in {m for m, _ in grid}}  # fmt: skip
    lrs = {m: choose_lr(s) for m, s in grid_scores.items()}
    info = float("nan")  # sdpo-own's mean I_k at its rate, on the validation slice
    if BASELINE in lrs:
        info = mean_of(Path(grid[(BASELINE, lrs[BASELINE])].output.dir), "info")
    alpha = alpha_for(info)

    # 2. The runs: every method x seed on the task's training split, scored on its test split.
    def final(name: str, seed: int, setting: str, *extra: str) -> TrainConfig:
        folder = plan.out / setting / f"{name}-seed{seed}"
        a = alpha if name != "pgpo-adaptive" else min(max(alpha, ADAPTIVE[0]), ADAPTIVE[1])
        return config(plan, model, name, folder, f"data.train={LARGEST_NUMBER}", "data.test=",
                      f"optim.lr={lrs[method(name)[0]]}", f"pgpo.alpha={a}", f"seed={seed}",
                      f"eval.every={min(EVAL_EVERY, plan.steps)}", *extra)  # fmt: skip

    first = [m for m in plan.methods if m != MATCHED]
    configs = {f"real/{m}-seed{s}": final(m, s, "real") for m in first for s in plan.seeds}
    if plan.premise:
        configs |= {f"noisy/{m}-seed{s}": final(m, s, "noisy", *NOISY)
                    for m in PREMISE_METHODS if m in plan.methods for s in plan.seeds}  # fmt: skip
    run_all(demo, configs)
    if MATCHED in plan.methods:
        matched = {}
        for s in plan.seeds:
            rho = mean_of(plan.out / "real" / f"{PAIRED}-seed{s}", "rho")
            lr = lrs[BASELINE] * rho
            matched[f"real/{MATCHED}-seed{s}"] = final(MATCHED, s, "real", f"optim.lr={lr}")
        run_all(demo, matched)
        configs |= matched
    # 3. Per-question held-out scores: the start (the same for every run) and each run's end.
    honest = {n: Path(c.output.dir) for n, c in configs.items() if n.startswith("real/")}
    evaluations = {n: [r for r in rows(f) if "eval_per_question" in r] for n, f in honest.items()}
    per_question = {n: e[-1]["eval_per_question"] for n, e in evaluations.items()}
    starts = [e[0] for e in evaluations.values() if e and e[0]["step"] == 0]
    if not starts:
        raise ValueError("the real study scores the start at step 0: keep eval.before_train")
    per_question["start"] = starts[0]["eval_per_question"]
    summary = summarize(plan, configs, per_question, grid_scores, lrs, info, alpha)
    summary["minutes"] = (time.perf_counter() - start) / 60
    if plan.premise and any(n.startswith("noisy/") for n in configs):
        folders = [Path(c.output.dir) for n, c in configs.items() if n.startswith("noisy/")]
        try:
            summary["premise"] = premise_summary(folders)
        except ValueError as err:  # no wrong demonstration, or no right one
            summary["premise"] = {"not_measured": str(err)}
    (plan.out / "summary.json").write_text(json_text(summary, indent=1) + "\n")
    (plan.out / "summary.md").write_text(markdown(summary))
    plot_curves(summary, plan.out / "curves.png")
    print(markdown(summary))
    return summary


def summarize(plan, configs, per_question, grid_scores, lrs, info, alpha) -> dict:
    """The table's numbers: per method, over seeds, the final scores, the paired gain over
    ``sdpo-own`` (seeds and questions resampled), mean rho, lr, minutes; own successes."""
    start = per_question["start"]
    out: dict = {
        "model": MODEL, "steps": plan.steps, "seeds": plan.seeds,
        "questions_per_step": plan.questions,
        "held_out_questions": len(start[SCORES[0]]), "chance": CHANCE,
        "start": {s: float(np.mean(start[s])) for s in SCORES},
        "lr_grid": {m: {f"{lr:g}": v for lr, v in sorted(s.items())}
                    for m, s in grid_scores.items()},
        "lr": lrs, "sdpo_own_validation_info": info, "alpha": alpha, "rho_aim": RHO_AIM,
        "methods": {},
    }  # fmt: skip
    by_method: dict[str, dict[int, str]] = {}
    for name in per_question:
        if name.startswith("real/"):
            label, seed = name.removeprefix("real/").rsplit("-seed", 1)
            by_method.setdefault(label, {})[int(seed)] = name
    for name in [m for m in plan.methods if m in by_method]:
        names = by_method[name]
        row: dict = {"lr": configs[next(iter(names.values()))].optim.lr}
        for score in SCORES[:2]:
            finals = [float(np.mean(per_question[n][score])) for n in names.values()]
            row[score] = {"mean": statistics.fmean(finals), "per_seed": finals}
            if name != BASELINE and BASELINE in by_method:
                row[f"{score}_vs_{BASELINE}"] = paired_over_seeds_and_questions(
                    {s: per_question[n][score] for s, n in names.items()},
                    {s: per_question[n][score] for s, n in by_method[BASELINE].items()},
                )
            row[f"{score}_gain"] = paired_over_seeds_and_questions(
                {s: per_question[n][score] for s, n in names.items()},
                {s: start[score] for s in names})  # fmt: skip
        folders = [Path(configs[n].output.dir) for n in names.values()]
        row["rho_mean"] = statistics.fmean(mean_of(f, "rho") for f in folders)
        row["info_mean"] = statistics.fmean(mean_of(f, "info") for f in folders)
        row["minutes"] = statistics.fmean(rows(f)[-1]["step_seconds_total"] / 60 for f in folders)
        if "rollout.n=4" in method(name)[1]:  # own successes: how often none came
            row["no_success_share"] = 1 - statistics.fmean(
                mean_of(f, "success_group_fraction") for f in folders
            )
            row["masked_share"] = statistics.fmean(mean_of(f, "masked_share") for f in folders)
        row["curve"] = curve([rows(f) for f in folders])
        out["methods"][name] = row
    m = out["methods"]
    if PAIRED in m and MATCHED in m:
        gain = paired_over_seeds_and_questions(
            {s: per_question[n][SCORES[0]] for s, n in by_method[PAIRED].items()},
            {s: per_question[n][SCORES[0]] for s, n in by_method[MATCHED].items()},
        )
        out["pgpo_vs_matched"] = {**gain, "verdict": verdict(gain)}  # fmt: skip
    return out


def curve(runs: list[list[dict]]) -> list[dict]:
    """Held-out scores at each evaluated step, the mean over seeds."""
    steps = sorted({r["step"] for rs in runs for r in rs if f"eval_{SCORES[0]}" in r})
    out = []
    for step in steps:
        at = [r for rs in runs for r in rs if r["step"] == step and f"eval_{SCORES[0]}" in r]
        out.append({"step": step, **{s: statistics.fmean(r[f"eval_{s}"] for r in at)
                                     for s in SCORES[:2]}})  # fmt: skip
    return out


def cell(text: str) -> str:
    """``text`` inside a markdown table cell."""
    return text.replace("|", "\\|")


def markdown(summary: dict) -> str:
    """The real-model table and its one-line verdict."""
    a, b = SCORES[0], SCORES[1]
    seeds = len(summary["seeds"])
    lines = [
        f"# pgpo study --real: {summary['model']} on the largest-number task",
        "",
        f"{summary['steps']} steps of {summary['questions_per_step']} questions, {seeds} paired "
        f"seed(s), {summary['held_out_questions']} held-out questions (chance {CHANCE:.2f}); "
        f"learning rates chosen on a validation slice of the training split; "
        f"{summary['minutes']:.0f} min in all.",
        "",
        f"Start: {LABELS[a]} {summary['start'][a]:.3f}, {LABELS[b]} {summary['start'][b]:.2f}.",
        "",
        f"| method | lr | final {cell(LABELS[a])} | minus {BASELINE} [95 % CI] | final "
        f"{cell(LABELS[b])} | minus {BASELINE} [95 % CI] | mean rho | min per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["methods"].items():
        cells = [name, f"{row['lr']:.2g}"]
        for s in (a, b):
            cells.append(f"{row[s]['mean']:.3f}")
            g = row.get(f"{s}_vs_{BASELINE}")
            cells.append("-" if g is None else f"{g['mean']:+.3f} [{g['ci_low']:+.3f}, "
                                               f"{g['ci_high']:+.3f}]")  # fmt: skip
        cells += [f"{row['rho_mean']:.3f}", f"{row['minutes']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    own = summary["methods"].get(BASELINE, {})
    if "no_success_share" in own:
        lines += [
            "",
            f"{BASELINE}: a question had no successful rollout in {own['no_success_share']:.0%} "
            f"of its groups; {own['masked_share']:.0%} of the samples were masked (no successful "
            "sibling): they train nothing.",
        ]
    grid = summary["lr_grid"]
    lines += ["", "Learning rates on the validation slice (final " + LABELS[a] + "): " + "; ".join(
        f"{m}: " + ", ".join(f"{lr} -> {v:.3f}" for lr, v in g.items()) for m, g in grid.items()),
        f"PGPO's alpha = ln({RHO_AIM}) / {summary['sdpo_own_validation_info']:.3f} nats (the mean "
        f"I_k of {BASELINE} at its learning rate on the validation slice) = "
        f"{summary['alpha']:.4f}."]  # fmt: skip
    v = summary.get("pgpo_vs_matched")
    if v:
        lines += ["", f"**Verdict ({seeds} seed(s)): PGPO {v['verdict']} SDPO at a matched step** "
                  f"({LABELS[a]}: {v['mean']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}], "
                  "seeds and questions resampled)."]  # fmt: skip
    p = summary.get("premise")
    if p and "gap_difference" in p:
        c, d = p["r_share_right"], p["r_share_right_detrended"]
        lines += ["", f"Premise (verifier with false positives, {p['runs']} runs, "
                  f"{p['wrong_share']:.1%} wrong demonstrations): gap(right) - gap(wrong) = "
                  f"{p['gap_difference']:+.4f} +- {p['gap_difference_se']:.4f} nats (SE clustered "
                  f"by question); r(I_k, share right) = {c['r']:+.2f} [{c['ci_low']:+.2f}, "
                  f"{c['ci_high']:+.2f}], detrended {d['r']:+.2f} [{d['ci_low']:+.2f}, "
                  f"{d['ci_high']:+.2f}]."]  # fmt: skip
    elif p:
        lines += ["", f"Premise: not measured ({p.get('not_measured')})."]
    return "\n".join(lines) + "\n"


def plot_curves(summary: dict, path: Path) -> None:
    """Held-out P(correct | a letter) and top-letter accuracy over steps, the mean over seeds,
    one line per method, and chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, score in zip(axes, SCORES[:2]):
        for name, row in summary["methods"].items():
            points = row["curve"]
            ax.plot([p["step"] for p in points], [p[score] for p in points], marker="o",
                    label=name)  # fmt: skip
        ax.axhline(CHANCE, color="grey", linestyle=":", label="chance")
        ax.set_xlabel("step")
        ax.set_title(f"held-out {LABELS[score]} (mean over {len(summary['seeds'])} seed(s))")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{summary['model']}: SDPO, PGPO and supervised training")
    fig.savefig(path, dpi=110)
    plt.close(fig)
