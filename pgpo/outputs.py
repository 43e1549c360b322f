"""Files that commands write: JSON every reader accepts, and output folders that appear complete
or not at all (nothing that a command did not write is ever replaced or removed); where built
models are cached."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path

from pgpo.cli_util import UserError


def default_cache() -> Path:
    """Where built models are kept and reused: ``$PGPO_CACHE``, else ``~/.cache/pgpo``."""
    return Path(os.environ.get("PGPO_CACHE", Path.home() / ".cache" / "pgpo"))


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
