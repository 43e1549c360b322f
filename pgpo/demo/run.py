"""``pgpo demo``: SDPO against PGPO from one warm start, through the real trainer.

Every run is :func:`pgpo.train.loop.train` on a config built from the ``demo`` preset, so each run
folder is exactly what ``pgpo train`` writes (config.yaml, metrics.jsonl, samples.jsonl,
checkpoints/). Independent runs go to separate processes (one torch thread each).
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pgpo.demo.warmstart import WarmStartConfig, warm_start
from pgpo.locking import exclusive, one_writer
from pgpo.outputs import default_cache
from pgpo.train.config import TrainConfig, load_config, to_dict
from pgpo.train.run_folder.run_dir import finished
from pgpo.train.tasks.data import make_splits, write_jsonl

N_TRAIN, N_TEST, TASK_SEED = 2000, 200, 0


@dataclass(frozen=True)
class Method:
    """A named variant: its config overrides on top of the demo preset."""

    name: str
    overrides: tuple[str, ...]


SDPO = Method("sdpo", ("pgpo.enabled=false",))


def pgpo_method(alpha: float) -> Method:
    return Method(f"pgpo-a{alpha:g}", ("pgpo.enabled=true", f"pgpo.alpha={alpha:g}"))


@dataclass
class DemoPlan:
    """What one ``pgpo demo`` invocation runs."""

    out: Path
    methods: list[Method]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)  # applied to every run
    warm: WarmStartConfig = field(default_factory=WarmStartConfig)
    cache: Path | None = None
    workers: int = 2
    progress: bool = True
    title: str = "pgpo demo: SDPO against PGPO"


def prepare(plan: DemoPlan) -> tuple[Path, Path, Path]:
    """The task's JSON-lines splits (in the output folder) and the cached warm start."""
    train_q, test_q = make_splits(N_TRAIN, N_TEST, TASK_SEED)
    data = plan.out / "data"
    train_file = write_jsonl(train_q, data / "train.jsonl")
    test_file = write_jsonl(test_q, data / "test.jsonl")
    cache = plan.cache if plan.cache is not None else default_cache()
    folder = cache / f"demo-warm-start-{plan.warm.key(N_TRAIN, N_TEST, TASK_SEED)}"
    with one_writer(folder):  # one process builds it; any other waits, then reuses it
        if not (folder / "config.json").exists():
            print(f"warm start -> {folder} (once; reused afterwards)", file=sys.stderr)
            warm_start(train_q, train_q + test_q, folder, plan.warm, plan.progress)
    return folder, train_file, test_file


def run_config(
    plan: DemoPlan, method: Method, seed: int, model: Path, train_file: Path, test_file: Path
) -> TrainConfig:
    return load_config(
        "demo",
        [
            f"model.path={model}",
            f"model.tokenizer={model}",
            f"data.train={train_file}",
            f"data.test={test_file}",
            "eval.before_train=true",
            *plan.overrides,
            *method.overrides,
            f"seed={seed}",
            f"output.dir={plan.out / f'{method.name}-seed{seed}'}",
        ],
    )


def quiet_transformers() -> None:
    """No per-load progress bars from transformers between the demo's own bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _train_job(cfg: TrainConfig, desc: str, progress: bool, position: int) -> str:
    """One run in a worker process."""
    import torch

    torch.set_num_threads(1)
    quiet_transformers()
    from pgpo.train import loop

    return str(loop.train(cfg, progress=progress, desc=desc, position=position))


def run_all(plan: DemoPlan, configs: dict[str, TrainConfig]) -> dict[str, Path]:
    """Train every config: in this process with ``workers=1``, else in a spawned pool. A run
    that already finished with the same settings is kept and not run again; any other earlier
    run in its folder is replaced (``output.overwrite``: only that run's own files)."""
    from pgpo.train import loop

    done = {n: Path(c.output.dir) for n, c in configs.items() if finished(c.output.dir, to_dict(c))}
    if done:
        print(f"kept {len(done)} finished run(s): {', '.join(done)}", file=sys.stderr)
    configs = {n: c for n, c in configs.items() if n not in done}
    for cfg in configs.values():
        cfg.output.overwrite = True
    if not configs:
        return done
    if plan.workers == 1:
        return done | {
            name: loop.train(cfg, progress=plan.progress, desc=name)
            for name, cfg in configs.items()
        }
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(plan.workers, mp_context=ctx) as pool:
        jobs = {
            name: pool.submit(_train_job, cfg, name, plan.progress, i % plan.workers)
            for i, (name, cfg) in enumerate(configs.items())
        }
        return done | {name: Path(job.result()) for name, job in jobs.items()}


def run_demo(plan: DemoPlan) -> dict:
    """Warm start (cached), every method x seed through the trainer, then the report."""
    import torch

    from pgpo.demo.report import write_report

    start = time.perf_counter()
    # One thread per process (the warm start here, each run in its worker): on small shared CPUs
    # two threads per process were up to 10x slower.
    torch.set_num_threads(1)
    quiet_transformers()
    plan.out.mkdir(parents=True, exist_ok=True)
    with exclusive(plan.out, "--out"):  # one demo writes here at a time
        model, train_file, test_file = prepare(plan)
        configs = {
            f"{m.name}-seed{s}": run_config(plan, m, s, model, train_file, test_file)
            for s in plan.seeds
            for m in plan.methods
        }
        run_all(plan, configs)
        return write_report(plan, configs, model, time.perf_counter() - start, plan.title)
