"""LoRA through peft (``model.lora``): low-rank adapters on a frozen base, an adapter teacher.

``apply`` injects peft's LoRA layers into the causal LM in place (``W x + s B A x`` with
``s = alpha / rank``, B zero at the start, so the adapted model starts as the base) and freezes
everything else: the optimizer sees only the adapters. The model keeps its class and its step
interface; the adapters appear in its state dict under peft's names
(``...q_proj.lora_A.default.weight``).

The teacher over LoRA is a set of adapter tensors over the same frozen base, swapped into the
student's adapters for the teacher's forward (:func:`swapped`): an EMA teacher is an EMA of the
adapters, a frozen teacher is the initial adapters (B = 0: the base itself), never a second copy
of the base. Rollout engines and ``pgpo export`` take the merged weights ``W + s B A`` under
transformers' names (:func:`merged_named_tensors`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from pgpo.train.models.distributed import WRAPPED, full, full_named_tensors

ADAPTER = ".lora_"  # in the state-dict name of every adapter tensor


def is_adapter(name: str) -> bool:
    return ADAPTER in name


def apply(lm: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]):
    """Inject LoRA adapters of ``rank`` into ``lm``'s modules named in ``targets`` (in place,
    peft's initialisation from the global RNG); only the adapters train. Returns ``lm``."""
    import peft

    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none"
    )
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            peft.get_peft_model(lm, config)  # injects into lm itself and freezes its base
    except ValueError as err:  # e.g. no module matches target_modules
        raise ValueError(f"model.lora: {str(err).splitlines()[0]}") from None
    return lm


def adapters(lm: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter parameters ``(state-dict name, parameter)``, in the model's order, under
    transformers' names (as in checkpoints, also when layers are wrapped for activation
    checkpointing)."""
    return [(n.replace(WRAPPED, ""), p) for n, p in lm.named_parameters() if is_adapter(n)]


def adapter_state(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as whole tensors on the CPU, by name (under FSDP2 each is gathered: a
    collective; the frozen base is not touched)."""
    return {name: full(p).detach().cpu().clone() for name, p in adapters(lm)}


def has_adapters(lm: torch.nn.Module) -> bool:
    return any(is_adapter(n) for n, _ in lm.named_parameters())


@contextlib.contextmanager
def swapped(params: list[torch.Tensor], values: list[torch.Tensor]):
    """``params`` hold ``values`` inside the block and their own values again after it
    (exchanged in place, bit for bit; under FSDP2 each rank exchanges its shards)."""
    with torch.no_grad():
        kept = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)


def scalings(lm: torch.nn.Module) -> dict[str, float]:
    """``s = alpha / rank`` of each adapted module, by its name (peft's own value)."""
    from peft.tuners.lora import LoraLayer

    return {
        name.replace(WRAPPED, ""): module.scaling["default"]
        for name, module in lm.named_modules()
        if isinstance(module, LoraLayer)
    }


def merged_named_tensors(lm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of the causal LM with every adapter merged, ``W + s B A``
    (``W [out, in]``, ``A [rank, in]``, ``B [out, rank]``), under transformers' names: what a
    plain model of the base's class loads. Without adapters: :func:`full_named_tensors`. One
    adapted module is held at a time; under FSDP2 every rank must consume it in step."""
    scale = scalings(lm) if has_adapters(lm) else {}
    held: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in full_named_tensors(lm):
        module = next((m for m in (name.rsplit(".", k)[0] for k in (2, 3)) if m in scale), None)
        if module is None:
            yield name, tensor
            continue
        part = name[len(module) + 1 :]  # base_layer.weight / .bias, lora_A.default.weight, ...
        parts = held.setdefault(module, {})
        parts[part] = tensor
        if part.startswith("base_layer.") and part != "base_layer.weight":
            yield f"{module}.{part.removeprefix('base_layer.')}", parts.pop(part)
        if {"base_layer.weight", "lora_A.default.weight", "lora_B.default.weight"} <= set(parts):
            w = parts["base_layer.weight"]
            a, b = parts["lora_A.default.weight"], parts["lora_B.default.weight"]
            delta = (b.to(torch.float32) @ a.to(torch.float32)) * scale[module]
            yield f"{module}.weight", (w.to(torch.float32) + delta).to(w.dtype)
            del held[module]
