"""Every command the README and docs/ show is accepted as written: its arguments parse with the
command's own parser, and a training config (preset plus key=value overrides) passes the same
validation that `pgpo train` runs before loading a model. Running them all would take hours (the
demo alone is 5 minutes); what they do is tested elsewhere."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pgpo.cli import build_parser as pgpo_parser
from pgpo.train.config import PRESETS, load_config
from pgpo.train.gpu_check import build_parser as check_gpu_parser
from pgpo.train.gpu_smoke import build_parser as smoke_parser
from proofs_checks.cli import build_parser as check_parser
from sde.cli import build_parser as sde_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("pgpo ", "pgpo-sde ", "pgpo-check ", "torchrun ", "python -m pgpo.")


def doc_commands() -> list[tuple[str, str]]:
    """(page:line, command) for each command line in a code block (fenced or indented)."""
    found = []
    for page in PAGES:
        fenced = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                fenced = not fenced
                continue
            if not (fenced or line.startswith("    ")):
                continue
            for part in line.strip().split("&&"):  # `... && pgpo demo` in an install line
                text = re.sub(r"\s+#\s.*$", "", part.strip())  # a trailing comment
                if text.startswith(PROGRAMS):
                    found.append((f"{page.name}:{number}", text))
    return found


COMMANDS = doc_commands()


def test_the_docs_show_commands_of_every_program():
    programs = {cmd.split()[0] for _, cmd in COMMANDS}
    assert {"pgpo", "pgpo-sde", "pgpo-check", "torchrun", "python"} <= programs
    assert len(COMMANDS) > 25


def _check_train_config(args) -> None:
    """A preset's or an existing file's config with the overrides, as `pgpo train` checks it.
    A config file that a previous command writes (runs/...) is checked as the preset it
    came from."""
    config = args.config
    if not (PRESETS / f"{config}.yaml").exists() and not Path(config).exists():
        config = Path(config).parent.name  # runs/tiny-cpu/config.yaml -> tiny-cpu
    load_config(config, args.overrides)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_is_accepted(where, command):
    argv = shlex.split(command)
    if argv[0] == "torchrun":  # torchrun ... -m pgpo.train ARGS == pgpo train ARGS
        module = argv.index("-m")
        assert argv[module + 1] in ("pgpo.train", "pgpo.cli"), where
        rest = argv[module + 2 :]
        argv = ["pgpo", *(["train"] if argv[module + 1] == "pgpo.train" else []), *rest]
    if argv[:3] == ["python", "-m", "pgpo.train"]:
        argv = ["pgpo", "train", *argv[3:]]
    if argv[:3] == ["python", "-m", "pgpo.train.gpu_smoke"]:
        smoke_parser().parse_args(argv[3:])
        return
    if argv[:3] == ["python", "-m", "pgpo.train.gpu_check"]:
        check_gpu_parser().parse_args(argv[3:])
        return
    parser = {"pgpo": pgpo_parser, "pgpo-sde": sde_parser, "pgpo-check": check_parser}[argv[0]]
    args = parser().parse_args(argv[1:])
    if argv[1] in ("train", "eval", "teacher-check"):
        _check_train_config(args)
    elif argv[1] == "sweep":
        from pgpo.train.sweep import expand

        expand(ROOT / args.grid)  # every run of the shipped grid validates
    elif argv[1] == "demo":
        load_config("demo", args.overrides)
