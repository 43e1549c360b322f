"""pgpo's training step against TRL's ``SDPOTrainer`` step, the same work, time and peak memory.

Both systems train the same saved model (a random Qwen3ForCausalLM with the real 151,936-token
vocabulary, hidden 128, 2 layers, tied head, float32) on the same questions, rendered by the same
chat template. What is made equal is printed first. Each system runs in its own process and the
processes step in turn (one step of each, then the next), so that machine noise hits them alike;
the first step of each is a warm-up and is not counted.

Rewards: every rollout succeeds (TRL: a reward function returning 1; pgpo:
``reward.false_positive_rate=1``), so that in both every response's teacher prompt holds a
sibling's response as the demonstration (its own success is not reused) and every token trains.

    python benchmarks/bench_vs_trl.py                    # 128 and 512 response tokens
    python benchmarks/bench_vs_trl.py --tokens 128 --steps 3

Prints, per response length: median seconds per step and its split into generation and the rest,
peak RSS of each process, and the pgpo / TRL ratios. Also measured (``pgpo-defaults``): pgpo with
I_k tracked (``pgpo.track_info=true``) and its default top-100 loss; and ``trl+pgpo``, TRL's
trainer with pgpo's add-on as shipped (``PGPOSDPOTrainer``: TRL's loss through the fused head,
I_k, alpha 1). Targets: pgpo / TRL time <= 0.7 at 128 tokens, peak memory <= 0.1 at 512 tokens;
the add-on / TRL time <= 0.8 and peak memory <= 0.15 at 512 tokens. Writes
benchmarks/results/vs_trl.json. Needs ``pip install -e ".[trl]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pgpo.outputs import json_text

RESULTS = Path(__file__).parent / "results" / "vs_trl.json"
HIDDEN, LAYERS, HEADS, HEAD_DIM = 128, 2, 2, 64
LR, EMA_RATE, ROLLOUTS = 1e-5, 0.05, 2
# Responses per step at each response length (as many as fit TRL in memory).
RESPONSES = {32: 32, 128: 16, 512: 8}

EQUAL = [
    "model: the same saved Qwen3ForCausalLM (vocab 151,936, hidden 128, 2 layers, tied), float32",
    "questions: the same synthetic ones, the same system and user messages, Qwen3's chat template "
    "without thinking; 2 rollouts per question",
    "generation: one HF generate per step, temperature 1, top-p 1, up to the response length "
    "(a random model seldom samples an end token: pgpo's mean length is printed each step)",
    "teacher: EMA at rate 0.05 of the student, updated after every step; its prompt is the "
    "question plus a sibling's response (every rollout rewarded 1, own success not reused)",
    "loss: full-vocabulary reverse KL(student || teacher) per token (pgpo loss.beta=1 "
    "loss.topk=null; TRL distillation_mode=full_logits distillation_alpha=1), all responses in "
    "one micro-batch",
    "optimizer: AdamW, lr 1e-5, betas (0.9, 0.999), no weight decay, gradient clipped at 1.0; "
    "pgpo with rho = 1 and no I_k (pgpo.enabled=false pgpo.track_info=false)",
]


def _peak_rss() -> int:
    """The process's peak resident set (bytes) since it started."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024


def save_model(folder: Path) -> Path:
    from pgpo.train.models.model import load_tokenizer, small_qwen3

    model = small_qwen3(151_936, HIDDEN, LAYERS, HEADS, 1, HEAD_DIM, True,
                        (151643, 151645, 151643), 4096, seed=0)  # fmt: skip
    model.save_pretrained(folder)
    load_tokenizer("qwen3").save_pretrained(folder)
    return folder


MARK = "bench_vs_trl: "  # a worker's report lines (TRL prints its own logs to stdout too)


def _report(row: dict) -> None:
    print(MARK + json_text(row), flush=True)


def _wait_for_turn() -> None:
    if sys.stdin.readline().strip() != "step":
        raise SystemExit(0)  # the parent is done with this process


def pgpo_worker(model: Path, tokens: int, responses: int, defaults: bool) -> None:
    import torch

    from pgpo.malloc import keep_freed_memory
    from pgpo.train.config import load_config
    from pgpo.train.loop import Run

    keep_freed_memory()  # as `pgpo train` does at start-up
    torch.set_num_threads(1)
    overrides = [
        f"model.path={model}",
        f"model.tokenizer={model}",
        f"batch_size={responses}",
        f"rollout.n={ROLLOUTS}",
        f"rollout.max_new_tokens={tokens}",
        "rollout.max_prompt_tokens=1024",
        f"teacher.ema_rate={EMA_RATE}",
        "teacher.fallback_demonstration=none",
        "reward.false_positive_rate=1.0",
        f"loss.micro_batch={responses}",
        f"optim.lr={LR}",
        "optim.warmup_steps=0",
        "optim.weight_decay=0.0",
        "optim.grad_clip=1.0",
        f"output.dir={model.parent / f'pgpo-{os.getpid()}'}",  # in the parent's scratch folder
    ]
    if not defaults:
        overrides += ["loss.beta=1.0", "loss.topk=null", "pgpo.enabled=false",
                      "pgpo.track_info=false"]  # fmt: skip
    cfg = load_config("tiny-cpu", overrides)
    run = Run(cfg)
    _report({"ready": True, "chunk_size": cfg.loss.chunk_size})
    while True:
        _wait_for_turn()
        questions = run.sampler.next(cfg.questions_per_step)
        start = time.perf_counter()
        metrics = run.train_step(questions)
        seconds = time.perf_counter() - start
        _report(
            {
                "seconds": seconds,
                "generation": metrics["rollout_seconds"],
                "response_tokens": metrics["response_length_mean"],
                "trained_share": 1.0 - metrics["masked_share"],
                "peak_bytes": _peak_rss(),
            }
        )


def trl_worker(model: Path, tokens: int, responses: int, steps: int, add_on: bool) -> None:
    import warnings

    import torch

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    from pgpo.integrations.trl import PGPOSDPOTrainer
    from pgpo.train.tasks.data import QuestionSampler, load_split
    from pgpo.train.tasks.prompts import messages

    torch.set_num_threads(1)

    class Timed(PGPOSDPOTrainer if add_on else SDPOTrainer):
        """TRL's trainer (or pgpo's add-on to it, as shipped: the fused loss and I_k) as it is,
        with the time spent in generation added up."""

        generation = 0.0

        def _generate(self, prompt_ids):
            start = time.perf_counter()
            out = super()._generate(prompt_ids)
            self.generation += time.perf_counter() - start
            return out

    class InTurn(TrainerCallback):
        """Waits for the parent before each step and reports the step after it."""

        def on_step_begin(self, args, state, control, **kwargs):
            _wait_for_turn()
            trainer.generation = 0.0
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.start
            _report(
                {
                    "seconds": seconds,
                    "generation": trainer.generation,
                    "peak_bytes": _peak_rss(),
                }
            )

    # pgpo's questions in pgpo's order (its train split and its sampler at seed 0)
    sampler = QuestionSampler(load_split("synthetic", "train", 0, False, None).questions, 0)
    questions = sampler.next(responses // ROLLOUTS * steps)
    data = Dataset.from_dict({"prompt": [messages(q) for q in questions]})
    args = SDPOConfig(
        output_dir=str(model.parent / f"trl-{os.getpid()}"),  # in the parent's scratch folder
        per_device_train_batch_size=responses,
        gradient_accumulation_steps=1,
        num_generations=ROLLOUTS,
        max_completion_length=tokens,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        temperature=1.0,
        top_p=1.0,
        distillation_mode="full_logits",
        distillation_alpha=1.0,
        teacher_model_kind="ema",
        teacher_update_rate=EMA_RATE,
        teacher_sync_steps=1,
        dont_reprompt_on_self_success=True,
        chat_template_kwargs={"enable_thinking": False},
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=True,
        seed=0,
        shuffle_dataset=False,
        disable_tqdm=True,
    )
    trainer = Timed(
        model=str(model),
        reward_funcs=lambda completions, **kwargs: [1.0] * len(completions),
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model),
        callbacks=[InTurn()],
    )
    _report({"ready": True})
    trainer.train()
    _wait_for_turn()


class Worker:
    """One system in its own process; ``step()`` runs one training step there."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        # Offline: everything is local, and a hub lookup would wait for its network timeout.
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")  # fmt: skip
        self.stderr = tempfile.TemporaryFile("w+")  # read on failure; a pipe could fill up
        self.proc = subprocess.Popen(
            [sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True, env=env,
        )  # fmt: skip
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.proc.wait()
        self.stderr.seek(0)
        err = self.stderr.read()
        raise SystemExit(f"bench_vs_trl: the {self.name} process failed:\n{err[-3000:]}")

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def compare(model: Path, tokens: int, responses: int, steps: int) -> dict:
    """Steps ``steps + 1`` times in turn; the first is a warm-up."""
    common = ["--model", str(model), "--tokens", str(tokens), "--responses", str(responses)]
    workers = [
        Worker("pgpo", ["--worker", "pgpo", *common]),
        Worker("pgpo-defaults", ["--worker", "pgpo-defaults", *common]),
        Worker("trl", ["--worker", "trl", *common, "--steps", str(steps + 1)]),
        Worker("trl+pgpo", ["--worker", "trl+pgpo", *common, "--steps", str(steps + 1)]),
    ]
    rows = {w.name: [] for w in workers}
    for step in range(steps + 1):
        for w in workers:
            row = w.step()
            if step > 0:
                rows[w.name].append(row)
            length = ""
            if "response_tokens" in row:  # pgpo's own count of what it trained on
                length = (f", responses of {row['response_tokens']:.0f} tokens, "
                          f"{row['trained_share']:.0%} trained")  # fmt: skip
            print(f"  {tokens} tokens, step {step}{' (warm-up)' if step == 0 else ''}: "
                  f"{w.name} {row['seconds']:.1f} s{length}", flush=True)  # fmt: skip
    for w in workers:
        w.close()
    out = {}
    for name, runs in rows.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        generation = statistics.median(r["generation"] for r in runs)
        out[name] = {
            "seconds": seconds,
            "generation": generation,
            "rest": statistics.median(r["seconds"] - r["generation"] for r in runs),
            "peak_gib": max(r["peak_bytes"] for r in runs) / 2**30,
        }
    out["chunk_size"] = workers[0].ready["chunk_size"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512],
                   help=f"response lengths, from {sorted(RESPONSES)}")  # fmt: skip
    p.add_argument("--steps", type=int, default=2, help="timed steps per system (after 1 warm-up)")
    p.add_argument("--worker", choices=["pgpo", "pgpo-defaults", "trl", "trl+pgpo"],
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--responses", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker in ("trl", "trl+pgpo"):
        trl_worker(args.model, args.tokens[0], args.responses, args.steps, args.worker != "trl")
        return 0
    if args.worker:
        pgpo_worker(args.model, args.tokens[0], args.responses, args.worker == "pgpo-defaults")
        return 0
    bad = [t for t in args.tokens if t not in RESPONSES]
    if bad or args.steps < 1:
        p.error(f"--tokens takes {sorted(RESPONSES)} and --steps at least 1")
    try:
        import trl  # noqa: F401
    except ImportError:
        p.error('TRL is not installed: pip install -e ".[trl]"')

    print("Made equal:")
    for line in EQUAL:
        print(f"- {line}")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        model = save_model(Path(folder) / "model")
        for tokens in args.tokens:
            results[tokens] = compare(model, tokens, RESPONSES[tokens], args.steps)
    print(f"\n{'tokens':>6s} {'system':14s} {'s/step':>7s} {'generate':>9s} {'rest':>6s} "
          f"{'peak GiB':>9s}")  # fmt: skip
    for tokens, r in results.items():
        for name in ("pgpo", "pgpo-defaults", "trl", "trl+pgpo"):
            x = r[name]
            print(f"{tokens:6d} {name:14s} {x['seconds']:7.2f} {x['generation']:9.2f} "
                  f"{x['rest']:6.2f} {x['peak_gib']:9.2f}")  # fmt: skip
    print()
    for tokens, r in results.items():
        time_ratio = r["pgpo"]["seconds"] / r["trl"]["seconds"]
        rest_ratio = r["pgpo"]["rest"] / r["trl"]["rest"]
        memory_ratio = r["pgpo"]["peak_gib"] / r["trl"]["peak_gib"]
        add_on_time = r["trl+pgpo"]["seconds"] / r["trl"]["seconds"]
        add_on_memory = r["trl+pgpo"]["peak_gib"] / r["trl"]["peak_gib"]
        r["ratios"] = {"time": time_ratio, "rest": rest_ratio, "memory": memory_ratio,
                       "add_on_time": add_on_time, "add_on_memory": add_on_memory}  # fmt: skip
        line = (f"{tokens} tokens ({RESPONSES[tokens]} responses): pgpo / TRL time "
                f"{time_ratio:.2f} (without generation {rest_ratio:.2f}), peak memory "
                f"{memory_ratio:.3f}")  # fmt: skip
        if tokens == 128:
            line += f"; time target <= 0.7 {'OK' if time_ratio <= 0.7 else 'MISSED'}"
        if tokens == 512:
            line += f"; memory target <= 0.1 {'OK' if memory_ratio <= 0.1 else 'MISSED'}"
        print(line)
        line = (f"{tokens} tokens: TRL + pgpo's add-on / TRL time {add_on_time:.2f}, peak memory "
                f"{add_on_memory:.3f}")  # fmt: skip
        if tokens == 512:
            ok = add_on_time <= 0.8 and add_on_memory <= 0.15
            line += f"; targets time <= 0.8, memory <= 0.15 {'OK' if ok else 'MISSED'}"
        print(line)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json_text({"equal": EQUAL, "results": results}, indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
