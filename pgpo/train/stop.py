"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what schedulers and ``torchrun`` send).

The first signal asks the loop to stop after the step in progress: it writes a checkpoint and
ends with exit code 128 + the signal's number, so ``--resume`` continues exactly. A second signal
stops at once, like an ordinary Ctrl-C.
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context manager that catches the first SIGINT / SIGTERM; ``signal`` is its number, or
    0 while none came. Outside the main thread (where Python cannot take signals) it does
    nothing."""

    def __init__(self) -> None:
        self.signal = 0
        self._previous: dict = {}

    def _handle(self, number, frame) -> None:
        if self.signal:
            raise KeyboardInterrupt
        self.signal = number
        name = signal.Signals(number).name
        print(f"\npgpo: {name}: stopping after this step (again to stop at once)", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
