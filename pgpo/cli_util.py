"""Command-line plumbing shared by ``pgpo``, ``pgpo-sde`` and ``pgpo-check``.

One error path for every command: a user mistake (bad argument, bad value, bad file), a file
system failure (no permission, a full disk) or an interruption ends with one line on stderr and
exit code 2 (130 for Ctrl-C, 143 for SIGTERM), never a traceback; and the argument types the
commands share. What the commands write is :mod:`pgpo.outputs`'s; the folder lock,
:mod:`pgpo.locking`'s; the malloc setting, :mod:`pgpo.malloc`'s.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

from pgpo.multiplier import MAX_ALPHA, MAX_RHO_MAX

USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


class Interrupted(Exception):
    """The run was stopped by a signal after saving what it could; ``code`` is the exit code
    (128 + the signal's number) and the message says how to continue."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage + message -> one line
        raise UserError(message)


def os_error_text(err: OSError) -> str:
    """An OSError in one line that names the file and, for a full disk, says so."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"no space left on device{where}: free some space, then run again"
    return f"{err.strerror or err}{where}"


def run(main: Callable[[list[str] | None], int], prog: str, argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; turn UserError/ValueError/OSError into ``prog: error: ...`` and exit
    2 (``PGPO_DEBUG=1`` re-raises them with their traceback)."""
    try:
        return main(argv)
    except (UserError, ValueError, OSError) as err:
        if os.environ.get("PGPO_DEBUG"):  # a ValueError can also be a bug: show the traceback
            raise
        text = os_error_text(err) if isinstance(err, OSError) else str(err)
        # One line, printable whatever the input held (a non-UTF-8 byte arrives as a surrogate).
        text = " ".join(text.split()).encode("utf-8", "backslashreplace").decode("utf-8")
        print(f"{prog}: error: {text}", file=sys.stderr)
        return USER_ERROR
    except Interrupted as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def bounded_float(name: str, low: float, high: float, low_open: bool = False):
    """An argparse type for a float in ``[low, high]`` (``(low, high]`` when ``low_open``): the
    same bounds as the training config's field of the same meaning."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        inside = (value > low if low_open else value >= low) and value <= high
        if not inside:
            left = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"{name} must be in {left}{low:g}, {high:g}], got {text}"
            )
        return value

    return parse


def alpha_arg(text: str) -> float:
    """``--alpha``: in (0, MAX_ALPHA], as ``pgpo.alpha``."""
    return bounded_float("alpha", 0.0, MAX_ALPHA, low_open=True)(text)


def rho_max_arg(text: str) -> float:
    """``--rho-max``: in [1, MAX_RHO_MAX], as ``pgpo.rho_max``."""
    return bounded_float("rho_max", 1.0, MAX_RHO_MAX)(text)


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text}")
    return value
