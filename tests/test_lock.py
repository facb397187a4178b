"""The writer lock: a robust, process-shared pthread mutex in the root page.

Real processes hold it and are SIGKILLed; threads of one process contend for it; damaged
mutex bytes give ``CorruptRegistry`` (never a hang) and ``fsck --repair`` re-initialises them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import threading
from collections.abc import Iterator

import pytest
from helpers import DEADLINE_S, Children, alarm_after, children, read_line

import shmreg
from shmreg._engine import fsck
from shmreg._engine import layout as L
from shmreg._engine import lock as M
from shmreg._engine.store import Store

HOLDER = r"""
import sys, time
from shmreg._engine.store import Store
store = Store.open(sys.argv[1], create=False, capacity=None, max_metadata_bytes=None)
if sys.argv[2] == "begin":
    store.begin()  # the lock and the owner words, as a writer inside a change
else:
    store.lock.acquire()  # the mutex alone
report({"held": True})
time.sleep(3600)
"""


@pytest.fixture
def kids() -> Iterator[Children]:
    with children() as k:
        yield k


def _store(reg: shmreg.Registry) -> Store:
    store: Store = reg.backend.store  # type: ignore[attr-defined]
    return store


def _hold(kids: Children, name: str, how: str) -> int:
    proc = kids.py(HOLDER, name, how)
    assert read_line(proc) == {"held": True}
    return proc.pid


def _kill(kids: Children, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    kids.kill_all()  # reaps it


def _mutex_word(reg: shmreg.Registry, offset: int, value: int) -> None:
    """Overwrite one int of the mutex bytes, as a stray write would."""
    buf = _store(reg)._root.buf
    assert buf is not None
    struct.pack_into("<I", buf, L.R_MUTEX_OFFSET + offset, value)


def test_the_mutex_fits_its_reserved_bytes_and_is_robust_and_shared() -> None:
    assert M.MUTEX_SIZE <= L.R_MUTEX_BYTES
    assert L.R_MUTEX_OFFSET % 64 == 0 and L.R_MUTEX_OFFSET >= 8 * (L.R_MODE + 1)
    assert L.R_MUTEX_OFFSET + L.R_MUTEX_BYTES <= L.RING_OFFSET
    assert M.KIND & 0x10 and M.KIND & 0x80  # glibc's robust and process-shared bits


@pytest.mark.parametrize("how", ["lock", "begin"])
def test_a_holder_killed_by_sigkill_hands_the_lock_on(
    registry: shmreg.Registry, kids: Children, how: str
) -> None:
    holder = _hold(kids, registry.name, how)
    with pytest.raises(shmreg.RegistryTimeout):
        _store(registry).lock.acquire(timeout=0.05)  # really held by the child
    _kill(kids, holder)
    _store(registry).lock.acquire(timeout=DEADLINE_S)  # EOWNERDEAD, made consistent
    _store(registry).lock.release()
    registry.register("jobs", "after-kill")  # the owner words (if set) made it recover
    assert registry.lookup("jobs", "after-kill") == os.getpid()
    assert _store(registry).rq[L.R_RECOVERIES] == (1 if how == "begin" else 0)
    assert fsck.check(registry.name).ok


def test_a_held_lock_times_out_and_changes_nothing(
    registry: shmreg.Registry, kids: Children
) -> None:
    registry.register("jobs", "before")
    holder = _hold(kids, registry.name, "begin")
    for timeout in (0.0, 0.2):
        with pytest.raises(shmreg.RegistryTimeout):
            _store(registry).begin(timeout=timeout)
    assert _store(registry).rq[L.R_OWNER_PID] == holder  # the waiter wrote nothing
    _kill(kids, holder)
    registry.register("jobs", "after")
    assert sorted(registry.list_services("jobs")) == ["after", "before"]


def test_threads_of_one_process_exclude_each_other(registry: shmreg.Registry) -> None:
    lock = _store(registry).lock
    inside: list[int] = []
    overlaps: list[int] = []
    count = [0]

    def work() -> None:
        for _ in range(2000):
            lock.acquire()
            try:
                if inside:
                    overlaps.append(threading.get_ident())
                inside.append(1)
                value = count[0]
                os.sched_yield()  # invite the other thread in, were it not excluded
                count[0] = value + 1
                inside.pop()
            finally:
                lock.release()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    assert not any(t.is_alive() for t in threads)
    assert overlaps == [] and count[0] == 6000


def test_a_forked_child_does_not_inherit_the_parents_hold(registry: shmreg.Registry) -> None:
    store = _store(registry)
    store.lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: the parent holds the lock, so this must time out
            code = 1
            try:
                store.lock.acquire(timeout=0.05)
            except shmreg.RegistryTimeout:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        store.lock.release()
    assert os.waitstatus_to_exitcode(status) == 0
    registry.register("jobs", "parent-still-writes")


def _assert_damaged_then_repaired(registry: shmreg.Registry) -> None:
    with pytest.raises(shmreg.CorruptRegistry, match="fsck --repair") as damaged:
        registry.register("jobs", "while-damaged")
    assert damaged.value.detail == "writer lock damaged"
    report = fsck.check(registry.name)
    assert any("writer lock damaged" in p for p in report.problems), report.problems
    repaired = fsck.check(registry.name, repair=True)
    assert any("writer lock re-initialised" in r for r in repaired.repaired), repaired.repaired
    assert fsck.check(registry.name).ok
    registry.register("jobs", "after-repair")
    assert registry.lookup("jobs", "after-repair") == os.getpid()


def test_a_damaged_type_word_is_corrupt_registry_and_repairable(
    registry: shmreg.Registry,
) -> None:
    _mutex_word(registry, M.KIND_OFFSET, 0xDEADBEEF)
    _assert_damaged_then_repaired(registry)


def test_a_futex_word_naming_no_thread_is_corrupt_registry_not_a_hang(
    registry: shmreg.Registry,
) -> None:
    # pid_max is at most 2**22: this thread id cannot exist.
    _mutex_word(registry, 0, 0x3FFFFFFF)
    _assert_damaged_then_repaired(registry)


def test_a_futex_word_naming_a_live_stranger_is_corrupt_registry_not_a_hang(
    registry: shmreg.Registry, kids: Children
) -> None:
    stranger = kids.sleeper()  # alive, but never the registry's writer
    _mutex_word(registry, 0, stranger.pid)
    _assert_damaged_then_repaired(registry)


def test_an_unrecoverable_mutex_is_corrupt_registry_and_repairable(
    registry: shmreg.Registry, kids: Children
) -> None:
    _kill(kids, _hold(kids, registry.name, "lock"))
    ptr = ctypes.c_void_p(ctypes.addressof(_store(registry).lock._cell))
    # A locker that got EOWNERDEAD and unlocked without pthread_mutex_consistent.
    assert M._trylock(ptr) == errno.EOWNERDEAD
    assert M._unlock(ptr) == 0
    _assert_damaged_then_repaired(registry)


def test_repair_leaves_a_mutex_held_by_a_live_writer_alone(
    registry: shmreg.Registry, kids: Children
) -> None:
    holder = _hold(kids, registry.name, "begin")
    assert fsck.check(registry.name).problems == []  # held by a live writer: no problem
    _mutex_word(registry, M.KIND_OFFSET, 0xDEADBEEF)
    with pytest.raises(shmreg.CorruptRegistry, match="recorded writer is alive"):
        _store(registry).lock.repair()
    assert _store(registry).rq[L.R_OWNER_PID] == holder
    _kill(kids, holder)  # now nobody can be inside: the repair goes ahead
    repaired = fsck.check(registry.name, repair=True).repaired
    assert any("writer lock re-initialised" in r for r in repaired), repaired
    registry.register("jobs", "after-repair")


@pytest.mark.parametrize("damage", ["all-ones", "bit-0"])
@pytest.mark.parametrize("word", range(M.MUTEX_SIZE // 4))
def test_any_damaged_int_of_the_mutex_fails_cleanly_and_is_repaired(
    registry: shmreg.Registry, word: int, damage: str
) -> None:
    buf = _store(registry)._root.buf
    assert buf is not None
    old = struct.unpack_from("<I", buf, L.R_MUTEX_OFFSET + 4 * word)[0]
    _mutex_word(registry, 4 * word, 0xFFFFFFFF if damage == "all-ones" else old ^ 1)
    with alarm_after(DEADLINE_S, AssertionError, "a write hung on a damaged mutex"):
        try:
            registry.register("jobs", "while-damaged")
        except shmreg.CorruptRegistry as exc:
            assert exc.detail == "writer lock damaged"
        fsck.check(registry.name, repair=True)
        assert fsck.check(registry.name).ok
        registry.register("jobs", "after-repair")
    assert registry.lookup("jobs", "after-repair") == os.getpid()
