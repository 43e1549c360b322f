"""``pgpo study``: when does information-modulation help? Methods x settings x paired seeds.

Every run is :func:`pgpo.train.loop.train` on the ``demo`` preset from the demo's warm start, so
each run folder is what ``pgpo train`` writes. Methods:

- ``sdpo``: no modulation;
- ``pgpo-a0.5``, ``pgpo-a1``, ``pgpo-a1.5``: Eq. 9 at the paper's three alphas;
- ``pgpo-token``, ``pgpo-sequence``: rho reallocates the loss weight between tokens or responses
  (alpha 1; the step itself is not scaled);
- ``pgpo-adaptive``: Eq. 9 with the ``target_rho`` controller (``rho_target`` 1.25);
- ``pgpo-agreement``: Eq. 9 on a signal that needs no gold answer instead of Eq. 8
  (``pgpo.signal: agreement``, alpha 1); for the premise's settings, not run by default;
- ``sdpo-matched``: SDPO whose learning rate is multiplied by the mean ``rho_k`` of the paired
  ``pgpo-a1`` run (same setting, same seed, hence the same data order). If PGPO beats SDPO but
  not this control, the gain is the larger mean step, not the information.

Settings: ``learn`` (the demo's: frozen teacher, lr 3e-4, 120 steps) and ``collapse`` (the
pipeline's EMA teacher at 0.05, lr 2e-3, 150 steps: see ``pgpo demo --collapse``) by default;
on request the premise's settings, ``learn`` with misleading feedback
(:mod:`pgpo.train.evaluation.feedback`):
``noisy`` (a verifier with false positives, q = 0.4) and ``wrong-demo`` (a share p = 0.4 of the
demonstrations states a wrong option). Their report adds whether ``I_k`` marks the right
demonstrations (:mod:`pgpo.demo.premise`).

Runs go to worker processes; a run that already finished with the same settings is kept, so an
interrupted study continues where it stopped. The report is :mod:`pgpo.demo.study_report`.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pgpo.demo.collapse import COLLAPSE_SETTING
from pgpo.demo.run import DemoPlan, Method, prepare, quiet_transformers, run_all, run_config
from pgpo.demo.warmstart import WarmStartConfig
from pgpo.locking import exclusive
from pgpo.train.config import TrainConfig

MATCHED, PAIRED = "sdpo-matched", "pgpo-a1"
METHODS: dict[str, tuple[str, ...]] = {
    "sdpo": ("pgpo.enabled=false",),
    "pgpo-a0.5": ("pgpo.enabled=true", "pgpo.alpha=0.5"),
    "pgpo-a1": ("pgpo.enabled=true", "pgpo.alpha=1.0"),
    "pgpo-a1.5": ("pgpo.enabled=true", "pgpo.alpha=1.5"),
    "pgpo-token": ("pgpo.enabled=true", "pgpo.alpha=1.0", "pgpo.granularity=token"),
    "pgpo-sequence": ("pgpo.enabled=true", "pgpo.alpha=1.0", "pgpo.granularity=sequence"),
    "pgpo-adaptive": (
        "pgpo.enabled=true",
        "pgpo.alpha=1.0",
        "pgpo.alpha_schedule=target_rho",
        "pgpo.rho_target=1.25",
    ),
    "pgpo-agreement": ("pgpo.enabled=true", "pgpo.alpha=1.0", "pgpo.signal=agreement"),
    MATCHED: ("pgpo.enabled=false",),  # its lr is set from the paired run
}
# pgpo-agreement's signal is constant (1/2) where every success is right: premise settings only.
DEFAULT_METHODS = tuple(m for m in METHODS if m != "pgpo-agreement")
# q = p = 0.4: a probe at q = 0.4 found 37 % of the demonstrations wrong, so both settings mislead
# about as often; the right letter is still the one most often shown (0.6 against 0.13 for each
# wrong one under wrong-demo), so SDPO can still learn.
MISLEADING = 0.4
SETTINGS: dict[str, tuple[str, ...]] = {
    "learn": (),
    "collapse": COLLAPSE_SETTING,
    "noisy": (f"reward.false_positive_rate={MISLEADING}",),
    "wrong-demo": (f"teacher.wrong_demo_share={MISLEADING}",),
}
DEFAULT_SETTINGS = ("learn", "collapse")  # the premise's: --settings noisy,wrong-demo
# --quick: a few steps of a small batch from a short warm start, for the test suite.
QUICK = (
    "steps=3",
    "batch_size=16",
    "eval.every=3",
    "eval.n=2",
    "data.max_test=16",
    "teacher.fallback_demonstration=gold",
)  # a signal even from a 10-step warm start


@dataclass
class StudyPlan:
    out: Path
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    settings: list[str] = field(default_factory=lambda: list(DEFAULT_SETTINGS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)  # every run, after the setting's
    workers: int = 2
    cache: Path | None = None
    warm: WarmStartConfig = field(default_factory=WarmStartConfig)
    progress: bool = True
    quick: bool = False

    def __post_init__(self) -> None:
        for name, known, what in ((self.methods, METHODS, "method"), (self.settings, SETTINGS,
                                                                        "setting")):  # fmt: skip
            unknown = [n for n in name if n not in known]
            if unknown:
                raise ValueError(f"unknown {what} {unknown[0]!r}: choose from {', '.join(known)}")
        if MATCHED in self.methods and PAIRED not in self.methods:
            raise ValueError(f"{MATCHED} needs its paired run: add {PAIRED} to --methods")


def run_name(setting: str, method: str, seed: int) -> str:
    return f"{setting}/{method}-seed{seed}"


def mean_rho(folder: Path) -> float:
    """The mean ``rho_k`` over a finished run's training steps."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rhos = [r["rho"] for r in rows if "rho" in r]
    if not rhos:
        raise ValueError(f"{folder}: no training steps logged")
    return statistics.fmean(rhos)


def configs_for(
    plan: StudyPlan, demo: DemoPlan, model: Path, data: tuple[Path, Path], methods: list[str]
) -> dict[str, TrainConfig]:
    """The run configs of ``methods`` (``sdpo-matched``'s lr read from its finished pair)."""
    out = {}
    for setting in plan.settings:
        for method in methods:
            for seed in plan.seeds:
                extra = [*SETTINGS[setting], *(QUICK if plan.quick else ()), *plan.overrides]
                m = Method(f"{setting}/{method}", METHODS[method])
                cfg = run_config(demo_with(demo, extra), m, seed, model, *data)
                if method == MATCHED:
                    paired = Path(out_of(plan, setting, PAIRED, seed))
                    cfg.optim.lr = cfg.optim.lr * mean_rho(paired)
                out[run_name(setting, method, seed)] = cfg
    return out


def demo_with(demo: DemoPlan, overrides: list[str]) -> DemoPlan:
    return DemoPlan(demo.out, demo.methods, demo.seeds, overrides=overrides)


def out_of(plan: StudyPlan, setting: str, method: str, seed: int) -> Path:
    return plan.out / setting / f"{method}-seed{seed}"


def run_study(plan: StudyPlan) -> dict:
    """Warm start (cached), every run (the matched control after its pairs), the report."""
    import torch

    start = time.perf_counter()
    torch.set_num_threads(1)
    quiet_transformers()
    plan.out.mkdir(parents=True, exist_ok=True)
    with exclusive(plan.out, "--out"):  # one study writes here at a time
        return _run_study(plan, start)


def _run_study(plan: StudyPlan, start: float) -> dict:
    from pgpo.demo.study_report import write_study_report

    demo = DemoPlan(plan.out, [], [], cache=plan.cache, warm=plan.warm, progress=plan.progress)
    demo.workers = plan.workers
    model, train_file, test_file = prepare(demo)
    first = [m for m in plan.methods if m != MATCHED]
    configs = configs_for(plan, demo, model, (train_file, test_file), first)
    print(f"study: {len(configs)} runs in {plan.out}", file=sys.stderr)
    run_all(demo, configs)
    if MATCHED in plan.methods:
        matched = configs_for(plan, demo, model, (train_file, test_file), [MATCHED])
        run_all(demo, matched)
        configs.update(matched)
    return write_study_report(plan, configs, time.perf_counter() - start)
