"""Process identity against real processes: live, reaped, zombie, reused, forked, threaded.

Every child is killed and reaped in ``finally``. Nothing here asserts a timing.
"""

from __future__ import annotations

import collections
import doctest
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import DEADLINE_S

from shmreg import _identity
from shmreg._errors import ProcessNotAlive
from shmreg._identity import (
    UNREADABLE,
    boot_id,
    check,
    check_many,
    identity_of,
    parse_stat,
    pid_namespace,
    probe_alive,
    read_proc_stat,
    self_identity,
)
from shmreg._types import Liveness, ProcessIdentity

needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")

#: How long a killed child may take to show up as a zombie. The kernel turns a SIGKILLed task
#: into a zombie within microseconds; the suite's deadline only guards against a hang (a loaded
#: machine can delay the killed task's exit for seconds).
_ZOMBIE_DEADLINE = DEADLINE_S

_SLEEPER = [sys.executable, "-c", "import time; time.sleep(1e9)"]


def _proc_stat_fields(pid: int) -> list[str]:
    """Fields 3.. of /proc/<pid>/stat, parsed independently of the code under test."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(_SLEEPER)
    try:
        yield proc
    finally:
        _reap(proc)


@pytest.fixture
def zombie(reader: str) -> Iterator[tuple[subprocess.Popen[bytes], ProcessIdentity]]:
    """A killed child not yet reaped, with the identity it had while alive (per reader)."""
    proc = subprocess.Popen(_SLEEPER)
    try:
        ident = identity_of(proc.pid)
        proc.kill()  # and no poll()/wait(): Popen reaps only when asked
        deadline = time.monotonic() + _ZOMBIE_DEADLINE
        while _proc_stat_fields(proc.pid)[0] != "Z":
            assert time.monotonic() < deadline, "child never became a zombie"
            time.sleep(0.001)
        yield proc, ident
    finally:
        _reap(proc)


@pytest.fixture
def dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(params=["proc", "psutil"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test over /proc and over the psutil fallback (as on hosts without /proc)."""
    if request.param == "proc" and not _identity._USE_PROC:
        pytest.skip("needs /proc")
    monkeypatch.setattr(_identity, "_USE_PROC", request.param == "proc")
    monkeypatch.setattr(_identity, "_self", None)  # the two sources count ticks differently
    return str(request.param)


# -- parse_stat: pure ---------------------------------------------------------------------------

# Fields 3..25 of a real line; field 20 (threads) is 1 and field 22 (start ticks) is 7341.
_TAIL = b"S 1 42 42 0 -1 4194560 120 0 0 0 3 1 0 0 20 0 1 0 7341 12345678 300 18446744073709551615"


@pytest.mark.parametrize(
    "comm",
    [b"python", b"a b", b"a) b", b"(", b")", b") S 1 2 3", b"12 (a) b) c)", b"", b"\xff\xfe"],
)
def test_parse_stat_counts_fields_from_the_last_paren(comm: bytes) -> None:
    line = b"4242 (" + comm + b") " + _TAIL + b"\n"
    assert parse_stat(line) == ("S", 7341)


def test_parse_stat_reports_exited_processes() -> None:
    assert parse_stat(b"7 (x) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0\n") == ("Z", 99)
    assert parse_stat(b"7 (x) X 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0\n") == ("X", 99)


def test_parse_stat_zombie_leader_with_live_threads_is_running() -> None:
    # The main thread called pthread_exit: the leader shows Z, field 20 counts 3 threads.
    assert parse_stat(b"7 (x) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 3 0 99 0 0\n") == ("R", 99)


def test_parse_stat_exactly_22_fields() -> None:
    assert parse_stat(b"7 (x) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99\n") == ("S", 99)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"no paren here",
        b"7 (x)",
        b"7 (x) S 1 2 3\n",
        b"7 (x)  S 1 " + _TAIL[2:],
        b"7 (x) " + _TAIL.replace(b"7341", b"zz"),
    ],
)
def test_parse_stat_rejects_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_stat(data)


# -- read_proc_stat -----------------------------------------------------------------------------


@needs_proc
def test_read_proc_stat_self_matches_an_independent_parse() -> None:
    fields = _proc_stat_fields(os.getpid())
    assert read_proc_stat(os.getpid()) == (fields[0], int(fields[19]))


@needs_proc
@pytest.mark.parametrize("pid", [0, -1, 2**22 + 1, 2**40])
def test_read_proc_stat_impossible_pids_are_none(pid: int) -> None:
    assert read_proc_stat(pid) is None


@needs_proc
def test_read_proc_stat_reaped_child_is_none(dead_pid: int) -> None:
    assert read_proc_stat(dead_pid) is None


@needs_proc
def test_permission_denied_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    # hidepid=1: the /proc entry is there, its files are refused.
    def refuse(path: str, flags: int) -> int:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(_identity, "_open", refuse)
    assert read_proc_stat(os.getpid()) is UNREADABLE
    assert check(ProcessIdentity(os.getpid(), 1)) is Liveness.UNKNOWN
    with pytest.raises(ProcessNotAlive, match="unreadable"):
        identity_of(os.getpid())


@needs_proc
def test_hidden_but_live_process_is_unknown_not_gone(
    monkeypatch: pytest.MonkeyPatch, child: subprocess.Popen[bytes], dead_pid: int
) -> None:
    # hidepid=2: another user's processes are missing from /proc altogether. Only kill(pid, 0)
    # can tell that the owner still runs, and a sweep must then keep its entry.
    def hide(path: str, flags: int) -> int:
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(_identity, "_open", hide)
    assert read_proc_stat(child.pid) is UNREADABLE
    assert check(ProcessIdentity(child.pid, 1)) is Liveness.UNKNOWN
    assert read_proc_stat(dead_pid) is None
    assert check(ProcessIdentity(dead_pid, 1)) is Liveness.GONE


@needs_proc
def test_hidden_process_of_another_user_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def hide(path: str, flags: int) -> int:
        raise FileNotFoundError(2, "No such file or directory", path)

    def eperm(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_identity, "_open", hide)
    monkeypatch.setattr(_identity, "_kill", eperm)
    assert read_proc_stat(12345) is UNREADABLE


@needs_proc
def test_reaped_between_open_and_read_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    def esrch(fd: int, n: int) -> bytes:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(_identity, "_read", esrch)
    assert read_proc_stat(os.getpid()) is None


# -- self_identity ------------------------------------------------------------------------------


@needs_proc
def test_self_identity_equals_proc() -> None:
    fields = _proc_stat_fields(os.getpid())
    assert self_identity() == ProcessIdentity(os.getpid(), int(fields[19]))
    assert self_identity() is self_identity()  # cached
    assert identity_of(os.getpid()) == self_identity()


def test_self_identity_refreshes_when_the_pid_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fork that bypassed os.register_at_fork leaves the parent's identity in the cache.
    monkeypatch.setattr(_identity, "_self", ProcessIdentity(os.getpid() + 1, 5))
    assert self_identity() == identity_of(os.getpid())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_refreshes_self_identity() -> None:
    parent = self_identity()  # fill the cache before forking
    ns = pid_namespace()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, then leave without running the parent's pytest machinery
        code = 1
        try:
            os.close(r)
            cached_ns = _identity._pid_ns  # before pid_namespace() fills it again
            fields = [os.getpid(), self_identity().start_ticks, cached_ns, pid_namespace()]
            fields.append(identity_of(os.getpid()).start_ticks)
            os.write(w, " ".join(map(str, fields)).encode())
            code = 0
        finally:
            os._exit(code)
    try:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            reported = f.read().decode().split()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child_pid, child_ticks, child_cached_ns, child_ns, fresh_ticks = reported
    assert int(child_pid) == pid != parent.pid
    assert int(child_ticks) == int(fresh_ticks)
    assert child_cached_ns == "None"  # dropped by the fork hook
    assert int(child_ns) == ns
    assert self_identity() is parent


# -- check and identity_of over real processes, on both readers --------------------------------


def test_live_child_is_same_then_gone(reader: str, child: subprocess.Popen[bytes]) -> None:
    ident = identity_of(child.pid)
    assert ident.pid == child.pid
    assert check(ident) is Liveness.SAME
    assert probe_alive(child.pid)
    child.kill()
    child.wait()
    assert check(ident) is Liveness.GONE
    assert not probe_alive(child.pid)
    with pytest.raises(ProcessNotAlive) as info:
        identity_of(child.pid)
    assert info.value.pid == child.pid


def test_self_is_same(reader: str) -> None:
    assert check(self_identity()) is Liveness.SAME


def test_unreaped_child_is_zombie(
    reader: str, zombie: tuple[subprocess.Popen[bytes], ProcessIdentity]
) -> None:
    proc, ident = zombie
    assert check(ident) is Liveness.ZOMBIE
    assert Liveness.ZOMBIE.is_dead
    assert probe_alive(proc.pid)  # the cheap probe cannot see zombies: why check() exists
    with pytest.raises(ProcessNotAlive, match="zombie") as info:
        identity_of(proc.pid)
    assert info.value.pid == proc.pid
    proc.wait()
    assert check(ident) is Liveness.GONE


def test_other_start_ticks_is_reused(reader: str, child: subprocess.Popen[bytes]) -> None:
    # The way psutil tests pid reuse: the real pid, a forged start time.
    ident = identity_of(child.pid)
    assert check(ident._replace(start_ticks=ident.start_ticks + 5)) is Liveness.REUSED
    assert check(ident._replace(start_ticks=ident.start_ticks - 5)) is Liveness.REUSED


@needs_proc
def test_one_tick_off_is_reused_with_proc(child: subprocess.Popen[bytes]) -> None:
    ident = identity_of(child.pid)
    assert check(ident._replace(start_ticks=ident.start_ticks + 1)) is Liveness.REUSED


def test_psutil_allows_one_tick_of_rounding(
    monkeypatch: pytest.MonkeyPatch, child: subprocess.Popen[bytes]
) -> None:
    monkeypatch.setattr(_identity, "_USE_PROC", False)
    ident = identity_of(child.pid)
    assert check(ident._replace(start_ticks=ident.start_ticks + 1)) is Liveness.SAME
    assert check(ident._replace(start_ticks=ident.start_ticks + 2)) is Liveness.REUSED


def test_psutil_access_denied_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    def deny(pid: int) -> None:
        raise psutil.AccessDenied(pid)

    monkeypatch.setattr(_identity, "_USE_PROC", False)
    monkeypatch.setattr(psutil, "Process", deny)
    assert check(ProcessIdentity(os.getpid(), 1)) is Liveness.UNKNOWN


@pytest.mark.parametrize("pid", [0, -1, 2**22 + 1, 2**31, 2**64])
def test_identity_of_rejects_impossible_pids(reader: str, pid: int) -> None:
    with pytest.raises(ProcessNotAlive) as info:
        identity_of(pid)
    assert info.value.pid == pid


@pytest.mark.parametrize("pid", [True, False, "1", 1.0, None, b"1"])
def test_identity_of_rejects_non_int_pids(pid: object) -> None:
    with pytest.raises(ProcessNotAlive, match="pid must be an int") as info:
        identity_of(pid)  # type: ignore[arg-type]
    assert info.value.pid is None


def test_identity_of_reaped_child(reader: str, dead_pid: int) -> None:
    with pytest.raises(ProcessNotAlive, match="no process"):
        identity_of(dead_pid)


def test_identity_of_stores_a_plain_int() -> None:
    class Pid(int):
        pass

    ident = identity_of(Pid(os.getpid()))
    assert type(ident.pid) is int


@needs_proc
@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open")
def test_identity_of_rejects_a_thread_id() -> None:
    # /proc/<tid>/stat and kill(tid, 0) both work for a thread id; it is still not a process.
    started, stop = threading.Event(), threading.Event()
    tids: list[int] = []

    def run() -> None:
        tids.append(threading.get_native_id())
        started.set()
        stop.wait()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert started.wait(10)
        with pytest.raises(ProcessNotAlive, match="thread"):
            identity_of(tids[0])
    finally:
        stop.set()
        thread.join()


# The main thread leaves with pthread_exit; a second thread keeps the process running until the
# parent closes its stdin. The leader then shows state Z in /proc although the process lives.
_ZOMBIE_LEADER = r"""
import ctypes, os, sys, threading
def linger():
    sys.stdin.read()
    os._exit(0)
threading.Thread(target=linger).start()
print("ready", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


@needs_proc
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux thread-group semantics")
def test_zombie_leader_with_live_threads_is_alive() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _ZOMBIE_LEADER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + _ZOMBIE_DEADLINE
        while _proc_stat_fields(proc.pid)[0] != "Z":
            assert time.monotonic() < deadline, "leader never exited"
            time.sleep(0.001)
        ident = identity_of(proc.pid)
        assert check(ident) is Liveness.SAME
        assert proc.poll() is None
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        _reap(proc)
        if proc.stdout is not None:
            proc.stdout.close()


# -- check_many ---------------------------------------------------------------------------------


@needs_proc
def test_check_many_reads_each_pid_once(
    monkeypatch: pytest.MonkeyPatch, child: subprocess.Popen[bytes], dead_pid: int
) -> None:
    reads: collections.Counter[int] = collections.Counter()
    real = _identity.read_proc_stat

    def counting(pid: int) -> tuple[str, int] | None:
        reads[pid] += 1
        return real(pid)

    me = self_identity()
    kid = identity_of(child.pid)
    gone = ProcessIdentity(dead_pid, 1)
    reused = me._replace(start_ticks=me.start_ticks + 1)
    monkeypatch.setattr(_identity, "read_proc_stat", counting)
    result = check_many([me, kid, gone, reused, me, kid, kid])
    assert result == {
        me: Liveness.SAME,
        kid: Liveness.SAME,
        gone: Liveness.GONE,
        reused: Liveness.REUSED,
    }
    assert reads == {me.pid: 1, kid.pid: 1, dead_pid: 1}


def test_check_many_empty() -> None:
    assert check_many([]) == {}
    assert check_many(iter(())) == {}


# -- probe_alive --------------------------------------------------------------------------------


def test_probe_alive(dead_pid: int) -> None:
    assert probe_alive(os.getpid()) is True
    assert probe_alive(dead_pid) is False


@pytest.mark.parametrize("pid", [0, -1, 2**31, 2**64])
def test_probe_alive_never_probes_groups_or_overflows(pid: int) -> None:
    # kill(0, 0), kill(-1, 0) and kill(-pgid, 0) succeed: they probe process groups.
    assert probe_alive(pid) is False


def test_probe_alive_negative_pid_is_not_our_process_group() -> None:
    assert probe_alive(-os.getpgid(0)) is False


def test_probe_alive_eperm_means_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    def eperm(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(_identity, "_kill", eperm)
    assert probe_alive(1) is True


# -- boot id and pid namespace ------------------------------------------------------------------


@needs_proc
def test_boot_id_and_pid_namespace() -> None:
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert boot_id() == f.read().strip()
    assert len(boot_id()) == 36
    assert pid_namespace() == os.stat("/proc/self/ns/pid").st_ino > 0


def test_boot_id_and_pid_namespace_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(_identity, "_boot_id", None)
    monkeypatch.setattr(_identity, "_pid_ns", None)
    monkeypatch.setattr(_identity, "open", missing, raising=False)
    monkeypatch.setattr(os, "stat", missing)
    assert boot_id() == ""
    assert pid_namespace() == 0


# -- module hygiene -----------------------------------------------------------------------------


def test_all_lists_the_public_names() -> None:
    public = {
        name
        for name, value in vars(_identity).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == _identity.__name__
    }
    assert public <= set(_identity.__all__)
    assert all(hasattr(_identity, name) for name in _identity.__all__)


def test_doctests() -> None:
    failures, tried = doctest.testmod(_identity)
    assert tried > 0
    assert failures == 0
