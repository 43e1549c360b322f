"""Figures of the toolkit: weak error against eta, sample paths."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sde.weak_error import Estimate, Summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_weak_error(
    estimates: Sequence[Estimate], summaries: Sequence[Summary], path, title: str
) -> None:
    """Log-log |e| against eta per test function, one curve per model, 95 % bars, reference
    slopes 1 and 2; unresolved points hollow."""
    plt = _pyplot()

    fns = list(dict.fromkeys(e.test_fn for e in estimates))
    models = list(dict.fromkeys(e.model for e in estimates))
    below = len(models) > 2  # many curves: the legend goes under the axes, not over the data
    height = 4.2 + (0.35 * (len(models) + 2) if below else 0.0)
    fig, axes = plt.subplots(
        1, len(fns), figsize=(4.6 * len(fns), height), squeeze=False, layout="constrained"
    )
    for ax, fn in zip(axes[0], fns):
        top = None
        for i, model in enumerate(models):
            pts = sorted(
                (e for e in estimates if e.model == model and e.test_fn == fn), key=lambda e: e.eta
            )
            eta = np.array([e.eta for e in pts])
            val = np.abs([e.value for e in pts])
            se = np.array([1.96 * e.se for e in pts])
            res = np.array([e.resolved for e in pts])
            verdict = next(s.verdict for s in summaries if s.model == model and s.test_fn == fn)
            color = f"C{i}"
            ax.errorbar(
                eta,
                val,
                yerr=np.minimum(se, val * 0.999),
                color=color,
                lw=1.2,
                capsize=2,
                label=f"{model}: {verdict.split(' (')[0]}",
            )
            ax.plot(eta[res], val[res], "o", color=color)
            ax.plot(eta[~res], val[~res], "o", mfc="none", color=color)
            if len(val[res]) and (top is None or val[res].max() > top[1]):
                top = (eta.max(), val[res].max())
        if top is not None:
            grid = np.array([min(e.eta for e in estimates), max(e.eta for e in estimates)])
            for order, style in ((1, "--"), (2, ":")):
                ax.plot(
                    grid,
                    top[1] * (grid / top[0]) ** order,
                    "k" + style,
                    lw=0.8,
                    label=f"slope {order}",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate eta")
        ax.set_ylabel(f"|weak error|, g = {fn}")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels of a log axis overlap
        if below:
            ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        else:
            ax.legend(fontsize=7)
    fig.suptitle(title + "  (hollow: |e| < 3 SE, not fitted; bars: 95 %)", fontsize=9)
    fig.savefig(path, dpi=120)  # constrained layout: laid out in the one draw that saves
    plt.close(fig)


def plot_paths(times, sde_path, chain_path, path, title) -> None:
    """Sample paths ``[steps + 1, P, d]`` of chain and SDE per coordinate, means in bold."""
    plt = _pyplot()

    d = sde_path.shape[2]
    fig, axes = plt.subplots(1, min(d, 2), figsize=(10, 3.8), squeeze=False)
    for j, ax in enumerate(axes[0]):
        show = min(sde_path.shape[1], 8)
        ax.plot(times, chain_path[:, :show, j], color="C0", lw=0.8, alpha=0.7)
        ax.plot(times, sde_path[:, :show, j], color="C1", lw=0.8, alpha=0.7)
        ax.plot(
            times,
            np.nanmean(chain_path[:, :, j], axis=1),
            color="C0",
            lw=2.5,
            label="chain (mean bold)",
        )
        ax.plot(
            times,
            np.nanmean(sde_path[:, :, j], axis=1),
            color="C1",
            lw=2.5,
            label="SDE (mean bold)",
        )
        ax.set_xlabel("t = k eta")
        ax.set_ylabel(f"theta_{j + 1}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
