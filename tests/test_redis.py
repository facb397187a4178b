"""RedisBackend on real redis-servers: opening, many hosts, failures, durability, failover.

Every server is started by the test (``shmreg.testing.redis.RedisServer``) on a free port and
stopped afterwards, on failure too. Two hosts are simulated with ``SHMREG_HOST_ID``: another
host's process is a child process with its own host id.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmreg
from shmreg import _identity
from shmreg._types import ProcessIdentity
from shmreg.backends import RedisBackend
from shmreg.testing.redis import RedisServer, free_port


def _name() -> str:
    return f"t-{os.getpid()}-redis-{uuid.uuid4().hex[:10]}"


#: The host lease (seconds) of the many-host tests. Short, so an expiry is quick to wait
#: for, but several times the longest pause a loaded machine gives a process: a live host's
#: lease must never lapse between its registration (or its monitor's last renewal, every
#: fifth of the lease) and the test's next look.
LEASE_S = 4


def _until(condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; generous, never a guess."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except shmreg.BackendUnavailable:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def reg(url: str) -> Iterator[shmreg.Registry]:
    registry = shmreg.Registry.create(_name(), url=url)
    try:
        yield registry
    finally:
        registry.destroy()


def _child(code: str, host: str, url: str) -> subprocess.Popen[str]:
    """A process of another "host": its own SHMREG_HOST_ID, reporting on stdout."""
    env = {**os.environ, "SHMREG_HOST_ID": host}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), url],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


# ---------------------------------------------------------------------- opening


def test_open_by_url_create_attach_and_env(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _name()
    with pytest.raises(shmreg.RegistryNotFound):
        shmreg.Registry.attach(name, url=url)
    created = shmreg.Registry.create(name, url=url)
    try:
        assert isinstance(created.backend, RedisBackend)
        created.register("ns", "svc", metadata={"type": "web"})
        monkeypatch.setenv("SHMREG_URL", url)
        by_env = shmreg.Registry.attach(name)
        assert by_env.backend.kind == "redis"
        assert by_env.lookup_with_metadata("ns", "svc") == (os.getpid(), {"type": "web"})
        with pytest.raises(shmreg.IncompatibleRegistry):
            shmreg.Registry.attach(name, capacity=7)
        by_env.close()
    finally:
        created.destroy()


def test_pickles_by_name_and_url(reg: shmreg.Registry) -> None:
    reg.register("ns", "svc", metadata={"n": 1})
    clone = pickle.loads(pickle.dumps(reg))
    try:
        assert clone.backend.kind == "redis" and clone.lookup("ns", "svc") == os.getpid()
    finally:
        clone.close()


def test_bad_urls_are_config_errors() -> None:
    for bad in (
        "http://x",
        "redis://h/0?timeout=0",
        "redis+sentinel://h:1",
        "redis+sentinel://h/m",
    ):
        with pytest.raises(shmreg.InvalidBackendConfig):
            shmreg.Registry(_name(), url=bad)


def test_index_sets_are_swept_of_stale_members(reg: shmreg.Registry, url: str) -> None:
    import redis

    reg.register("ns", "a", metadata={"type": "web", "capabilities": ["x", "y"]})
    reg.register("ns", "b", metadata={"type": "db"})
    client = redis.Redis.from_url(url)
    prefix = f"shmreg:{{{reg.name}}}:"
    stale = f"{prefix}ix:ns:t{b'web'.hex()}"
    client.sadd(stale, b"ns\x00ghost")  # a member whose entry is gone (lost in a failover)
    assert [e.service for e in reg.backend.find("ns", {"type": "web"})] == ["a"]
    (key_a,) = (k for k in client.hkeys(prefix + "ns:ns") if k.endswith(b"a"))
    assert client.smembers(stale) == {key_a}  # the ghost was swept
    assert [e.service for e in reg.backend.find("ns", {"capabilities": ["y", "x"]})] == ["a"]
    reg.update_metadata("ns", "a", {"type": "db"})
    assert sorted(e.service for e in reg.backend.find("ns", {"type": "db"})) == ["a", "b"]
    assert reg.backend.find("ns", {"type": "web"}) == []
    client.close()


def test_wait_events_blocks_on_the_stream(reg: shmreg.Registry) -> None:
    backend = reg.backend
    assert isinstance(backend, RedisBackend)
    start = backend.last_event_seq()
    assert backend.wait_events(start, 0.1) is False
    timer = threading.Timer(0.2, lambda: reg.register("ns", "late"))
    timer.start()
    try:
        assert backend.wait_events(start, 60.0) is True
    finally:
        timer.join()
    assert [e.service for e in backend.read_events(start)[0]] == ["late"]


def test_redis_errors_are_mapped(reg: shmreg.Registry, url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.set(f"shmreg:{{{reg.name}}}:ev", b"not a stream")
    with pytest.raises(shmreg.BackendOperationFailed) as info:
        reg.register("ns", "svc")
    assert info.value.code == 4002 and info.value.operation == "register"
    client.close()
    assert reg.lookup("ns", "svc") is None  # the refused script changed nothing


# ---------------------------------------------------------------------- many hosts

_OTHER_HOST = """
    import sys, shmreg
    reg = shmreg.Registry.attach(sys.argv[2], url=sys.argv[1])
    reg.register("ns", "svc", metadata={"host": "b"})
    if sys.argv[3] == "monitor":
        reg.start_monitor()
    print("ready", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("with_monitor", [False, True])
def test_a_host_is_judged_by_its_lease(redis_server: RedisServer, with_monitor: bool) -> None:
    url = redis_server.url.replace("/0", f"/0?lease={LEASE_S}")
    name = _name()
    reg = shmreg.Registry.create(name, url=url)
    code = _OTHER_HOST.replace("sys.argv[2]", repr(name)).replace(
        "sys.argv[3]", repr("monitor" if with_monitor else "none")
    )
    proc = _child(code, "host-b", url)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        pid = reg.lookup("ns", "svc")
        assert pid == proc.pid  # alive: its host's lease lives, no pid probe here
        with pytest.raises(shmreg.AlreadyRegistered):
            reg.register("ns", "svc")
        if with_monitor:
            # Its monitor renews the lease: sweeps here never remove a live host's entry,
            # however long they go on (several lease lengths).
            deadline = time.monotonic() + 2.5 * LEASE_S
            while time.monotonic() < deadline:
                assert reg.sweep() == 0
                time.sleep(0.2)
            assert reg.lookup("ns", "svc") == proc.pid
        else:
            # Nothing renews host-b's lease: its entry reads dead once it expires, though the
            # process still runs, and a sweep here removes it, saying why.
            seq = reg.backend.last_event_seq()
            _until(lambda: reg.lookup("ns", "svc") is None, what="host-b's lease to expire")
            assert reg.sweep() == 1
            events, _ = reg.backend.read_events(seq)
            assert [(e.kind, e.reason, e.pid, e.host) for e in events] == [
                ("died", "host-lost", proc.pid, "host-b")
            ]
            assert reg.register("ns", "svc") > 0  # the name is free again
    finally:
        _stop(proc)
        reg.destroy()


def test_a_remote_pid_is_never_probed_here(reg: shmreg.Registry) -> None:
    backend = reg.backend
    # A pid that does not exist here, held by a process of host-b (its lease was set by the
    # registration): a local probe would call it dead. It is not ours to judge.
    ghost = ProcessIdentity(2**22 - 3, 12345, "host-b")
    backend.register("ns", "remote", ghost, {"n": 1})
    assert reg.lookup("ns", "remote") == ghost.pid
    assert reg.sweep() == 0
    assert backend.remove_dead({ghost: shmreg.Liveness.GONE}) == 0  # lease lives: refused
    assert backend.owners() >= {ghost}
    assert _identity.check(ghost) is shmreg.Liveness.UNKNOWN


def test_the_monitor_buries_a_dead_local_owner(reg: shmreg.Registry) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE
    )
    try:
        reg.register("ns", "child", pid=proc.pid)
        with reg.monitor():
            assert reg.lookup("ns", "child") == proc.pid
            proc.kill()
            proc.wait(timeout=30)
            events = _until(
                lambda: [e for e in reg.backend.read_events(0)[0] if e.kind == "died"],
                what="the monitor's died event",
            )
        assert events[0].reason in ("gone", "zombie") and reg.count("ns") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stdin is not None
        proc.stdin.close()


# ---------------------------------------------------------------------- failures


def test_unreachable_server_is_backend_unavailable_then_reconnects() -> None:
    server = RedisServer()
    try:
        reg = shmreg.Registry.create(_name(), url=server.url)
        reg.register("ns", "svc")
        server.kill()
        began = time.monotonic()
        with pytest.raises(shmreg.BackendUnavailable) as info:
            reg.lookup("ns", "svc")
        assert info.value.code == 4001
        assert info.value.retry_strategy is shmreg.RetryStrategy.BACKOFF
        assert time.monotonic() - began < 30  # bounded; the figure is in docs/redis.md
        server.start()  # empty again (no persistence): the registry is gone, not hung
        with pytest.raises(shmreg.RegistryDestroyed):
            reg.lookup("ns", "svc")
    finally:
        server.stop()
    with pytest.raises(shmreg.BackendUnavailable):
        shmreg.Registry(_name(), url=f"redis://127.0.0.1:{free_port()}/0")


def test_aof_survives_sigkill_with_every_acknowledged_registration() -> None:
    server = RedisServer(appendonly=True)
    try:
        reg = shmreg.Registry.create(_name(), url=server.url)
        gens = {i: reg.register("ns", ("job", i), metadata={"i": i}) for i in range(200)}
        server.kill()  # SIGKILL right after the last acknowledgement
        server.start()
        assert {s[1]: g for s, _pid, g in reg.backend.namespace_owners("ns")} == gens
        assert reg.lookup_with_metadata("ns", ("job", 199)) == (os.getpid(), {"i": 199})
        assert reg.register("ns", "after") == 201  # the generation counter survived too
        reg.destroy()
    finally:
        server.stop()


def test_sentinel_failover_is_survived() -> None:
    import redis

    master = RedisServer()
    replica = RedisServer(config=[f"replicaof 127.0.0.1 {master.port}"])
    sentinel = None
    try:
        sentinel = RedisServer(
            sentinel=True,
            config=[
                f"sentinel monitor shmreg-m 127.0.0.1 {master.port} 1",
                "sentinel down-after-milliseconds shmreg-m 500",
                "sentinel failover-timeout shmreg-m 5000",
            ],
        )
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/shmreg-m/0"
        reg = shmreg.Registry.create(_name(), url=url)
        for i in range(50):
            reg.register("ns", ("job", i))
        # Wait for the replica to hold every write: what async replication has not shipped
        # a failover may lose (docs/redis.md says so).
        direct = redis.Redis(port=master.port)
        assert direct.wait(1, 30_000) == 1
        direct.close()
        master.kill()
        _until(lambda: reg.register("ns", "after-failover") > 0, what="the failover")
        from redis.sentinel import Sentinel

        watcher = Sentinel([("127.0.0.1", sentinel.port)], socket_timeout=5)
        assert watcher.discover_master("shmreg-m")[1] == replica.port  # a real failover
        for conn in watcher.sentinels:
            conn.close()
        assert reg.count("ns") == 51
        assert reg.backend.read_events(0)[0][-1].service == "after-failover"
        reg.destroy()
    finally:
        for server in (sentinel, replica, master):
            if server is not None:
                server.stop()


def test_wait_for_and_watch_follow_the_stream(reg: shmreg.Registry) -> None:
    seen = reg.backend.last_event_seq()
    timer = threading.Timer(0.2, lambda: reg.register("ns", "late", metadata={"n": 1}))
    timer.start()
    try:
        assert reg.wait_for("ns", "late", timeout=60) == os.getpid()
    finally:
        timer.join()
    with pytest.raises(shmreg.RegistryTimeout):
        reg.wait_for("ns", "never", timeout=0.2)
    watched = reg.watch("ns", since=seen, timeout=0.5)
    assert [(e.kind, e.service) for e in watched] == [("registered", "late")]


# ---------------------------------------------------------------------- the command line


def _cli(*args: str) -> Any:
    import json

    out = subprocess.run(
        [sys.executable, "-m", "shmreg", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    if args[0] == "watch":  # one event per line
        return [json.loads(line) for line in out.stdout.splitlines()]
    return json.loads(out.stdout)


def test_cli_takes_urls(reg: shmreg.Registry, url: str) -> None:
    reg.register("ns", "svc", metadata={"type": "web"})
    target = f"{url}#{reg.name}"
    assert reg.name in _cli("ls", url)
    rows = _cli("ls", target)
    assert [(r["namespace"], r["service"], r["pid"], r["alive"]) for r in rows] == [
        ("ns", "svc", os.getpid(), True)
    ]
    info = _cli("info", target)
    assert (info["backend"], info["entries"]) == ("redis", 1)
    assert _cli("sweep", target) == {"removed": 0}
    events = _cli("watch", target, "--since", "0", "--timeout", "0.5")
    assert [(e["kind"], e["service"]) for e in events] == [("registered", "svc")]


def test_a_hung_server_times_out_and_the_client_recovers() -> None:
    import signal

    server = RedisServer()
    try:
        # 2 s, not less: the calls before the SIGSTOP must not time out on a loaded machine.
        reg = shmreg.Registry.create(_name(), url=server.url.replace("/0", "/0?timeout=2"))
        reg.register("ns", "svc")
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # accepts nothing, answers nothing
        try:
            began = time.monotonic()
            with pytest.raises(shmreg.BackendUnavailable):
                reg.lookup("ns", "svc")
            waited = time.monotonic() - began
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert waited < 30  # bounded (two attempts of the timeout; docs/redis.md has figures)
        assert _until(lambda: reg.lookup("ns", "svc"), what="the reconnect") == os.getpid()
        reg.destroy()
    finally:
        server.stop()


def test_a_crashed_hosts_entries_are_buried_by_another_hosts_monitor(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url.replace("/0", f"/0?lease={LEASE_S}")
    name = _name()
    reg = shmreg.Registry.create(name, url=url)
    code = _OTHER_HOST.replace("sys.argv[2]", repr(name)).replace("sys.argv[3]", "'monitor'")
    proc = _child(code, "host-b", url)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        seq = reg.backend.last_event_seq()
        with reg.monitor():  # this host's monitor, beside host-b's
            assert reg.lookup("ns", "svc") == proc.pid
            proc.kill()  # host-b goes down whole: its process and its monitor
            proc.wait(timeout=30)
            died = _until(
                lambda: [e for e in reg.backend.read_events(seq)[0] if e.kind == "died"],
                what="host-b's entry to be buried",
            )
        assert [(e.reason, e.host, e.pid) for e in died] == [("host-lost", "host-b", proc.pid)]
        assert reg.count() == 0
    finally:
        _stop(proc)
        reg.destroy()


def test_shmreg_monitor_url_keeps_its_hosts_lease(redis_server: RedisServer) -> None:
    url = redis_server.url.replace("/0", f"/0?lease={LEASE_S}")
    reg = shmreg.Registry.create(_name(), url=url)
    env = {**os.environ, "SHMREG_HOST_ID": "host-b"}
    monitor = subprocess.Popen(
        [sys.executable, "-m", "shmreg", "monitor", f"{url}#{reg.name}"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert monitor.stdout is not None
        assert monitor.stdout.readline().startswith("monitoring")
        # An entry of a live host-b process (registered from here; host-b's monitor judges
        # it, and finds it alive: both "hosts" are this machine).
        owner = _identity.self_identity()._replace(host="host-b")
        reg.backend.register("ns", "svc", owner, None)
        deadline = time.monotonic() + 2.5 * LEASE_S  # several lease lengths
        while time.monotonic() < deadline:
            assert reg.sweep() == 0 and reg.lookup("ns", "svc") == owner.pid
            time.sleep(0.2)
        monitor.terminate()  # host-b's monitor stops: nothing renews the lease now
        monitor.wait(timeout=30)
        _until(lambda: reg.lookup("ns", "svc") is None, what="host-b's lease to expire")
        assert reg.sweep() == 1
    finally:
        if monitor.poll() is None:
            monitor.kill()
        monitor.wait(timeout=30)
        if monitor.stdout is not None:
            monitor.stdout.close()
        reg.destroy()
