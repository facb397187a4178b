"""``SwitchGate``: writes run side by side; a backend switch waits for them and runs alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SwitchGate:
    """Many writers at once (shared) or one switch alone (exclusive), switches first.

    A write reads the front, writes it and mirrors to the back: swapping the two in the
    middle would mirror the wrong way (and could erase the acknowledged entry).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._writers = 0
        self._switching = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._switching)
            self._writers += 1
        try:
            yield
        finally:
            with self._cond:
                self._writers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._switching)
            self._switching = True  # new writers wait from here on
            self._cond.wait_for(lambda: self._writers == 0)
        try:
            yield
        finally:
            with self._cond:
                self._switching = False
                self._cond.notify_all()
