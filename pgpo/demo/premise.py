"""Does ``I_k`` mark informative feedback? The study's answer for its misleading-feedback settings.

From each run's ``feedback.jsonl`` (one record per trained sample,
:mod:`pgpo.train.evaluation.feedback`)
and ``metrics.jsonl`` (one row per step):

- ``gap(right) - gap(wrong)``: the mean per-sample entropy gap of samples whose demonstration
  states the gold answer minus that of samples whose demonstration states a wrong one, with a
  standard error clustered by question (:func:`clustered_difference`). The premise needs it
  above 0: a teacher shown a wrong answer should know less, so gain less entropy over the student;
- ``r(I_k, share right)``: over training steps, the correlation of the batch's ``I_k`` with the
  share of its trained samples whose demonstration is right, each centred on its run's mean
  (:func:`within_run_correlation`), with a 95 % bootstrap interval over runs. The premise needs
  it above 0: PGPO's larger steps should fall on batches with better feedback. Beside it, the
  same with the batch's accuracy (the verifier-free reward), which an earlier probe found to
  explain ``I_k`` better. Both also detrended (first differences): over a run both series
  drift with training, and a shared drift alone would correlate them;
- the separation of signals that need no gold answer (:data:`SIGNALS`): each one's mean over
  samples with a right demonstration minus that over samples with a wrong one, in standard
  errors clustered by question. One that separates by more than 3 could tell informative
  feedback from misleading feedback where ``I_k`` cannot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

RESAMPLES = 2000  # bootstrap resamples of the runs (seeded: reproducible)
# Per-sample signals that need no gold answer (feedback.jsonl), the entropy gap first.
SIGNALS = {
    "gap": "entropy gap H_S - H_T (Eq. 8 per sample; PGPO's signal)",
    "p_shown": "teacher P(shown letter)",
    "p_student_shown": "student's prior P(shown letter)",
    "success_agreement": "share of the group's successes stating the shown letter",
}


def clustered_difference(
    values: np.ndarray, right: np.ndarray, clusters: np.ndarray
) -> tuple[float, float]:
    """``mean(values[right]) - mean(values[~right])`` and its standard error clustered by
    ``clusters`` (all ``[n]``): the sandwich variance of the difference of two means,
    ``G / (G - 1) sum_g U_g^2`` with ``U_g`` the sum over cluster g of each observation's
    influence ``(x_i - m_R) / n_R`` (right) or ``-(x_i - m_W) / n_W`` (wrong), G clusters."""
    x = np.asarray(values, dtype=np.float64)
    r = np.asarray(right, dtype=bool)
    if r.all() or not r.any():
        raise ValueError("both groups need at least one value")
    m_r, m_w = x[r].mean(), x[~r].mean()
    influence = np.where(r, (x - m_r) / r.sum(), -(x - m_w) / (~r).sum())
    _, index = np.unique(np.asarray(clusters), return_inverse=True)
    per_cluster = np.bincount(index, weights=influence)
    g = len(per_cluster)
    var = g / (g - 1) * float((per_cluster**2).sum()) if g > 1 else float("nan")
    return float(m_r - m_w), float(np.sqrt(var))


def within_run_correlation(
    xs: list[np.ndarray], ys: list[np.ndarray], seed: int = 0, detrend: bool = False
) -> dict:
    """Pearson's r of ``x`` and ``y`` pooled over runs after centring each on its run's mean
    (``xs[i]``, ``ys[i]``: one run's ``[steps]``; non-finite pairs dropped), with a 95 %
    percentile bootstrap interval that resamples whole runs (steps of one run are not
    independent).

    ``detrend``: the same on first differences, ``x[k+1] - x[k]`` and ``y[k+1] - y[k]`` (pairs
    of consecutive steps that are both finite). Over a run both series drift with training; a
    shared drift alone correlates the raw series, while their step-to-step changes correlate only
    when the two move together from one step to the next."""
    runs = []
    for x, y in zip(xs, ys):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if detrend:
            x, y = np.diff(x), np.diff(y)  # a non-finite step makes both its differences so
        keep = np.isfinite(x) & np.isfinite(y)
        if keep.sum() >= 2:
            runs.append((x[keep] - x[keep].mean(), y[keep] - y[keep].mean()))
    if not runs:
        raise ValueError("no run with two finite steps")

    def r_of(chosen) -> float:
        x = np.concatenate([runs[i][0] for i in chosen])
        y = np.concatenate([runs[i][1] for i in chosen])
        den = np.sqrt((x * x).sum() * (y * y).sum())
        return float((x * y).sum() / den) if den > 0 else float("nan")

    rng = np.random.default_rng(seed)
    boot = np.array([r_of(rng.integers(0, len(runs), len(runs))) for _ in range(RESAMPLES)])
    boot = boot[np.isfinite(boot)]
    low, high = np.percentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
    return {
        "r": r_of(range(len(runs))),  # nan where either side never varies within a run
        "ci_low": float(low),
        "ci_high": float(high),
        "runs": len(runs),
        "steps": int(sum(len(x) for x, _ in runs)),
        "detrended": detrend,
    }


def read_feedback(folder: Path) -> list[dict]:
    """A run's per-sample records (``feedback.jsonl``), each with its ``step``."""
    rows = []
    for line in (Path(folder) / "feedback.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows += [{"step": row["step"], **s} for s in row["samples"]]
    return rows


def read_steps(folder: Path) -> list[dict]:
    """A run's training-step rows of ``metrics.jsonl`` (those that log ``info``)."""
    rows = map(json.loads, (Path(folder) / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if "info" in r]


def _metric(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=np.float64)


def _entropy_gap(rows: list[dict]) -> np.ndarray:
    """Each step's Eq. 8 ``I_k`` (``entropy_gap`` where the run's signal was another one)."""
    return _metric(rows, "entropy_gap" if rows and "entropy_gap" in rows[0] else "info")


def premise_summary(folders: list[Path]) -> dict:
    """The premise's numbers over one setting's runs (``folders``): the per-sample gap and the
    teacher's letter probabilities by the demonstration's truth, ``gap(right) - gap(wrong)``
    clustered by question, and ``r(I_k, share right)`` and ``r(I_k, accuracy)`` within runs."""
    samples = [s for f in folders for s in read_feedback(f)]
    usable = [s for s in samples if s["gap"] is not None and s["demo_right"] is not None]
    gap = np.array([s["gap"] for s in usable])
    right = np.array([s["demo_right"] for s in usable], dtype=bool)
    question = np.array([s["question"] for s in usable])
    out: dict = {
        "samples": len(usable),
        "runs": len(folders),
        "wrong_share": float(1 - right.mean()) if usable else math.nan,  # nan: no sample
    }
    if not right.any() or right.all():
        raise ValueError("the premise needs samples with right and with wrong demonstrations")
    diff, se = clustered_difference(gap, right, question)
    out["gap_right"], out["gap_wrong"] = float(gap[right].mean()), float(gap[~right].mean())
    out["gap_difference"], out["gap_difference_se"] = diff, se
    out["questions"] = int(len(np.unique(question)))
    # The same split within rollouts that are themselves correct, and within those that are
    # not: a gap that follows whether the response agrees with its demonstration, rather than
    # whether the demonstration is right, changes sign between the two.
    own = np.array([s["correct"] for s in usable], dtype=bool)
    out["gap_difference_by_rollout"] = {}
    for name, pick in (("correct", own), ("incorrect", ~own)):
        if right[pick].any() and (~right[pick]).any():
            d, d_se = clustered_difference(gap[pick], right[pick], question[pick])
            out["gap_difference_by_rollout"][name] = {"difference": d, "se": d_se,
                                                      "samples": int(pick.sum())}  # fmt: skip
    for key in ("p_shown", "p_gold"):
        for name, pick in (("right", right), ("wrong", ~right)):
            v = np.array([np.nan if s[key] is None else s[key] for s in usable])[pick]
            out[f"{key}_{name}"] = float(np.nanmean(v)) if np.isfinite(v).any() else None
    out["signals"] = {}
    for key in SIGNALS:
        v = np.array([np.nan if s.get(key) is None else s[key] for s in usable], np.float64)
        ok = np.isfinite(v)
        if ok[right].any() and ok[~right].any():
            d, d_se = clustered_difference(v[ok], right[ok], question[ok])
            # z: the difference in SEs; infinite where every right and every wrong sample
            # has its group's own value (SE 0), as agreement has under wrong-demo
            z = d / d_se if d_se > 0 else float(np.sign(d) * np.inf) if d else float("nan")
            out["signals"][key] = {"right": float(v[ok & right].mean()),
                                   "wrong": float(v[ok & ~right].mean()), "difference": d,
                                   "se": d_se, "z": z, "separates": bool(abs(d) > 3 * d_se),
                                   "samples": int(ok.sum())}  # fmt: skip
    metrics = [read_steps(f) for f in folders]
    infos = [_entropy_gap(rows) for rows in metrics]
    share_right = [1.0 - _metric(rows, "demo_wrong_share") for rows in metrics]
    accuracy = [_metric(rows, "reward_true") for rows in metrics]
    out["r_share_right"] = within_run_correlation(infos, share_right)
    out["r_accuracy"] = within_run_correlation(infos, accuracy)
    out["r_share_right_detrended"] = within_run_correlation(infos, share_right, detrend=True)
    out["r_accuracy_detrended"] = within_run_correlation(infos, accuracy, detrend=True)
    return out


def plot_premise(summaries: dict[str, dict], folders: dict[str, list[Path]], path: Path) -> None:
    """Per setting: the per-sample gap's distribution for right and for wrong demonstrations,
    and each step's ``I_k`` against its share of right demonstrations (both centred on the
    run's mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(summaries)
    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 3.8 * len(settings)), squeeze=False)
    for (left, right_ax), setting in zip(axes, settings):
        s, runs = summaries[setting], folders[setting]
        records = [r for f in runs for r in read_feedback(f) if r["gap"] is not None]
        # the central 99.8 % of the gaps: a few outliers would squeeze the rest into one bin
        span = np.percentile([r["gap"] for r in records], [0.1, 99.9])
        for truth, colour in ((True, "tab:green"), (False, "tab:red")):
            gaps = [r["gap"] for r in records if r["demo_right"] is truth]
            label = f"{'right' if truth else 'wrong'} demonstration (n={len(gaps):,})"
            left.hist(gaps, bins=60, range=tuple(span), density=True, alpha=0.5, color=colour,
                      label=label)  # fmt: skip
        diff, se = s["gap_difference"], s["gap_difference_se"]
        left.set_title(f"{setting}: per-sample entropy gap; right - wrong = {diff:+.4f} +- "
                       f"{se:.4f} nats", fontsize=10)  # fmt: skip
        left.set_xlabel("H_S - H_T, token mean over the response (nats)")
        left.legend(fontsize=8)
        for f in runs:
            rows = read_steps(f)
            x = 1.0 - _metric(rows, "demo_wrong_share")
            y = _entropy_gap(rows)
            right_ax.scatter(x - np.nanmean(x), y - np.nanmean(y), s=4, alpha=0.4)
        c = s["r_share_right"]
        right_ax.set_title(f"{setting}: I_k against the share of right demonstrations, per "
                           f"step\nr = {c['r']:+.2f} [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] "
                           f"(centred within each run; {c['runs']} runs)", fontsize=10)  # fmt: skip
        right_ax.set_xlabel("share of right demonstrations - run mean")
        right_ax.set_ylabel("I_k - run mean (nats)")
        right_ax.axhline(0, color="gray", lw=0.5)
        right_ax.axvline(0, color="gray", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
