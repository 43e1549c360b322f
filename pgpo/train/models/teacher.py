"""The self-teacher: the same network, conditioned on a demonstration.

``ema``: a separate copy from the initial weights, after each finite step
``theta_T <- (1 - r) theta_T + r theta_S`` (r = 0.05 in the reference; r = 0 is frozen);
``frozen``: the initial weights; ``live``: the current policy itself (the paper's Eq. 2);
``trust_region``: logits ``lerp(z_ref, z_S, r)``, the frozen initial weights as ref and the
current policy, both on the teacher's prompt (the reference's trust-region teacher).

Over LoRA (``model.lora``) the teacher is adapter tensors on the student's own frozen base
(:class:`AdapterTeacher`): the same rules act on the adapters alone.
"""

from __future__ import annotations

import copy

import torch

from pgpo.train.models import lora
from pgpo.train.models.distributed import full
from pgpo.train.models.forward import Policy, head_weight


class AdapterTeacher(torch.nn.Module):
    """The teacher's network over LoRA: the student's modules, with the teacher's adapter
    values (``values``, one per adapter parameter, sharded like them) swapped in for each call,
    in eval mode (no adapter dropout). Nothing of the base is copied."""

    def __init__(self, student: Policy, values: list[torch.Tensor]) -> None:
        super().__init__()
        self._student = [student]  # a list: not registered as a submodule a second time
        self.values = values

    @property
    def lm(self) -> torch.nn.Module:
        return self._student[0].lm

    def forward(self, *args, **kwargs):
        student = self._student[0]
        was_training = student.training
        with lora.swapped([p for _, p in lora.adapters(student.lm)], self.values):
            student.eval()
            try:
                return student(*args, **kwargs)
            finally:
                student.train(was_training)


class Teacher:
    """The teacher's network (``policy``, a :class:`Policy` around the causal LM ``lm``) and its
    update rule. Built from the student's :class:`Policy`: a copy of it, or (``live``) itself."""

    def __init__(
        self,
        student: Policy,
        mode: str,
        ema_rate: float,
        dtype: torch.dtype | None = None,
        trust_region_rate: float = 0.05,
        temperature: float = 1.0,
    ) -> None:
        self.mode, self.ema_rate, self.trust_region_rate = mode, ema_rate, trust_region_rate
        self.temperature = temperature
        self.adapter_names: list[str] | None = None
        if mode == "live":
            self.policy = student
        elif lora.has_adapters(student.lm):  # built after sharding: values sharded alike
            named = lora.adapters(student.lm)
            self.adapter_names = [n for n, _ in named]
            self.policy = AdapterTeacher(student, [p.detach().clone() for _, p in named])
        else:
            self.policy = Policy(copy.deepcopy(student.lm)).eval()
            self.policy.requires_grad_(False)
            if dtype is not None:
                self.policy.to(dtype)

    @property
    def lm(self) -> torch.nn.Module:
        return self.policy.lm

    @torch.no_grad()
    def hidden_and_head(
        self, student: Policy, prompts: list[list[int]], responses: list[list[int]], pad: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's response hidden states ``[B, T, H']`` and head ``[V, H']``: its logits
        are ``hidden @ head.T``. For ``trust_region``, ``lerp(z_ref, z_S, r)`` is written as one
        pair of width 2H, ``[(1 - r) h_ref, r h_S] @ [W_ref, W_S].T``, so that the fused loss
        and Eq. 8's entropies see that teacher like any other. The teacher's temperature tau
        divides the head: logits ``z / tau``."""
        hidden = self.policy(prompts, responses, pad)
        head = full(head_weight(self.lm)).to(hidden.dtype)
        if self.mode == "trust_region":
            r = self.trust_region_rate
            h_student = student(prompts, responses, pad).to(hidden.dtype)
            head_student = full(head_weight(student.lm)).to(hidden.dtype)
            hidden = torch.cat([(1 - r) * hidden, r * h_student], -1)
            head = torch.cat([head, head_student], -1)
        return hidden, head if self.temperature == 1 else head / self.temperature

    @torch.no_grad()
    def update(self, student: Policy) -> None:
        """After a finite optimizer step (never after a skipped one). Under FSDP2 both are
        sharded alike, so each rank updates its own shards."""
        if self.mode != "ema" or self.ema_rate == 0:
            return
        if self.adapter_names is not None:  # the adapters' EMA; the base is shared and frozen
            pairs = zip(self.policy.values, (p for _, p in lora.adapters(student.lm)))
        else:
            pairs = zip(self.policy.parameters(), student.parameters())
        for t, s in pairs:
            t.lerp_(s.detach().to(t.dtype), self.ema_rate)

    def state_dict(self) -> dict | None:
        """The teacher's own weights (None for ``live``); over LoRA its adapters, whole (a
        collective under FSDP2)."""
        if self.adapter_names is not None:
            values = self.policy.values
            return {n: full(v).cpu().clone() for n, v in zip(self.adapter_names, values)}
        return None if self.mode == "live" else self.lm.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.mode == "live" or state is None:
            return
        if self.adapter_names is None:
            self.lm.load_state_dict(state)
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        if set(state) != set(self.adapter_names):
            raise KeyError("the teacher's adapters do not match this run's model.lora")
        with torch.no_grad():
            for name, value in zip(self.adapter_names, self.policy.values):
                source = state[name].to(value.dtype)
                if isinstance(value, DTensor):
                    source = distribute_tensor(source, value.device_mesh, value.placements)
                value.copy_(source)


def choose_demonstrations(
    rewards: list[list[float]], texts: list[list[str]], threshold: float, *, own_success_ok: bool
) -> list[list[str | None]]:
    """For each rollout, the first successful sibling's response (not its own unless allowed);
    None where there is none (the sample is then masked out of the loss)."""
    out = []
    for group_rewards, group_texts in zip(rewards, texts):
        winners = [j for j, r in enumerate(group_rewards) if r >= threshold]
        row = []
        for j in range(len(group_rewards)):
            pick = next((w for w in winners if own_success_ok or w != j), None)
            row.append(None if pick is None else group_texts[pick])
        out.append(row)
    return out
