"""The writer lock: a robust, process-shared pthread mutex in the root segment.

Layout and attributes (``layout.R_MUTEX_OFFSET``, ``layout.R_MUTEX_BYTES``; the same bytes a
compiled extension locks with the real pthread calls): a ``pthread_mutex_t`` at byte 2048 of
the root segment, 64 bytes reserved, initialised by ``pthread_mutex_init`` with an attribute
set to ``PTHREAD_PROCESS_SHARED``, ``PTHREAD_MUTEX_ROBUST`` and type
``PTHREAD_MUTEX_NORMAL``. It is called here through ctypes on libc (no compiler needed).

Why this mutex: uncontended, a lock/unlock pair is two atomic instructions and no system
call, and it is *robust*: when its holder dies (SIGKILL included) the kernel marks it, and
the next locker gets ``EOWNERDEAD`` and the lock. We then call
``pthread_mutex_consistent`` and carry on: repairing what the dead writer left half-done is
not this module's job, the owner words in the root are (``Store.begin`` finds the owner pid
word still set and runs recovery before writing).

A pthread mutex excludes threads too, so no thread lock sits in front. It records its
holder's thread id, so a forked child never inherits its parent's hold: the child waits
like any other process until the parent releases.

Contract for any other locker of these bytes (a compiled extension): lock with
``pthread_mutex_lock`` / ``pthread_mutex_timedlock`` / ``pthread_mutex_trylock`` on
``root + 2048``; on ``EOWNERDEAD`` call ``pthread_mutex_consistent`` and go on (the caller
then finds the owner words set and recovers, as ``Store.begin`` does); write the owner words
right after taking the mutex and clear the pid word right before unlocking; treat
``EINVAL`` / ``ENOTRECOVERABLE`` as ``CorruptRegistry``. Never initialise the bytes outside
creation, ``shmreg upgrade`` and ``fsck --repair``.

Damage (a stray write into the mutex bytes) must never hang a writer. A blocking acquire
waits in slices of ``_SLICE`` seconds; between slices it looks at the futex word. A word
that names no live thread, or a thread of a process that is not the recorded writer, and
does not change for ``_STUCK_AFTER`` seconds, is damage: the acquire raises
``CorruptRegistry`` pointing at ``shmreg fsck --repair``, which re-initialises the mutex
under the same rule (``repair``). So does an ``EINVAL`` / ``ENOTRECOVERABLE`` from pthread,
or a type word that is not the one ``pthread_mutex_init`` wrote.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import time
import weakref
from typing import Any

from shmreg._engine import layout as L
from shmreg._errors import CorruptRegistry, RegistryClosed, RegistryTimeout

# pthread constants (glibc, every Linux architecture).
_PROCESS_SHARED = 1
_ROBUST = 1
_NORMAL = 0
_FUTEX_TID_MASK = 0x3FFFFFFF
_FUTEX_OWNER_DIED = 0x40000000

#: sizeof(pthread_mutex_t) in glibc per machine; anything unknown must fit the 64 reserved.
_GLIBC_MUTEX_SIZE = {"x86_64": 40, "aarch64": 48, "ppc64le": 40, "s390x": 40, "riscv64": 40}
_SLICE = 0.5  # seconds a blocked acquire sleeps in the kernel before it looks at the word
_STUCK_AFTER = 3.0  # seconds an unchanged word naming no live writer may last: then damage


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load_libc() -> tuple[Any, Any]:
    """libc twice: as CDLL (calls release the GIL: for the blocking lock) and as PyDLL
    (calls keep it: for trylock and unlock, which never block and run faster so)."""
    path = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(path, use_errno=True)
    if not hasattr(libc, "pthread_mutex_timedlock"):  # glibc < 2.34: pthread lives apart
        path = "libpthread.so.0"
        libc = ctypes.CDLL(path, use_errno=True)
    quick = ctypes.PyDLL(path)
    for lib in (libc, quick):
        for fn in (
            "pthread_mutex_trylock",
            "pthread_mutex_unlock",
            "pthread_mutex_consistent",
            "pthread_mutex_init",
            "pthread_mutexattr_init",
            "pthread_mutexattr_destroy",
            "pthread_mutexattr_setpshared",
            "pthread_mutexattr_setrobust",
            "pthread_mutexattr_settype",
        ):
            getattr(lib, fn).restype = ctypes.c_int
    libc.pthread_mutex_timedlock.restype = ctypes.c_int
    libc.pthread_mutex_timedlock.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
    for name in ("pthread_mutex_trylock", "pthread_mutex_unlock"):
        getattr(quick, name).argtypes = [ctypes.c_void_p]
    return libc, quick


_LIBC, _QUICK = _load_libc()
_trylock = _QUICK.pthread_mutex_trylock
_unlock = _QUICK.pthread_mutex_unlock
_timedlock = _LIBC.pthread_mutex_timedlock


def initialise(address: int) -> None:
    """``pthread_mutex_init`` the mutex at ``address`` (robust, process-shared, normal)."""
    attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4 or 8 bytes
    for call, *args in (
        (_LIBC.pthread_mutexattr_init,),
        (_LIBC.pthread_mutexattr_setpshared, _PROCESS_SHARED),
        (_LIBC.pthread_mutexattr_setrobust, _ROBUST),
        (_LIBC.pthread_mutexattr_settype, _NORMAL),
    ):
        rc = call(attr, *args)
        if rc:
            raise OSError(rc, f"{call.__name__}: {os.strerror(rc)}")
    try:
        rc = _LIBC.pthread_mutex_init(ctypes.c_void_p(address), attr)
        if rc:
            raise OSError(rc, f"pthread_mutex_init: {os.strerror(rc)}")
    finally:
        _LIBC.pthread_mutexattr_destroy(attr)


def initialise_in(buf: memoryview) -> None:
    """Initialise the writer lock in a root segment's buffer (creation, upgrade, repair)."""
    cell = ctypes.c_char.from_buffer(buf, L.R_MUTEX_OFFSET)
    try:
        initialise(ctypes.addressof(cell))
    finally:
        del cell  # releases the buffer export, so the segment can be closed later


def _pristine() -> tuple[int, int, int]:
    """(bytes pthread_mutex_init rewrites, offset and value of the type word), measured.

    glibc's init clears the whole ``pthread_mutex_t`` and then sets the type word, the only
    non-zero int of a fresh mutex: initialising a buffer of 0xAA shows both, compile-free.
    """
    scratch = ctypes.create_string_buffer(b"\xaa" * 128, 128)
    initialise(ctypes.addressof(scratch))
    raw = scratch.raw
    size = max(i for i in range(128) if raw[i] != 0xAA) + 1
    words = [int.from_bytes(raw[i : i + 4], "little") for i in range(0, size - size % 4, 4)]
    kind_at = next(i for i, w in enumerate(words) if w)
    return size, kind_at * 4, words[kind_at]


MUTEX_SIZE, KIND_OFFSET, KIND = _pristine()
_expected = _GLIBC_MUTEX_SIZE.get(platform.machine(), L.R_MUTEX_BYTES)
if not MUTEX_SIZE <= _expected <= L.R_MUTEX_BYTES:  # pragma: no cover - exotic libc
    raise ImportError(
        f"pthread_mutex_t here spans {MUTEX_SIZE} bytes, glibc's on {platform.machine()} "
        f"{_expected}: more than the {L.R_MUTEX_BYTES} the registry layout reserves"
    )

_LIVE_LOCKS: weakref.WeakSet[WriterLock] = weakref.WeakSet()


def _damaged(registry: str, why: str) -> CorruptRegistry:
    return CorruptRegistry(
        f"registry {registry!r}: writer lock damaged ({why}); run `shmreg fsck --repair "
        f"{registry}` once no writer is running",
        name=registry,
        detail="writer lock damaged",
    )


def thread_process(tid: int) -> int:
    """The process (thread group) of thread ``tid``, 0 if no such thread exists."""
    try:
        with open(f"/proc/{tid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class WriterLock:
    """Process- and thread-exclusive lock in a root mapping, safe across fork and SIGKILL.

    ``buf`` is the root segment's buffer: the lock holds a view of it, so the mapping stays
    while the lock lives (and, if ``close()`` comes while a thread holds it, until that
    thread releases).
    """

    def __init__(self, buf: memoryview, registry: str) -> None:
        self._registry = registry
        self._cell: Any = ctypes.c_char.from_buffer(buf, L.R_MUTEX_OFFSET)  # keeps the mapping
        self._words: Any = buf[L.R_MUTEX_OFFSET : L.R_MUTEX_OFFSET + L.R_MUTEX_BYTES].cast("i")
        self._root: Any = buf.cast("Q")
        self._ptr = ctypes.c_void_p(ctypes.addressof(self._cell))
        self._held = False
        self._closed = False
        self.damage = ""  # why the last acquire called the mutex damaged
        self._stuck_word = -1  # the futex word it last judged stuck
        _LIVE_LOCKS.add(self)

    def acquire(self, timeout: float | None = None) -> None:
        if self._closed:
            raise RegistryClosed(
                f"registry {self._registry!r} is closed in this process", name=self._registry
            )
        rc = _trylock(self._ptr)
        if rc:
            self._acquire_slow(rc, timeout)
        self._held = True

    def _acquire_slow(self, rc: int, timeout: float | None) -> None:
        start = time.monotonic()
        deadline = None if timeout is None else start + max(timeout, 0.0)
        seen: tuple[int, float] | None = None  # (futex word, since) while it looks stuck
        while True:
            if rc == errno.EOWNERDEAD:
                # Its holder died inside. We hold it now; the owner words tell Store.begin
                # whether anything needs repair, so here it only becomes usable again.
                self._consistent()
                return
            if rc != errno.EBUSY and rc != errno.ETIMEDOUT:
                self.damage = f"pthread: {errno.errorcode.get(rc, rc)}"
                raise _damaged(self._registry, self.damage)
            now = time.monotonic()
            if rc == errno.ETIMEDOUT or now - start >= _SLICE:
                seen = self._check_stuck(seen, now)
            if deadline is not None and now >= deadline:
                raise RegistryTimeout(
                    f"writer lock of {self._registry!r} not acquired in {timeout} s",
                    timeout=timeout,
                )
            until = now + _SLICE if deadline is None else min(deadline, now + _SLICE)
            wall = time.time() + (until - now)  # timedlock takes an absolute CLOCK_REALTIME
            ts = _Timespec(int(wall), int((wall % 1) * 1e9))
            rc = _timedlock(self._ptr, ctypes.byref(ts))  # releases the GIL while it waits
            if rc == 0:
                return

    def _consistent(self) -> None:
        rc = _LIBC.pthread_mutex_consistent(self._ptr)
        if rc:
            _unlock(self._ptr)
            raise _damaged(self._registry, f"pthread_mutex_consistent: {os.strerror(rc)}")

    def problem(self) -> str | None:
        """What makes the mutex unusable at a glance (its type word), or None."""
        if self._words[KIND_OFFSET // 4] != KIND:
            return f"type word {self._words[KIND_OFFSET // 4]:#x}, not {KIND:#x}"
        return None

    def _check_stuck(self, seen: tuple[int, float] | None, now: float) -> tuple[int, float] | None:
        """Raise ``CorruptRegistry`` if the mutex is damaged; the new stuck observation."""
        bad = self.problem()
        if bad:
            self.damage = bad
            raise _damaged(self._registry, bad)
        word = self._words[0] & 0xFFFFFFFF
        if self._holder_is_plausible(word):
            return None
        # A word this lock already judged stuck, still there: no second wait for it.
        judged = word == self._stuck_word
        if not judged and (seen is None or seen[0] != word):
            return (word, now)
        if judged or now - (seen[1] if seen else now) >= _STUCK_AFTER:
            self.damage = self._describe(word)
            self._stuck_word = word
            raise _damaged(self._registry, self.damage)
        return seen

    def _holder_is_plausible(self, word: int) -> bool:
        """Whether the futex word could belong to a live writer (see the module docstring)."""
        tid = word & _FUTEX_TID_MASK
        if word & _FUTEX_OWNER_DIED and not tid:
            return True  # the next locker recovers it
        if not tid:
            return word == 0
        process = thread_process(tid)
        if not process:
            return False
        owner = int(self._root[L.R_OWNER_PID])
        # Between taking the mutex and writing the owner word a writer holds it unrecorded
        # for an instant: only a holder that stays unrecorded for _STUCK_AFTER is suspect.
        return owner == process or (process == os.getpid() and self._held)

    def _describe(self, word: int) -> str:
        tid = word & _FUTEX_TID_MASK
        if not tid:
            return f"futex word {word:#x} names no thread"
        if not thread_process(tid):
            return f"held by thread {tid}, which does not exist"
        return f"held by thread {tid}, which is not the recorded writer"

    def release(self) -> None:
        self._held = False
        rc = _unlock(self._ptr)
        if self._closed:
            self._drop()  # close() came while we held it: the mapping may go now
        if rc:
            raise _damaged(self._registry, f"pthread_mutex_unlock: {os.strerror(rc)}")

    def repair(self) -> str | None:
        """For ``fsck --repair``: re-initialise a damaged mutex; what was done, or None.

        The rule that keeps a live writer safe: the mutex is re-initialised only if pthread
        refuses it outright (no lock can be held through it), its type word is wrong while
        the owner words name no live writer, or a blocked acquire judged it stuck (its word
        named no live recorded writer and did not change for ``_STUCK_AFTER`` seconds).
        A mutex that is merely held by a live writer makes this wait up to 30 s and then
        raise ``RegistryTimeout``, changing nothing.
        """
        why = self.problem()
        if why and self._owner_alive():
            raise _damaged(self._registry, why + ", and its recorded writer is alive")
        if not why:
            try:
                self.acquire(timeout=30.0)
            except CorruptRegistry:
                why = self.damage
            else:
                self.release()
                return None
        self.initialise()
        return f"writer lock re-initialised ({why})"

    def initialise(self) -> None:
        """(Re-)initialise the mutex bytes: only where no process can hold them (``repair``,
        and ``shmreg upgrade`` under the old flock, before the version stamp)."""
        initialise(self._ptr.value or 0)

    def inspect(self) -> str | None:
        """For ``fsck``: what is wrong with the mutex, or None; never waits.

        A mutex its dead holder left behind is fine here (the next writer recovers it);
        a free one is locked and unlocked once, which changes nothing.
        """
        why = self.problem()
        if why:
            return why
        rc = _trylock(self._ptr)
        if rc == 0 or rc == errno.EOWNERDEAD:
            if rc:  # the owner words still say a writer died inside: recovery stays due
                _LIBC.pthread_mutex_consistent(self._ptr)
            _unlock(self._ptr)
            return None
        if rc != errno.EBUSY:
            return f"pthread: {errno.errorcode.get(rc, rc)}"
        # Held. Only a holder that stays implausible as long as a waiter would tolerate
        # (the module docstring's rule) is damage: a writer may be between taking the
        # mutex and writing the owner word.
        word = self._words[0] & 0xFFFFFFFF
        since = time.monotonic()
        while not self._holder_is_plausible(word):
            if time.monotonic() - since >= _STUCK_AFTER:
                return self._describe(word)
            time.sleep(0.05)
            if self._words[0] & 0xFFFFFFFF != word:
                return None  # it moved: somebody is using it
        return None

    def _owner_alive(self) -> bool:
        from shmreg import _identity
        from shmreg._types import ProcessIdentity

        pid = int(self._root[L.R_OWNER_PID])
        if not pid or pid == os.getpid():
            return False
        start = int(self._root[L.R_OWNER_START])
        return not _identity.check(ProcessIdentity(pid, start)).is_dead

    def close(self) -> None:
        self._closed = True
        _LIVE_LOCKS.discard(self)
        if not self._held:
            self._drop()

    def _drop(self) -> None:
        for view in (self._words, self._root):
            if isinstance(view, memoryview):
                view.release()
        self._words = self._root = None
        self._cell = None

    def _after_fork_in_child(self) -> None:
        # A parent's thread may have held the mutex at the fork: that hold stays the
        # parent's (the mutex names the parent's thread), the child merely waits for it.
        self._held = False


def _forget_holds_after_fork() -> None:
    for lock in list(_LIVE_LOCKS):
        lock._after_fork_in_child()


os.register_at_fork(after_in_child=_forget_holds_after_fork)
