"""torch.distributed for the trainer: the process group ``torchrun`` describes, FSDP2 sharding,
full weights for rollout engines and checkpoints, and sums over ranks.

In a single process (no ``torchrun``) :class:`World` has size 1 and every function here is the
identity, so the trainer has one code path. Launch::

    torchrun --nproc-per-node 4 -m pgpo.train --config qwen3-8b-pgpo
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pgpo.train.config import FSDPConfig
from pgpo.train.models.model import torch_dtype

# torch's checkpoint_wrapper puts this in front of the wrapped layer's parameter names.
WRAPPED = "_checkpoint_wrapped_module."


def process_group_backend(cuda: bool) -> str:
    """The process group's backends: NCCL for CUDA tensors and, with CUDA, gloo beside it for CPU
    tensors, which CPU-offloaded FSDP2 shards are (their gradient-norm and ``full_tensor``
    collectives fail on an NCCL-only group); gloo alone without CUDA."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def _device() -> str:
    """Where the trainer's own collectives' tensors live: CUDA when NCCL is in the group."""
    return "cuda" if "nccl" in str(dist.get_backend()) else "cpu"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes. ``distributed``: launched by
    torchrun (even with one rank: FSDP2 then still shards onto one GPU and can offload)."""

    rank: int = 0
    size: int = 1
    distributed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Elementwise sum over ranks (float64); the values themselves on a single process."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        if not self.distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def gather(self, items: list) -> list:
        """Every rank's ``items`` (picklable), concatenated in rank order; on the main process
        only (the other ranks get ``[]``). ``items`` itself on a single process."""
        if not self.distributed:
            return list(items)
        parts = [None] * self.size if self.main else None
        dist.gather_object(list(items), parts, dst=0)
        return [x for part in parts for x in part] if self.main else []

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_world() -> World:
    """Join the process group ``torchrun`` set up (it sets ``LOCAL_RANK``): NCCL on GPUs, gloo
    on CPUs. A plain process gets ``World()``."""
    if "LOCAL_RANK" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(process_group_backend(cuda))
    return World(dist.get_rank(), dist.get_world_size(), distributed=True)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from all ranks if it is a sharded DTensor (a collective: every
    rank must call it), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_named_tensors(lm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every state-dict entry of a transformers causal LM, one at a
    time (peak extra memory: the largest tensor), with transformers' names even when the layers
    are wrapped for activation checkpointing. Under FSDP2 every rank must consume it in step."""
    for name, tensor in lm.state_dict().items():
        yield name.replace(WRAPPED, ""), full(tensor).detach()


def shard(
    policy: torch.nn.Module, lm: torch.nn.Module, cfg: FSDPConfig, *, trainable: bool
) -> None:
    """FSDP2 in place: ``fully_shard`` on each decoder layer of ``lm``, then on ``policy`` (the
    :class:`~pgpo.train.models.forward.Policy` holding it) for the rest (embedding, final norm, LM
    head). Parameters stay in their dtype (the fp32 master weights); forward and backward run in
    ``cfg.compute_dtype``, gradients are reduced in fp32. Activation checkpointing (trainable
    models only) is applied first, per layer; ``cpu_offload`` keeps shards and optimizer state
    in CPU memory."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.cpu_offload and device == "cpu":
        raise ValueError("fsdp.cpu_offload=true needs GPUs (without them shards are in CPU memory)")
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    compute = torch_dtype(cfg.compute_dtype)
    options = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    )
    layers = lm.get_decoder().layers
    if cfg.activation_checkpointing and trainable:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i])
    for layer in layers:
        fully_shard(layer, **options)
    # The root's parameters (embedding, LM head) stay gathered after its forward by default,
    # for the backward that follows; a teacher has no backward, so it gives them back at once.
    fully_shard(policy, reshard_after_forward=not trainable, **options)


def full_state_dict(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The causal LM's state dict with whole tensors on the CPU and transformers' names (what a
    single process saves). A collective under FSDP2."""
    return {name: t.cpu().clone() for name, t in full_named_tensors(lm)}


def load_full_state_dict(
    lm: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Load whole tensors (as written by :func:`full_state_dict`) into a causal LM whose
    parameters may be sharded: each rank copies its own shard. ``strict=False``: only the
    entries ``state`` has (LoRA adapters over a base loaded otherwise)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = lm.state_dict()
    mapped = {}
    for name, target in own.items():
        if not strict and name.replace(WRAPPED, "") not in state:
            continue
        source = state[name.replace(WRAPPED, "")]
        if isinstance(target, DTensor):
            source = distribute_tensor(
                source.to(target.dtype), target.device_mesh, target.placements
            )
        mapped[name] = source
    lm.load_state_dict(mapped, strict=strict)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict with every DTensor state gathered whole onto the CPU (moments of
    a sharded model), so that a run on any number of ranks can continue from it."""
    state = optimizer.state_dict()
    return {
        "state": {
            k: {n: full(v).cpu().clone() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`full_optimizer_state` for sharded parameters: each rank keeps its
    shard of every moment (steps and other scalars as they are)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for key, entry in state["state"].items():
        p = params[int(key)]
        out = {}
        for name, value in entry.items():
            if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
            out[name] = value
        sharded[key] = out
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})
