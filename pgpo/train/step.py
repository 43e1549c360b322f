"""One SDPO / PGPO training step (Algorithm 1), top to bottom.

1. sample n rollouts per question from the current policy (temperature 1.0);
2. score them (the letter in the last <answer>...</answer>, or \\boxed{});
3. build the teacher's prompt: question + a successful sibling's answer (Sec. 3, reprompting);
   samples without a demonstration are masked out;
4. student forward (with grad) and teacher forward (no grad) over the same response tokens; the
   loss is the divergence between them (Eq. 2 for beta = 1; the reference's JSD for 0.5), the LM
   head applied chunk by chunk inside it (logits never held for a whole sequence);
5. from the same logits, per-token entropies -> I_k (Eq. 8) -> rho_k (Eq. 9);
6. AdamW step scaled by rho_k (theta_{k+1} = theta_k - eta rho_k h_k), then the EMA teacher.
A NaN/inf loss, gradient or I_k skips the step: weights, optimizer and teacher stay untouched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from pgpo.distill import head_divergence
from pgpo.multiplier import MultiplierConfig
from pgpo.optim import ModulatedOptimizer
from pgpo.reduction import reduction_weights
from pgpo.train.config import TrainConfig
from pgpo.train.data import Question
from pgpo.train.prompts import student_prompt, teacher_prompt
from pgpo.train.rewards import extract_answer, reward, strip_thinking
from pgpo.train.rollout import RolloutEngine
from pgpo.train.teacher import Teacher, choose_demonstrations


@dataclass
class Sample:
    """One rollout prepared for the loss: prompts for both roles and the shared response."""

    student_prompt: list[int]
    teacher_prompt: list[int]
    response: list[int]
    trained: bool  # False: no demonstration, masked out of loss and I_k


def response_hidden(
    model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` at the positions that predict each response token
    (T = longest response). The LM head is applied later, chunk by chunk, inside the loss: full-
    vocabulary logits never exist for a whole sequence."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state
    t_max = max(len(r) for r in responses)
    index = torch.zeros((len(seqs), t_max), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        # position p-1+t predicts response token t
        index[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported by the fused loss")
    return head.weight


def response_mask(samples: list[Sample]) -> torch.Tensor:
    """``[B, T]``: 1 on the response tokens of trained samples."""
    t_max = max(len(s.response) for s in samples)
    mask = torch.zeros((len(samples), t_max))
    for i, s in enumerate(samples):
        if s.trained:
            mask[i, : len(s.response)] = 1.0
    return mask


def train_step(
    questions: list[Question],
    policy: torch.nn.Module,
    teacher: Teacher,
    tokenizer,
    engine: RolloutEngine,
    optimizer: ModulatedOptimizer,
    scheduler,
    cfg: TrainConfig,
    multiplier: MultiplierConfig | None,
) -> dict:
    """One step; returns its metrics. ``multiplier=None`` is SDPO (rho = 1)."""
    t0 = time.perf_counter()
    n = cfg.rollout.n

    # 1. Rollouts from the current policy.
    prompts = [student_prompt(tokenizer, q, cfg.rollout.max_prompt_tokens) for q in questions]
    completions = engine.generate(
        prompts, n, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens
    )
    texts = [
        [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in group]
        for group in completions
    ]
    t_rollout = time.perf_counter() - t0

    # 2. Rewards (1 when the extracted letter is right).
    lenient = cfg.reward.leading_letter
    rewards = [[reward(t, q.answer, lenient) for t in group] for q, group in zip(questions, texts)]
    formatted = [extract_answer(t).has_answer_tag for group in texts for t in group]

    # 3. Demonstrations: the first successful sibling's answer, thinking stripped.
    demos = choose_demonstrations(
        rewards, texts, cfg.teacher.success_threshold, cfg.teacher.reprompt_on_own_success
    )
    samples = []
    for q, prompt, group, group_demos in zip(questions, prompts, completions, demos):
        for completion, demo in zip(group, group_demos):
            if demo is None and cfg.teacher.fallback_demonstration == "gold":
                demo = f"<answer>{q.answer}</answer>"
            if demo is not None and cfg.teacher.strip_thinking:
                demo = strip_thinking(demo)
            tprompt = (
                prompt
                if demo is None
                else teacher_prompt(tokenizer, q, demo, cfg.teacher.max_reprompt_tokens)
            )
            # An empty response (stopped at once) has nothing to train on.
            samples.append(
                Sample(
                    prompt,
                    tprompt,
                    completion.tokens or [tokenizer.pad_token_id],
                    demo is not None and len(completion.tokens) > 0,
                )
            )

    # 4-5. Forwards in micro-batches: divergence (loss) and entropies (I_k) from the same logits.
    # Weights are computed over the whole step so that micro-batching does not change the sums.
    mask = response_mask(samples)
    loss_w = reduction_weights(mask, cfg.loss.reduction, empty_sequences_count=True).float()
    info_w = reduction_weights(mask, cfg.pgpo.info_reduction, empty_sequences_count=False)
    loss_total, info_total, h_student, h_teacher = 0.0, 0.0, 0.0, 0.0
    pad = tokenizer.pad_token_id
    need_info = multiplier is not None or cfg.pgpo.track_info
    optimizer.zero_grad()
    for start in range(0, len(samples), cfg.loss.micro_batch):
        mb = samples[start : start + cfg.loss.micro_batch]
        rows = slice(start, start + len(mb))
        t_mb = max(len(s.response) for s in mb)
        responses = [s.response for s in mb]
        student_hidden = response_hidden(policy, [s.student_prompt for s in mb], responses, pad)
        with torch.no_grad():
            teacher_hidden = response_hidden(
                teacher.model, [s.teacher_prompt for s in mb], responses, pad
            )
        # Eq. 2 (beta = 1) or the reference's JSD, weighted by the step's reduction weights, with
        # the LM head applied chunk by chunk; with I_k wanted, the per-token entropies of Eq. 8
        # come out of the same pass over the logits (no extra forward).
        loss, hs, ht = head_divergence(
            student_hidden,
            head_weight(policy),
            teacher_hidden,
            head_weight(teacher.model),
            loss_w[rows, :t_mb],
            cfg.loss.beta,
            cfg.loss.topk,
            cfg.loss.add_tail,
            cfg.loss.temperature,
            cfg.loss.chunk_size,
            return_entropies=need_info,
        )
        loss.backward()
        loss_total += loss.item()
        if need_info:  # Eq. 8: I_k = mean over trained tokens of H(student) - H(teacher)
            w = info_w[rows, :t_mb]
            hs, ht = hs.double(), ht.double()
            info_total += float((w * (hs - ht)).sum())
            h_student += float((w * hs).sum())
            h_teacher += float((w * ht).sum())
        del student_hidden, teacher_hidden

    # 6. The modulated step, unless anything is non-finite.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.optim.grad_clip))
    has_signal = bool(mask.sum() > 0) and need_info
    info = info_total if has_signal else 0.0  # no trained token (or not tracked): I = 0
    rho = 1.0 if multiplier is None else float(multiplier(info))  # Eq. 9
    finite = all(math.isfinite(v) for v in (loss_total, grad_norm, info, rho))
    if finite:
        optimizer.step(rho)
        scheduler.step()
        teacher.update(policy)
    optimizer.zero_grad()

    seconds = time.perf_counter() - t0
    lengths = [len(c.tokens) for group in completions for c in group]
    flat_rewards = [r for group in rewards for r in group]
    return {
        "reward": sum(flat_rewards) / len(flat_rewards),
        "accuracy": sum(r >= cfg.teacher.success_threshold for r in flat_rewards)
        / len(flat_rewards),
        "format_rate": sum(formatted) / len(formatted),
        "loss": loss_total,
        "info": info,
        "rho": rho,
        "entropy_student": h_student if has_signal else 0.0,
        "entropy_teacher": h_teacher if has_signal else 0.0,
        "grad_norm": grad_norm,
        "skipped": not finite,
        "lr": optimizer.param_groups[0]["lr"],
        "response_length_mean": sum(lengths) / len(lengths),
        "response_length_max": max(lengths),
        "masked_share": 1.0 - sum(s.trained for s in samples) / len(samples),
        "success_group_fraction": sum(
            any(r >= cfg.teacher.success_threshold for r in g) for g in rewards
        )
        / len(rewards),
        "empty_target_batch": not has_signal,
        "rollout_seconds": t_rollout,
        "train_seconds": seconds - t_rollout,
        "step_seconds": seconds,
        "tokens_per_second": sum(lengths) / max(t_rollout, 1e-9),
        "samples": [
            {
                "question": q.prompt[:200],
                "answer": q.answer,
                "response": texts[i][0],
                "reward": rewards[i][0],
            }
            for i, q in enumerate(questions[:2])
        ],
    }
