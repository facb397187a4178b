"""Other processes' identities, remembered while a pidfd vouches for them (``_known_pids``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import DEADLINE_S, wait_until

import shmreg
from shmreg import _identity, _known_pids

pytestmark = pytest.mark.skipif(
    not _known_pids.enabled() or not _identity._USE_PROC,
    reason="needs /proc and pidfds with an inode per process (Linux 6.9+)",
)


SLEEP = [sys.executable, "-c", "import sys; sys.stdin.read()"]  # until the test lets go


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    _known_pids.clear()
    yield
    _known_pids.clear()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(SLEEP, stdin=subprocess.PIPE)
    try:
        yield child
    finally:
        child.kill()
        child.wait(timeout=DEADLINE_S)


def test_a_running_process_is_read_once(
    sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    real = _identity._read_stat
    monkeypatch.setattr(_identity, "_read_stat", lambda pid: reads.append(pid) or real(pid))
    first = _identity.identity_of(sleeper.pid)
    assert [_identity.identity_of(sleeper.pid) for _ in range(5)] == [first] * 5
    assert reads == [sleeper.pid]
    assert _known_pids.known(sleeper.pid) == first


def test_an_exited_process_is_forgotten_even_before_it_is_reaped(
    sleeper: subprocess.Popen[bytes],
) -> None:
    ident = _identity.identity_of(sleeper.pid)
    assert _known_pids.known(sleeper.pid) == ident
    os.kill(sleeper.pid, 9)
    # Not reaped: a zombie. The pidfd turns readable at the exit, not at the reaping.
    wait_until(lambda: _known_pids.known(sleeper.pid) is None, "the pidfd to report the exit")
    with pytest.raises(shmreg.ProcessNotAlive, match=r"zombie|no process"):
        _identity.identity_of(sleeper.pid)


def test_registering_a_dead_process_still_fails(
    registry: shmreg.Registry, sleeper: subprocess.Popen[bytes]
) -> None:
    registry.register("ns", "first", pid=sleeper.pid)  # remembered from here on
    sleeper.kill()
    sleeper.wait(timeout=DEADLINE_S)
    with pytest.raises(shmreg.ProcessNotAlive):
        registry.register("ns", "second", pid=sleeper.pid)
    assert registry.lookup("ns", "second") is None


def test_a_descriptor_someone_else_closed_and_reused_is_not_trusted_or_closed(
    sleeper: subprocess.Popen[bytes], tmp_path: os.PathLike[str]
) -> None:
    _identity.identity_of(sleeper.pid)
    fd = _known_pids._known[sleeper.pid].fd
    # As a daemon closing every descriptor and opening a file would: the number is reused.
    other = os.open(os.path.join(tmp_path, "f"), os.O_CREAT | os.O_WRONLY)
    os.dup2(other, fd)  # closes the pidfd, gives its number to the file
    os.close(other)
    try:
        assert _known_pids.known(sleeper.pid) is None
        os.fstat(fd)  # still open: not closed as if it were the pidfd
    finally:
        os.close(fd)
    assert _identity.identity_of(sleeper.pid).pid == sleeper.pid  # read again, remembered again
    assert _known_pids.known(sleeper.pid) is not None


def test_it_holds_at_most_limit_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_known_pids, "LIMIT", 3)
    children = [subprocess.Popen(SLEEP, stdin=subprocess.PIPE) for _ in range(5)]
    try:
        before = len(os.listdir("/proc/self/fd"))
        for child in children:
            _identity.identity_of(child.pid)
        assert len(_known_pids._known) == 3
        assert [c.pid for c in children[2:]] == list(_known_pids._known)  # the newest kept
        assert len(os.listdir("/proc/self/fd")) == before + 3
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=DEADLINE_S)
    _known_pids.clear()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_hit_keeps_a_process_from_being_the_next_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_known_pids, "LIMIT", 3)
    children = [subprocess.Popen(SLEEP, stdin=subprocess.PIPE) for _ in range(4)]
    try:
        a, b, c, d = (child.pid for child in children)
        for pid in (a, b, c):
            _identity.identity_of(pid)
        _identity.identity_of(a)  # a hit: now the most recently used
        _identity.identity_of(d)
        assert list(_known_pids._known) == [c, a, d]  # b, the least recently used, went
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=DEADLINE_S)


def test_where_pidfds_share_an_inode_nothing_is_remembered(
    sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_known_pids, "_enabled", False)  # as before Linux 6.9
    reads: list[int] = []
    real = _identity._read_stat
    monkeypatch.setattr(_identity, "_read_stat", lambda pid: reads.append(pid) or real(pid))
    assert _identity.identity_of(sleeper.pid) == _identity.identity_of(sleeper.pid)
    assert reads == [sleeper.pid, sleeper.pid] and _known_pids._known == {}
