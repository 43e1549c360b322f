"""The rollout seam: what the trainer asks of a rollout engine, and what one returns.

The trainer calls :meth:`RolloutEngine.generate`, after every optimizer step
:meth:`RolloutEngine.sync_weights`, reads :attr:`RolloutEngine.sleep_freed_gib` for its log, and
calls :meth:`RolloutEngine.close` when the run ends. The engines live in their own modules and
know this one, never each other: :mod:`pgpo.train.rollout.hf` (transformers ``generate``) and
:mod:`pgpo.train.rollout.vllm` (a colocated vLLM). Whoever builds the run picks one
(:func:`pgpo.train.rollout.engines.make_engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Completion:
    """One sampled response: its token ids (ending with EOS when the model stopped) and, when the
    engine provides them, the sampling log-probs of those tokens."""

    tokens: list[int]
    logprobs: list[float] | None = None
    finished: bool = False


class RolloutEngine(Protocol):
    # The GPU memory (GiB) the engine gave back when it last slept (vLLM's sleep mode on CUDA);
    # None where it does not sleep.
    sleep_freed_gib: float | None

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions for each prompt (token ids), in prompt order. With ``seeds`` (one
        per prompt) each prompt is sampled from its own RNG stream."""

    def sync_weights(self, lm: torch.nn.Module) -> None:
        """Make the engine sample from ``lm``'s current weights (a transformers causal LM,
        possibly FSDP-sharded: then every rank calls this)."""

    def close(self) -> None:
        """Free what the engine holds (processes, GPU memory); called once, when the run ends."""


def prompt_seed(seed: int, step: int, index: int, stream: int) -> int:
    """The RNG seed of question ``index`` (in the global batch) at ``step``; ``stream`` 0 for
    training rollouts, 1 for evaluation. Independent of ranks and batching."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, index, stream]).generate_state(1)[0])


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a response: EOS, ``<|im_end|>``, ``<|endoftext|>`` (those that exist)."""
    ids = {
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    } - {None}
    return sorted(ids)
