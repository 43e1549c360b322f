"""The real Qwen3 tokenizer with its vocabulary trimmed to what a task uses.

A 150k-row embedding would dominate a tiny demo model. Trimming keeps: the 256 byte tokens (so
any text still encodes, byte by byte at worst), every token that the full tokenizer produces on
the task's texts together with the merge ancestry of each, and all special tokens. Only merges
between kept tokens are kept, in their original order. For any text whose full-vocabulary
encoding uses kept tokens only, byte-level BPE then picks the same merges in the same order, so
the trimmed tokenizer gives the same tokens (renumbered); the chat template, pre-tokenizer and
decoder are the original ones. The result is an ordinary transformers tokenizer folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pgpo.outputs import json_text

BYTE_TOKENS = 256  # byte-level BPE: ids 0..255 are the single-byte symbols


def _ancestry(token: str, parents: dict[str, tuple[str, str]], keep: set[str]) -> None:
    stack = [token]
    while stack:
        t = stack.pop()
        if t in keep:
            continue
        keep.add(t)
        if t in parents:
            stack.extend(parents[t])


def trim_tokenizer(source: str | Path, texts: Iterable[str], out: str | Path) -> dict[int, int]:
    """Write a trimmed copy of the tokenizer folder ``source`` to ``out``; return the map from
    original to new token ids. ``texts``: everything the task will encode (chat-rendered
    prompts and responses)."""
    from transformers import AutoTokenizer

    source, out = Path(source), Path(out)
    full = AutoTokenizer.from_pretrained(str(source))
    spec = json.loads((source / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]
    ]
    parents = {a + b: (a, b) for a, b in merges}
    special_ids = {t["id"] for t in spec["added_tokens"]}

    keep: set[str] = {by_id[i] for i in range(BYTE_TOKENS)}
    for text in texts:
        for i in full(text, add_special_tokens=False)["input_ids"]:
            if i not in special_ids:
                _ancestry(by_id[i], parents, keep)

    regular = sorted(keep, key=vocab.__getitem__)
    new_vocab = {t: n for n, t in enumerate(regular)}
    id_map = {vocab[t]: n for t, n in new_vocab.items()}
    for n, added in enumerate(sorted(spec["added_tokens"], key=lambda t: t["id"])):
        id_map[added["id"]] = len(regular) + n
    spec["model"]["vocab"] = new_vocab
    spec["model"]["merges"] = [
        [a, b] for a, b in merges if a in keep and b in keep and a + b in keep
    ]
    for added in spec["added_tokens"]:
        added["id"] = id_map[added["id"]]

    config = json.loads((source / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(id_map[int(i)]): entry for i, entry in config.get("added_tokens_decoder", {}).items()
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json_text(spec, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json_text(config, ensure_ascii=False, indent=1))
    (out / "vocab.json").write_text(json_text(new_vocab, ensure_ascii=False))
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in spec["model"]["merges"])
    )
    return id_map
