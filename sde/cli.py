"""``pgpo-sde``: weak-error studies and sample paths of the modulated-drift SDE.

    pgpo-sde weak-error [--problem quadratic] [--models paper,matched,ode] [--info-source
        same-batch] [--etas ...] [--paths 2000] [--out runs/weak-error]
    pgpo-sde weak-error --optimizer adamw --regime malladi|ballistic|fixed [--start cold|warm]
        [--betas 0.9,0.999] [--c1 4 --c2 1] [--eps 1e-8] [--weight-decay 0.01] ...
    pgpo-sde simulate [--problem quadratic] [--model paper] [--eta 0.05] [--out runs/simulate]

The default weak-error study is the one that shows the paper's same-batch gap: with the batch's
own information (Algorithm 1) the paper's SDE stops converging as eta -> 0, the matched SDE
converges at order 1, in about 20 s on one core.

``--optimizer adamw`` measures the same weak error for PGPO on AdamW, as trained
(``ModulatedOptimizer(torch.optim.AdamW)``), against the limit equation of one scaling regime
(:mod:`sde.adamw`): the cell of claim C8 for the given information source and start.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from pgpo.cli_util import (
    ArgumentParser,
    UserError,
    alpha_arg,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    rho_max_arg,
    run,
)
from pgpo.malloc import keep_freed_memory
from pgpo.multiplier import KINDS, MultiplierConfig
from pgpo.outputs import check_output, json_text, output_files
from sde.adamw import REGIMES, STARTS, AdamWScaling, adamw_weak_errors
from sde.chains import gaussian_chain, minibatch_chain
from sde.integrate import BrownianPath, euler_maruyama
from sde.models import INFO_SOURCES, MODELS, constant_rho, make_model
from sde.plots import plot_paths, plot_weak_error
from sde.problems import PROBLEMS, make_problem
from sde.weak_error import CHAINS, TEST_FUNCTIONS, order_one, summarize, to_json, weak_errors

DEFAULT_ETAS = "0.2,0.1,0.05,0.025,0.0125,0.00625"


def _csv(choices=None, kind=str):
    def parse(text: str):
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("an empty list")
        if choices is not None:
            for x in items:
                if x not in choices:
                    raise argparse.ArgumentTypeError(
                        f"unknown value {x!r}; choose from {', '.join(choices)}"
                    )
        return items

    return parse


def _etas(text: str) -> list[float]:
    try:
        etas = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None
    if len(etas) < 1 or any(not (0 < e < float("inf")) for e in etas):
        raise argparse.ArgumentTypeError(f"must be finite numbers > 0, got {text!r}")
    return sorted(set(etas), reverse=True)


def _betas(text: str) -> tuple[float, float]:
    try:
        betas = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not two comma-separated numbers: {text!r}") from None
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise argparse.ArgumentTypeError(f"must be two numbers in [0, 1), got {text!r}")
    return betas


_ADAMW = AdamWScaling("malladi")
ADAMW_DEFAULTS = dict(regime="malladi", start="cold", betas=None, c1=_ADAMW.c1, c2=_ADAMW.c2,
                      eps=_ADAMW.eps, weight_decay=_ADAMW.weight_decay)  # fmt: skip


def _add_common(p: ArgumentParser) -> None:
    p.add_argument("--problem", choices=list(PROBLEMS), default="quadratic")
    p.add_argument(
        "--info-source",
        choices=list(INFO_SOURCES),
        default="same-batch",
        help="where the chain's I_hat comes from (same-batch = Algorithm 1)",
    )
    p.add_argument("--kind", choices=list(KINDS), default="paper", help="multiplier kind")
    p.add_argument("--alpha", type=alpha_arg, default=1.0)
    p.add_argument("--rho-max", type=rho_max_arg, default=2.0)
    p.add_argument(
        "--constant-rho",
        type=positive_float,
        default=None,
        help="use this constant rho instead of the multiplier (1 = SGD)",
    )
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument("--without-replacement", action="store_true")
    p.add_argument("--horizon", type=positive_float, default=1.0, help="T, in units of k * eta")
    p.add_argument("--seed", type=nonnegative_int, default=0)


def _multiplier(args):
    if args.constant_rho is not None:
        return constant_rho(args.constant_rho)
    return MultiplierConfig(args.alpha, args.rho_max, args.kind)


# Bounds on the loops a user's numbers control: steps per path (horizon / eta, times the SDE's
# substeps) and paths. Past them a run would take days or all the memory.
MAX_STEPS = 1_000_000
MAX_PATHS = 10_000_000


def _check_size(args, eta: float, substeps: int = 1) -> None:
    steps = args.horizon / eta
    if steps * substeps > MAX_STEPS:
        raise UserError(
            f"eta {eta:g} with --horizon {args.horizon:g} means {steps * substeps:.3g} steps per "
            f"path (at most {MAX_STEPS:,}): use a larger eta or a shorter horizon"
        )
    if args.paths > MAX_PATHS:
        raise UserError(f"--paths must be at most {MAX_PATHS:,}, got {args.paths}")


def _check_batch(args, problem) -> None:
    if args.without_replacement and args.batch_size > problem.n:
        raise UserError(
            f"--batch-size {args.batch_size} exceeds the {problem.n} examples (without replacement)"
        )


def _adamw_scaling(args) -> AdamWScaling:
    """The AdamW regime the arguments name; options of the other optimizer refused by name."""
    for flag, value in (("--models", args.models), ("--chain", args.chain)):
        if value is not None:
            raise UserError(f"{flag} is for --optimizer sgd; AdamW's model is its regime's limit")
    if args.info_source == "independent-batch":
        raise UserError("--optimizer adamw takes --info-source same-batch or full")
    if args.betas is not None and args.regime != "fixed":
        raise UserError(f"--betas is for --regime fixed; {args.regime} sets them from --c1, --c2")
    scaling = AdamWScaling(
        args.regime, args.start, args.c1, args.c2, tuple(args.betas or (0.9, 0.999)), args.eps,
        args.weight_decay,
    )  # fmt: skip
    for eta in args.etas:
        try:
            scaling.hyper(eta)
        except ValueError as err:  # 1 - beta = c h must stay in (0, 1]
            raise UserError(f"--etas: {err}") from None
    return scaling


def _cmd_weak_error(args) -> int:
    problem = make_problem(args.problem)
    _check_batch(args, problem)
    if args.paths < 2:
        raise UserError(f"--paths must be >= 2, got {args.paths}")
    adamw = args.optimizer == "adamw"
    if not adamw:
        for flag in ("regime", "start", "betas", "c1", "c2", "eps", "weight_decay"):
            if getattr(args, flag) != ADAMW_DEFAULTS[flag]:
                raise UserError(f"--{flag.replace('_', '-')} is for --optimizer adamw")
        args.models = args.models or ["paper", "matched", "ode"]
        args.chain = args.chain or "gaussian"
    scaling = _adamw_scaling(args) if adamw else None
    sde_step = args.sde_step or (0.01 if adamw else 0.0125)
    for eta in args.etas:  # the chain's steps, and the SDE reference's at h / 2
        if adamw:
            _check_size(args, scaling.time_step(eta))
            _check_size(args, sde_step, 2)
        else:
            _check_size(args, eta, 2 * max(2, math.ceil(eta / sde_step)))
    if max(args.etas) > args.horizon:
        raise UserError(f"every eta must be <= --horizon {args.horizon}, got {max(args.etas)}")
    if args.out:
        check_output(args.out)
    multiplier = _multiplier(args)
    # The results do not depend on the number of workers: it is not part of the settings.
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "workers")}
    settings["sde_step"] = sde_step
    rho_text = (
        f"rho = {args.constant_rho:g}"
        if args.constant_rho is not None
        else f"rho = {args.kind}(alpha={args.alpha:g}, rho_max={args.rho_max:g})"
    )
    against = (
        f"the {args.regime} limit of modulated AdamW ({args.start} start)"
        if adamw
        else f"the {args.chain} PGPO chain"
    )
    what = f"regime {args.regime}" if adamw else ", ".join(args.models)
    print(
        f"weak error of {what} against {against} on {args.problem}; I from {args.info_source}; "
        f"{rho_text}; batch {args.batch_size}; {args.paths} paths; T = {args.horizon:g}"
    )

    from tqdm import tqdm

    start = time.perf_counter()
    common = dict(
        info_source=args.info_source, batch_size=args.batch_size, paths=args.paths,
        horizon=args.horizon, seed=args.seed, test_fns=args.test_fns, sde_step=sde_step,
        workers=args.workers,
    )  # fmt: skip
    with tqdm(
        total=len(args.etas), desc="weak error", unit="run", file=sys.stderr, disable=None
    ) as bar:
        progress = lambda label: (bar.set_postfix_str(label), bar.update())
        if adamw:
            estimates = adamw_weak_errors(
                problem, multiplier, args.etas, scaling, replace_=not args.without_replacement,
                progress=progress, **common,
            )  # fmt: skip
            args.models = [estimates[0].model]
        else:
            estimates = weak_errors(
                problem, multiplier, args.etas, args.models, replace=not args.without_replacement,
                chain=args.chain, progress=progress, **common,
            )  # fmt: skip
    seconds = time.perf_counter() - start
    summaries = summarize(estimates, seed=args.seed)

    fn0 = args.test_fns[0]
    print(
        f"\nweak error e(eta) = E g(chain) - E g(SDE), g = {fn0}  (value +- standard error; "
        "* = unresolved, |e| < 3 SE)"
    )
    print(f"{'eta':>9s} " + " ".join(f"{m:>22s}" for m in args.models))
    for eta in args.etas:
        cells = []
        for m in args.models:
            e = next(x for x in estimates if x.eta == eta and x.model == m and x.test_fn == fn0)
            cells.append(f"{e.value:+.5f} +- {e.se:.5f}{' ' if e.resolved else '*'}")
        print(f"{eta:9.5g} " + " ".join(f"{c:>22s}" for c in cells))
    diverged = sum(e.diverged_chain + e.diverged_sde for e in estimates)
    print(f"\n{'model':14s} {'g':7s} verdict (slope over resolved points, 95 % bootstrap interval)")
    for s in summaries:
        small = (
            f"; smallest etas {s.slope_small.slope:.2f} [{s.slope_small.ci_low:.2f}, "
            f"{s.slope_small.ci_high:.2f}]"
            if s.slope_small
            else ""
        )
        print(f"{s.model:14s} {s.test_fn:7s} {s.verdict}{small}")
        if adamw:  # claim C8's reading of the same fit
            verdict = {True: "holds", False: "fails", None: "not measured"}[order_one(s)]
            print(f"{'':14s} {'':7s} order-1 picture (claim C8's cell verdict): {verdict}")
    if diverged:
        print(f"diverged paths (left out of every mean): {diverged}")
    print(f"time: {seconds:.1f} s")
    if args.out:
        with output_files(args.out) as tmp:
            data = to_json(estimates, summaries, settings)  # no timing: the same for any workers
            (tmp / "results.json").write_text(json_text(data, indent=2))
            plot_weak_error(
                estimates,
                summaries,
                tmp / "weak_error.png",
                f"{args.problem}, I from {args.info_source}, {rho_text}",
            )
        print(f"wrote {args.out}/results.json and weak_error.png")
    return 0


def _cmd_simulate(args) -> int:
    problem = make_problem(args.problem)
    _check_batch(args, problem)
    if args.eta > args.horizon:
        raise UserError(f"--eta must be <= --horizon {args.horizon}, got {args.eta}")
    _check_size(args, args.eta, args.substeps)
    check_output(args.out)
    multiplier = _multiplier(args)
    steps = max(1, round(args.horizon / args.eta))
    replace = not args.without_replacement
    brownian = BrownianPath(args.seed, args.paths, problem.d, args.eta, fine=args.substeps)
    model = make_model(
        args.model, problem, multiplier, args.batch_size, args.eta, args.info_source, replace
    )
    sde = euler_maruyama(model, problem.theta0, steps, brownian, args.substeps, record=True)
    if args.chain == "gaussian":
        chain = gaussian_chain(
            problem,
            multiplier,
            args.eta,
            steps,
            args.batch_size,
            brownian,
            args.info_source,
            replace,
            record=True,
        )
    else:
        chain = minibatch_chain(
            problem,
            multiplier,
            args.eta,
            steps,
            args.batch_size,
            args.paths,
            [args.seed, 1],
            args.info_source,
            replace,
            record=True,
        )
    times = np.arange(steps + 1) * args.eta
    with output_files(args.out) as tmp:
        np.savez(tmp / "paths.npz", times=times, sde=sde.path, chain=chain.path)
        (tmp / "settings.json").write_text(
            json_text({k: v for k, v in vars(args).items() if k != "func"}, indent=2)
        )
        plot_paths(
            times,
            sde.path,
            chain.path,
            tmp / "paths.png",
            f"{args.problem}: {args.model} SDE vs {args.chain} chain, eta={args.eta:g}",
        )
    print(
        f"simulated {args.paths} paths x {steps} steps; chain mean at T: "
        f"{np.nanmean(chain.theta, axis=0).round(4).tolist()}, SDE mean at T: "
        f"{np.nanmean(sde.theta, axis=0).round(4).tolist()}"
    )
    print(f"wrote {args.out}/paths.npz, paths.png and settings.json")
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pgpo-sde", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    w = sub.add_parser("weak-error", help="weak error of SDE models against PGPO vs eta")
    _add_common(w)
    w.add_argument(
        "--optimizer",
        choices=["sgd", "adamw"],
        default="sgd",
        help="sgd: the paper's chain against SDE models; adamw: modulated AdamW against its "
        "regime's limit (claim C8)",
    )
    w.add_argument(
        "--models", type=_csv(MODELS), default=None, help="sgd: SDE models (paper,matched,ode)"
    )
    w.add_argument("--etas", type=_etas, default=_etas(DEFAULT_ETAS))
    w.add_argument("--paths", type=int, default=2000)
    w.add_argument("--test-fns", type=_csv(TEST_FUNCTIONS), default=list(TEST_FUNCTIONS))
    w.add_argument(
        "--chain",
        choices=list(CHAINS),
        default=None,
        help="sgd: gaussian (default): the chain's exact step mean and covariance with Gaussian "
        "noise, coupled to the SDE (low variance); minibatch: real batches (needs ~10x paths)",
    )
    w.add_argument(
        "--sde-step",
        type=positive_float,
        default=None,
        help="largest Euler-Maruyama step of the SDE reference (Richardson on h, h/2); default "
        "0.0125 (sgd), 0.01 in SDE time (adamw)",
    )
    a = w.add_argument_group("--optimizer adamw (sde.adamw; claim C8)")
    a.add_argument("--regime", choices=list(REGIMES), default=ADAMW_DEFAULTS["regime"],
                   help="how the betas follow eta: malladi (1 - beta = c eta^2), ballistic "
                   "(1 - beta = c eta), fixed (--betas, against the eta -> 0 ODE)")  # fmt: skip
    a.add_argument("--start", choices=list(STARTS), default=ADAMW_DEFAULTS["start"],
                   help="cold: zero moments, bias-corrected; warm: stationary moments")  # fmt: skip
    a.add_argument("--betas", type=_betas, default=None, help="fixed regime: b1,b2 (0.9,0.999)")
    a.add_argument("--c1", type=positive_float, default=ADAMW_DEFAULTS["c1"],
                   help="scaled regimes: 1 - beta1 = c1 eta^p")  # fmt: skip
    a.add_argument("--c2", type=positive_float, default=ADAMW_DEFAULTS["c2"],
                   help="scaled regimes: 1 - beta2 = c2 eta^p")  # fmt: skip
    a.add_argument("--eps", type=positive_float, default=ADAMW_DEFAULTS["eps"],
                   help="AdamW's eps (eps0 / eta under malladi)")  # fmt: skip
    a.add_argument("--weight-decay", type=nonnegative_float,
                   default=ADAMW_DEFAULTS["weight_decay"])  # fmt: skip
    w.add_argument("--out", default="runs/weak-error", help="output folder ('' for none)")
    w.add_argument(
        "--workers", type=positive_int, default=1, help="processes (etas in parallel; same results)"
    )
    w.set_defaults(func=_cmd_weak_error)

    s = sub.add_parser("simulate", help="sample paths of a chain and an SDE model")
    _add_common(s)
    s.add_argument("--model", choices=list(MODELS), default="paper")
    s.add_argument("--chain", choices=list(CHAINS), default="minibatch")
    s.add_argument("--eta", type=positive_float, default=0.05)
    s.add_argument("--paths", type=positive_int, default=200)
    s.add_argument("--substeps", type=positive_int, default=4)
    s.add_argument("--out", default="runs/simulate")
    s.set_defaults(func=_cmd_simulate)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    return run(_main, "pgpo-sde", argv)


if __name__ == "__main__":
    sys.exit(main())
