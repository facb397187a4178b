"""Identities of other processes, remembered for as long as a pidfd says each still runs.

Registering on behalf of another process (a supervisor its agents, a pool's parent its
workers) needs that process's identity: its start ticks from ``/proc/<pid>/stat`` and proof
that the pid names a process rather than a thread. That costs 5-30 µs, several times a whole
registration, and a supervisor pays it for the same few processes again and again.

A pidfd refers to one process for good. It becomes readable when that process exits (as a
zombie too), and a pid reused later belongs to a new process the old pidfd does not refer to.
``identity.identity_of`` opens one *before* it reads the stat, and polls it once after; while
polling it says the process has not exited, that process has held the pid since before the
read, so the identity read then is still its identity. A check costs a poll and an fstat
(~1 µs).

The fstat guards against code that closes descriptors it does not own (a daemon closing
every fd, say) and lets another file take the number: the descriptor must still be the file
it was. That test means something only where every process's pidfds have an inode of their
own (the kernel's pidfs, Linux 6.9 on); before that every pidfd, epoll and eventfd shared one
anonymous inode, so the cache stays off there (``enabled()``) and every registration reads
``/proc``. One case the test cannot see: our descriptor closed by someone else and its number
taken by another pidfd for the same process, which the cache would later close; closing
descriptors one did not open is a bug this module does not try to survive.

At most ``LIMIT`` processes are remembered, the least recently used forgotten first, so the
descriptors held stay few; pidfds are close-on-exec, so none leaks into a child's ``exec``.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable

from shmreg._types import ProcessIdentity

__all__ = ["LIMIT", "clear", "enabled", "forget", "known", "remember", "still_running", "watch"]

LIMIT = 128
_pidfd_open: Callable[[int], int] | None = getattr(os, "pidfd_open", None)


class _Watched:
    """One remembered identity and the pidfd that vouches for it."""

    __slots__ = ("fd", "file", "identity", "poller")

    def __init__(self, identity: ProcessIdentity, fd: int) -> None:
        self.identity, self.fd = identity, fd
        st = os.fstat(fd)
        self.file = (st.st_dev, st.st_ino)
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)

    def ours(self) -> bool:
        """``fd`` is still the file opened for this entry (nobody closed and reused it)."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.file

    def running(self) -> bool:
        """The process has not exited, and ``fd`` is still the pidfd opened for it."""
        return not self.poller.poll(0) and self.ours()


_known: dict[int, _Watched] = {}  # in order of use, the least recent first
# Held while an entry is checked or dropped: a descriptor closed by one thread while another
# polls it could be reused by a third file in between.
_lock = threading.Lock()
_enabled: bool | None = None


def enabled() -> bool:
    """Whether identities are remembered here: pidfds exist and each process's has an inode
    of its own (decided once, by opening one for this process and one for its parent)."""
    global _enabled
    if _enabled is None:
        _enabled = _pidfds_have_own_inodes()
    return _enabled


def _pidfds_have_own_inodes() -> bool:
    if _pidfd_open is None:
        return False
    fds: list[int] = []
    try:
        for pid in (os.getpid(), os.getppid()):
            fds.append(_pidfd_open(pid))
        a, b = (os.fstat(fd) for fd in fds)
        return (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino)
    except OSError:  # no pidfds (seccomp, an old kernel), no parent to open one for
        return False
    finally:
        for fd in fds:
            os.close(fd)


def watch(pid: int) -> int | None:
    """A pidfd for ``pid``, to open before reading its identity; None where there is none.

    None too when the cache is off, when ``pid`` is a thread that does not lead its process
    (the kernel refuses a pidfd for it), when it is gone, or when no descriptor is free: the
    caller then reads and checks the identity without remembering it.
    """
    if _pidfd_open is None or not enabled():
        return None
    try:
        return _pidfd_open(pid)
    except OSError:
        return None


def still_running(fd: int) -> bool:
    """Whether the process of the pidfd ``fd`` has not exited yet."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not poller.poll(0)


def remember(identity: ProcessIdentity, fd: int) -> None:
    """Keep ``identity``, read after ``fd`` was opened by ``watch``; takes over ``fd``."""
    try:
        entry = _Watched(identity, fd)
    except OSError:
        os.close(fd)
        return
    with _lock:
        old = _known.pop(identity.pid, None)
        if old is not None:
            _drop(old)
        _known[identity.pid] = entry
        while len(_known) > LIMIT:
            _drop(_known.pop(next(iter(_known))))


def known(pid: int) -> ProcessIdentity | None:
    """The remembered identity of ``pid`` if its process still runs; else None (forgotten)."""
    if pid not in _known:
        return None
    with _lock:
        entry = _known.pop(pid, None)
        if entry is None:
            return None
        if entry.running():
            _known[pid] = entry  # the most recently used now
            return entry.identity
        _drop(entry)
    return None


def forget(pid: int) -> None:
    """Drop what is remembered of ``pid``."""
    with _lock:
        entry = _known.pop(pid, None)
        if entry is not None:
            _drop(entry)


def clear() -> None:
    """Forget everything (tests; a process about to close descriptors it did not open)."""
    with _lock:
        entries = list(_known.values())
        _known.clear()
        for entry in entries:
            _drop(entry)


def _drop(entry: _Watched) -> None:
    try:
        entry.poller.unregister(entry.fd)
    except (KeyError, ValueError):
        pass
    if entry.ours():  # a number another file has taken is not ours to close
        try:
            os.close(entry.fd)
        except OSError:
            pass


def _after_fork_in_child() -> None:
    # The descriptors are inherited and still refer to the same processes; only the lock
    # may have been held by a thread that does not exist in the child.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
