"""The writer lock: ``flock`` on the root segment, with a thread lock in front.

Why flock: the kernel drops it when its holder dies, SIGKILL included, so a crashed writer
never wedges the registry (POSIX semaphores and ``multiprocessing.Lock`` stay locked
forever). It costs about half a microsecond.

Two traps it comes with, both handled here:

* flock belongs to the open file description, so threads sharing one fd do not exclude
  each other: a per-object ``threading.Lock`` serialises them first.
* A forked child inherits the fd and with it the parent's lock: it could "acquire" while
  the parent holds it, and unlocking would release the parent's lock. After a fork every
  lock reopens its file, and its thread lock is replaced (the parent's threads do not
  exist in the child).

The crash-recovery hook (owner words, redo journal) lives with the table; this module only
excludes.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref

from shmreg._errors import RegistryClosed, RegistryDestroyed, RegistryTimeout

_LIVE_LOCKS: weakref.WeakSet[WriterLock] = weakref.WeakSet()


class WriterLock:
    """Process- and thread-exclusive lock on one file, safe across fork and SIGKILL."""

    def __init__(self, path: str, registry: str) -> None:
        self._path = path
        self._registry = registry
        self._thread_lock = threading.Lock()
        self._closed = False
        self._fd = self._open()
        _LIVE_LOCKS.add(self)

    def _open(self) -> int:
        try:
            return os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return -1

    def acquire(self, timeout: float | None = None) -> None:
        if timeout is None:
            self._thread_lock.acquire()
        elif not self._thread_lock.acquire(timeout=max(timeout, 0.0)):
            raise RegistryTimeout(
                f"writer lock of {self._registry!r} not acquired in {timeout} s", timeout=timeout
            )
        try:
            if self._fd < 0:
                if self._closed:
                    raise RegistryClosed(
                        f"registry {self._registry!r} is closed in this process",
                        name=self._registry,
                    )
                # Only a fork can get here: the child found the root file already unlinked.
                raise RegistryDestroyed(
                    f"registry {self._registry!r} was destroyed", name=self._registry
                )
            if timeout is None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            else:
                self._acquire_polling(timeout)
        except BaseException:
            self._thread_lock.release()
            raise

    def _acquire_polling(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegistryTimeout(
                        f"writer lock of {self._registry!r} not acquired in {timeout} s",
                        timeout=timeout,
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.005)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        self._closed = True
        _LIVE_LOCKS.discard(self)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _after_fork_in_child(self) -> None:
        # Closing the inherited fd does not release the parent's flock: the parent still
        # holds a reference to the same open file description.
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = self._open()
        self._thread_lock = threading.Lock()


def _reopen_all_after_fork() -> None:
    for lock in list(_LIVE_LOCKS):
        lock._after_fork_in_child()


os.register_at_fork(after_in_child=_reopen_all_after_fork)
