"""The demo's report: held-out avg@k, I_k and rho_k over steps per method, as PNG plots and a
Markdown summary (plus summary.json), from the runs' metrics.jsonl files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from pgpo.outputs import json_text
from pgpo.train.config import TrainConfig

PIPELINE_TEACHER = ("ema", 0.05)  # the SDPO reference's teacher
COLLAPSE_REWARD = 0.05  # training reward (mean over COLLAPSE_WINDOW steps) at or below: collapsed
COLLAPSE_WINDOW = 5


def read_run(folder: Path) -> dict:
    """Series from one run's metrics.jsonl: eval (step, avg@k), the teacher's edge at each
    evaluation (step, edge; pgpo.train.evaluation.exact) and per-step training metrics."""
    evals, formats, edges = [], [], []
    train = {"step": [], "info": [], "rho": [], "reward": []}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval_avg_at_k" in row:
            evals.append((row["step"], row["eval_avg_at_k"]))
            formats.append(row["eval_format_rate"])
        if "eval_teacher_edge" in row:
            edges.append((row["step"], row["eval_teacher_edge"]))
        if "info" in row:
            for key in train:
                train[key].append(row[key])
    return {
        "eval": evals,
        "eval_format": formats,
        "edge": edges,
        **{k: np.asarray(v, float) for k, v in train.items()},
    }


def collapse_step(run: dict) -> int | None:
    """First step where the training reward, averaged over the last few steps, is near 0."""
    reward = run["reward"]
    for i in range(COLLAPSE_WINDOW - 1, len(reward)):
        if reward[i - COLLAPSE_WINDOW + 1 : i + 1].mean() <= COLLAPSE_REWARD:
            return int(run["step"][i])
    return None


def before_collapse(run: dict, step: int | None, window: int = 20) -> dict:
    """Mean I_k and rho_k over the ``window`` steps before the collapse (None without one)."""
    if step is None:
        return {"info_before_collapse": None, "rho_before_collapse": None}
    span = (run["step"] < step - COLLAPSE_WINDOW) & (run["step"] >= step - COLLAPSE_WINDOW - window)
    if not span.any():
        span = run["step"] <= step
    return {
        "info_before_collapse": float(run["info"][span].mean()),
        "rho_before_collapse": float(run["rho"][span].mean()),
    }


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def summarize(runs: dict[str, dict], configs: dict[str, TrainConfig]) -> dict:
    """Per run: start, final and best held-out avg@k, I_k and rho statistics, collapse step;
    per method: median and range over seeds."""
    per_run = {}
    for name, run in runs.items():
        evals = run["eval"]
        per_run[name] = {
            "seed": configs[name].seed,
            "start": evals[0][1],
            "final": evals[-1][1],
            "best": max(v for _, v in evals),
            "gain": evals[-1][1] - evals[0][1],
            "format_final": run["eval_format"][-1],
            "info_mean": float(run["info"].mean()),
            "rho_mean": float(run["rho"].mean()),
            "rho_min": float(run["rho"].min()),
            "rho_max": float(run["rho"].max()),
            "collapse_step": collapse_step(run),
            "edge": [[int(step), float(e)] for step, e in run["edge"]],
        }
        per_run[name].update(before_collapse(run, per_run[name]["collapse_step"]))
    methods: dict[str, dict] = {}
    for name, row in per_run.items():
        method = name.rsplit("-seed", 1)[0]
        m = methods.setdefault(method, {"runs": [], "final": [], "gain": [], "collapsed": 0})
        m["runs"].append(name)
        m["final"].append(row["final"])
        m["gain"].append(row["gain"])
        m["collapsed"] += row["collapse_step"] is not None
        m.setdefault("collapse_steps", []).append(row["collapse_step"])
    for m in methods.values():
        m["final_median"] = statistics.median(m["final"])
        m["gain_median"] = statistics.median(m["gain"])
    return {"runs": per_run, "methods": methods}


def plot(runs: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({name.rsplit("-seed", 1)[0] for name in runs})
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    with_edge = any(run.get("edge") for run in runs.values())
    fig, axes = plt.subplots(1, 5 if with_edge else 4, figsize=(23 if with_edge else 19, 4))
    seen = set()
    for name, run in runs.items():
        method = name.rsplit("-seed", 1)[0]
        label = None if method in seen else method
        seen.add(method)
        steps, values = zip(*run["eval"])
        axes[0].plot(steps, values, "o-", color=colors[method], label=label, ms=3)
        if with_edge and run.get("edge"):
            steps, values = zip(*run["edge"])
            axes[4].plot(steps, values, "o-", color=colors[method], label=label, ms=3)
        axes[1].plot(run["step"], run["info"], color=colors[method], lw=0.8, label=label)
        axes[2].plot(run["step"], run["rho"], color=colors[method], lw=0.8, label=label)
        window = np.ones(COLLAPSE_WINDOW) / COLLAPSE_WINDOW
        if len(run["reward"]) >= COLLAPSE_WINDOW:
            smooth = np.convolve(run["reward"], window, mode="valid")
            axes[3].plot(
                run["step"][COLLAPSE_WINDOW - 1 :],
                smooth,
                color=colors[method],
                lw=0.8,
                label=label,
            )
    axes[0].set_title("held-out avg@k")
    axes[1].set_title("I_k (nats): student minus teacher entropy")
    axes[2].set_title("rho_k (1 for SDPO)")
    axes[3].set_title(f"training reward ({COLLAPSE_WINDOW}-step mean)")
    axes[1].axhline(0, color="gray", lw=0.6)
    if with_edge:
        axes[4].set_title("teacher's edge: P_T(correct) - P_S(correct)")
        axes[4].axhline(0, color="gray", lw=0.6)
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(
    summary: dict, configs: dict[str, TrainConfig], seconds: float, model: Path, title: str
) -> str:
    cfg = next(iter(configs.values()))
    lines = [f"# {title}", ""]
    lines.append(
        f"Warm start: `{model}`. Each run: {cfg.steps} steps of {cfg.questions_per_step} questions "
        f"x {cfg.rollout.n} rollouts, lr {cfg.optim.lr:g}, teacher `{cfg.teacher.mode}`"
        + (f" (rate {cfg.teacher.ema_rate:g})" if cfg.teacher.mode == "ema" else "")
        + f"; held-out avg@{cfg.eval.n} at temperature {cfg.eval.temperature:g} on "
        f"{summary_questions(configs)} questions every {cfg.eval.every} steps. "
        f"Wall time {seconds / 60:.1f} min."
    )
    if (cfg.teacher.mode, cfg.teacher.ema_rate) != PIPELINE_TEACHER:
        lines += [
            "",
            f"Note: the teacher here is `{cfg.teacher.mode}`, not the pipeline's EMA teacher at "
            "rate 0.05: at this model size a frozen teacher learns where a live or EMA(0.05) "
            "teacher has been seen to collapse (`pgpo demo --collapse` measures that).",
        ]
    lines += [
        "",
        "| run | seed | start | final | best | gain | format | mean I_k | rho range | collapse |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["runs"].items():
        lines.append(
            f"| {name} | {r['seed']} | {r['start']:.3f} | {r['final']:.3f} | {r['best']:.3f} | "
            f"{r['gain']:+.3f} | {r['format_final']:.2f} | {r['info_mean']:.4f} | "
            f"{r['rho_min']:.3f}-{r['rho_max']:.3f} | {_collapse_cell(r)} |"
        )
    lines += [
        "",
        "| method | runs | final avg@k: median [min, max] | gain: median [min, max] | collapsed "
        "| collapse step per seed |",
        "|---|---|---|---|---|---|",
    ]
    for method, m in summary["methods"].items():
        lines.append(
            f"| {method} | {len(m['runs'])} | {_spread(m['final'])} | {_spread(m['gain'])} | "
            f"{m['collapsed']}/{len(m['runs'])} | "
            + ", ".join("-" if c is None else str(c) for c in m["collapse_steps"])
            + " |"
        )
    lines += [
        "",
        f"Collapse: training reward averaged over {COLLAPSE_WINDOW} steps at or below "
        f"{COLLAPSE_REWARD}.",
        "",
        "![curves](curves.png)",
        "",
    ]
    return "\n".join(lines)


def _collapse_cell(r: dict) -> str:
    if r["collapse_step"] is None:
        return "-"
    return (
        f"step {r['collapse_step']} (before: I {r['info_before_collapse']:.3f}, "
        f"rho {r['rho_before_collapse']:.3f})"
    )


def summary_questions(configs: dict[str, TrainConfig]) -> str:
    cfg = next(iter(configs.values()))
    return str(sum(1 for line in open(cfg.data.test) if line.strip()))


def write_report(
    plan,
    configs: dict[str, TrainConfig],
    model: Path,
    seconds: float,
    title: str = "pgpo demo: SDPO against PGPO",
) -> dict:
    """summary.md, summary.json and curves.png in plan.out; prints the method table."""
    runs = {name: read_run(Path(cfg.output.dir)) for name, cfg in configs.items()}
    summary = summarize(runs, configs)
    summary["seconds"] = seconds
    plot(runs, plan.out / "curves.png", title)
    text = markdown(summary, configs, seconds, model, title)
    (plan.out / "summary.md").write_text(text)
    (plan.out / "summary.json").write_text(json_text(summary, indent=1))
    print(text)
    return summary
