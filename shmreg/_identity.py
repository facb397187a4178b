"""Who a process is, and whether it is still the same one.

A registry entry names its owner by ``ProcessIdentity(pid, start_ticks)``. A pid alone is not
an identity: the kernel hands a freed pid to the next process that asks, so an entry that stored
only the pid would start to describe a stranger once its owner exits. The start time, in clock
ticks since boot (field 22 of ``/proc/<pid>/stat``), tells the two apart.

Three questions, three costs (medians measured on Linux):

- ``probe_alive(pid)``: ``os.kill(pid, 0)``, ~0.25 µs. The per-read probe. It sees "this pid is
  taken", so it answers *alive* for zombies and for a reused pid.
- ``check(identity)``: one read of ``/proc/<pid>/stat``, ~3 µs. Proof of death for sweeps:
  ``GONE``, ``REUSED``, ``ZOMBIE``, or ``UNKNOWN`` when the kernel will not say.
- ``identity_of(pid)``: the identity to store when registering a process, ~3 µs read; another
  process's is then remembered while a pidfd says it still runs (``_known_pids``, ~1 µs).

Why not psutil on Linux: ``psutil.Process(pid).create_time()`` costs ~18 µs and is a float epoch
time (boot time + ticks), which moves when the wall clock is stepped, so a clock step would make
every stored identity look reused. The raw ticks cannot move. psutil is the fallback where there
is no ``/proc`` (macOS, the BSDs, Windows); its caveats are in ``read_psutil_stat``.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterable
from typing import Any, Final, NoReturn

from shmreg import _known_pids
from shmreg._errors import ProcessNotAlive
from shmreg._types import Liveness, ProcessIdentity

__all__ = [
    "UNREADABLE",
    "boot_id",
    "check",
    "check_many",
    "host_id",
    "identity_of",
    "is_local",
    "parse_stat",
    "pid_namespace",
    "probe_alive",
    "read_proc_stat",
    "read_psutil_stat",
    "self_identity",
]

#: True where ``/proc/<pid>/stat`` exists (Linux). Decided once; tests flip it to run the psutil
#: fallback on Linux. Identities from the two sources are not comparable (ticks since boot versus
#: centiseconds since the epoch), so one host must use one source for its lifetime.
_USE_PROC: bool = os.path.exists("/proc/self/stat")

#: The largest pid worth asking about. Linux caps ``kernel.pid_max`` at PID_MAX_LIMIT = 2**22.
#: We use the cap, not the current ``pid_max``: that sysctl can be raised at run time (and is
#: per pid namespace on recent kernels), so a value cached at import could reject a real pid.
#: Elsewhere pids are C ints.
_PID_LIMIT: Final = 2**22 if sys.platform.startswith("linux") else 2**31 - 1

#: ``read_proc_stat`` returns this for a process that exists but whose stat it may not read
#: (``/proc`` mounted with ``hidepid``, another pid namespace). "?" is no kernel state letter.
UNREADABLE: Final[tuple[str, int]] = ("?", -1)

#: One page, the size of the kernel's seq_file buffer. A stat line holds 52 numbers of at most
#: 20 digits plus a short name, about 1.1 KiB at worst (321 bytes was the longest measured), so
#: one read always returns the whole line.
_STAT_READ_SIZE: Final = 4096

#: psutil's ``create_time()`` is a float; stored as an int in hundredths of a second (the size
#: of Linux's USER_HZ ticks). Coarse on purpose: float noise in ``boot_time + ticks / HZ`` rounds
#: away, and ``check`` still allows one tick of slack for a value that lands on a rounding edge.
_PSUTIL_TICKS_PER_SECOND: Final = 100

# Bound once: these run on every lookup and sweep. A module global, not a default argument, so
# tests can monkeypatch ``_identity._kill`` (timeit showed no difference between the two).
_kill = os.kill
_open = os.open
_read = os.read
_close = os.close
_O_RDONLY: Final = os.O_RDONLY


def parse_stat(data: bytes) -> tuple[str, int]:
    """Return ``(state, start_ticks)`` from the bytes of a ``/proc/<pid>/stat`` line.

    Field 2, the command name, is wrapped in parentheses but may itself hold spaces and ``)``
    (any process can rename itself with ``prctl(PR_SET_NAME)``), so the fields are counted from
    the *last* ``)``. ``state`` is field 3 and ``start_ticks`` is field 22.

    A zombie thread-group leader whose other threads still run (the main thread called
    ``pthread_exit``) shows state ``Z`` although its process is alive; field 20, the thread
    count, gives it away, and such a process is reported as ``"R"``. So ``"Z"`` and ``"X"``
    returned here always mean the whole process has exited.

    Raises ``ValueError`` if the line does not have the expected shape.

    >>> parse_stat(b"42 (a) b) c) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0\\n")
    ('S', 777)
    """
    close = data.rfind(b")")
    if close < 0:
        raise ValueError(f"not a /proc stat line: {data[:64]!r}")
    # After ") ": field 3 at index 0, so field N at index N - 3. maxsplit leaves the ~30 fields
    # after start_ticks in one piece we never split.
    fields = data[close + 2 :].split(b" ", 20)
    if len(fields) < 20 or len(fields[0]) != 1:
        raise ValueError(f"not a /proc stat line: {data[:64]!r}")
    state = chr(fields[0][0])  # one-character strings are interned: no allocation
    if (state == "Z" or state == "X") and int(fields[17]) > 1:
        state = "R"
    return state, int(fields[19])


def read_proc_stat(pid: int) -> tuple[str, int] | None:
    """Return ``(state, start_ticks)`` of ``pid`` from ``/proc``; ``None`` if there is no such pid.

    Returns ``UNREADABLE`` when the process exists but its stat cannot be read. Costs ~3 µs:
    ``os.open`` and ``os.read`` skip the buffered-file machinery that doubles the cost of
    ``open().read()``.
    """
    try:
        fd = _open(f"/proc/{pid}/stat", _O_RDONLY)
    except FileNotFoundError:
        return _confirm_missing(pid)
    except ProcessLookupError:
        return None
    except PermissionError:
        return UNREADABLE  # hidepid=1: the directory is listed, its files refused
    try:
        data = _read(fd, _STAT_READ_SIZE)
    except ProcessLookupError:
        return None  # reaped between open and read
    except PermissionError:
        return UNREADABLE
    finally:
        _close(fd)
    return parse_stat(data)


def _confirm_missing(pid: int) -> tuple[str, int] | None:
    # A missing /proc entry is not proof of death: with hidepid=2 another user's processes are
    # simply not there, and a /proc mounted from another pid namespace numbers them differently.
    # Ask the kernel directly; if the pid is taken, say "cannot tell" so that no sweep reclaims a
    # live owner. Costs ~0.5 µs more on the dead path. Only for pids > 0: kill(0) and kill(-n)
    # address process groups and kill(-1) every process, which would all read as "exists".
    if not 0 < pid <= _PID_LIMIT:
        return None
    try:
        _kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # EPERM: taken, by another user's process
    return UNREADABLE


def read_psutil_stat(pid: int) -> tuple[str, int] | None:
    """``read_proc_stat`` for platforms without ``/proc``, through psutil (~20 µs).

    Same contract: ``None`` for no such process, ``UNREADABLE`` for access denied. The state is
    ``"Z"`` or ``"X"`` for an exited process and ``"R"`` for any live one. ``start_ticks`` is
    ``create_time()`` in hundredths of a second since the epoch.

    Caveat: ``create_time()`` is a wall-clock time. Where the platform derives it from the boot
    time (Linux does), stepping the clock moves it, and identities stored before the step then
    read as ``REUSED``. That is why ``/proc`` is used wherever it exists.
    """
    import psutil  # late: only hosts without /proc pay for the import

    if not 0 < pid <= _PID_LIMIT:
        return None  # psutil knows a pid 0 on some platforms (the idle task)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            status = proc.status()
            if status == psutil.STATUS_ZOMBIE or status == psutil.STATUS_DEAD:
                # The zombie-leader case of parse_stat, where the platform can tell.
                if _psutil_num_threads(proc) > 1:
                    return "R", _psutil_ticks(proc.create_time())
                return "Z", -1
            return "R", _psutil_ticks(proc.create_time())
    except psutil.ZombieProcess:  # a subclass of NoSuchProcess: catch it first
        return "Z", -1
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return UNREADABLE


def _psutil_ticks(create_time: float) -> int:
    return round(create_time * _PSUTIL_TICKS_PER_SECOND)


def _psutil_num_threads(proc: Any) -> int:
    import psutil

    try:
        return int(proc.num_threads())
    except psutil.Error:
        return 1  # cannot tell: a zombie it stays


def _read_stat(pid: int) -> tuple[str, int] | None:
    # Module globals looked up per call, so tests can flip _USE_PROC or wrap either reader.
    return read_proc_stat(pid) if _USE_PROC else read_psutil_stat(pid)


def _classify(identity: ProcessIdentity, stat: tuple[str, int] | None) -> Liveness:
    if stat is None:
        return Liveness.GONE
    state, start = stat
    if state == "?":
        return Liveness.UNKNOWN
    # Zombie first: a zombie is dead whether or not it is the process we stored, and psutil
    # cannot always read a zombie's start time.
    if state == "Z" or state == "X":
        return Liveness.ZOMBIE
    if start != identity.start_ticks and (_USE_PROC or abs(start - identity.start_ticks) > 1):
        return Liveness.REUSED
    return Liveness.SAME


def host_id() -> str:
    """This machine's id for owner identities: ``hostname:boot_id``, or ``$SHMREG_HOST_ID``.

    The boot id is part of it because start ticks count from boot: after a reboot the same
    hostname is, for identities, another host. ``SHMREG_HOST_ID`` (read on every call) lets
    tests run several "hosts" on one machine.
    """
    override = os.environ.get("SHMREG_HOST_ID")
    if override:
        return override
    global _host_id
    if _host_id is None:
        import socket

        _host_id = f"{socket.gethostname()}:{boot_id()}"
    return _host_id


def is_local(identity: ProcessIdentity) -> bool:
    """Whether ``identity`` lives on this host (``""`` or this ``host_id()``)."""
    return not identity.host or identity.host == host_id()


def check(identity: ProcessIdentity) -> Liveness:
    """Compare a stored identity with what the system says now (~3 µs on Linux).

    ``SAME``: that very process runs. ``GONE``: no process has the pid. ``REUSED``: another
    process has it (different start ticks). ``ZOMBIE``: the process exited and awaits reaping.
    ``UNKNOWN``: the pid is taken but the kernel will not show by whom, or the process lives
    on another host (only its own host may judge it); treat it as alive.

    >>> check(self_identity())
    <Liveness.SAME: 'same'>
    """
    if identity.host and not is_local(identity):
        return Liveness.UNKNOWN
    return _classify(identity, _read_stat(identity.pid))


def check_many(identities: Iterable[ProcessIdentity]) -> dict[ProcessIdentity, Liveness]:
    """``check`` for many identities, reading each distinct pid once.

    A sweep meets one owner many times (a process registers many names); its stat is read once.
    """
    stats: dict[int, tuple[str, int] | None] = {}
    result: dict[ProcessIdentity, Liveness] = {}
    here = host_id()
    for identity in identities:
        if identity.host and identity.host != here:
            result[identity] = Liveness.UNKNOWN  # judged on its own host, never here
            continue
        pid = identity.pid
        if pid in stats:
            stat = stats[pid]
        else:
            stat = stats[pid] = _read_stat(pid)
        result[identity] = _classify(identity, stat)
    return result


def _not_alive(pid: int | None, message: str) -> NoReturn:
    raise ProcessNotAlive(message, pid=pid)


def identity_of(pid: int) -> ProcessIdentity:
    """Return the identity of the live process ``pid``, to store with a registration.

    Raises ``ProcessNotAlive`` if ``pid`` is not an int (``bool`` included), is out of range,
    names no process, a zombie, or a thread rather than a process, or if the process exists but
    its start time cannot be read (an identity without one could not detect pid reuse).

    >>> identity_of(os.getpid()) == self_identity()
    True
    """
    if isinstance(pid, bool) or not isinstance(pid, int):
        # The error's pid field holds ints only; the offending value goes in the message.
        _not_alive(None, f"pid must be an int, got {type(pid).__name__} {pid!r}")
    if not 0 < pid <= _PID_LIMIT:
        _not_alive(pid, f"pid {pid} is outside 1..{_PID_LIMIT}")
    pid = int(pid)  # an IntEnum or other int subclass is stored as a plain int
    # Another process's identity is remembered while a pidfd says it still runs (see
    # _known_pids): a supervisor registering its children reads each stat once.
    other = _USE_PROC and pid != os.getpid()
    if other and (remembered := _known_pids.known(pid)) is not None:
        return remembered
    watch = _known_pids.watch(pid) if other else None  # opened before the stat is read
    if watch is None:
        return _read_identity(pid, thread_checked=False)
    try:
        identity = _read_identity(pid, thread_checked=True)
        running = _known_pids.still_running(watch)
    except BaseException:
        _close(watch)
        raise
    if not running:
        # The process the pidfd was opened for exited before (or while) its stat was read,
        # so the stat may be a later holder's of the pid, even a thread's: read it again,
        # every check made, nothing remembered.
        _close(watch)
        return _read_identity(pid, thread_checked=False)
    _known_pids.remember(identity, watch)
    return identity


def _read_identity(pid: int, thread_checked: bool) -> ProcessIdentity:
    """``identity_of`` from the stat; ``thread_checked``: a pidfd opened, so not a thread."""
    stat = _read_stat(pid)
    if stat is None:
        if pid == os.getpid():
            # Only when /proc belongs to another pid namespace than ours (a container
            # with the host's /proc, say): every pid there names a different process.
            _not_alive(pid, f"this process (pid {pid}) is not in /proc: foreign pid namespace?")
        _not_alive(pid, f"no process has pid {pid}")
    state, start = stat
    if state == "?":
        _not_alive(pid, f"pid {pid} exists but its start time is unreadable (/proc hidepid?)")
    if state == "Z" or state == "X":
        _not_alive(pid, f"pid {pid} has exited (a zombie not yet reaped by its parent)")
    # The kernel gives a pidfd only for a process (a thread group's leader): one opened
    # already answers the thread question.
    if _USE_PROC and pid != os.getpid() and not thread_checked and _is_thread_id(pid):
        _not_alive(pid, f"{pid} is the id of a thread, not of a process")
    return ProcessIdentity(pid, start)


def _is_thread_id(pid: int) -> bool:
    # Linux gives threads ids from the pid space, and /proc/<tid>/stat and kill(tid, 0) both
    # work for them, so threading.get_native_id() passed as a pid would look like a process.
    # pidfd_open refuses a thread that does not lead its group (EINVAL; ENOENT on kernels
    # with PIDFD_THREAD). ~1.2 µs, and only when registering some other process.
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return False
    try:
        fd = pidfd_open(pid)
    except OSError as exc:
        # ESRCH (just exited) is left to the next check; EPERM or ENOSYS (seccomp, old
        # kernels) means we cannot tell, and a process is the likely answer.
        return exc.errno in (errno.EINVAL, errno.ENOENT)
    _close(fd)
    return False


_self: ProcessIdentity | None = None
_boot_id: str | None = None
_host_id: str | None = None
_pid_ns: int | None = None


def self_identity() -> ProcessIdentity:
    """The identity of the calling process, cached (~0.1 µs after the first call).

    A forked child gets a new pid and start time: the cache is dropped by a fork hook, and
    ``os.getpid()`` is compared on every call for forks that bypass Python's hooks (a C
    extension calling ``fork()``).
    """
    ident = _self
    if ident is not None and ident.pid == os.getpid():
        return ident
    return _refresh_self()


def _refresh_self() -> ProcessIdentity:
    global _self
    _self = identity_of(os.getpid())
    return _self


def boot_id() -> str:
    """This boot's random id (``/proc/sys/kernel/random/boot_id``), cached; ``""`` if unavailable.

    Start ticks count from boot, so identities are only comparable within one boot; a registry
    file that survives a reboot must not trust the identities in it.
    """
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                _boot_id = f.read().strip()
        except OSError:
            _boot_id = ""
    return _boot_id


def pid_namespace() -> int:
    """The inode of this process's pid namespace (``/proc/self/ns/pid``), cached; 0 if unavailable.

    Pids mean different processes in different namespaces: a process must only judge the
    liveness of identities recorded in its own.
    """
    global _pid_ns
    if _pid_ns is None:
        try:
            _pid_ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            _pid_ns = 0
    return _pid_ns


def _after_fork_in_child() -> None:
    global _self, _pid_ns
    _self = None
    # A child forked after the parent called unshare(CLONE_NEWPID) lives in the new namespace.
    _pid_ns = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


if sys.platform == "win32":

    def probe_alive(pid: int) -> bool:
        """Whether some process has ``pid`` (psutil; on Windows ``os.kill`` terminates)."""
        import psutil

        return pid > 0 and bool(psutil.pid_exists(pid))

else:

    def probe_alive(pid: int) -> bool:
        """Whether some process has ``pid``: the cheap probe run on every read (~0.25 µs).

        ``os.kill(pid, 0)`` sends nothing; it only asks whether the pid is taken. True is not
        proof of the *same* live process: a zombie or a reused pid also answers True, and only
        ``check`` can tell those apart. False is proof the owner has exited and been reaped.

        >>> probe_alive(os.getpid())
        True
        """
        if pid <= 0:
            return False  # kill(0) and kill(-n) probe process groups, kill(-1) every process
        try:
            _kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # EPERM: it exists, owned by another user
        except OverflowError:
            return False  # larger than a C pid_t: no such process
        return True
