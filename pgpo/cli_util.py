"""Command-line plumbing shared by ``pgpo``, ``pgpo-sde`` and ``pgpo-check``.

User mistakes (bad arguments, bad values) end with one line on stderr and exit code 2, never a
traceback; outputs are written to a temporary folder and moved into place only when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + message -> one line
        raise UserError(message)


def run(main: Callable[[list[str] | None], int], prog: str, argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; turn UserError/ValueError into ``prog: error: ...`` and exit 2
    (``PGPO_DEBUG=1`` re-raises them with their traceback)."""
    try:
        return main(argv)
    except (UserError, ValueError) as err:
        if os.environ.get("PGPO_DEBUG"):  # a ValueError can also be a bug: show the traceback
            raise
        message = " ".join(str(err).split())  # one line
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text}")
    return value


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` at once.

    On any error the temporary folder is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
