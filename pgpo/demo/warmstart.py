"""The demo's starting point: a small ``Qwen3ForCausalLM`` with the trimmed real Qwen3 tokenizer,
given a short supervised warm start, saved as an ordinary transformers folder and reused.

The warm start teaches two things, as pretraining and instruction tuning would for a real model:
- on the student's prompt, the answer format and the task, briefly enough that the model is right
  only part of the time unaided (about 45% after 200 steps; ``label_accuracy`` < 1 adds label
  noise for a weaker start);
- on the teacher's reprompt (question + a correct solution), to use the solution.
Self-distillation then has something to teach: the teacher's solution-conditioned answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pgpo.demo.vocab import trim_tokenizer
from pgpo.outputs import json_text, output_files
from pgpo.train.models.model import qwen3_tokenizer_dir, small_qwen3
from pgpo.train.tasks.data import LETTERS, Question, answer_text
from pgpo.train.tasks.prompts import chat_text, messages, teacher_messages

END = "<|im_end|>"


@dataclass(frozen=True)
class WarmStartConfig:
    hidden_size: int = 128
    layers: int = 2
    heads: int = 2
    head_dim: int = 64  # vLLM's CPU attention needs 64
    steps: int = 200  # short on purpose: the model is right only part of the time unaided
    batch_size: int = 32
    lr: float = 1e-3
    label_accuracy: float = 1.0  # share of student-prompt targets with the right letter
    teacher_share: float = 0.5  # share of examples on the teacher's reprompt
    seed: int = 0

    def key(self, *task) -> str:
        """A short hash naming the cached folder: changes with any setting and with ``task``
        (what defines the training questions)."""
        text = json_text([dataclasses.asdict(self), task], sort_keys=True) + "|v1"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def example(question: Question, on_teacher: bool, label_accuracy: float, rng: random.Random):
    """(prompt messages, target text) for one warm-start example."""
    if on_teacher:  # a correct demonstration in context: copy its answer
        demo = answer_text(question.answer)
        return teacher_messages(question, demo), answer_text(question.answer) + END
    letter = question.answer
    if rng.random() >= label_accuracy:
        letter = rng.choice([c for c in LETTERS[:4] if c != question.answer])
    return messages(question), answer_text(letter) + END


def task_texts(tokenizer, questions: list[Question]) -> list[str]:
    """Everything the demo will encode: both prompts and every possible answer."""
    texts = [answer_text(c) + END for c in LETTERS[:4]]
    for q in questions:
        texts.append(chat_text(tokenizer, messages(q)))
        texts.append(chat_text(tokenizer, teacher_messages(q, answer_text(q.answer))))
    return texts


def build_model(vocab_size: int, tokenizer, cfg: WarmStartConfig) -> torch.nn.Module:
    text_end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return small_qwen3(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        layers=cfg.layers,
        heads=cfg.heads,
        kv_heads=cfg.heads,
        head_dim=cfg.head_dim,
        tied=False,  # as Qwen3-8B
        special_ids=(text_end, tokenizer.convert_tokens_to_ids(END), text_end),
        max_positions=1024,
        seed=cfg.seed,
    )


def _batch(tokenizer, pairs: list[tuple[list[dict], str]]):
    """Right-padded ids, attention mask and labels (-100 outside the targets)."""
    seqs, starts = [], []
    for msgs, target in pairs:
        prompt = tokenizer(chat_text(tokenizer, msgs), add_special_tokens=False)["input_ids"]
        answer = tokenizer(target, add_special_tokens=False)["input_ids"]
        seqs.append(prompt + answer)
        starts.append(len(prompt))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, start : len(s)] = torch.tensor(s[start:])
    return ids, mask, labels


def warm_start(
    questions: list[Question],
    all_questions: list[Question],
    folder: Path,
    cfg: WarmStartConfig,
    progress: bool = True,
) -> Path:
    """Train on ``questions`` and save model + trimmed tokenizer to ``folder`` (atomically).
    ``all_questions`` (train and test) define the kept vocabulary."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    full = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    with output_files(folder) as tmp:
        trim_tokenizer(qwen3_tokenizer_dir(), task_texts(full, all_questions), tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp))
        model = build_model(len(tokenizer), tokenizer, cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
        rng = random.Random(cfg.seed)
        model.train()
        bar = tqdm(
            range(cfg.steps),
            desc="warm start",
            unit="step",
            file=sys.stderr,
            disable=not progress or None,
        )
        for _ in bar:
            pairs = [
                example(
                    rng.choice(questions),
                    rng.random() < cfg.teacher_share,
                    cfg.label_accuracy,
                    rng,
                )
                for _ in range(cfg.batch_size)
            ]
            ids, mask, labels = _batch(tokenizer, pairs)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(tmp))
        (tmp / "warm_start.json").write_text(json_text(dataclasses.asdict(cfg), indent=1))
    return folder
