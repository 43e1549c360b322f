"""Peak memory and time of the chunked entropy gap + divergence against the naive full-tensor code.

Baseline ("naive"): the same math written the direct way, every [tokens, vocab] intermediate
materialised in float32 and differentiated by autograd over the whole tensor. Both compute the
training step's work: I_k (Eq. 8, no grad) and the SDPO loss (JSD mix 0.5 on the student's
top-100 tokens plus tail), forward and backward, from bfloat16 logits.

Each measurement runs in a fresh subprocess: inputs are allocated, one warm-up call runs, the
kernel's peak-RSS counter is reset (/proc/self/clear_refs), then the timed call runs; "extra
memory" is the peak RSS during the call minus the RSS before it (the inputs are not counted).

    python benchmarks/bench_core.py                       # vocab 151,936, 4,096 tokens
    python benchmarks/bench_core.py --tokens 512 --vocab 32000
    python benchmarks/bench_core.py --head 128 --tokens 1024     # the LM head against its floor
    python benchmarks/bench_core.py --head 128 --tokens 512 --runs 5 --json head.json

With ``--head H`` it measures the training step's fused head instead
(:func:`pgpo.distill.head_divergence` from float32 hidden states ``[tokens, H]`` and a head
``[V, H]``, the loss's gradient and both entropies) against its floor: the four bare matmuls of
the same shapes over all tokens at once (teacher logits ``h_t W^T``, student logits ``h_s W^T``,
and the two backward products ``G W`` and ``G^T h_s``) into preallocated buffers, nothing else
(it needs ``[tokens, V]`` buffers the chunked loss never holds), all in one process taking
turns, each timed as its fastest of three turns after a warm-up. The loss's ``[chunk, V]``
buffers are held across calls (a ``ChunkBuffers`` made outside the timed pass, as the trainer
holds one for a step's micro-batches), the footing of the floor's preallocated arrays; the
"(own)" rows allocate them in each call instead. It prints chunked / floor for full-vocabulary
reverse KL (target <= 1.6) and for the default top-100 JSD (target <= 2.0), and with ``--runs``
their medians over that many runs.

If the naive version cannot fit in this machine's memory at the requested size, both versions
are compared at the largest token count where it fits (memory and time of both are linear in
tokens), and the report says so. Targets: memory ratio <= 0.15, time ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from pgpo.outputs import json_text

BETA, TOPK, TEMPERATURE = 0.5, 100, 1.0


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def naive(student, teacher, mask):
    """Direct full-tensor version: returns (loss, info) after loss.backward()."""
    import torch

    keep = mask.reshape(-1) != 0
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])
    with torch.no_grad():
        ls_ng = torch.log_softmax(s.float() / TEMPERATURE, -1)
        lt_ng = torch.log_softmax(t.float() / TEMPERATURE, -1)
        h_s = -(ls_ng.exp() * ls_ng).sum(-1)
        h_t = -(lt_ng.exp() * lt_ng).sum(-1)
        info = ((h_s - h_t) * keep).sum() / keep.sum()
        del ls_ng, lt_ng
    ls = torch.log_softmax(s.float() / TEMPERATURE, -1)
    lt = torch.log_softmax(t.detach().float() / TEMPERATURE, -1)
    idx = ls.detach().topk(TOPK, -1).indices
    tail_s = ls.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    tail_t = lt.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    ls_k = torch.cat([ls.gather(-1, idx), tail_s], -1)
    lt_k = torch.cat([lt.gather(-1, idx), tail_t], -1)
    lm = torch.logaddexp(
        ls_k + torch.log(torch.tensor(1 - BETA)), lt_k + torch.log(torch.tensor(BETA))
    )
    per_token = (1 - BETA) * (ls_k.exp() * (ls_k - lm)).sum(-1) + BETA * (
        lt_k.exp() * (lt_k - lm)
    ).sum(-1)
    loss = (per_token * keep).sum() / keep.sum()
    loss.backward()
    return loss.detach(), info


def chunked(student, teacher, mask, chunk_size):
    from pgpo.distill import DivergenceSpec, divergence
    from pgpo.information import entropy_gap

    gap = entropy_gap(student, teacher, mask, TEMPERATURE, chunk_size=chunk_size)
    spec = DivergenceSpec(BETA, TOPK, add_tail=True, temperature=TEMPERATURE)
    loss = divergence(student, teacher, mask, spec, chunk_size=chunk_size)
    loss.backward()
    return loss.detach(), gap.info


HEAD_LOSSES = {"reverse-kl": (1.0, None), "jsd-top100": (BETA, TOPK)}
HEAD_TARGETS = {"reverse-kl": 1.6, "jsd-top100": 2.0}  # most seconds per second of the floor
OWN = " (own)"  # the head loss allocating its buffers each call, not reusing the caller's
HEAD_REPEATS = 3  # timed turns of each variant after the warm-up; the fastest is reported


def head_worker(
    tokens: int, vocab: int, hidden: int, chunk_size: int, glibc_defaults: bool
) -> dict:
    """Seconds of the fused head loss (each key of HEAD_LOSSES) and of its floor, the same
    matmuls alone, on seeded float32 inputs, in one process: after one warm-up of each, the
    variants take turns for HEAD_REPEATS rounds and each keeps its fastest pass, so a burst of
    load on the machine slows every variant alike or none."""
    import torch

    from pgpo.distill import DivergenceSpec, head_divergence
    from pgpo.malloc import keep_freed_memory
    from pgpo.reduction import ChunkBuffers

    if not glibc_defaults:
        keep_freed_memory()  # as `pgpo train` does at start-up
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_(True)
    h_s = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    h_t = torch.randn(tokens, hidden, generator=g)
    token_w = torch.full((tokens,), 1.0 / tokens)
    # The floor's preallocated [tokens, V] buffers, outside the timed pass.
    logits = torch.empty(tokens, vocab)
    grad_logits = torch.randn(tokens, vocab, generator=g)
    grad_h, grad_w = torch.empty(tokens, hidden), torch.empty(vocab, hidden)

    # The loss's [chunk, V] buffers, held across calls as the trainer holds them: the same
    # footing as the floor's preallocated arrays. "<loss> (own)" allocates them each call.
    workspace = ChunkBuffers(min(chunk_size, tokens), vocab)

    def loss_pass(variant):
        name, own = variant.removesuffix(OWN), variant.endswith(OWN)
        beta, topk = HEAD_LOSSES[name]
        spec = DivergenceSpec(beta, topk)
        loss, ent_s, ent_t = head_divergence(h_s, weight, h_t, weight.detach(), token_w, spec,
                                             chunk_size=chunk_size,
                                             workspace=None if own else workspace)  # fmt: skip
        loss.backward()
        return float(loss), float((ent_s - ent_t).mean())

    def floor_pass(_variant):
        # The same four products over all tokens at once, nothing else.
        w, hs = weight.detach(), h_s.detach()
        torch.mm(h_t, w.T, out=logits)  # teacher logits
        torch.mm(hs, w.T, out=logits)  # student logits
        torch.mm(grad_logits, w, out=grad_h)  # d loss / d h_s
        torch.mm(grad_logits.T, hs, out=grad_w)  # d loss / d W
        return None, None

    variants = ("floor", *HEAD_LOSSES, *(name + OWN for name in HEAD_LOSSES))
    rows = {v: dict(variant=v, tokens=tokens, seconds=float("inf")) for v in variants}
    for v in variants:  # warm-up: kernels, allocator
        (floor_pass if v == "floor" else loss_pass)(v)
    for _ in range(HEAD_REPEATS):
        for v in variants:
            weight.grad = h_s.grad = None
            start = time.perf_counter()
            loss, info = (floor_pass if v == "floor" else loss_pass)(v)
            seconds = time.perf_counter() - start
            rows[v].update(seconds=min(rows[v]["seconds"], seconds), loss=loss, info=info)
    return rows


def head_main(args) -> int:
    """The fused head against its floor (``--head H``), ``--runs`` times, each in a fresh
    process; with ``--json`` every run's rows, ratios and their medians are written there."""
    import statistics

    print(f"LM head: {args.tokens:,} tokens, hidden {args.head}, vocab {args.vocab:,}, "
          f"float32, chunks of {args.chunk_size} tokens; loss forward+backward with both "
          f"entropies; the fastest of {HEAD_REPEATS} turns each")  # fmt: skip
    runs, ratios = [], {}
    for run in range(args.runs):
        rows = measure("head", args.tokens, args.vocab, args.chunk_size, args.head,
                       args.glibc_defaults)  # fmt: skip
        runs.append(rows)
        floor = rows["floor"]["seconds"]
        print(f"run {run + 1} of {args.runs}")
        print(f"{'version':18s} {'seconds':>8s} {'/ floor':>8s} {'loss':>10s} {'I':>10s}")
        for name, r in rows.items():
            values = "" if r["loss"] is None else f"{r['loss']:10.6f} {r['info']:10.6f}"
            print(f"{name:18s} {r['seconds']:8.2f} {r['seconds'] / floor:8.2f} {values}")
            if name != "floor":
                ratios.setdefault(name, []).append(r["seconds"] / floor)
    medians = {name: statistics.median(r) for name, r in ratios.items()}
    for name in HEAD_LOSSES:
        ratio, target = medians[name], HEAD_TARGETS[name]
        print(f"{name} chunked / floor, median of {args.runs}: {ratio:.2f} (target <= {target}) "
              f"{'OK' if ratio <= target else 'MISSED'}; allocating per call: "
              f"{medians[name + OWN]:.2f}")  # fmt: skip
    if args.json:
        summary = {"tokens": args.tokens, "hidden": args.head, "vocab": args.vocab,
                   "chunk_size": args.chunk_size, "repeats": HEAD_REPEATS,
                   "targets": HEAD_TARGETS, "ratios": ratios, "medians": medians,
                   "runs": runs}  # fmt: skip
        with open(args.json, "w") as f:
            f.write(json_text(summary, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def worker(variant: str, tokens: int, vocab: int, chunk_size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    def make(n):
        s = (torch.randn(1, n, vocab, generator=g) * 3).bfloat16().requires_grad_(True)
        t = (torch.randn(1, n, vocab, generator=g) * 3).bfloat16()
        return s, t, torch.ones(1, n)

    run = naive if variant == "naive" else (lambda s, t, m: chunked(s, t, m, chunk_size))
    run(*make(min(tokens, 8)))  # warm-up: imports, kernels, allocator
    s, t, m = make(tokens)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    loss, info = run(s, t, m)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    return dict(
        variant=variant,
        tokens=tokens,
        vocab=vocab,
        seconds=seconds,
        extra_bytes=peak - before,
        loss=float(loss),
        info=float(info),
    )


def measure(
    variant: str, tokens: int, vocab: int, chunk_size: int, head: int = 0, glibc: bool = False
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--tokens",
        str(tokens),
        "--vocab",
        str(vocab),
        "--chunk-size",
        str(chunk_size),
        "--head",
        str(head),
        *(["--glibc-defaults"] if glibc else []),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"bench_core: the {variant} worker failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) * 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--chunk-size", type=int, default=None, help="default: pgpo's default")
    p.add_argument("--head", type=int, default=0, help="hidden size: time the fused LM head")
    p.add_argument("--glibc-defaults", action="store_true",
                   help="with --head: leave malloc as it is (no keep_freed_memory)")  # fmt: skip
    p.add_argument("--runs", type=int, default=1, help="with --head: runs, each in a fresh process")
    p.add_argument("--json", default=None, help="with --head: write the runs' summary here")
    p.add_argument("--worker", choices=["naive", "chunked", "head"],
                   help=argparse.SUPPRESS)  # fmt: skip
    args = p.parse_args(argv)
    if args.chunk_size is None:
        from pgpo.reduction import DEFAULT_CHUNK_SIZE

        args.chunk_size = DEFAULT_CHUNK_SIZE
    if args.worker and args.head:
        print(json_text(head_worker(args.tokens, args.vocab, args.head, args.chunk_size,
                                    args.glibc_defaults)))  # fmt: skip
        return 0
    if args.worker:
        print(json_text(worker(args.worker, args.tokens, args.vocab, args.chunk_size)))
        return 0
    if args.head:
        return head_main(args)

    gib = 2**30
    # Size the naive run: measure it small, scale linearly, keep 15 % of free memory spare.
    probe_tokens = min(args.tokens, 256)
    probe = measure("naive", probe_tokens, args.vocab, args.chunk_size)
    per_token = probe["extra_bytes"] / probe_tokens
    inputs = 2 * 2 * args.vocab  # two bf16 inputs per token
    fit = int(0.85 * available_bytes() / (per_token + inputs))
    tokens = args.tokens if fit >= args.tokens else max(probe_tokens, fit // 256 * 256)
    print(
        f"vocab {args.vocab:,}, requested {args.tokens:,} response tokens, bf16 logits, "
        f"chunk {args.chunk_size} tokens, JSD beta={BETA} top-{TOPK}+tail, fwd+bwd + I_k"
    )
    if tokens < args.tokens:
        need = per_token * args.tokens / gib
        print(
            f"naive at {args.tokens:,} tokens would need ~{need:.1f} GiB extra"
            f" (measured {per_token / 2**20:.1f} MiB/token at {probe_tokens} tokens) and "
            f"{available_bytes() / gib:.1f} GiB is free: comparing at {tokens:,} tokens"
        )
    chunk = measure("chunked", tokens, args.vocab, args.chunk_size)
    base = measure("naive", tokens, args.vocab, args.chunk_size)
    full = (
        chunk
        if tokens == args.tokens
        else measure("chunked", args.tokens, args.vocab, args.chunk_size)
    )
    print(
        f"{'version':10s} {'tokens':>7s} {'extra peak GiB':>15s} {'seconds':>8s} "
        f"{'loss':>10s} {'I_k':>10s}"
    )
    for r in (base, chunk) + ((full,) if full is not chunk else ()):
        print(
            f"{r['variant']:10s} {r['tokens']:7d} {r['extra_bytes'] / gib:15.3f} "
            f"{r['seconds']:8.2f} {r['loss']:10.6f} {r['info']:10.6f}"
        )
    mem_ratio = chunk["extra_bytes"] / base["extra_bytes"]
    time_ratio = chunk["seconds"] / base["seconds"]
    agree = abs(chunk["loss"] - base["loss"]) <= 1e-4 * max(1.0, abs(base["loss"]))
    print(
        f"memory ratio chunked/naive: {mem_ratio:.3f} (target <= 0.15) "
        f"{'OK' if mem_ratio <= 0.15 else 'MISSED'}"
    )
    print(
        f"time ratio chunked/naive:   {time_ratio:.3f} (target <= 1.2) "
        f"{'OK' if time_ratio <= 1.2 else 'MISSED'}"
    )
    print(f"same loss and I_k: {'yes' if agree else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
