"""The paper's claims (Theorem A.2, Eq. 4-9), each re-measured with the ``sde`` toolkit.

Every claim returns a :class:`~proofs_checks.checks.Check` with a verdict, the fitted slopes or
plateau values with their intervals, and a figure written to the output folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgpo.multiplier import MultiplierConfig
from proofs_checks.checks import CONDITIONAL, FAILS, HOLDS, NOT_MEASURED, Check, rho_at_least_one
from sde.adamw import adamw_study
from sde.chains import minibatch_chain
from sde.plots import plot_weak_error
from sde.problems import make_problem
from sde.weak_error import (
    ORDER_TOLERANCE,
    Estimate,
    Summary,
    order_one,
    summarize,
    weak_errors,
)


@dataclass(frozen=True)
class Effort:
    """How hard to measure: ``quick`` for CI, ``full`` for the report; ``workers`` processes
    (the same numbers for any count)."""

    name: str
    paths: int
    etas: tuple[float, ...]
    workers: int = 1
    adamw_paths: int = 2000  # C8: the chain is not coupled to the SDE, so more paths
    adamw_etas: tuple[tuple[str, tuple[float, ...]], ...] = ()  # per regime

    @classmethod
    def of(cls, quick: bool, workers: int = 1) -> Effort:
        etas = (0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625)  # the same etas: the same question
        if quick:
            adamw = (
                ("malladi", (0.2, 0.14, 0.1, 0.07)),
                ("ballistic", (0.2, 0.1, 0.05, 0.025)),
                ("fixed", (0.1, 0.01, 0.001)),
            )
            return cls("quick", 1000, etas, workers, 4000, adamw)
        adamw = (
            ("malladi", (0.2, 0.14, 0.1, 0.07, 0.05)),
            ("ballistic", (0.2, 0.1, 0.05, 0.025, 0.0125)),
            ("fixed", (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003)),
        )
        return cls("full", 4000, etas, workers, 16_000, adamw)


class Studies:
    """The claims' weak-error estimates, each (problem, multiplier, information, SDE model)
    computed once per report: C1 to C4 all compare the paper SDE on the quadratic with full-data
    information. A model's estimates depend only on its own seeds, never on which other models
    share the call, so a shared one is the number a separate call would give."""

    def __init__(self, effort: Effort) -> None:
        self.effort = effort
        self._done: dict[tuple, list[Estimate]] = {}

    def estimates(self, problem: str, mult, models, info_source: str) -> list[Estimate]:
        """Estimates ``[eta, model, test function]`` in that order, as ``weak_errors`` gives."""
        missing = [m for m in models if (problem, mult, info_source, m) not in self._done]
        if missing:
            est = weak_errors(
                make_problem(problem),
                mult,
                self.effort.etas,
                missing,
                info_source=info_source,
                paths=self.effort.paths,
                chain="gaussian",
                test_fns=("theta1", "sqnorm"),
                workers=self.effort.workers,
            )
            for m in missing:
                self._done[(problem, mult, info_source, m)] = [e for e in est if e.model == m]
        chosen = [e for m in models for e in self._done[(problem, mult, info_source, m)]]
        return sorted(chosen, key=lambda e: -e.eta)  # stable: models keep their order


def _study(problem, mult, models, info_source, studies, out: Path, figure: str, title: str):
    est = studies.estimates(problem, mult, models, info_source)
    summaries = summarize(est)
    plot_weak_error(est, summaries, out / figure, title)
    return {(s.model, s.test_fn): s for s in summaries}


def _slope_text(s: Summary) -> str:
    if s.slope is None:
        return "unresolved"
    if s.plateau:
        return (
            f"plateau {s.plateau_value:+.4f} (smallest-eta slope {s.slope_small.slope:.2f} "
            f"[{s.slope_small.ci_low:.2f}, {s.slope_small.ci_high:.2f}])"
        )
    return f"slope {s.slope.slope:.2f} [{s.slope.ci_low:.2f}, {s.slope.ci_high:.2f}]"


def _order_one(s: Summary) -> bool:
    return s.slope is not None and not s.plateau and abs(s.slope.slope - 1) <= ORDER_TOLERANCE


def claim_c1_full(mult, effort, out, studies: Studies | None = None) -> Check:
    studies = studies or Studies(effort)
    rows, ok = {}, True
    for problem in ("quadratic", "logistic", "distill"):
        v = _study(
            problem,
            mult,
            ["paper"],
            "full",
            studies,
            out,
            f"c1_full_{problem}.png",
            f"C1, {problem}, full-data I: paper SDE vs PGPO",
        )
        s = v[("paper", "theta1")]
        rows[problem] = _slope_text(s)
        ok &= _order_one(s)
    return Check(
        "C1.full",
        "C1: PGPO is an order-1 weak approximation of the paper's SDE (full-data information)",
        HOLDS if ok else FAILS,
        "; ".join(f"{p}: {t}" for p, t in rows.items())
        + f" (g = theta1, {effort.paths} coupled paths per eta, 95 % bootstrap intervals)",
        rows,
        "c1_full_quadratic.png",
    )


def claim_c1_same_batch(mult, effort, out, studies: Studies | None = None) -> Check:
    studies = studies or Studies(effort)
    v = _study(
        "quadratic",
        mult,
        ["paper", "matched"],
        "same-batch",
        studies,
        out,
        "c1_same_batch.png",
        "C1, quadratic, same-batch I (Algorithm 1)",
    )
    paper, matched = v[("paper", "theta1")], v[("matched", "theta1")]
    fails = not _order_one(paper)
    explanation = (
        "with the batch's own information the chain's mean step is E_B[rho(I_B) g_B] = "
        "E[rho(I_B)] grad L + Cov_B(rho(I_B), g_B), and E[rho(I_B)] != rho(I) (Jensen): a drift "
        "bias of order 1/b that does not shrink with eta, so the paper's SDE cannot track the "
        "chain; the matched SDE, whose drift and noise are the chain's own, is order 1"
    )
    return Check(
        "C1.same_batch",
        "C1: ... with same-batch information (the paper's Algorithm 1)",
        FAILS if fails else HOLDS,
        f"paper SDE: {_slope_text(paper)}; matched SDE: {_slope_text(matched)}. "
        + (explanation if fails else "order 1 measured"),
        dict(
            paper=_slope_text(paper),
            matched=_slope_text(matched),
            plateau_value=paper.plateau_value,
        ),
        "c1_same_batch.png",
    )


def claim_c2_printed(mult, effort, out, studies: Studies | None = None) -> Check:
    studies = studies or Studies(effort)
    v = _study(
        "quadratic",
        mult,
        ["printed", "paper"],
        "full",
        studies,
        out,
        "c2_printed.png",
        "C2: diffusion without sqrt(eta) (as printed) vs with it",
    )
    printed, paper = v[("printed", "sqnorm")], v[("paper", "sqnorm")]
    ok = _order_one(printed)
    return Check(
        "C2.printed",
        "C2: Theorem A.2 as printed (diffusion Sigma^{1/2}, no sqrt(eta))",
        HOLDS if ok else FAILS,
        f"printed: {_slope_text(printed)}; with sqrt(eta): {_slope_text(paper)} (g = |theta|^2, "
        "which sees the noise). Without sqrt(eta) the SDE's noise does not vanish with the "
        "learning rate while the chain's does"
        if not ok
        else f"printed: {_slope_text(printed)}",
        dict(printed=_slope_text(printed), paper=_slope_text(paper)),
        "c2_printed.png",
    )


def claim_c3_sigma(mult, effort, out, studies: Studies | None = None) -> Check:
    studies = studies or Studies(effort)
    v = _study(
        "quadratic",
        mult,
        ["unbatched", "paper"],
        "full",
        studies,
        out,
        "c3_sigma.png",
        "C3: noise covariance Sigma (as printed) vs Sigma / b",
    )
    unb, paper = v[("unbatched", "sqnorm")], v[("paper", "sqnorm")]
    ok = _order_one(unb)
    return Check(
        "C3.sigma",
        "C3: minibatch noise covariance written as Sigma instead of Sigma / b",
        CONDITIONAL if ok else FAILS,
        f"Sigma: {_slope_text(unb)}; Sigma / b: {_slope_text(paper)} (g = |theta|^2). "
        + (
            "Still order 1: at first order the noise enters the weak error only at O(eta), so the "
            "wrong covariance changes the constant, not the order; it matters for anything that "
            "reads the noise level (the stationary spread, second-order models)"
            if ok
            else "The wrong covariance also breaks the order"
        ),
        dict(sigma=_slope_text(unb), sigma_over_b=_slope_text(paper)),
        "c3_sigma.png",
    )


def claim_c4_kink(mult, effort, out, studies: Studies | None = None) -> Check:
    studies = studies or Studies(effort)
    smooth = MultiplierConfig(mult.alpha, mult.rho_max, "smooth")
    paper_kind = MultiplierConfig(mult.alpha, mult.rho_max, "paper")
    v_paper = _study(
        "quadratic",
        paper_kind,
        ["paper"],
        "full",
        studies,
        out,
        "c4_kink.png",
        "C4: min(.) kind (kink)",
    )
    v_smooth = _study(
        "quadratic", smooth, ["paper"], "full", studies, out, "c4_smooth.png", "C4: smooth cap"
    )
    a, b = v_paper[("paper", "theta1")], v_smooth[("paper", "theta1")]
    ok = _order_one(a) and _order_one(b)
    return Check(
        "C4.kink",
        "C4: the kink of min(.) costs no order",
        HOLDS if ok else FAILS,
        f"min kind: {_slope_text(a)}; smooth kind: {_slope_text(b)} (quadratic, full-data I; the "
        "trajectories start above the cap and cross the kink)",
        dict(min_kind=_slope_text(a), smooth_kind=_slope_text(b)),
        "c4_kink.png",
    )


def claim_c5_rho_ge_1(mult, effort, out, extra_infos=None, extra_source=None) -> Check:
    """Share of I_hat < 0 along same-batch PGPO trajectories on each toy (and in a log)."""
    shares = {}
    samples = []
    for problem_name in ("quadratic", "logistic", "distill"):
        problem = make_problem(problem_name)
        rng = np.random.default_rng(0)
        infos = []
        theta = np.tile(problem.theta0, (200, 1))
        for k in range(40):  # I_hat along the chain, from start to near-stationarity
            batch = rng.integers(0, problem.n, size=(200, 2))
            infos.append(problem.infos(theta)[np.arange(200)[:, None], batch].mean(1))
            theta = minibatch_chain(problem, mult, 0.05, 1, 2, 200, [k, 1], theta0=theta).theta
        infos = np.concatenate(infos)
        samples.append(infos)
        shares[problem_name] = float((mult(infos) < 1).mean())
    check = rho_at_least_one(
        mult, np.concatenate(samples), "same-batch PGPO on the 3 toys (200 paths x 40 steps each)"
    )
    check.id, check.title = "C5.rho_ge_1", "C5: rho_k >= 1 keeps each update at least as large"
    check.numbers["share_by_problem"] = shares
    check.summary += "; by problem: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in shares.items())
    if extra_infos is not None:
        log = rho_at_least_one(mult, extra_infos, extra_source)
        check.summary += f"; training log: {log.summary}"
        check.numbers["log"] = log.numbers
    check.verdict = FAILS if check.numbers["share_rho_below_1"] > 0 else HOLDS
    if check.verdict == FAILS and mult.kind != "floored":
        check.verdict = CONDITIONAL
        check.summary = "holds only when I >= 0 (or with the floored kind): " + check.summary
    _histogram(np.concatenate(samples), mult, out / "c5_info.png")
    check.figure = "c5_info.png"
    return check


def claim_c6_overhead(bench_file: Path | None) -> Check:
    if bench_file is None or not Path(bench_file).exists():
        return Check(
            "C6.overhead",
            "C6: O(1) overhead per iteration",
            NOT_MEASURED,
            "no trainer benchmark output found (python benchmarks/bench_train_step.py writes "
            "benchmarks/results/train_step.json)",
        )
    data = json.loads(Path(bench_file).read_text())
    ratio = float(data["time_ratio"])
    return Check(
        "C6.overhead",
        "C6: O(1) overhead per iteration",
        HOLDS if ratio <= 1.02 else FAILS,
        f"PGPO step / SDPO step time = {ratio:.3f} (target <= 1.02) from {bench_file}",
        data,
    )


def claim_c7_stability(study_file: Path | None) -> Check:
    """C7 read from ``pgpo study``'s summary.json (its ``collapse`` setting): each PGPO
    variant's collapses against SDPO's, over the same seeds."""
    title = "C7: PGPO remains stable where SDPO collapses"
    if study_file is None or not Path(study_file).exists():
        missing = "no study results found (pgpo study writes runs/study/summary.json)"
        return Check("C7.stability", title, NOT_MEASURED, missing)
    data = json.loads(Path(study_file).read_text())
    methods = data.get("settings", {}).get("collapse", {}).get("methods", {})
    if "sdpo" not in methods or data.get("quick"):
        why = "a --quick study" if data.get("quick") else "no collapse setting with SDPO"
        return Check("C7.stability", title, NOT_MEASURED, f"{study_file}: {why}")
    runs = len(methods["sdpo"]["runs"])
    sdpo = methods["sdpo"]["collapsed"]
    counts = {
        m: (v["collapsed"], len(v["runs"])) for m, v in methods.items() if m.startswith("pgpo")
    }
    text = f"SDPO collapsed in {sdpo}/{runs} runs; " + ", ".join(
        f"{m} {c}/{n}" for m, (c, n) in counts.items()
    )
    if sdpo == 0:
        text += ": SDPO did not collapse, so there is nothing to be stable against"
        return Check("C7.stability", title, NOT_MEASURED, text, {"sdpo": sdpo, "pgpo": counts})
    fewer = [m for m, (c, n) in counts.items() if c / n < sdpo / runs]
    verdict = HOLDS if len(fewer) == len(counts) else (CONDITIONAL if fewer else FAILS)
    text += f" (from {study_file}). Fewer collapses than SDPO: {', '.join(fewer) or 'none'}"
    numbers = {"sdpo": sdpo, "runs": runs, "pgpo": counts, "fewer_than_sdpo": fewer}
    return Check("C7.stability", title, verdict, text, numbers)


PREMISE_SETTINGS = ("noisy", "wrong-demo")


REAL_SETTING = "smollm2-noisy"  # pgpo study --real's premise runs: SmolLM2, a noisy verifier


def _real_premise(real_file: Path | None) -> tuple[dict, str]:
    """``{REAL_SETTING: premise}`` from ``pgpo study --real``'s summary.json where it measured
    the premise, and a note where a file was given but holds none."""
    if real_file is None or not Path(real_file).exists():
        return {}, ""
    data = json.loads(Path(real_file).read_text())
    p = data.get("premise", {})
    if data.get("quick") or "gap_difference" not in p:
        why = "a --quick study" if data.get("quick") else p.get("not_measured", "no premise runs")
        return {}, f"; SmolLM2 ({real_file}): not measured ({why})"
    return {REAL_SETTING: p}, ""


def claim_c9_premise(premise_file: Path | None, real_file: Path | None = None) -> Check:
    """C9 read from the summary.json of ``pgpo study --settings noisy,wrong-demo`` and, where
    given, of ``pgpo study --real`` (SmolLM2 with a noisy verifier: :data:`REAL_SETTING`): in
    each setting, whether samples with a right demonstration have a larger entropy gap than
    those with a wrong one (by more than 2 standard errors clustered by question) and whether
    the batch's ``I_k`` rises with its share of right demonstrations (the 95 % interval of the
    within-run correlation above 0; detrended by first differences where the study reports it,
    since a drift that both series share over training alone correlates them). Holds where both
    do in every setting; fails where neither does in any; conditional otherwise."""
    cid, title = "C9.premise", "C9: I_k marks informative feedback"
    real, real_note = _real_premise(real_file)
    found: dict = {}
    if premise_file is not None and Path(premise_file).exists():
        data = json.loads(Path(premise_file).read_text())
        if data.get("quick"):
            return Check(cid, title, NOT_MEASURED, f"{premise_file}: a --quick study")
        found = {s: data["settings"][s].get("premise", {}) for s in PREMISE_SETTINGS
                 if s in data.get("settings", {})}  # fmt: skip
        found = {s: p for s, p in found.items() if "gap_difference" in p}
        if not found and not real:
            return Check(
                cid, title, NOT_MEASURED, f"{premise_file}: no noisy or wrong-demo setting"
            )
    found |= real
    if not found:
        missing = ("no premise study found (pgpo study --settings noisy,wrong-demo --out "
                   "runs/premise writes runs/premise/summary.json)")  # fmt: skip
        return Check(cid, title, NOT_MEASURED, missing + real_note)
    parts, marks, numbers = [], [], {}
    for setting, p in found.items():
        diff, se, r = p["gap_difference"], p["gap_difference_se"], p["r_share_right"]
        d = p.get("r_share_right_detrended")  # studies before detrending: the centred r
        by_gap, by_batch = diff > 2 * se, (d or r)["ci_low"] > 0
        marks += [by_gap, by_batch]
        numbers[setting] = {"gap_difference": diff, "gap_difference_se": se, "r": r["r"],
                            "r_ci": [r["ci_low"], r["ci_high"]], "samples": p["samples"],
                            "runs": p["runs"]}  # fmt: skip
        if d:
            numbers[setting].update(r_detrended=d["r"], r_detrended_ci=[d["ci_low"], d["ci_high"]])
        split = p.get("gap_difference_by_rollout", {})
        within = " / ".join(f"{v['difference']:+.4f} +- {v['se']:.4f}" for v in split.values())
        parts.append(
            f"{setting}: gap(right) - gap(wrong) = {diff:+.4f} +- {se:.4f} nats (clustered by "
            f"question, {p['samples']:,} samples"
            + (f"; within correct / incorrect rollouts {within}" if len(split) == 2 else "")
            + f"), r(I_k, share right) = {r['r']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
            + (f", detrended {d['r']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]" if d else "")
            + f" over {r['runs']} runs"
        )
    verdict = HOLDS if all(marks) else (CONDITIONAL if any(marks) else FAILS)
    sources = [str(f) for f, part in ((premise_file, set(found) - set(real)), (real_file, real))
               if part]  # fmt: skip
    text = "; ".join(parts) + real_note + f" (from {', '.join(sources)})"
    return Check(cid, title, verdict, text, numbers)


ADAMW_SCALINGS = {
    "malladi": "1 - beta_i = c_i eta^2, time k eta^2, noise and eps scaled by 1/eta "
    "(Malladi et al. 2022)",
    "ballistic": "1 - beta_i = c_i eta, time k eta",
    "fixed": "betas (0.9, 0.999) as trained, time k eta, against the eta -> 0 limit ODE",
}


def _adamw_cell_verdict(s: Summary) -> str:
    """A converging weak error whose slope's interval reaches order 1 (``order_one``)."""
    return {True: HOLDS, False: FAILS, None: NOT_MEASURED}[order_one(s)]


def _adamw_regime_verdict(rows: dict) -> str:
    """holds: every measured cell holds; conditional: the warm-start cells hold and a cold one
    fails (the condition: a warm start); fails otherwise; not measured when no cell is."""
    measured = {k: r["verdict"] for k, r in rows.items() if r["verdict"] != NOT_MEASURED}
    if not measured:
        return NOT_MEASURED
    if all(v == HOLDS for v in measured.values()):
        return HOLDS
    warm = [v for k, v in measured.items() if "-warm " in k]
    return CONDITIONAL if warm and all(v == HOLDS for v in warm) else FAILS


def claim_c8_adamw(mult, effort, out, regime: str) -> Check:
    """C8 in one regime: the weak error of its limit equation against modulated AdamW, for
    full and same-batch information, cold and warm starts (sde.adamw)."""
    etas = dict(effort.adamw_etas)[regime]
    est = adamw_study(
        make_problem("quadratic"), mult, regime, etas, paths=effort.adamw_paths,
        workers=effort.workers,
    )  # fmt: skip
    summaries = summarize(est)
    figure = f"c8_adamw_{regime}.png"
    plot_weak_error(est, summaries, out / figure, f"C8, quadratic, AdamW, {regime} scaling")
    rows = {}
    for s in summaries:
        cell = s.model.removeprefix(f"adamw-{regime}-")
        points = [e for e in est if e.model == s.model and e.test_fn == s.test_fn]
        ses = [e.se for e in points]
        rows[f"{cell} {s.test_fn}"] = dict(
            verdict=_adamw_cell_verdict(s),
            fit=_slope_text(s),
            se=[min(ses), max(ses)],
            resolved=s.resolved,
            errors=[[e.eta, e.value, e.se] for e in points],  # [eta, weak error, its SE]
        )
    verdict = _adamw_regime_verdict(rows)
    text = "; ".join(
        f"{k}: {r['fit']} (MC SE {r['se'][0]:.4f}-{r['se'][1]:.4f}, {r['resolved']} etas resolved)"
        for k, r in rows.items()
    )
    return Check(
        f"C8.{regime}",
        f"C8: the order-1 picture carries over to PGPO with AdamW ({regime}: "
        f"{ADAMW_SCALINGS[regime]})",
        verdict,
        text + f" (quadratic, {effort.adamw_paths} chain and SDE paths per eta, independent; "
        "etas " + ", ".join(f"{e:g}" for e in etas) + ")",
        rows,
        figure,
    )


def _histogram(infos, mult, path) -> None:
    from sde.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(infos, bins=80, color="C0", alpha=0.8)
    ax.axvline(0.0, color="k", lw=1, label="I = 0 (rho = 1)")
    ax.axvline(mult.cap_point, color="C3", ls="--", lw=1, label="I* (rho = rho_max)")
    ax.set_xlabel("I_hat (nats)")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def all_claims(
    mult: MultiplierConfig,
    quick: bool,
    out: Path,
    bench_file=None,
    log_infos=None,
    log_source=None,
    progress=None,
    study_file=None,
    workers: int = 1,
    premise_file=None,
    real_study_file=None,
) -> list[Check]:
    effort = Effort.of(quick, workers)
    studies = Studies(effort)
    steps = [
        lambda: claim_c1_full(mult, effort, out, studies),
        lambda: claim_c1_same_batch(mult, effort, out, studies),
        lambda: claim_c2_printed(mult, effort, out, studies),
        lambda: claim_c3_sigma(mult, effort, out, studies),
        lambda: claim_c4_kink(mult, effort, out, studies),
        lambda: claim_c5_rho_ge_1(mult, effort, out, log_infos, log_source),
        lambda: claim_c6_overhead(bench_file),
        lambda: claim_c7_stability(study_file),
        lambda: claim_c9_premise(premise_file, real_study_file),
        *(lambda r=regime: claim_c8_adamw(mult, effort, out, r) for regime, _ in effort.adamw_etas),
    ]
    results = []
    for step in steps:
        results.append(step())
        if progress is not None:
            progress(results[-1].id)
    return results
