"""A checkpoint's policy (or EMA teacher) as a transformers model folder, for serving and
sharing: ``from_pretrained`` and ``vllm serve`` read it as they read Qwen3-8B's own folder."""

from __future__ import annotations

from pathlib import Path

import torch

from pgpo.outputs import json_text, output_files
from pgpo.train.config import ModelConfig, model_config
from pgpo.train.models import lora
from pgpo.train.models.model import TINY, from_pretrained, load_model, load_tokenizer, torch_dtype
from pgpo.train.run_folder import checkpoint
from pgpo.train.run_folder.model_card import model_card


def _empty_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """The checkpoint's architecture without reading any weights from disk (a real model is
    built on the meta device and filled by ``load_state_dict(assign=True)``)."""
    if cfg.path == TINY:
        return load_model(cfg, seed)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = from_pretrained(AutoConfig.from_pretrained, cfg.path, "model config")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _merged(cfg: ModelConfig, seed: int, adapters: dict, path: Path, role: str) -> dict:
    """The base model with ``role``'s LoRA adapters merged (``W + s B A``), as a plain state
    dict under transformers' names (the base read from model.path, or built from the seed)."""
    lm = load_model(cfg, seed)
    l = cfg.lora  # noqa: E741
    lora.apply(lm, l.rank, l.alpha, l.dropout, l.target_modules)
    result = lm.load_state_dict(adapters, strict=False)
    if result.unexpected_keys or any(lora.is_adapter(k) for k in result.missing_keys):
        raise checkpoint.CheckpointError(
            f"{path}: its {role} adapters do not fit its own model.lora settings"
        )
    return {name: t.clone() for name, t in lora.merged_named_tensors(lm)}


def export(path: Path, out: Path, role: str = "policy", dtype: str | None = None) -> Path:
    """Write ``role`` ("policy" or "teacher") of the checkpoint folder ``path`` (whole or
    sharded) to the new folder ``out``: config, safetensors weights in ``dtype`` (default: the
    training dtype), generation config, tokenizer, ``pgpo_export.json`` (source, step, role) and
    a model card as README.md (:mod:`pgpo.train.run_folder.model_card`). Atomic: ``out`` appears
    complete or not at all. An existing non-empty ``out`` is refused, not replaced; one that holds
    only the user's own README.md is filled around it, the README kept."""
    path, out = Path(path), Path(out)
    # A folder holding only the user's own README.md (their model card) is filled around it.
    if out.exists() and (not out.is_dir() or any(p.name != "README.md" for p in out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not empty")
    state = checkpoint.load(path)
    if state.get("sharded"):  # only this model's shards are read, not the optimizer's
        weights = checkpoint.load_sharded_weights(path, role)
    else:
        weights = state.get(role)
    if weights is None:
        raise ValueError(f"{path}: holds no {role} weights (the teacher is the policy itself)")
    cfg = model_config(state["config"]["model"])
    seed = state["config"].get("seed", 0)
    if cfg.lora.rank:  # the checkpoint holds adapters: merged into the base they were trained on
        weights = _merged(cfg, seed, weights, path, role)
    model = _empty_model(cfg, seed)
    try:
        model.load_state_dict(weights, assign=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        reason = (str(err).strip().splitlines() or [repr(err)])[0]
        raise checkpoint.CheckpointError(
            f"{path}: its {role} weights do not fit its own model config ({reason})"
        ) from None
    model.tie_weights()  # assign=True replaces tied tensors one by one: tie them again
    model.to(torch_dtype(dtype or cfg.dtype)).eval()

    with output_files(out) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(cfg.tokenizer).save_pretrained(tmp)
        record = {"checkpoint": str(path.resolve()), "step": state["step"], "role": role}
        (tmp / "pgpo_export.json").write_text(json_text(record, indent=2) + "\n")
        if not (out / "README.md").exists():  # the user's own card is kept
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
            card = model_card(state["config"], state["step"], role, run_dir,
                              state.get("resumes", []))  # fmt: skip
            (tmp / "README.md").write_text(card)
    return out
