"""Folder locks: one writer per output folder, and one builder per cached folder.

Both are the kernel's ``flock`` on a folder itself, so no lock file is ever left behind: the lock
goes with the process that holds it (also when it is killed), and the next writer finds the
folder free. Where ``fcntl`` does not exist (not POSIX), there is no lock.

- :func:`exclusive` refuses a second writer at once (a run folder, a study's ``--out``), naming
  the process that holds the folder, read from the kernel's table of locks (``/proc/locks``).
- :func:`one_writer` makes a second builder of a cache wait, then find the cache built.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None


class FolderInUse(ValueError):
    """Another process is writing into the folder (one line: the folder and its holder)."""


def holder(folder: str | os.PathLike) -> int | None:
    """The process id that holds ``folder``'s exclusive lock, as the kernel lists it in
    ``/proc/locks`` (``None``: not locked, or no such table here)."""
    try:
        st = os.stat(folder)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 2531 fe:00:2146371 0 EOF" ("->" marks a waiter)
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK" or fields[3] != "WRITE":
            continue
        if fields[5] == device and fields[4].isdigit():
            return int(fields[4])
    return None


def command_of(pid: int) -> str:
    """``pid``'s command line, shortened for a message (the interpreter and folders dropped); a
    worker of a ``multiprocessing`` pool is named by its parent's command."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ""
    args = [a for a in args if a]
    if "--multiprocessing-fork" in args:
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return "a worker process"
        return f"a worker of {parent}: {command_of(parent)}"
    if args and Path(args[0]).name.startswith("python") and len(args) > 1:
        args = args[1:] if args[1] == "-m" else [Path(args[1]).name, *args[2:]]
        if args[0] == "-m":
            args = args[1:]
    elif args:
        args[0] = Path(args[0]).name
    text = " ".join(args)
    return text if len(text) <= 300 else text[:297] + "..."


def _describe(pid: int | None) -> str:
    if pid is None:
        return "another process"
    command = command_of(pid)
    return f"process {pid}" + (f" ({command})" if command else "")


@contextmanager
def exclusive(folder: str | os.PathLike, name: str = "output.dir") -> Iterator[None]:
    """Hold ``folder`` (which must exist) for this process alone while the block runs. A folder
    already held by another process is refused at once: :class:`FolderInUse`, naming ``name``
    (the setting or option that chose the folder), the folder and the holder."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(
            f"{name} {folder} is in use: {_describe(holder(folder))} is writing there; wait "
            f"for it to end, or choose another {name}"
        ) from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def one_writer(path: str | os.PathLike) -> Iterator[None]:
    """Build ``path`` (a cached folder) in one process at a time: of several processes building
    into the same cache (two ``pgpo demo`` runs, two test workers), one builds and the others
    wait, then find it built. The lock is on the cache folder itself (the parent of ``path``)."""
    if fcntl is None:
        yield
        return
    root = Path(path).parent
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
