"""Identities of other processes, remembered for as long as a pidfd says each still runs.

Registering on behalf of another process (a supervisor its agents, a pool's parent its
workers) needs that process's identity: its start ticks from ``/proc/<pid>/stat`` and proof
that the pid names a process rather than a thread. That costs 5-30 µs, several times a whole
registration, and a supervisor pays it for the same few processes again and again.

A pidfd refers to one process for good. It becomes readable when that process exits (as a
zombie too), and a pid reused later belongs to a new process the old pidfd does not refer to.
``identity.identity_of`` opens one *before* it reads the stat; while polling it says the
process has not exited, that process has held the pid since before the read, so the identity
read then is still its identity. A check costs a poll and an fstat (~1 µs).

The fstat guards against code that closes descriptors it does not own (a daemon closing
every fd, say) and lets another file take the number: the descriptor must still be the file
it was. At most ``LIMIT`` processes are remembered (the oldest is forgotten first), so the
descriptors held stay few; pidfds are close-on-exec, so none leaks into a child's ``exec``.
"""

from __future__ import annotations

import errno
import os
import select
import threading

from shmreg._types import ProcessIdentity

__all__ = ["LIMIT", "clear", "forget", "known", "remember", "watch"]

LIMIT = 64


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


_known: dict[int, _Watched] = {}
# Held while an entry is checked or dropped: a descriptor closed by one thread while another
# polls it could be reused by a third file in between.
_lock = threading.Lock()


def watch(pid: int) -> int | None:
    """A pidfd for ``pid``, to open before reading its identity; None where there is none.

    None too when ``pid`` is a thread that does not lead its process (the kernel refuses a
    pidfd for it), when it is gone, or when no descriptor is free: the caller then reads and
    checks the identity without remembering it.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT, errno.ESRCH, errno.EMFILE, errno.ENFILE,
                             errno.ENOSYS, errno.EPERM):  # fmt: skip
            raise
        return None
    return fd


def remember(identity: ProcessIdentity, fd: int) -> None:
    """Keep ``identity``, read after ``fd`` was opened by ``watch``; takes over ``fd``."""
    try:
        entry = _Watched(identity, fd)
    except OSError:
        os.close(fd)
        return
    with _lock:
        # Forget processes that have exited since (at most LIMIT polls), then the oldest.
        for pid in [pid for pid, known in _known.items() if not known.running()]:
            _drop(_known.pop(pid))
        old = _known.pop(identity.pid, None)
        if old is not None:
            _drop(old)
        _known[identity.pid] = entry
        while len(_known) > LIMIT:
            _drop(_known.pop(next(iter(_known))))


def known(pid: int) -> ProcessIdentity | None:
    """The remembered identity of ``pid`` if its process still runs; else None (forgotten)."""
    entry = _known.get(pid)
    if entry is None:
        return None
    with _lock:
        if _known.get(pid) is entry and entry.running():
            return entry.identity
        if _known.get(pid) is entry:
            del _known[pid]
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
