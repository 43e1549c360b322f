"""Rollouts with transformers' ``generate``: the embedded default engine (no extra install)."""

from __future__ import annotations

import copy

import torch

from pgpo.train.rollout import Completion, stop_token_ids


class HFRolloutEngine:
    """Sampling with transformers' ``generate``. By default on the policy itself (no weight
    copy); with ``own_copy`` on a private replica that ``sync_weights`` refreshes (needed when
    the policy is FSDP-sharded: each rank then samples its prompts from whole weights)."""

    def __init__(
        self,
        lm: torch.nn.Module,
        tokenizer,
        prompts_per_call: int = 16,
        *,
        own_copy: bool = False,
    ) -> None:
        self.own_copy = own_copy
        self.lm = copy.deepcopy(lm).eval() if own_copy else lm
        if own_copy:
            self.lm.requires_grad_(False)
            if torch.cuda.is_available():  # the sharded policy is on the GPU: sample there too
                self.lm.to("cuda")
        self.tokenizer, self.prompts_per_call = tokenizer, prompts_per_call
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.sleep_freed_gib: float | None = None  # it never sleeps

    def close(self) -> None:
        """Nothing to free: the engine is the policy, or a copy that goes with it."""

    @torch.no_grad()
    def sync_weights(self, lm: torch.nn.Module) -> None:
        if not self.own_copy:
            self.lm = lm  # the engine samples from the live policy
            return
        from pgpo.train.models.distributed import full_named_tensors

        own = self.lm.state_dict()
        for name, tensor in full_named_tensors(lm):
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
        was_training = self.lm.training
        self.lm.eval()
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
                device = self.lm.get_input_embeddings().weight.device
                generated = self.lm.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
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
            self.lm.train(was_training)
        return out

    def _cut(self, tokens: list[int]) -> Completion:
        for j, t in enumerate(tokens):
            if t in self.stop_ids:
                return Completion(tokens[: j + 1], finished=True)
        return Completion(tokens, finished=False)
