"""Failover through a DualWriteBackend: Redis (a real redis-server) as the primary, shared
memory as the standby, writers registering all along while the server is SIGKILLed or
stopped and started again. Afterwards every acknowledged registration is on the primary."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

import shmreg
from shmreg.backends import Backend
from shmreg.backends._dualwrite import DualWriteBackend
from shmreg.backends._shm import SharedMemoryBackend
from shmreg.testing.redis import RedisServer, redis_server_binary
from tests import test_backend_monitor

Sides = tuple[shmreg.Registry, DualWriteBackend, Backend, SharedMemoryBackend]

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server")

WAIT = 120.0  # seconds: the machine is slow and shared; these are bounds, not expectations


server = test_backend_monitor.server  # a private server with an AOF, stopped and started


@pytest.fixture
def sides(server: RedisServer, reg_name: str) -> Iterator[Sides]:
    """A registry on a dual-write backend: Redis the primary, shared memory the standby."""
    from shmreg.backends._redis import RedisBackend

    primary = RedisBackend(f"fo-{uuid.uuid4().hex[:8]}", f"{server.url}?timeout=5", create=True)
    standby = SharedMemoryBackend(reg_name, capacity=8192)
    dual = DualWriteBackend(primary, standby)
    try:
        yield shmreg.Registry(primary.name, backend=dual), dual, primary, standby
    finally:
        standby.destroy()
        try:
            primary.destroy()
        except shmreg.ShmregError:
            pass


def wait_until(what: str, condition: Callable[[], bool], status: Callable[[], object]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {WAIT} s: {status()}"
        time.sleep(0.02)


class Writers:
    """Threads registering fresh names; a name counts once ``register`` returned for it."""

    def __init__(self, reg: shmreg.Registry, threads: int = 2, per_thread: int = 3000) -> None:
        self.reg = reg
        self.acked: list[str] = []
        self.refused = 0  # calls that raised: not acknowledged, so not counted
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(w, per_thread), daemon=True)
            for w in range(threads)
        ]

    def _run(self, w: int, count: int) -> None:
        for n in range(count):
            if self._stop.is_set():
                return
            name = f"w{w}-{n}"
            try:
                self.reg.register("jobs", name, metadata={"n": n})
            except shmreg.ShmregError:
                with self._lock:
                    self.refused += 1
                self._stop.wait(0.01)  # the primary is down and not failed over yet
                continue
            with self._lock:
                self.acked.append(name)
            self._stop.wait(0.002)  # steady load, not a burst that ends before the outage

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(WAIT)

    def grows_by(self, more: int) -> Callable[[], bool]:
        base = len(self.acked)
        return lambda: (
            len(self.acked) >= base + more or not any(t.is_alive() for t in self._threads)
        )


def test_no_acknowledged_registration_is_lost_across_two_outages(
    server: RedisServer, sides: Sides
) -> None:
    reg, dual, primary, standby = sides
    switches: list[tuple[str, str]] = []
    mon = shmreg.BackendMonitor(
        reg,
        interval=0.05,
        fail_after=3,
        recover_after=3,
        on_switch=lambda role, why: switches.append((role, why)),
    )
    try:
        with mon, Writers(reg) as writers:

            def status() -> object:
                return (len(writers.acked), writers.refused, mon.status(), dual.stats().extra)

            wait_until("writing", writers.grows_by(100), status)
            during_outages: list[str] = []
            for stop_server in (server.kill, lambda: (server.proc.terminate(), server.proc.wait())):
                stop_server()  # SIGKILL, then SIGTERM
                wait_until("failed over", lambda: mon.active == "standby", status)
                assert dual.serving == "secondary"
                start = len(writers.acked)
                wait_until("writing on the standby", writers.grows_by(100), status)
                during_outages += writers.acked[start:]
                server.start()
                wait_until("failed back", lambda: mon.active == "primary", status)
                assert dual.serving == "primary"
                wait_until("writing on the primary", writers.grows_by(100), status)
        acked = list(writers.acked)
        on_primary = set(primary.list_services("jobs"))
        missing = [name for name in acked if name not in on_primary]
        assert not missing, (len(missing), missing[:10], status())
        # The names acknowledged while the standby served reached the primary by the resync.
        assert len(during_outages) >= 200
        assert all(primary.lookup("jobs", name) == os.getpid() for name in during_outages[:50])
        assert set(acked) <= set(standby.list_services("jobs"))  # mirrored the other way too
        assert dual.pending == 0
        assert [role for role, _ in switches] == ["standby", "primary"] * 2, switches
        assert "resynced to the primary" in switches[1][1]
        assert mon.figures.failovers == 2 and mon.figures.failbacks == 2
    finally:
        mon.stop()


def test_a_monitor_on_a_dual_write_registry_takes_no_other_standby(reg_name: str) -> None:
    standby = SharedMemoryBackend(reg_name, capacity=64)
    other = SharedMemoryBackend(f"{reg_name}-x", capacity=64)
    try:
        reg = shmreg.Registry(reg_name, backend=DualWriteBackend(other, standby))
        with pytest.raises(shmreg.InvalidArgument):
            shmreg.BackendMonitor(reg, other)
        mon = shmreg.BackendMonitor(reg, standby)  # its own secondary is accepted
        assert mon.backends["standby"].backend is standby
        assert mon.check_once() == "primary"
    finally:
        standby.destroy()
        other.destroy()


def test_failback_waits_until_the_primary_can_be_resynced(
    server: RedisServer, sides: Sides
) -> None:
    reg, dual, primary, _ = sides
    reg.register("web", "before")
    server.kill()
    dual.fail_over()
    reg.register("web", "during")  # the standby acknowledges it
    assert reg.lookup("web", "during") == os.getpid()
    assert set(reg.list_services("web")) == {"before", "during"}
    with pytest.raises(shmreg.ShmregError):
        dual.fail_back()  # the primary is still down: nothing switches
    assert dual.serving == "secondary" and reg.lookup("web", "during") == os.getpid()
    reg.unregister("web", "before")  # removals reach the primary by the resync too
    server.start()
    assert primary.lookup("web", "during") is None
    assert dual.fail_back() >= 2
    assert dual.serving == "primary" and dual.pending == 0
    assert primary.lookup("web", "during") == os.getpid()
    assert primary.lookup("web", "before") is None
    assert dual.stats().extra["dual"]["serving"] == "primary"
