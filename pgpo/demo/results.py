"""The docs' result blocks, generated from the summaries committed under ``results/``.

A block is the text of a page between ``<!-- results: NAME -->`` and ``<!-- results: end -->``.
:data:`BLOCKS` names, for each, the summary file that makes it and the function that writes it,
so that a number in such a block comes from a file and a command (each results folder's README
says which command and commit made its summary).

    python -m pgpo.demo.results            # rewrite every block from its file
    python -m pgpo.demo.results --check    # exit 1, naming each block that differs from its file
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = ("README.md", "docs/*.md")
_BLOCK = re.compile(r"(<!-- results: ([\w-]+) -->\n)(.*?)(<!-- results: end -->)", re.DOTALL)


def study_real(summary: dict) -> str:
    """``pgpo study --real``'s report without its title: the table, the verdict, the premise."""
    from pgpo.demo.real_study import markdown

    return markdown(summary).split("\n", 2)[2]


def demo_real(summary: dict) -> str:
    """``pgpo demo --real``'s table: each run's held-out exact scores, gains and differences."""
    from pgpo.demo.real import scores_table

    return scores_table(summary)


def study_setting(setting: str) -> Callable[[dict], str]:
    """``pgpo study``'s table for one setting (:func:`pgpo.demo.study_report.setting_table`)."""

    def table(summary: dict) -> str:
        from pgpo.demo.study_report import setting_table

        return "\n".join(setting_table(summary["settings"][setting])) + "\n"

    return table


def study_edge(summary: dict) -> str:
    """The teacher's edge at each evaluation of SDPO's runs in the ``collapse`` setting, beside
    held-out avg@k and the step at which each run collapsed."""
    s = summary["settings"]["collapse"]
    names = s["methods"]["sdpo"]["runs"]
    runs = [s["runs"][name] for name in names]
    steps = [step for step, _ in runs[0]["edge"]]
    lines = [
        f"| seed | edge at step {' / '.join(map(str, steps))} | held-out avg@k: start / final "
        "| collapsed at |",
        "|---|---|---|---|",
    ]
    for r in runs:
        edges = " / ".join(f"{e:+.2f}" for _, e in r["edge"])
        at = "-" if r["collapse_step"] is None else str(r["collapse_step"])
        lines.append(f"| {r['seed']} | {edges} | {r['start']:.2f} / {r['final']:.2f} | {at} |")
    return "\n".join(lines) + "\n"


def demo_runs(summary: dict) -> str:
    """``pgpo demo``'s runs: held-out avg@k at the start, the end and best, and rho_k's range."""
    lines = ["| run | seed | start | final | best | mean I_k | rho_k range |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in summary["runs"].items():
        lines.append(f"| {name.rsplit('-seed', 1)[0]} | {r['seed']} | {r['start']:.3f} | "
                     f"{r['final']:.3f} | {r['best']:.3f} | {r['info_mean']:.4f} | "
                     f"{r['rho_min']:.3f}-{r['rho_max']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def premise_table(setting: str) -> Callable[[dict], str]:
    """The premise's numbers for one setting: the per-sample gap difference (overall, within
    correct and within incorrect rollouts), r(I_k, share right) and r(I_k, batch accuracy)
    centred and detrended (first differences), and the signals that need no gold answer."""

    def table(summary: dict) -> str:
        from pgpo.demo.premise import SIGNALS

        p = summary["settings"][setting]["premise"]

        def r(key: str) -> str:
            c = p[key]
            return f"{c['r']:+.2f} [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"

        def gap(d: dict, difference: str = "difference", se: str = "se") -> str:
            return f"{d[difference]:+.4f} +- {d[se]:.4f}"

        by = p["gap_difference_by_rollout"]
        rows = [
            ("runs (trained samples, questions)",
             f"{p['runs']} ({p['samples']:,}, {p['questions']:,})"),
            ("wrong demonstrations", f"{p['wrong_share']:.1%}"),
            ("gap(right) - gap(wrong), nats (SE clustered by question)",
             gap(p, "gap_difference", "gap_difference_se")),
            ("... within correct rollouts", gap(by["correct"])),
            ("... within incorrect rollouts", gap(by["incorrect"])),
            ("r(I_k, share right), centred per run", r("r_share_right")),
            ("r(I_k, share right), first differences", r("r_share_right_detrended")),
            ("r(I_k, batch accuracy), centred per run", r("r_accuracy")),
            ("r(I_k, batch accuracy), first differences", r("r_accuracy_detrended")),
            ("teacher P(shown letter): right / wrong demonstration",
             f"{p['p_shown_right']:.3f} / {p['p_shown_wrong']:.3f}"),
            ("teacher P(gold letter) when shown a wrong one", f"{p['p_gold_wrong']:.3f}"),
        ]  # fmt: skip
        for key, v in p["signals"].items():
            z = "total" if v["se"] == 0 else f"{v['z']:+.1f} SE"
            rows.append((f"gold-free signal, right - wrong: {SIGNALS[key]}",
                         f"{v['difference']:+.4f} ({z})"))  # fmt: skip
        lines = ["| measured | `" + setting + "` |", "|---|---|"]
        return "\n".join(lines + [f"| {a} | {b} |" for a, b in rows]) + "\n"

    return table


def teacher_temperature(checks: dict) -> str:
    """``pgpo teacher-check`` at each teacher temperature: P(correct) of student and teacher
    (shown the gold answer) and the paired edge, hottest first."""
    rows = sorted(checks.values(), key=lambda r: -r["teacher_temperature"])
    lines = ["| teacher temperature | student P(correct) | teacher P(correct) | edge |",
             "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['teacher_temperature']:g} | {r['p_student']:.3f} | "
                     f"{r['p_teacher']:.3f} | {r['teacher_edge']:+.3f} +- "
                     f"{r['teacher_edge_se']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def teacher_wrong_demo(checks: dict) -> str:
    """``pgpo teacher-check --wrong-demo`` per task (the folder ``wrong-demo-<task>`` names it):
    Eq. 8's I for a right demonstration minus for a wrong one, and the letter probabilities
    (each +- its standard error over questions)."""

    def v(r: dict, key: str, sign: str = "") -> str:
        return f"{r[key]:{sign}.3f} +- {r[key + '_se']:.3f}"

    lines = ["| task (questions) | I(right) - I(wrong), nats | P(shown), gold shown | "
             "P(shown), wrong shown | P(gold), wrong shown | student P(gold) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for folder, r in checks.items():
        task = folder.removeprefix("wrong-demo-")
        lines.append(f"| {task} ({r['questions']}) | {v(r, 'gap_right_minus_wrong', '+')} "
                     f"| {v(r, 'p_shown_gold')} | {v(r, 'p_shown_wrong')} | "
                     f"{v(r, 'p_gold_given_wrong')} | {v(r, 'p_student')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def head_floor(summary: dict) -> str:
    """``benchmarks/bench_core.py --head``: the fused head's time over its floor's, per run and
    their median, with the buffers held across calls and allocated in each call."""

    def series(name: str) -> str:
        values = ", ".join(f"{r:.2f}" for r in summary["ratios"][name])
        return f"{values} (**{summary['medians'][name]:.2f}**)"

    lines = ["| loss | target | buffers held across calls: / floor per run (median) | "
             "allocated in each call: / floor per run (median) |",
             "|---|---|---|---|"]  # fmt: skip
    for name, target in summary["targets"].items():
        lines.append(f"| {name} | <= {target} | {series(name)} | {series(name + ' (own)')} |")
    return "\n".join(lines) + "\n"


def bench_vs_trl(summary: dict) -> str:
    """``benchmarks/bench_vs_trl.py``'s table: seconds per step and peak memory of each system,
    and the ratios to stock TRL."""
    names = {"pgpo": "pgpo (same loss, rho = 1)", "pgpo-defaults": "pgpo (its defaults)",
             "trl": "TRL `SDPOTrainer`", "trl+pgpo": "TRL + pgpo's add-on"}  # fmt: skip
    lines = ["| response tokens | system | s / step | generation | the rest | peak RSS GiB |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for tokens, r in summary["results"].items():
        for i, (key, label) in enumerate(names.items()):
            if key not in r:
                continue
            x = r[key]
            first = tokens if i == 0 else ""
            lines.append(f"| {first} | {label} | {x['seconds']:.1f} | {x['generation']:.1f} | "
                         f"{x['rest']:.1f} | {x['peak_gib']:.2f} |")  # fmt: skip
    lines.append("")
    for tokens, r in summary["results"].items():
        q = r["ratios"]
        line = (f"- {tokens} tokens: pgpo / TRL time {q['time']:.2f}, peak memory "
                f"{q['memory']:.3f}")  # fmt: skip
        if "add_on_time" in q:
            line += (f"; TRL + pgpo's add-on / TRL time {q['add_on_time']:.2f}, peak memory "
                     f"{q['add_on_memory']:.3f}")  # fmt: skip
        lines.append(line + ".")
    return "\n".join(lines) + "\n"


def head_vs_trl_kernel(summary: dict) -> str:
    """``benchmarks/bench_head_vs_trl_kernel.py``'s rows and the pgpo / TRL ratios."""
    lines = ["| hidden | tokens | variant | seconds | extra MiB |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['hidden']} | {r['tokens']} | {r['variant']} | {r['seconds']:.2f} | "
                     f"{r['extra_bytes'] / 2**20:.0f} |")  # fmt: skip
    lines += ["", "| hidden | tokens | loss | pgpo / TRL time | pgpo / TRL extra memory | faster |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for q in summary["ratios"]:
        faster = "pgpo" if q["time"] < 1 else "TRL"
        lines.append(f"| {q['hidden']} | {q['tokens']} | {q['loss']} | {q['time']:.2f} | "
                     f"{q['memory']:.2f} | {faster} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def claims_report(summary: dict) -> str:
    """``pgpo-check report``'s claims that it measured: each one's verdict and numbers (a claim
    it could not measure from the inputs it was given is left out)."""
    lines = ["| claim | verdict | what was measured |", "|---|---|---|"]
    for c in summary["checks"]["Claims"]:
        if c["verdict"] != "not measured":
            text = " ".join(c["summary"].split()).replace("|", "\\|")
            lines.append(f"| {c['title']} | **{c['verdict']}** | {text} |")
    return "\n".join(lines) + "\n"


def weak_error(summary: dict) -> str:
    """``pgpo-sde weak-error``'s verdict per SDE model at g = theta1: a plateau's value, or the
    order (slope over the resolved learning rates, 95 % bootstrap interval)."""
    described = {
        "paper": "`paper` (Theorem A.2 ii, drift `-rho(I(theta)) grad L`)",
        "ode": "`ode` (modulated gradient flow)",
        "matched": "`matched` (drift and noise of the actual chain)",
    }
    lines = ["| SDE model | weak error as eta -> 0 (g = theta1) |", "|---|---|"]
    for s in summary["summaries"]:
        if s["test_fn"] != "theta1":
            continue
        if s["plateau"]:
            said = f"**plateaus** at {s['plateau_value']:.4f}"
        else:
            fit = s["slope"]
            said = f"order {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]"
        lines.append(f"| {described.get(s['model'], s['model'])} | {said} |")
    return "\n".join(lines) + "\n"


# name: (summary file, relative to the repository, and the function that writes the block); a
# pattern with ``*`` reads every file it matches, keyed by the name of the folder holding it
BLOCKS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "claims-report": ("results/claims-report/report.json", claims_report),
    "demo-real": ("results/demo-real/real.json", demo_real),
    "demo-vllm": ("results/demo-vllm/summary.json", demo_runs),
    "study-learn": ("results/study/summary.json", study_setting("learn")),
    "study-collapse": ("results/study/summary.json", study_setting("collapse")),
    "study-edge": ("results/study/summary.json", study_edge),
    "premise-noisy": ("results/premise-noisy/summary.json", premise_table("noisy")),
    "premise-noisy-methods": ("results/premise-noisy/summary.json", study_setting("noisy")),
    "premise-wrong-demo": ("results/premise-wrong-demo/summary.json", premise_table("wrong-demo")),
    "premise-wrong-demo-methods": (
        "results/premise-wrong-demo/summary.json",
        study_setting("wrong-demo"),
    ),
    "weak-error": ("results/weak-error/results.json", weak_error),
    "study-real": ("results/study-real/summary.json", study_real),
    "teacher-temperature": (
        "results/teacher-check/temperature-*/teacher_check.json",
        teacher_temperature,
    ),
    "teacher-wrong-demo": (
        "results/teacher-check/wrong-demo-*/teacher_check.json",
        teacher_wrong_demo,
    ),
    "head-floor": ("results/head-floor/summary.json", head_floor),
    "bench-vs-trl": ("results/bench-vs-trl/summary.json", bench_vs_trl),
    "head-vs-trl-kernel": ("results/head-vs-trl-kernel/summary.json", head_vs_trl_kernel),
}


def render(name: str, root: Path = ROOT) -> str:
    """Block ``name`` as its file makes it."""
    path, write = BLOCKS[name]
    if "*" not in path:
        return write(json.loads((root / path).read_text()))
    files = sorted(root.glob(path))
    if not files:
        raise OSError(f"no file matches {path}")
    return write({f.parent.name: json.loads(f.read_text()) for f in files})


def pages(root: Path = ROOT) -> list[Path]:
    return [p for pattern in PAGES for p in sorted(root.glob(pattern))]


def _filled(page: Path, root: Path, differed: list[str]) -> str:
    """``page``'s text with every block rendered from its file; ``page:NAME`` of each block
    that differed appended to ``differed``."""

    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in BLOCKS:
            raise ValueError(f"{page.name}: no results block named {name!r}")
        new = render(name, root)
        if new != m.group(3):
            differed.append(f"{page.relative_to(root)}:{name}")
        return m.group(1) + new + m.group(4)

    return _BLOCK.sub(fill, page.read_text())


def update(root: Path = ROOT, write: bool = True) -> list[str]:
    """Every block of every page from its file: ``page:NAME`` of each block that differed
    (rewritten with ``write``). A block with no entry in :data:`BLOCKS` is an error."""
    differed: list[str] = []
    for page in pages(root):
        text = _filled(page, root, differed)
        if write and text != page.read_text():
            page.write_text(text)
    return differed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 where a block differs"
    )
    args = p.parse_args(argv)
    try:
        differed = update(write=not args.check)
    except (ValueError, OSError, KeyError) as err:  # an unknown block, a missing or odd summary
        print(f"pgpo.demo.results: {err}", file=sys.stderr)
        return 2
    for name in differed:
        print(f"{'differs' if args.check else 'rewrote'}: {name}")
    return 1 if (args.check and differed) else 0


if __name__ == "__main__":
    sys.exit(main())
