"""Command-line plumbing shared by ``pgpo``, ``pgpo-sde`` and ``pgpo-check``.

One error path for every command: a user mistake (bad argument, bad value, bad file), a file
system failure (no permission, a full disk) or an interruption ends with one line on stderr and
exit code 2 (130 for Ctrl-C, 143 for SIGTERM), never a traceback. Outputs are written to a
temporary folder and moved into place only when complete; nothing that a command did not write
is ever replaced or removed.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path

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


def default_cache() -> Path:
    """Where built models are kept and reused: ``$PGPO_CACHE``, else ``~/.cache/pgpo``."""
    return Path(os.environ.get("PGPO_CACHE", Path.home() / ".cache" / "pgpo"))


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


def json_text(data, **kwargs) -> str:
    """``data`` as JSON text that every reader accepts. A NaN or an infinity, which Python's
    ``json`` writes as ``NaN``/``Infinity`` (not JSON), becomes null, JSON's missing value: a
    diverged estimate or a NaN loss is recorded as missing, and the rest of the file is kept."""
    return json.dumps(_finite(data), allow_nan=False, **kwargs)


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


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


def keep_freed_memory() -> None:
    """Let the C library's malloc keep freed blocks for reuse: a process-wide setting, made by the
    commands at start-up (``pgpo``, ``pgpo-sde``, ``pgpo-check``), never on import.

    The SDE toolkit's temporaries are a few MB each (``[paths, batches]`` float64). glibc serves
    such a block with a fresh ``mmap`` and unmaps it when it is freed, so every temporary pays
    page faults for all of its pages. Raising the mmap threshold (to glibc's 32 MiB maximum) and
    the trim threshold keeps them on the heap: C8's ballistic cells take 0.45 of the time
    (``benchmarks/bench_report.py``). The trainer's LM head allocates ``[chunk, V]`` float32
    temporaries of 19 MB per chunk of 32 tokens at Qwen3's vocabulary, which stay on the heap
    the same way. Results are unchanged; elsewhere than glibc, a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD: free heap kept before returning it
    except (OSError, AttributeError):
        pass


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


def check_output(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output location that :func:`output_files` could not fill:
    an existing file, or a place where no folder can be made. Leaves nothing behind."""
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise UserError(f"{final} exists and is not a folder")
    existing = final if final.exists() else next(p for p in final.absolute().parents if p.exists())
    try:  # a folder can be made there (the probe is removed at once)
        os.rmdir(tempfile.mkdtemp(prefix=".pgpo-probe-", dir=existing))
    except OSError as err:  # name what the user gave, not the probe
        raise OSError(
            err.errno, f"{err.strerror}: cannot write into {existing}", str(final)
        ) from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_abandoned(final: Path) -> None:
    """Remove the temporary folders that earlier writers of ``final`` left when they were killed
    (SIGKILL, a power cut): ``.NAME.tmp-PID-*`` whose process no longer runs. A live writer's
    folder is left alone."""
    for stale in final.parent.glob(f".{glob_escape(final.name)}.tmp-*"):
        pid = stale.name.removeprefix(f".{final.name}.tmp-").split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def output_files(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder for a command's outputs; on success they land in ``path``.

    A new ``path`` appears at once, complete (one rename). An existing folder keeps everything
    in it: each output file replaces only the file of the same name. ``path`` must be a folder
    or not exist. On any error the temporary folder is removed and ``path`` is left as it was.
    """
    final = Path(path)
    check_output(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make the result private
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if not final.exists():
            tmp.rename(final)
            return
        for item in sorted(tmp.rglob("*")):  # parents before their contents
            target = final / item.relative_to(tmp)
            if item.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
