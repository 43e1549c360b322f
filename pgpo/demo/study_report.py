"""The study's report: per setting and method, final and best held-out avg@k (median [min, max]
over seeds), the paired gain over SDPO with a bootstrap interval, collapses, and the
distributions of ``I_k`` and ``rho_k``; for settings with misleading feedback, whether ``I_k``
marks the right demonstrations (:mod:`pgpo.demo.premise`); as ``summary.md``, ``summary.json``
and figures."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from pgpo.demo.premise import SIGNALS, plot_premise, premise_summary
from pgpo.demo.report import plot, read_run, summarize
from pgpo.outputs import json_text
from pgpo.train.config import TrainConfig
from pgpo.train.evaluation.feedback import misleading_feedback

BOOTSTRAP = 10_000  # resamples of the seeds, for the paired interval (seeded: reproducible)
BASELINE = "sdpo"


def paired_gain(method: dict, baseline: dict, key: str) -> dict | None:
    """Mean over seeds of ``method[key] - baseline[key]`` (runs paired by seed) and its 95 %
    percentile bootstrap interval over the seeds; None without a common seed."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    diffs = np.array([method[s][key] - baseline[s][key] for s in seeds])
    rng = np.random.default_rng(0)
    means = diffs[rng.integers(0, len(diffs), size=(BOOTSTRAP, len(diffs)))].mean(axis=1)
    return {
        "mean": float(diffs.mean()),
        "ci_low": float(np.percentile(means, 2.5)),
        "ci_high": float(np.percentile(means, 97.5)),
        "per_seed": {int(s): float(d) for s, d in zip(seeds, diffs)},
    }


def distribution(values: np.ndarray) -> dict:
    v = values[np.isfinite(values)]
    return {
        "n": int(len(v)),
        "median": float(np.median(v)),
        "p5": float(np.percentile(v, 5)),
        "p95": float(np.percentile(v, 95)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def summarize_setting(runs: dict[str, dict], configs: dict[str, TrainConfig]) -> dict:
    """``runs`` / ``configs`` keyed ``<method>-seed<seed>``: the demo's per-run and per-method
    summary, plus best, paired gains, and the I_k / rho_k distributions per method."""
    base = summarize(runs, configs)
    by_method: dict[str, dict[int, dict]] = {}
    for name, row in base["runs"].items():
        by_method.setdefault(name.rsplit("-seed", 1)[0], {})[row["seed"]] = row
    for method, m in base["methods"].items():
        rows = by_method[method]
        m["best"] = [rows[s]["best"] for s in sorted(rows)]
        m["best_median"] = statistics.median(m["best"])
        m["rho_mean"] = statistics.fmean(rows[s]["rho_mean"] for s in rows)
        m["lr"] = configs[m["runs"][0]].optim.lr
        m["info"] = distribution(np.concatenate([runs[n]["info"] for n in m["runs"]]))
        m["rho"] = distribution(np.concatenate([runs[n]["rho"] for n in m["runs"]]))
        if method != BASELINE and BASELINE in by_method:
            m["gain_final"] = paired_gain(rows, by_method[BASELINE], "final")
            m["gain_best"] = paired_gain(rows, by_method[BASELINE], "best")
    return base


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def _gain(g: dict | None) -> str:
    if g is None:
        return "-"
    return f"{g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"


def setting_table(s: dict) -> list[str]:
    """One setting's table: per method its lr, final and best held-out avg@k (median [min, max]
    over seeds), the paired gains over SDPO, collapses, mean rho_k and I_k's spread."""
    lines = [
        "| method | runs | lr | final | best | gain (final) | gain (best) | collapsed | "
        "collapse steps | mean rho_k | rho_k [min, max] | I_k median [p5, p95] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, m in s["methods"].items():
        steps = ", ".join("-" if c is None else str(c) for c in m["collapse_steps"])
        info, rho = m["info"], m["rho"]
        lines.append(
            f"| {method} | {len(m['runs'])} | {m['lr']:.3g} | {_spread(m['final'])} | "
            f"{_spread(m['best'])} | {_gain(m.get('gain_final'))} | "
            f"{_gain(m.get('gain_best'))} | {m['collapsed']}/{len(m['runs'])} | {steps} | "
            f"{m['rho_mean']:.3f} | [{rho['min']:.3f}, {rho['max']:.3f}] | "
            f"{info['median']:.3f} [{info['p5']:.3f}, {info['p95']:.3f}] |"
        )
    return lines


def markdown(summary: dict, seconds: float) -> str:
    lines = [
        "# pgpo study: when does information-modulation help?",
        "",
        f"Wall time {seconds / 60:.1f} min. Held-out avg@k; final and best over the run, "
        "median [min, max] over seeds. Gains are paired by seed against SDPO: the mean "
        f"difference and a 95 % bootstrap interval over seeds ({BOOTSTRAP:,} resamples; with 3 "
        "seeds it is coarse). Collapse: the training reward averaged over 5 steps at or below "
        "0.05.",
    ]
    for setting, s in summary["settings"].items():
        lines += ["", f"## {setting}", "", *setting_table(s)]
        lines += ["", f"![curves](curves_{setting}.png)"]
        if "premise" in s:
            lines += ["", *premise_lines(s["premise"])]
    lines += ["", "![I_k and rho_k per method](distributions.png)", ""]
    if any("gap_difference" in s.get("premise", {}) for s in summary["settings"].values()):
        lines += ["![does I_k mark the right demonstrations?](premise.png)", ""]
    return "\n".join(lines)


def premise_lines(p: dict) -> list[str]:
    """The premise's numbers for one setting, as markdown."""
    if "not_measured" in p:
        return [f"Does I_k mark the right demonstrations? Not measured: {p['not_measured']}."]

    def corr(c: dict) -> str:
        return f"{c['r']:+.2f} [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"

    def prob(key: str) -> str:
        return "-" if p[key] is None else f"{p[key]:.3f}"

    return [
        f"Does I_k mark the right demonstrations? Over {p['runs']} runs, {p['samples']:,} "
        f"trained samples ({p['wrong_share']:.1%} with a wrong demonstration, "
        f"{p['questions']} questions):",
        "",
        "| | right demonstration | wrong demonstration | right - wrong |",
        "|---|---|---|---|",
        f"| per-sample entropy gap (nats) | {p['gap_right']:.4f} | {p['gap_wrong']:.4f} | "
        f"{p['gap_difference']:+.4f} +- {p['gap_difference_se']:.4f} (SE clustered by "
        "question) |",
        f"| teacher P(shown letter) | {prob('p_shown_right')} | {prob('p_shown_wrong')} | |",
        f"| teacher P(gold letter) | {prob('p_gold_right')} | {prob('p_gold_wrong')} | |",
        "",
        "Right - wrong within rollouts that are themselves correct / incorrect: "
        + " / ".join(
            f"{v['difference']:+.4f} +- {v['se']:.4f} ({v['samples']:,})"
            for v in p.get("gap_difference_by_rollout", {}).values()
        )
        + " nats.",
        "",
        f"Per step, centred within each run ({p['r_share_right']['steps']} steps): "
        f"r(I_k, share of right demonstrations) = {corr(p['r_share_right'])}, r(I_k, batch "
        f"accuracy) = {corr(p['r_accuracy'])} (95 % bootstrap intervals over runs).",
        *(
            [
                f"Detrended (first differences, {p['r_share_right_detrended']['steps']} pairs of "
                f"steps): r(I_k, share right) = {corr(p['r_share_right_detrended'])}, r(I_k, "
                f"accuracy) = {corr(p['r_accuracy_detrended'])}."
            ]
            if "r_share_right_detrended" in p
            else []
        ),  # fmt: skip
        "",
        "Signals that need no gold answer: right minus wrong demonstrations, in standard errors "
        "clustered by question (more than 3: the signal tells them apart):",
        "",
        "| signal | right | wrong | right - wrong | z |",
        "|---|---|---|---|---|",
        *(
            f"| {SIGNALS[k]} | {v['right']:.4f} | {v['wrong']:.4f} | {v['difference']:+.4f} +- "
            f"{v['se']:.4f} | {v['z']:+.1f}{' (separates)' if v['separates'] else ''} |"
            for k, v in p.get("signals", {}).items()
        ),
    ]


def plot_distributions(summary: dict, runs: dict[str, dict[str, dict]], path: Path) -> None:
    """Box plots of I_k and rho_k over all steps of all seeds, per method and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(summary["settings"])
    fig, axes = plt.subplots(len(settings), 2, figsize=(14, 3.6 * len(settings)), squeeze=False)
    for row, setting in zip(axes, settings):
        methods = list(summary["settings"][setting]["methods"])
        for ax, key, title in ((row[0], "info", "I_k (nats)"), (row[1], "rho", "rho_k")):
            data = []
            for method in methods:
                names = summary["settings"][setting]["methods"][method]["runs"]
                values = np.concatenate([runs[setting][n][key] for n in names])
                data.append(values[np.isfinite(values)])
            ax.boxplot(data, whis=(5, 95), showfliers=False)
            ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, fontsize=8)
            ax.axhline(0.0 if key == "info" else 1.0, color="gray", lw=0.6)
            ax.set_title(f"{setting}: {title} per step (whiskers 5-95 %)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_study_report(plan, configs: dict[str, TrainConfig], seconds: float) -> dict:
    """``summary.md``, ``summary.json``, ``curves_<setting>.png`` and ``distributions.png`` in
    ``plan.out`` (``configs`` keyed ``<setting>/<method>-seed<seed>``); prints the tables."""
    runs: dict[str, dict[str, dict]] = {}
    per_setting: dict[str, dict[str, TrainConfig]] = {}
    for name, cfg in configs.items():
        setting, run = name.split("/", 1)
        runs.setdefault(setting, {})[run] = read_run(Path(cfg.output.dir))
        per_setting.setdefault(setting, {})[run] = cfg
    settings = {s: summarize_setting(runs[s], per_setting[s]) for s in runs}
    misled = {
        s: [Path(c.output.dir) for c in per_setting[s].values()]
        for s in runs
        if misleading_feedback(next(iter(per_setting[s].values())))
    }
    for setting, folders in misled.items():
        try:
            settings[setting]["premise"] = premise_summary(folders)
        except ValueError as err:  # e.g. no wrong demonstration in a short run
            settings[setting]["premise"] = {"not_measured": str(err)}
    summary = {
        "settings": settings,
        "seeds": plan.seeds,
        "quick": plan.quick,
        "seconds": seconds,
    }
    for setting in runs:
        plot(runs[setting], plan.out / f"curves_{setting}.png", f"pgpo study: {setting}")
    plot_distributions(summary, runs, plan.out / "distributions.png")
    premise = {s: settings[s]["premise"] for s in misled}
    measured = {s: p for s, p in premise.items() if "not_measured" not in p}
    if measured:
        plot_premise(measured, {s: misled[s] for s in measured}, plan.out / "premise.png")
    text = markdown(summary, seconds)
    (plan.out / "summary.md").write_text(text)
    (plan.out / "summary.json").write_text(json_text(summary, indent=1))
    print(text)
    return summary
