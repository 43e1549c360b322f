"""``pgpo table RUNS...``: the paper's Table 1 / Table 4 layout from run folders.

Per run (its ``config.yaml`` and ``metrics.jsonl``): the best evaluation (``eval_avg_at_k``, or
``eval_p_correct`` with ``eval.mode: exact``) within each wall-clock budget of training
(``step_seconds_total``; the reference reports the best within 1 h and 5 h), the best within N
steps, the final one, and the collapse step (``collapsed_at``). The tables put methods in rows
and domains in columns, each cell the mean over seeds; ``table.csv`` has every run. One figure
per domain: the evaluation against training hours and against step.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import yaml

from pgpo.train.config import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_budget(text: str) -> float:
    """``1h``, ``90m``, ``300s`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh])\s*", text)
    if not match:
        raise ConfigError(f"budget {text!r}: write it as 1h, 90m or 300s")
    return float(match.group(1)) * _UNITS[match.group(2)]


def read_run(folder: Path) -> dict:
    """A run folder's labels (domain, method, alpha, seed) and its evaluations."""
    folder = Path(folder)
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{folder}: not a run folder ({type(err).__name__})") from None
    pgpo = cfg.get("pgpo", {})
    method = f"PGPO alpha={pgpo.get('alpha'):g}" if pgpo.get("enabled") else "SDPO"
    evals = []
    for r in rows:
        score = r.get("eval_avg_at_k", r.get("eval_p_correct"))
        if score is not None and r.get("step", 0) > 0:
            evals.append((r["step"], r.get("step_seconds_total"), float(score)))
    collapsed = next((r["collapsed_at"] for r in rows if "collapsed_at" in r), None)
    return {
        "run": folder.name,
        "domain": (cfg.get("data") or {}).get("domain") or "all",
        "method": method,
        "seed": cfg.get("seed"),
        "evals": evals,
        "collapsed_at": collapsed,
    }


def summarize(run: dict, budgets: dict[str, float], max_steps: int | None) -> dict:
    """The run's row: best within each budget and within ``max_steps``, final, collapse."""
    evals = run["evals"]
    out = {k: run[k] for k in ("run", "domain", "method", "seed", "collapsed_at")}
    for label, seconds in budgets.items():
        within = [s for _, t, s in evals if t is not None and t <= seconds]
        out[f"best_{label}"] = max(within) if within else None
    if max_steps is not None:
        within = [s for step, _, s in evals if step <= max_steps]
        out[f"best_{max_steps}_steps"] = max(within) if within else None
    out["final"] = evals[-1][2] if evals else None
    return out


def _cell(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.3f} +- {sd:.3f} (n={len(values)})"


def markdown(rows: list[dict], metrics: list[str]) -> str:
    """One table per metric: methods x domains, mean (+- sd over seeds)."""
    domains = sorted({r["domain"] for r in rows})
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "SDPO", m))
    out = []
    for metric in metrics:
        out += [f"### {metric}", "", "| method | " + " | ".join(domains) + " |",
                "|---|" + "---|" * len(domains)]  # fmt: skip
        for m in methods:
            cells = [_cell([r[metric] for r in rows if r["method"] == m and r["domain"] == d])
                     for d in domains]  # fmt: skip
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_domain(runs: list[dict], domain: str, path: Path) -> None:
    """Evaluation against training hours and against step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(10, 4))
    methods = sorted({r["method"] for r in runs}, key=lambda m: (m != "SDPO", m))
    for r in runs:
        color = f"C{methods.index(r['method'])}"
        steps = [e[0] for e in r["evals"]]
        hours = [(e[1] or 0.0) / 3600 for e in r["evals"]]
        scores = [e[2] for e in r["evals"]]
        label = f"{r['method']} (seed {r['seed']})"
        by_time.plot(hours, scores, "o-", color=color, ms=3, label=label)
        by_step.plot(steps, scores, "o-", color=color, ms=3, label=label)
    by_time.set_xlabel("training wall-clock (hours)")
    by_step.set_xlabel("step")
    for ax in (by_time, by_step):
        ax.set_ylabel("held-out score (avg@k or P(correct))")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=7)
    fig.suptitle(f"domain: {domain}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(
    folders: list[Path], out: Path, budgets: list[str], max_steps: int | None
) -> list[Path]:
    """table.md, table.csv and one figure per domain into ``out`` (a staging folder)."""
    seconds = {b.strip(): parse_budget(b) for b in budgets}
    runs = [read_run(f) for f in folders]
    rows = [summarize(r, seconds, max_steps) for r in runs]
    metrics = [f"best_{b}" for b in seconds]
    metrics += [f"best_{max_steps}_steps"] if max_steps is not None else []
    metrics += ["final"]
    text = markdown(rows, metrics)
    collapse = [f"| {r['run']} | {r['collapsed_at']} |" for r in rows if r["collapsed_at"]]
    if collapse:
        text += "\n### collapse step\n\n| run | collapsed_at |\n|---|---|\n" + "\n".join(collapse)
    (out / "table.md").write_text(text + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    written = [out / "table.md", out / "table.csv"]
    by_domain = defaultdict(list)
    for r in runs:
        by_domain[r["domain"]].append(r)
    for domain, group in sorted(by_domain.items()):
        plot_domain(group, domain, out / f"curves_{domain}.png")
        written.append(out / f"curves_{domain}.png")
    return written
