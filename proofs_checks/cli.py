"""``pgpo-check``: which guarantees behind PGPO hold for given settings.

    pgpo-check rho --alpha 1.0 --rho-max 2.0 [--kind paper]     the regularity table of rho
    pgpo-check report [--quick] [--log metrics.jsonl] [--out runs/report]

``report`` writes ``REPORT.md`` (every check with verdict and numbers, then one section per
claim with its figure) and ``report.json``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

from pgpo.cli_util import ArgumentParser, UserError, alpha_arg, positive_int, rho_max_arg, run
from pgpo.malloc import keep_freed_memory
from pgpo.multiplier import KINDS, MultiplierConfig
from pgpo.outputs import json_text, output_files
from proofs_checks.checks import Check, log_checks, problem_checks, read_metrics, rho_checks
from proofs_checks.claims import Effort, all_claims
from sde.problems import make_problem

DEFAULT_BENCH = Path("benchmarks/results/train_step.json")
DEFAULT_STUDY = Path("runs/study/summary.json")
DEFAULT_PREMISE = Path("runs/premise/summary.json")
DEFAULT_REAL_STUDY = Path("runs/study-real/summary.json")


def multiplier_checks(mult: MultiplierConfig) -> list[Check]:
    kinks = mult.kinks
    center = kinks[0] if kinks else 0.0
    return rho_checks(mult, mult.bounds(), mult.lipschitz, kinks, center=center)


def _table(checks: list[Check]) -> list[str]:
    lines = ["| check | verdict | evidence |", "|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.title} | **{c.verdict}** | {c.summary.replace('|', '/')} |")
    return lines


def _print_table(checks: list[Check]) -> None:
    width = max(len(c.id) for c in checks)
    for c in checks:
        print(f"{c.id:{width}s}  {c.verdict:13s}  {c.summary}")


def _cmd_rho(args) -> int:
    mult = MultiplierConfig(args.alpha, args.rho_max, args.kind)
    print(f"regularity of rho = {args.kind}(alpha={args.alpha:g}, rho_max={args.rho_max:g})")
    _print_table(multiplier_checks(mult))
    return 0


def _cmd_report(args) -> int:
    mult = MultiplierConfig(args.alpha, args.rho_max, args.kind)
    log_infos = log_source = None
    if args.log:
        if not Path(args.log).exists():
            raise UserError(f"--log {args.log}: no such file")
        metrics = read_metrics(args.log)
        log_infos, log_source = metrics["info"], f"training log {args.log}"
    effort = Effort.of(args.quick, args.workers)
    start = time.perf_counter()
    from tqdm import tqdm

    with output_files(args.out) as tmp:
        regularity = multiplier_checks(mult)
        assumptions = []
        for name in ("quadratic", "logistic", "distill"):
            assumptions += problem_checks(
                make_problem(name), mult, samples=500 if args.quick else 2000
            )
        logs = log_checks(metrics, mult, log_source) if args.log else []
        total = 9 + len(effort.adamw_etas)
        with tqdm(total=total, desc="claims", file=sys.stderr, disable=None) as bar:
            bench = Path(args.bench) if args.bench else DEFAULT_BENCH
            claims = all_claims(
                mult,
                args.quick,
                tmp,
                bench,
                log_infos,
                log_source,
                progress=lambda label: (bar.set_postfix_str(label), bar.update()),
                study_file=Path(args.study) if args.study else DEFAULT_STUDY,
                premise_file=Path(args.premise) if args.premise else DEFAULT_PREMISE,
                real_study_file=Path(args.real_study) if args.real_study else DEFAULT_REAL_STUDY,
                workers=args.workers,
            )
        seconds = time.perf_counter() - start
        sections = {
            "Regularity of rho": regularity,
            "Theorem assumptions on the toy problems": assumptions,
            "Training log": logs,
            "Claims": claims,
        }
        md = [
            "# PGPO theory report",
            "",
            f"Multiplier: `{args.kind}`, alpha = {args.alpha:g}, rho_max = {args.rho_max:g}. "
            f"Effort: **{effort.name}** ({effort.paths} coupled paths per eta, etas "
            f"{', '.join(f'{e:g}' for e in effort.etas)})"
            + (
                " -- a quick run for CI: fewer paths, wider intervals, same checks"
                if args.quick
                else ""
            )
            + f". Wall time {seconds:.0f} s.",
            "",
            "Verdicts: **holds**, **fails**, **conditional** (holds only under the stated "
            "condition), **not measured**. Slopes are weighted least-squares fits of log|e| on "
            "log eta with 95 % bootstrap intervals; points within 3 standard errors of 0 are not "
            "fitted.",
        ]
        for title, checks in sections.items():
            if checks:
                md += ["", f"## {title}", "", *_table(checks)]
        md += ["", "## Claims in detail"]
        for c in claims:
            md += ["", f"### {c.title}", "", f"Verdict: **{c.verdict}**.", "", c.summary]
            if c.figure:
                md += ["", f"![{c.id}]({c.figure})"]
        (tmp / "REPORT.md").write_text("\n".join(md) + "\n")
        (tmp / "report.json").write_text(
            json_text(
                {
                    "settings": dict(
                        alpha=args.alpha,
                        rho_max=args.rho_max,
                        kind=args.kind,
                        effort={k: v for k, v in asdict(effort).items() if k != "workers"},
                        log=args.log,
                        seconds=seconds,
                    ),
                    "checks": {
                        title: [asdict(c) for c in checks] for title, checks in sections.items()
                    },
                },
                indent=2,
                default=float,
            )
        )
    print(f"{'quick' if args.quick else 'full'} report in {seconds:.0f} s")
    _print_table(regularity + assumptions + logs + claims)
    print(f"wrote {args.out}/REPORT.md and report.json")
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pgpo-check", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name, func, help_text in (
        ("rho", _cmd_rho, "regularity table of the multiplier"),
        ("report", _cmd_report, "every check and claim -> REPORT.md"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--alpha", type=alpha_arg, default=1.0)
        p.add_argument("--rho-max", type=rho_max_arg, default=2.0)
        p.add_argument("--kind", choices=list(KINDS), default="paper")
        p.set_defaults(func=func)
        if name == "report":
            p.add_argument("--quick", action="store_true", help="fewer paths (for CI)")
            p.add_argument("--log", default=None, help="trainer metrics file (JSON lines)")
            p.add_argument("--bench", default=None, help="trainer benchmark JSON (for C6)")
            p.add_argument("--study", default=None, help="pgpo study's summary.json (for C7)")
            p.add_argument(
                "--premise",
                default=None,
                help="summary.json of pgpo study --settings noisy,wrong-demo (for C9)",
            )
            p.add_argument(
                "--real-study",
                default=None,
                help="summary.json of pgpo study --real (for C9 on SmolLM2; "
                f"default {DEFAULT_REAL_STUDY})",
            )
            p.add_argument("--workers", type=positive_int, default=1, help="processes")
            p.add_argument("--out", default="runs/report")
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    return run(_main, "pgpo-check", argv)


if __name__ == "__main__":
    sys.exit(main())
