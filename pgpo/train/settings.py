"""Every training setting as a user sees it: ``pgpo config`` (the resolved configuration as YAML)
and ``pgpo config --keys`` (every key with its type, allowed values, default, whether a resume may
change it, and description).

The schema is read from :mod:`pgpo.train.config` itself, so that nothing is written twice: the
type and its allowed values from each field's annotation (``Literal``, ``Range``), the default
from the dataclass, and the description from the comment written next to the field (the lines
directly above it and a comment at the end of its line). docs/trainer.md's settings reference is
this module's markdown output; a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from dataclasses import dataclass

import yaml

from pgpo.train.config import RESUMABLE, TrainConfig, _describe, to_dict


@dataclass(frozen=True)
class Key:
    """One setting: its dotted name, declared type in words, default and description."""

    name: str
    type: str
    default: object
    description: str
    resumable: bool = False  # whether --resume may change it (pgpo.train.config.RESUMABLE)


def _comments(cls) -> dict[str, str]:
    """Field name -> the comment next to it in ``cls``'s source: the comment lines directly
    above the field, then the comment at the end of its line, joined into one line."""
    lines, _ = inspect.getsourcelines(cls)
    source = "".join(lines)
    at_end = {}  # line number -> comment at the end of a code line
    whole = {}  # line number -> a comment line on its own
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (whole if not tok.line[: tok.start[1]].strip() else at_end)[tok.start[0]] = text
    out, above = {}, []
    for number, line in enumerate(lines, 1):
        if number in whole:
            above.append(whole[number])
            continue
        name = line.strip().split(":", 1)[0]
        if name.isidentifier() and ":" in line and not line.lstrip().startswith(("def ", "@")):
            out[name] = " ".join([*above, at_end.get(number, "")]).strip()
        above = []
    return out


def keys(cls=TrainConfig, prefix: str = "") -> list[Key]:
    """Every leaf setting of ``cls`` (a config dataclass), in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    comments = _comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += keys(hint, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        name = prefix + f.name
        out.append(Key(name, _describe(hint), default, comments.get(f.name, ""), name in RESUMABLE))
    return out


def resolved_yaml(cfg: TrainConfig) -> str:
    """The configuration as YAML that ``pgpo train --config`` reads back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _value(v: object) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...")


def _on_resume(k: Key) -> str:
    return "may change on --resume" if k.resumable else "fixed for a run"


def keys_text(rows: list[Key]) -> str:
    """``pgpo config --keys``: one block per key."""
    blocks = []
    for k in rows:
        blocks.append(f"{k.name}: {k.type}, default {_value(k.default)}, {_on_resume(k)}")
        if k.description:
            blocks.append(f"    {k.description}")
    return "\n".join(blocks) + "\n"


def keys_markdown(rows: list[Key]) -> str:
    """The settings reference of docs/trainer.md: a table per section."""
    out, section = [], None
    for k in rows:
        head = k.name.split(".")[0] if "." in k.name else "(top level)"
        if head != section:
            section = head
            out += ["", f"**{head}**", "", "| key | type | default | on --resume | description |"]
            out += ["|---|---|---|---|---|"]
        resume = "may change" if k.resumable else "fixed"
        cells = [f"`{k.name}`", k.type, f"`{_value(k.default)}`", resume, k.description]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out).strip() + "\n"
