"""RedisBackend upkeep on a real redis-server: forgotten hosts, scoped destroys, the kept line.

Each test opens its registries on the session's private server (``redis_server``) under
names starting with ``t-<pid>-`` and destroys them after, on failure too.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import shmreg
from shmreg._types import ProcessIdentity
from shmreg.backends import RedisBackend
from shmreg.testing.redis import RedisServer
from tests.helpers import wait_until


def _name() -> str:
    return f"t-{os.getpid()}-upkeep-{uuid.uuid4().hex[:10]}"


def _expire_lease(raw: Any, name: str, host: str) -> None:
    """End ``host``'s lease now, as its expiry would (Redis drops a key whose TTL ran out).

    The registries here keep the default ten-second lease, so a lease the test wants alive
    cannot lapse while a loaded machine pauses the test; the one it wants gone goes when
    the test says so.
    """
    assert raw.delete(f"shmreg:{{{name}}}:lease:{host.encode().hex()}") == 1


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[Any]:
    """A bare redis-py client on the same server, to look at the keys themselves."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        client.close()


def test_a_lost_host_is_forgotten_once_its_entries_are_buried(
    redis_server: RedisServer, raw: Any
) -> None:
    name = _name()
    reg = shmreg.Registry.create(name, url=redis_server.url)
    try:
        backend = reg.backend
        hosts = f"shmreg:{{{name}}}:hosts"
        gone = b"host-gone".hex().encode()
        # A registration for a host that then never renews its lease.
        backend.register("ns", "orphan", ProcessIdentity(4_000_000, 1, "host-gone"), None)
        assert gone in raw.smembers(hosts)
        _expire_lease(raw, name, "host-gone")
        wait_until(lambda: reg.lookup("ns", "orphan") is None, "the lease to expire")
        assert backend.heartbeat() == 1  # buried, with a died event (test_redis.py checks it)
        # ...and forgotten: heartbeats no longer check a host that holds nothing.
        assert gone not in raw.smembers(hosts)
        here = backend._here
        assert here in raw.smembers(hosts)  # this host's lease lives: it stays
        assert backend.heartbeat() == 0
    finally:
        reg.destroy()


def test_a_host_whose_lease_came_back_is_not_forgotten(redis_server: RedisServer, raw: Any) -> None:
    name = _name()
    reg = shmreg.Registry.create(name, url=redis_server.url)
    try:
        backend = reg.backend
        back = b"host-back".hex().encode()
        backend.register("ns", "a", ProcessIdentity(4_000_001, 1, "host-back"), None)
        _expire_lease(raw, name, "host-back")
        wait_until(lambda: reg.lookup("ns", "a") is None, "the lease to expire")
        # The host returns between a heartbeat's look and its removal: the script is given
        # the host to forget, but sees its lease and keeps it (and its new entry).
        backend.register("ns", "b", ProcessIdentity(4_000_001, 1, "host-back"), None)
        now = time.time()
        backend._run("remove", now, backend.ring_events, backend._here, 0, 1, back)
        assert back in raw.smembers(f"shmreg:{{{name}}}:hosts")
        assert reg.lookup("ns", "b") == 4_000_001
    finally:
        reg.destroy()


def test_destroy_takes_only_its_own_keys_whatever_the_name(
    redis_server: RedisServer, raw: Any
) -> None:
    # Names are glob patterns to SCAN MATCH unless escaped: "x*" would match "xy"'s keys.
    base = _name()
    other = RedisBackend(base + "-xy", redis_server.url)
    try:
        other.register("ns", "kept", ProcessIdentity(os.getpid(), 0), {"type": "w"})
        for pattern in ("-x*", "-x?", "-[x]y"):
            doomed = RedisBackend(base + pattern, redis_server.url)
            doomed.register("ns", "gone", ProcessIdentity(os.getpid(), 0), {"type": "w"})
            doomed.destroy()
            prefix = f"shmreg:{{{base + pattern}}}:".encode()
            assert [k for k in raw.keys(f"shmreg:{{{base}*") if k.startswith(prefix)] == []
            assert other.last_event_seq() == 1, pattern  # its meta survived
            assert other.lookup("ns", "kept") == os.getpid()
    finally:
        other.destroy()


def test_threads_share_a_handle(redis_server: RedisServer) -> None:
    # Calls made while another is in flight go through the pool: every answer is its own.
    reg = shmreg.Registry.create(_name(), url=redis_server.url)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(200):
                reg.register("ns", f"{t}-{i}", metadata={"t": t, "i": i})
                assert reg.backend.lookup_entry("ns", f"{t}-{i}")[2] == {"t": t, "i": i}
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors[0]
        assert reg.count("ns") == 800
    finally:
        reg.destroy()


def test_a_forked_child_leaves_the_parents_connection_alone(redis_server: RedisServer) -> None:
    reg = shmreg.Registry.create(_name(), url=redis_server.url)
    try:
        reg.register("ns", "parent")
        pid = os.fork()
        if pid == 0:  # the child: use the inherited handle, then leave at once
            code = 1
            try:
                reg.backend.register("ns", "child", ProcessIdentity(os.getpid(), 0), None)
                code = 0 if reg.lookup("ns", "parent") == os.getppid() else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # Had the child written on the parent's socket, replies would now be out of step.
        for i in range(20):
            assert reg.register("ns", f"after-{i}") > 0
            assert reg.lookup("ns", f"after-{i}") == os.getpid()
        assert reg.lookup("ns", "parent") == os.getpid()
    finally:
        reg.destroy()


def test_a_wait_ends_when_the_registry_is_destroyed(redis_server: RedisServer, raw: Any) -> None:
    reg = shmreg.Registry.create(_name(), url=redis_server.url)
    other = shmreg.Registry.attach(reg.name, url=redis_server.url)
    outcome: list[object] = []

    def wait() -> None:
        try:
            outcome.append(other.backend.wait_events(seq, 30.0))
        except shmreg.ShmregError as exc:
            outcome.append(exc)

    seq = other.backend.last_event_seq()
    waiter = threading.Thread(target=wait)
    try:
        waiter.start()
        wait_until(lambda: any(c["cmd"] == "xread" for c in raw.client_list()), "the blocked read")
        reg.destroy()
        waiter.join(60)
        # Without the check between slices the wait returns False after its full timeout.
        assert len(outcome) == 1 and isinstance(outcome[0], shmreg.RegistryDestroyed)
    finally:
        waiter.join(60)
        other.close()
        reg.destroy()


def test_a_remembered_key_never_lets_an_invalid_one_through(redis_server: RedisServer) -> None:
    # ("job", 1), ("job", True) and ("job", 1.0) are one dict key; only the first is a name.
    reg = shmreg.Registry.create(_name(), url=redis_server.url)
    try:
        reg.register("ns", ("job", 1))
        assert reg.lookup("ns", ("job", 1)) == os.getpid()
        for bad in (("job", True), ("job", 1.0), True, 1.0):
            with pytest.raises(shmreg.InvalidKey):
                reg.lookup("ns", bad)
        reg.register("ns", 7)
        assert reg.lookup("ns", 7) == os.getpid()
        with pytest.raises(shmreg.InvalidKey):
            reg.lookup("ns", True)
    finally:
        reg.destroy()


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose listen queue is full: the kernel drops new connections' SYNs, so a
    connect hangs (as to a host gone from the network) instead of being refused."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port: int = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        yield port
    finally:
        for sock in [*fillers, server]:
            sock.close()


@pytest.mark.parametrize("scheme", ["redis", "redis+sentinel"])
def test_a_server_that_never_answers_the_connect_is_unavailable_soon(
    black_hole: int, scheme: str
) -> None:
    url = f"redis://127.0.0.1:{black_hole}/0"
    if scheme == "redis+sentinel":
        url = f"redis+sentinel://127.0.0.1:{black_hole}/mymaster/0"
    outcome: list[BaseException] = []

    def open_it() -> None:
        try:
            shmreg.Registry.create(_name(), url=url).destroy()
        except BaseException as exc:  # reported below
            outcome.append(exc)

    # Daemon: without a connect timeout the thread would sit in connect() for minutes.
    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(60)  # many times the 1 s budget (two attempts of half each, per sentinel)
    assert outcome and isinstance(outcome[0], shmreg.BackendUnavailable), outcome


def test_close_does_not_wait_for_a_call_in_flight(redis_server: RedisServer) -> None:
    # A signal handler that closes the handle runs in the thread whose call it interrupted:
    # if close() waited for that call to finish it would wait forever. Here the call in
    # flight is held open by hand, and close() runs in a thread so a wait cannot hang us.
    reg = shmreg.Registry.create(_name(), url=redis_server.url)
    other = shmreg.Registry.attach(reg.name, url=redis_server.url)
    line = other.backend._line
    try:
        assert line._lock.acquire(timeout=30)  # a call in flight
        try:
            closer = threading.Thread(target=other.close, daemon=True)
            closer.start()
            closer.join(30)
            assert not closer.is_alive()
        finally:
            line._lock.release()
        with pytest.raises(shmreg.RegistryClosed):
            other.lookup("ns", "x")
    finally:
        other.close()
        reg.destroy()


def test_a_lost_hosts_name_is_taken_over_by_a_register_without_a_sweep(
    redis_server: RedisServer, raw: Any
) -> None:
    name = _name()
    reg = shmreg.Registry.create(name, url=redis_server.url)
    try:
        backend = reg.backend
        gone = ProcessIdentity(4_000_002, 1, "host-c")
        old = backend.register("ns", "svc", gone, None)
        with pytest.raises(shmreg.AlreadyRegistered):
            reg.register("ns", "svc")  # host-c's lease lives: its entry is not ours
        _expire_lease(raw, name, "host-c")
        wait_until(lambda: reg.lookup("ns", "svc") is None, "host-c's lease to expire")
        seq = backend.last_event_seq()
        assert reg.register("ns", "svc") > old  # the script itself saw the lease gone
        events, _ = backend.read_events(seq)
        assert [(e.kind, e.reason, e.pid) for e in events] == [
            ("registered", "takeover", os.getpid())
        ]
        assert reg.lookup("ns", "svc") == os.getpid()
    finally:
        reg.destroy()


def test_the_monitor_outlives_a_server_restart() -> None:
    """An unreachable server pauses the monitor, it does not end it: the lease keeps being
    renewed afterwards and deaths are still handled."""
    import subprocess
    import sys

    server = RedisServer(appendonly=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1e9)"])
    reg = shmreg.Registry.create(_name(), url=server.url)
    try:
        reg.register("ns", "doomed", pid=child.pid)
        with reg.monitor() as monitor:
            wait_until(lambda: monitor.stats.watched >= 1, "the owner watched")
            server.kill()
            wait_until(lambda: monitor.stats.errors, "the monitor noticing the outage")
            server.start()
            child.kill()
            child.wait()
            wait_until(lambda: reg.lookup("ns", "doomed") is None and reg.count("ns") == 0,
                   "the dead owner's entry removed after the restart")
            wait_until(lambda: monitor.stats.removed >= 1, "the monitor's removal")
            assert monitor.running
        assert all("BackendUnavailable" in error for error in monitor.stats.errors)
        reg.destroy()
    finally:
        child.kill()
        child.wait()
        reg.close()
        server.stop()
