"""What the step computes with a model: the hidden states that predict the response tokens and,
from them and the LM head, the loss.

:class:`Policy` puts both in one ``forward``. The step calls nothing else on a model, so when
FSDP2 shards it (``fully_shard`` per decoder layer and on this module as the root) the
embedding and the LM head are gathered for that forward and their gradients reduce-scattered
after its backward, exactly as for the decoder layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def response_hidden(
    lm: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], pad_id: int
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
    device = lm.get_input_embeddings().weight.device
    hidden = lm.get_decoder()(
        input_ids=ids.to(device), attention_mask=attention.to(device)
    ).last_hidden_state
    t_max = max(len(r) for r in responses)
    index = torch.zeros((len(seqs), t_max), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        # position p-1+t predicts response token t
        index[i, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
    index = index.to(hidden.device)
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def head_weight(lm: torch.nn.Module) -> torch.Tensor:
    """The LM head's ``[V, H]`` weight (the fused loss has no place for a bias)."""
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported by the fused loss")
    return head.weight


LossFn = Callable[[torch.Tensor, torch.Tensor], object]


class Policy(torch.nn.Module):
    """A causal LM (``lm``, a transformers ``*ForCausalLM``) seen through the step's one call.

    ``policy(prompts, responses, pad_id)`` returns the response hidden states ``[B, T, H]``;
    with ``loss_fn`` it returns ``loss_fn(hidden, head_weight)`` instead, computed inside the
    forward (where FSDP2 has the head gathered)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        pad_id: int,
        loss_fn: LossFn | None = None,
    ):
        hidden = response_hidden(self.lm, prompts, responses, pad_id)
        return hidden if loss_fn is None else loss_fn(hidden, head_weight(self.lm))


def backward_micro_batches(
    policy: Policy,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    rows: list[int],
    size: int,
    loss_for: Callable[[list[int], int], LossFn],
    ranks: int = 1,
) -> Iterator[tuple[list[int], object]]:
    """The step's forward and backward over ``rows`` (indices into ``prompts`` and
    ``responses``), ``size`` sequences at a time: each micro-batch runs ``policy`` with
    ``loss_for(its rows, its longest response)`` and backpropagates that loss (the output itself,
    or its ``.loss``) times ``ranks``, since FSDP2 averages gradients over ranks and each rank's
    loss is its share of the batch's. Gradients accumulate in ``.grad``; yields each micro-batch's
    rows and output."""
    for start in range(0, len(rows), size):
        picked = rows[start : start + size]
        mb_responses = [responses[i] for i in picked]
        width = max(len(r) for r in mb_responses)
        out = policy([prompts[i] for i in picked], mb_responses, pad_id, loss_for(picked, width))
        loss = out if isinstance(out, torch.Tensor) else out.loss
        (loss * ranks).backward()
        yield picked, out
