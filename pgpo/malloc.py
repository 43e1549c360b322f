"""The C library's malloc, set for the project's many short-lived temporaries."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> None:
    """Let the C library's malloc keep freed blocks for reuse: a process-wide setting, made by the
    commands at start-up (``pgpo``, ``pgpo-sde``, ``pgpo-check``), never on import.

    The SDE toolkit's temporaries are a few MB each (``[paths, batches]`` float64). glibc serves
    such a block with a fresh ``mmap`` and unmaps it when it is freed, so every temporary pays
    page faults for all of its pages. Raising the mmap threshold (to glibc's 32 MiB maximum) and
    the trim threshold keeps them on the heap: C8's ballistic cells take 0.45 of the time
    (``benchmarks/bench_report.py``). The LM head's ``[chunk, V]`` arrays, larger than the
    ceiling at Qwen3's vocabulary, are buffers allocated once per call instead
    (:class:`pgpo.reduction.ChunkBuffers`). Results are unchanged; elsewhere than glibc, a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD: free heap kept before returning it
    except (OSError, AttributeError):
        pass
