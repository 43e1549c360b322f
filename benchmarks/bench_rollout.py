"""Rollout throughput: vLLM (colocated, in-process) against transformers ``generate``.

Same model (a tiny random Qwen3ForCausalLM with the real 151,936-token vocabulary and head_dim
64, which vLLM's CPU attention needs), the same prompts (the trainer's chat-formatted synthetic
questions) and the same sampling settings (n per prompt, temperature 1, top-p 1, up to
``--max-new-tokens``). Both engines are the trainer's own (``HFRolloutEngine`` and
``VLLMRolloutEngine``), called as a training step calls them. Trials alternate between the two
so that machine noise hits them alike; the first call of each is a warm-up and not timed.

    python benchmarks/bench_rollout.py [--trials 3] [--prompts 16] [--n 4]

Needs vLLM (on CPU: the environment of the README's second test command). Prints tokens/s of
each and the ratio vllm / hf, and writes benchmarks/results/rollout.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pgpo.outputs import json_text

RESULTS = Path(__file__).parent / "results" / "rollout.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # before vLLM, which turns later calls into no-ops

    from pgpo.train.config import load_config
    from pgpo.train.models.model import load_model, load_tokenizer
    from pgpo.train.rollout.hf import HFRolloutEngine
    from pgpo.train.rollout.vllm import VLLMRolloutEngine
    from pgpo.train.tasks.data import load_split
    from pgpo.train.tasks.prompts import student_prompt

    cfg = load_config(
        "tiny-cpu",
        [
            "rollout.engine=vllm",
            "model.tiny_head_dim=64",
            f"model.tiny_hidden_size={args.hidden}",
            f"model.tiny_layers={args.layers}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"eval.max_new_tokens={args.max_new_tokens}",
            "output.dir=/tmp/pgpo-bench-rollout",  # where vLLM reads the initial weights
        ],
    )
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model = load_model(cfg.model, cfg.seed)
    questions = load_split("synthetic", "train", 0, False, args.prompts).questions
    prompts = [student_prompt(tokenizer, q, 256) for q in questions[: args.prompts]]
    engines = {
        "hf": HFRolloutEngine(model, tokenizer, prompts_per_call=args.prompts),
        "vllm": VLLMRolloutEngine.from_config(cfg, model, tokenizer),
    }
    rates: dict[str, list[float]] = {name: [] for name in engines}
    try:
        for trial in range(args.trials + 1):
            for name, engine in engines.items():
                torch.manual_seed(trial)
                start = time.perf_counter()
                groups = engine.generate(prompts, args.n, 1.0, 1.0, args.max_new_tokens)
                seconds = time.perf_counter() - start
                tokens = sum(len(c.tokens) for g in groups for c in g)
                if trial > 0:  # trial 0 warms both up
                    rates[name].append(tokens / seconds)
                    print(
                        f"trial {trial} {name:>4}: {tokens} tokens, {tokens / seconds:8.1f} tok/s"
                    )
    finally:
        engines["vllm"].close()
    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = median["vllm"] / median["hf"]
    print(f"median tokens/s: vllm {median['vllm']:.1f}, hf {median['hf']:.1f}")
    print(f"ratio vllm / hf (transformers generate, the baseline): {ratio:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json_text(
            {
                "tokens_per_second": median,
                "trials": rates,
                "ratio_vllm_over_hf": ratio,
                "settings": vars(args),
                "machine": platform.platform(),
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
