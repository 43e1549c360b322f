"""pgpo's fused LM-head loss against TRL's chunked divergence kernel: same work, time, memory.

Both compute, from float32 hidden states ``[tokens, H]`` of a student and a teacher and their LM
heads ``[V, H]`` (V = 151,936, Qwen3's vocabulary; the teacher's a separate tensor, as an EMA
teacher's is), each token's divergence and the student's entropy, then the gradient of the summed
divergence w.r.t. the student's hidden states and head:

- ``pgpo``: :func:`pgpo.distill.head_divergence` (token weights 1), which also returns the
  teacher's entropy (Eq. 8 needs both);
- ``trl``: ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (TRL >= 1.16), through
  its torch path on a CPU (on a GPU it runs Triton kernels, which pgpo's head does not have).

Losses: full-vocabulary reverse KL (beta 1) and the JSD with mix 0.5. Also pgpo's options that
TRL's kernel has no equivalent of, at their cost: without the entropies (``no-entropy``) and the
JSD on the student's top-100 tokens with the tail bucket (``top100``).

Each measurement runs in its own process: inputs allocated, one warm-up pass, the peak-RSS
counter reset, then ``--reps`` timed passes (median). "Extra memory" is the peak RSS during the
timed passes minus the RSS before them (inputs and gradient buffers of the first pass counted
in neither). One torch thread.

    python benchmarks/bench_head_vs_trl_kernel.py        # hidden 128, 1024 x tokens 512, 2048
    python benchmarks/bench_head_vs_trl_kernel.py --hidden 128 --tokens 512

Prints each row and the pgpo / TRL ratios; writes benchmarks/results/head_vs_trl_kernel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pgpo.outputs import json_text

VOCAB = 151_936
RESULTS = Path(__file__).parent / "results" / "head_vs_trl_kernel.json"
# name: (system, beta, top-k, entropies)
VARIANTS = {
    "pgpo reverse-kl": ("pgpo", 1.0, None, True),
    "trl reverse-kl": ("trl", 1.0, None, True),
    "pgpo jsd": ("pgpo", 0.5, None, True),
    "trl jsd": ("trl", 0.5, None, True),
    "pgpo reverse-kl no-entropy": ("pgpo", 1.0, None, False),
    "pgpo jsd top100": ("pgpo", 0.5, 100, True),
}
SAME_WORK = (("pgpo reverse-kl", "trl reverse-kl"), ("pgpo jsd", "trl jsd"))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def worker(variant: str, tokens: int, hidden: int, reps: int) -> dict:
    import torch

    from pgpo.malloc import keep_freed_memory

    keep_freed_memory()  # as `pgpo train` does at start-up
    torch.set_num_threads(1)
    system, beta, topk, entropies = VARIANTS[variant]
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(VOCAB, hidden, generator=g) / hidden**0.5).requires_grad_(True)
    teacher_weight = weight.detach() + 0.01 * torch.randn(VOCAB, hidden, generator=g)
    h_s = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    h_t = torch.randn(tokens, hidden, generator=g)

    if system == "pgpo":
        from pgpo.distill import DivergenceSpec, head_divergence

        ones = torch.ones(tokens)

        def one_pass() -> float:
            spec = DivergenceSpec(beta, topk)
            loss, _, _ = head_divergence(h_s, weight, h_t, teacher_weight, ones, spec,
                                         return_entropies=entropies)  # fmt: skip
            loss.backward()
            return float(loss)
    else:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def one_pass() -> float:
            per_token, _entropy = ChunkedDivergenceFunction.apply(
                h_s, weight, None, h_t, teacher_weight, None, beta
            )
            loss = per_token.sum()
            loss.backward()
            return float(loss)

    one_pass()  # warm-up: kernels, allocator, gradient buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak-RSS counter from here
    before = _status("VmRSS")
    seconds = []
    for _ in range(reps):
        weight.grad = h_s.grad = None
        start = time.perf_counter()
        loss = one_pass()
        seconds.append(time.perf_counter() - start)
    return dict(variant=variant, tokens=tokens, hidden=hidden, seconds=statistics.median(seconds),
                extra_bytes=_status("VmHWM") - before, loss=loss)  # fmt: skip


def measure(variant: str, tokens: int, hidden: int, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--tokens", str(tokens),
           "--hidden", str(hidden), "--reps", str(reps)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"bench_head_vs_trl_kernel: {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--reps", type=int, default=2, help="timed passes per process (median)")
    p.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json_text(worker(args.worker, args.tokens[0], args.hidden[0], args.reps)))
        return 0
    try:
        import trl.kernels.chunked_divergence  # noqa: F401
    except ImportError:
        p.error('TRL >= 1.16 is not installed: pip install -e ".[trl]"')
    print(f"vocab {VOCAB:,}, float32, forward + backward, {args.reps} timed passes each (median)")
    print(f"{'hidden':>6s} {'tokens':>6s} {'variant':28s} {'seconds':>8s} {'extra MiB':>10s} "
          f"{'loss':>12s}")  # fmt: skip
    rows = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            for variant in VARIANTS:
                r = measure(variant, tokens, hidden, args.reps)
                rows.append(r)
                mib = r["extra_bytes"] / 2**20
                print(f"{hidden:6d} {tokens:6d} {variant:28s} {r['seconds']:8.2f} {mib:10.0f} "
                      f"{r['loss']:12.4f}", flush=True)  # fmt: skip
    print()
    ratios = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            at = {r["variant"]: r for r in rows if (r["hidden"], r["tokens"]) == (hidden, tokens)}
            for ours, theirs in SAME_WORK:
                a, b = at[ours], at[theirs]
                ratio = dict(hidden=hidden, tokens=tokens, loss=ours.split()[1],
                             time=a["seconds"] / b["seconds"],
                             memory=a["extra_bytes"] / max(b["extra_bytes"], 1),
                             loss_relative_difference=abs(a["loss"] / b["loss"] - 1))  # fmt: skip
                ratios.append(ratio)
                faster = "pgpo" if ratio["time"] < 1 else "TRL"
                print(f"hidden {hidden}, {tokens} tokens, {ratio['loss']}: pgpo / TRL time "
                      f"{ratio['time']:.2f}, extra memory {ratio['memory']:.2f} ({faster} faster; "
                      f"losses differ by {ratio['loss_relative_difference']:.1e})")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json_text({"rows": rows, "ratios": ratios}, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
