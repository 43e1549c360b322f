"""Speed of our Euler-Maruyama against ``torchsde.sdeint(method="euler")`` on the same SDE.

The SDE: an Ornstein-Uhlenbeck process with a full diffusion matrix,
``d theta = -A theta dt + S dW`` in d dimensions, float64, same paths, steps and step size.
Ours runs through the toolkit's own path (``SDEModel`` + ``euler_maruyama`` + ``BrownianPath``);
torchsde gets native torch drift and diffusion functions and its default Brownian interval (its
best case). Both endpoints are checked against the exact OU mean, so neither side can win by
computing the wrong thing. Also times the README's default weak-error study.

    python benchmarks/bench_sde.py                     # d = 2 and d = 20, 10^5 paths, 1,000 steps
    python benchmarks/bench_sde.py --paths 10000 --dims 2

Target: ours >= 10x faster; the default study < 60 s, and >= 1.8x faster on 2 workers than on 1.

    python benchmarks/bench_sde.py --paths 1000 --dims 2   # mostly the study's speed-up
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.linalg import expm

from sde.integrate import BrownianPath, euler_maruyama
from sde.models import SDEModel


def ou(d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = (q * np.linspace(0.5, 2.0, d)) @ q.T
    S = 0.3 * rng.standard_normal((d, d))
    return A, S, np.ones(d)


def run_ours(A, S, theta0, paths, steps, t_end):
    d = len(theta0)

    def coefficients(theta):
        return -theta @ A.T, S  # additive noise: a [d, d] matrix shared by every path

    model = SDEModel("ou", coefficients, d)
    brownian = BrownianPath(seed=1, paths=paths, dim=d, eta=t_end / steps, fine=1)
    start = time.perf_counter()
    out = euler_maruyama(model, theta0, steps, brownian, substeps=1)
    return time.perf_counter() - start, out.theta


def run_torchsde(A, S, theta0, paths, steps, t_end):
    import torch
    import torchsde

    torch.set_num_threads(1)
    d = len(theta0)
    A_t, S_t = torch.from_numpy(A), torch.from_numpy(S)

    class OU(torch.nn.Module):
        noise_type, sde_type = "general", "ito"

        def f(self, t, y):
            return -y @ A_t.T

        def g(self, t, y):
            return S_t.expand(y.shape[0], d, d)

    y0 = torch.from_numpy(np.tile(theta0, (paths, 1)))
    bm = torchsde.BrownianInterval(0.0, t_end, size=(paths, d), dtype=torch.float64, entropy=2)
    start = time.perf_counter()
    with torch.no_grad():
        ys = torchsde.sdeint(
            OU(),
            y0,
            torch.tensor([0.0, t_end], dtype=torch.float64),
            bm=bm,
            method="euler",
            dt=t_end / steps,
        )
    return time.perf_counter() - start, ys[-1].numpy()


def time_default_study(workers: int = 1) -> tuple[float, bytes]:
    """Wall time of ``pgpo-sde weak-error --workers N`` (a fresh process, one thread per
    process) and the results.json it wrote (always to the same folder: the file records it)."""
    out = Path(tempfile.gettempdir()) / "pgpo-bench-sde" / "weak-error"
    cmd = [sys.executable, "-m", "sde.cli", "weak-error", "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(
        [*cmd, "--workers", str(workers)],
        check=True,
        capture_output=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    return time.perf_counter() - start, (out / "results.json").read_bytes()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--dims", default="2,20")
    p.add_argument("--horizon", type=float, default=1.0)
    p.add_argument("--skip-study", action="store_true")
    p.add_argument("--study-trials", type=int, default=3, help="runs of the study per worker count")
    args = p.parse_args(argv)
    print(
        f"OU SDE, full diffusion matrix, Euler-Maruyama, {args.paths:,} paths, "
        f"{args.steps:,} steps of {args.horizon / args.steps:g}, float64, 1 thread"
    )
    print(
        f"{'d':>3s} {'ours s':>9s} {'torchsde s':>11s} {'speed-up':>9s}  endpoint mean error "
        "(ours / torchsde, in standard errors)"
    )
    for d in (int(x) for x in args.dims.split(",")):
        A, S, theta0 = ou(d)
        exact = expm(-A * args.horizon) @ theta0
        t_ours, th_ours = run_ours(A, S, theta0, args.paths, args.steps, args.horizon)
        t_ts, th_ts = run_torchsde(A, S, theta0, args.paths, args.steps, args.horizon)
        z = [
            np.abs(th.mean(0) - exact).max() / (th.std(0).max() / np.sqrt(args.paths))
            for th in (th_ours, th_ts)
        ]
        ratio = t_ts / t_ours
        print(
            f"{d:3d} {t_ours:9.1f} {t_ts:11.1f} {ratio:8.1f}x  {z[0]:.1f} / {z[1]:.1f}  "
            f"{'OK' if ratio >= 10 else 'MISSED'} (target >= 10x)"
        )
    if not args.skip_study:
        # Alternating 1 and 2 workers, so that the machine's load falls on both alike.
        times: dict[int, list[float]] = {1: [], 2: []}
        outputs = {}
        for _ in range(args.study_trials):
            for workers in (1, 2):
                seconds, outputs[workers] = time_default_study(workers)
                times[workers].append(seconds)
        one, two = statistics.median(times[1]), statistics.median(times[2])
        print(
            f"default weak-error study (pgpo-sde weak-error): {one:.1f} s on 1 worker "
            f"{'OK' if one < 60 else 'MISSED'} (target < 60 s); {two:.1f} s on 2 workers: "
            f"speed-up {one / two:.2f}x {'OK' if one / two >= 1.8 else 'MISSED'} (target >= 1.8x "
            f"on 2 cores; medians of {args.study_trials}); results.json identical: "
            f"{outputs[1] == outputs[2]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
