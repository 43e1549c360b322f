"""``pgpo``: the project's command line.

pgpo demo [--seeds N] [--collapse | --real]             SDPO vs PGPO on a small local model
pgpo study [--quick] [--methods ...] [--settings ...]    when modulation helps: methods x seeds
pgpo study --real [--quick] [--seeds N] [--steps N]      the same on SmolLM2-135M: the verdict
pgpo train --config PRESET|FILE [key=value ...]          training
pgpo config [PRESET|FILE] [key=value ...] [--keys]       the resolved config, or every key
pgpo eval --config ... --checkpoint DIR                  avg@k of a checkpoint
pgpo teacher-check --config ... [--questions N]          does the teacher know more? (edge)
pgpo sweep GRID.yaml [--print]                           a grid of runs (domain x method x ...)
pgpo table RUNS... --out DIR [--budgets 1h,5h]           Table 1 / 4 layout + curves
pgpo consolidate --checkpoint DIR --out DIR              sharded checkpoint -> whole one
pgpo export --checkpoint DIR --out DIR [--teacher]       policy -> transformers folder
pgpo multiplier [--alpha A] [--rho-max R] [--out DIR]   the multiplier's properties + plot
"""

from __future__ import annotations

import argparse
import os
import sys
import typing

import numpy as np

from pgpo.cli_util import (
    ArgumentParser,
    UserError,
    alpha_arg,
    positive_float,
    positive_int,
    rho_max_arg,
    run,
)
from pgpo.malloc import keep_freed_memory
from pgpo.multiplier import KINDS, MultiplierConfig, cap_point
from pgpo.outputs import check_output, json_text, output_files
from pgpo.train.config import PRESETS, Dtype


def multiplier_report(alpha: float, rho_max: float, sharpness: float) -> list[dict]:
    """One row per kind: bounds, Lipschitz constant, kinks and sample values."""
    rows = []
    for kind in KINDS:
        cfg = MultiplierConfig(alpha, rho_max, kind, sharpness)
        lo, hi = cfg.bounds()
        rows.append(
            dict(
                kind=kind,
                inf=lo,
                sup=hi,
                lipschitz=cfg.lipschitz,
                kinks=list(cfg.kinks),
                rho_at={f"{i:g}": float(cfg(float(i))) for i in (-1.0, -0.5, 0.0, 0.5, 1.0)},
            )
        )
    return rows


def _plot_multiplier(alpha: float, rho_max: float, sharpness: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kink = cap_point(alpha, rho_max)
    grid = np.linspace(min(-2.0, -2 * kink), max(2.0, 3 * kink), 2001)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind in KINDS:
        cfg = MultiplierConfig(alpha, rho_max, kind, sharpness)
        axes[0].plot(grid, cfg(grid), label=kind)
        axes[1].plot(grid, cfg.derivative(grid, side="left"), label=kind)
    for ax, title in zip(axes, ["rho(I)", "d rho / d I (left derivative)"]):
        ax.axvline(kink, color="gray", lw=0.8, ls=":")
        ax.axvline(0.0, color="gray", lw=0.8)
        ax.set_xlabel("I (nats)")
        ax.set_title(title)
        ax.legend()
    axes[0].axhline(1.0, color="gray", lw=0.8, ls="--")
    fig.suptitle(f"PGPO multiplier, alpha={alpha:g}, rho_max={rho_max:g}; kink at I*={kink:.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cmd_multiplier(args) -> int:
    rows = multiplier_report(args.alpha, args.rho_max, args.sharpness)
    if args.out:
        check_output(args.out)
    print(f"rho(I) = min(exp(alpha I), rho_max), alpha={args.alpha:g}, rho_max={args.rho_max:g}")
    print(
        f"{'kind':8s} {'inf':>6s} {'sup':>6s} {'Lipschitz':>9s}  {'kinks (I)':18s} "
        + " ".join(f"rho({k:>4s})" for k in rows[0]["rho_at"])
    )
    for r in rows:
        kinks = ", ".join(f"{k:.4g}" for k in r["kinks"]) or "none"
        print(
            f"{r['kind']:8s} {r['inf']:6.3g} {r['sup']:6.3g} {r['lipschitz']:9.4g}  "
            f"{kinks:18s} " + " ".join(f"{v:9.4f}" for v in r["rho_at"].values())
        )
    if args.out:
        with output_files(args.out) as tmp:
            data = dict(
                alpha=args.alpha, rho_max=args.rho_max, sharpness=args.sharpness, kinds=rows
            )
            (tmp / "multiplier.json").write_text(json_text(data, indent=2))
            _plot_multiplier(args.alpha, args.rho_max, args.sharpness, tmp / "multiplier.png")
        print(f"wrote {args.out}/multiplier.json and multiplier.png")
    return 0


def _cmd_train(args) -> int:
    from pgpo.train.config import load_config
    from pgpo.train.loop import train

    cfg = load_config(args.config, args.overrides)  # refused here, before any model loads
    out = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once
        print(f"wrote {out}/metrics.jsonl, samples.jsonl and checkpoints/")
    return 0


def _cmd_eval(args) -> int:
    from pgpo.train.config import load_config
    from pgpo.train.loop import evaluate_checkpoint

    cfg = load_config(args.config, args.overrides)
    result = evaluate_checkpoint(cfg, args.checkpoint)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once
        print(json_text(result))
    return 0


def _cmd_teacher_check(args) -> int:
    from pgpo.train.config import load_config
    from pgpo.train.evaluation import exact

    cfg = load_config(args.config, args.overrides)
    if args.wrong_demo:
        report = exact.wrong_demo_check(cfg, args.questions, args.prefix)
        print("\n".join(exact.wrong_demo_lines(report)))
    else:
        report = exact.teacher_check(cfg, args.questions, args.prefix)
        print("\n".join(exact.edge_lines(report)))
    if args.json:
        with output_files(args.json) as tmp:
            (tmp / "teacher_check.json").write_text(json_text(report, indent=1) + "\n")
        print(f"wrote {args.json}/teacher_check.json")
    return 0


def _cmd_sweep(args) -> int:
    from pgpo.train.experiments.sweep import sweep

    for line in sweep(args.grid, print_only=args.print):
        print(line)
    return 0


def _cmd_table(args) -> int:
    from pathlib import Path

    from pgpo.train.experiments.table import write_table

    folders = [Path(p) for p in args.runs]
    for f in folders:
        if not (f / "metrics.jsonl").is_file():
            raise UserError(f"{f}: not a run folder (no metrics.jsonl)")
    with output_files(args.out) as tmp:
        written = write_table(folders, tmp, args.budgets.split(","), args.steps)
    print((Path(args.out) / "table.md").read_text(), end="")
    print(f"wrote {', '.join(str(Path(args.out) / w.name) for w in written)}")
    return 0


def _cmd_consolidate(args) -> int:
    from pathlib import Path

    from pgpo.locking import exclusive
    from pgpo.train.run_folder import checkpoint

    source, out = Path(args.checkpoint), Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    target = out / f"{checkpoint.PREFIX}{checkpoint.load(source)['step']:06d}"
    if target.exists():  # never replaced: it is not this command's
        raise ValueError(f"--out {out} already holds {target.name}")
    state = checkpoint.consolidate(source)
    step, rng = state.pop("step"), state.pop("rng")
    # One writer: a run's checkpoints/ is its run folder's (locked by a live run), any other
    # folder its own.
    run_dir = out.name == "checkpoints" and out.parent.is_dir()
    held, made = (out.parent if run_dir else out), not out.exists()
    held.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(held, "--out"):
            if target.exists():  # written meanwhile
                raise ValueError(f"--out {out} already holds {target.name}")
            final = checkpoint.save(out, step, state, rng=rng)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    print(f"wrote {final} (whole tensors: pgpo eval / train --resume in one process)")
    return 0


def _cmd_config(args) -> int:
    from pgpo.train import settings
    from pgpo.train.config import load_config

    if args.keys:
        if args.config or args.overrides:
            raise UserError("--keys lists the schema: give it no config or overrides")
        rows = settings.keys()
        print(settings.keys_markdown(rows) if args.markdown else settings.keys_text(rows), end="")
        return 0
    if args.markdown:
        raise UserError("--markdown goes with --keys")
    if not args.config:
        raise UserError("name a preset or a YAML file (or --keys for every setting)")
    print(settings.resolved_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_export(args) -> int:
    from pgpo.train.run_folder.export import export

    role = "teacher" if args.teacher else "policy"
    out = export(args.checkpoint, args.out, role, args.dtype)
    print(f"wrote {out} (the {role} as a transformers model folder, with its tokenizer)")
    return 0


def _cmd_real_study(args) -> int:
    from pathlib import Path

    from pgpo.demo.real_study import PRESET, RealStudyPlan, run_real_study
    from pgpo.train.config import load_config

    if args.settings or args.warm_steps:
        raise UserError("--real has no --settings or --warm-steps (its settings are its own)")
    out = Path(args.out if args.out != "runs/study" else "runs/study-real")
    plan = RealStudyPlan(out, seeds=list(range(args.seeds or (1 if args.quick else 3))),
                         overrides=list(args.overrides), workers=args.workers,
                         cache=args.cache and Path(args.cache))  # fmt: skip
    if args.methods:
        plan.methods = args.methods
    if args.quick:  # every code path, in minutes: 1 question a step, 8 held out, 2 rates
        plan.steps, plan.questions, plan.lrs = 2, 1, (1e-4, 3e-4)
        plan.overrides = ["data.max_test=8", *plan.overrides]
    if args.steps:
        plan.steps = args.steps
    plan.grid_steps = max(1, plan.steps // 2)  # the grid: half the steps, every method alike
    plan.__post_init__()  # the methods, checked again after --methods
    load_config(PRESET, plan.overrides)  # refuse bad overrides before any work
    check_output(plan.out)
    run_real_study(plan)
    print(f"wrote {plan.out}/summary.md, summary.json and curves.png")
    return 0


def _cmd_study(args) -> int:
    from pathlib import Path

    if args.real:
        return _cmd_real_study(args)

    from pgpo.demo.study import DEFAULT_METHODS, DEFAULT_SETTINGS, StudyPlan, run_study
    from pgpo.demo.warmstart import WarmStartConfig
    from pgpo.train.config import load_config

    plan = StudyPlan(
        Path(args.out),
        methods=args.methods or list(DEFAULT_METHODS),
        settings=args.settings or list(DEFAULT_SETTINGS),
        seeds=list(range(args.seeds or (1 if args.quick else 3))),
        overrides=list(args.overrides),
        workers=args.workers,
        cache=args.cache and Path(args.cache),
        quick=args.quick,
    )
    if args.quick or args.warm_steps:
        plan.warm = WarmStartConfig(steps=args.warm_steps or 10)
    load_config("demo", plan.overrides)  # refuse bad overrides before any work
    check_output(plan.out)
    run_study(plan)
    print(f"wrote {args.out}/summary.md, summary.json and figures")
    return 0


def _cmd_demo(args) -> int:
    from pathlib import Path

    from pgpo.demo.run import SDPO, DemoPlan, pgpo_method, run_demo
    from pgpo.demo.warmstart import WarmStartConfig

    args.out = args.out or ("runs/demo-real" if args.real else "runs/demo")
    if args.real:
        from pgpo.demo.real import PRESET, run_real
        from pgpo.train.config import load_config

        overrides = tuple(args.overrides)
        if args.questions is not None:
            overrides = (f"data.max_test={args.questions}", *overrides)
        load_config(PRESET, list(overrides))  # refuse bad overrides before any work
        check_output(Path(args.out))
        run_real(Path(args.out), args.steps, cache=args.cache and Path(args.cache),
                 overrides=overrides, workers=args.workers or 3)  # fmt: skip
        print(f"wrote {args.out}/real.md, real.json and real.png")
        return 0
    if args.collapse:
        from pgpo.demo.collapse import collapse_plan

        plan = collapse_plan(Path(args.out), args.seeds or 3, args.workers or 2, args.overrides)
    else:
        plan = DemoPlan(
            Path(args.out),
            [SDPO, pgpo_method(1.0)],
            list(range(args.seeds or 1)),
            overrides=list(args.overrides),
            workers=args.workers or 2,
        )
    if args.steps is not None:
        plan.overrides.append(f"steps={args.steps}")
    if args.cache is not None:
        plan.cache = Path(args.cache)
    if args.warm_steps is not None:
        plan.warm = WarmStartConfig(steps=args.warm_steps)
    from pgpo.train.config import load_config

    load_config("demo", plan.overrides)  # refuse bad overrides before any work
    run_demo(plan)
    print(f"wrote {args.out}/summary.md, summary.json and curves.png")
    return 0


def _names(text: str) -> list[str]:
    """A comma-separated list of names (checked by the command that takes them)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no names in {text!r}")
    return names


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pgpo", description="Physics-Guided Policy Optimization.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    t = sub.add_parser("train", help="SDPO / PGPO training from a config file or preset")
    t.add_argument(
        "--config",
        required=True,
        help="a YAML file or a preset name ("
        + ", ".join(p.stem for p in sorted(PRESETS.glob("*.yaml")))
        + ")",
    )
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.add_argument(
        "overrides",
        nargs="*",
        help="key=value, e.g. pgpo.alpha=1.5 (every key, its type, default and meaning: "
        "pgpo config --keys; the resolved configuration: pgpo config PRESET key=value ...)",
    )
    t.set_defaults(func=_cmd_train)
    cf = sub.add_parser(
        "config", help="the resolved configuration as YAML (what pgpo train runs), or --keys"
    )
    cf.add_argument("config", nargs="?", help="a YAML file or a preset name")
    cf.add_argument("overrides", nargs="*", help="key=value, as for pgpo train")
    cf.add_argument("--keys", action="store_true", help="every key: type, default, meaning")
    cf.add_argument("--markdown", action="store_true", help="with --keys: as markdown tables")
    cf.set_defaults(func=_cmd_config)
    e = sub.add_parser("eval", help="avg@k of a checkpoint on the config's test split")
    e.add_argument("--config", required=True)
    e.add_argument("--checkpoint", required=True)
    e.add_argument("overrides", nargs="*")
    e.set_defaults(func=_cmd_eval)
    tc = sub.add_parser(
        "teacher-check",
        help="P(correct answer) under the student and the solution-conditioned teacher: an edge?",
    )
    tc.add_argument("--config", required=True)
    tc.add_argument("--questions", type=positive_int, default=50, help="training questions")
    tc.add_argument(
        "--prefix", default="<answer>", help="response text before the letter ('' : none)"
    )
    tc.add_argument("--json", default=None, metavar="DIR", help="also write teacher_check.json")
    tc.add_argument(
        "--wrong-demo",
        action="store_true",
        help="the teacher shown the gold answer against shown a wrong one: entropy, P(shown), "
        "P(gold); does I_k mark a right demonstration?",
    )
    tc.add_argument("overrides", nargs="*")
    tc.set_defaults(func=_cmd_teacher_check)
    sw = sub.add_parser("sweep", help="run a grid of configs (idempotent, resumable)")
    sw.add_argument("grid", help="a grid YAML file (examples/paper_table1.yaml)")
    sw.add_argument("--print", action="store_true", help="print one launch line per run to do")
    sw.set_defaults(func=_cmd_sweep)
    tb = sub.add_parser("table", help="best within budgets, final and collapse step, per domain")
    tb.add_argument("runs", nargs="+", help="run folders (output.dir of each run)")
    tb.add_argument("--out", required=True, help="folder for table.md, table.csv, curves_*.png")
    tb.add_argument("--budgets", default="1h,5h", help="wall-clock budgets of training")
    tb.add_argument("--steps", type=positive_int, default=None, help="also: best within N steps")
    tb.set_defaults(func=_cmd_table)
    c = sub.add_parser(
        "consolidate", help="a sharded checkpoint (fsdp.checkpoint=sharded) as a whole one"
    )
    c.add_argument("--checkpoint", required=True, help="a step_... folder with shards/")
    c.add_argument("--out", required=True, help="checkpoints folder to write step_... into")
    c.set_defaults(func=_cmd_consolidate)
    x = sub.add_parser(
        "export", help="a checkpoint's policy as a transformers folder (from_pretrained, vLLM)"
    )
    x.add_argument("--checkpoint", required=True, help="a step_... folder, whole or sharded")
    x.add_argument("--out", required=True, help="the new model folder")
    x.add_argument("--teacher", action="store_true", help="the EMA / frozen teacher instead")
    x.add_argument(
        "--dtype", choices=typing.get_args(Dtype), default=None, help="default: model.dtype"
    )
    x.set_defaults(func=_cmd_export)
    d = sub.add_parser("demo", help="SDPO against PGPO on a small local model, in minutes on a CPU")
    d.add_argument("--out", default=None, help="output folder (runs/demo; --real: runs/demo-real)")
    d.add_argument("--seeds", type=positive_int, default=None, help="seeds per method")
    d.add_argument("--steps", type=positive_int, default=None, help="training steps per run")
    d.add_argument(
        "--workers", type=positive_int, default=None, help="runs in parallel (2; --real: 3)"
    )
    d.add_argument("--cache", default=None, help="warm-start cache (default ~/.cache/pgpo)")
    d.add_argument("--warm-steps", type=positive_int, default=None, help="warm-start steps (200)")
    study = d.add_mutually_exclusive_group()
    study.add_argument("--collapse", action="store_true", help="the EMA-teacher collapse study")
    study.add_argument(
        "--real", action="store_true", help="SmolLM2-135M learns a task: SDPO, PGPO and SFT"
    )
    d.add_argument(
        "--questions", type=positive_int, default=None, help="--real: held-out questions (100)"
    )
    d.add_argument("overrides", nargs="*", help="trainer key=value for every run")
    d.set_defaults(func=_cmd_demo)
    st = sub.add_parser("study", help="methods x settings x paired seeds: when modulation helps")
    st.add_argument("--out", default="runs/study", help="output folder (runs, figures, summary)")
    st.add_argument(
        "--methods", type=_names, default=None, help="comma-separated (all but pgpo-agreement)"
    )
    st.add_argument(
        "--settings",
        type=_names,
        default=None,
        help="learn,collapse (the default), noisy,wrong-demo (the premise's)",
    )
    st.add_argument("--seeds", type=positive_int, default=None, help="seeds (3; --quick: 1)")
    st.add_argument("--workers", type=positive_int, default=2, help="runs in parallel")
    st.add_argument("--cache", default=None, help="warm-start cache (default ~/.cache/pgpo)")
    st.add_argument("--warm-steps", type=positive_int, default=None, help="warm-start steps")
    st.add_argument("--quick", action="store_true", help="a few steps per run (for tests)")
    st.add_argument(
        "--real",
        action="store_true",
        help="SmolLM2-135M on largest-number: SDPO on its own successes, PGPO, the matched "
        "step, supervised yardsticks; learning rates chosen on a validation slice",
    )
    st.add_argument("--steps", type=positive_int, default=None, help="--real: steps per run (30)")
    st.add_argument("overrides", nargs="*", help="trainer key=value for every run")
    st.set_defaults(func=_cmd_study)
    m = sub.add_parser("multiplier", help="properties of rho(I) for each kind, and a plot")
    m.add_argument("--alpha", type=alpha_arg, default=1.0)
    m.add_argument("--rho-max", type=rho_max_arg, default=2.0)
    m.add_argument("--sharpness", type=positive_float, default=4.0, help="smooth kind only")
    m.add_argument("--out", default=None, help="folder for multiplier.json and multiplier.png")
    m.set_defaults(func=_cmd_multiplier)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # the LM head's [chunk, V] temporaries: see keep_freed_memory
    return run(_main, "pgpo", argv)


if __name__ == "__main__":
    sys.exit(main())
