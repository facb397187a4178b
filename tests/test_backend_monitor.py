"""BackendMonitor: health checks, failover after N failed checks, failback after M healthy,
against a real redis-server stopped and started."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator

import pytest

import shmreg
from shmreg.backends._shm import SharedMemoryBackend
from shmreg.testing.redis import RedisServer, redis_server_binary

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer(appendonly=True)  # private: stopped and started; the AOF keeps the data
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def pair(
    server: RedisServer, reg_name: str
) -> Iterator[tuple[shmreg.Registry, SharedMemoryBackend]]:
    """A registry on Redis (the primary) and a shared-memory standby of the same name."""
    reg = shmreg.Registry(f"obs-{uuid.uuid4().hex[:8]}", url=f"{server.url}?timeout=5")
    standby = SharedMemoryBackend(reg_name, capacity=256)
    try:
        yield reg, standby
    finally:
        standby.destroy()
        try:
            reg.close()
        except shmreg.ShmregError:
            pass


def test_failover_and_failback_with_a_real_server(
    server: RedisServer,
    pair: tuple[shmreg.Registry, SharedMemoryBackend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg, standby = pair
    primary = reg.backend
    switches: list[tuple[str, str]] = []
    mon = shmreg.BackendMonitor(
        reg,
        standby,
        fail_after=3,
        recover_after=2,
        on_switch=lambda r, why: switches.append((r, why)),
    )
    reg.register("web", "a")
    assert mon.check_once() == "primary"

    server.kill()  # SIGKILL: the server is gone; its files stay for the restart
    with caplog.at_level(logging.INFO, logger="shmreg"):
        assert mon.check_once() == "primary"  # one failure is not enough
        assert mon.check_once() == "primary"
        assert mon.check_once() == "standby"  # the third in a row is
    assert reg.backend is standby and switches[0][0] == "standby"
    assert "3 failed checks" in switches[0][1]
    reg.register("web", "b")  # the registry works on, on the standby
    assert reg.lookup("web", "b") == os.getpid() and standby.lookup("web", "b") == os.getpid()
    messages = [r.getMessage() for r in caplog.records if r.name == "shmreg.monitoring"]
    assert any("failover from primary to standby" in m for m in messages), messages
    assert sum("check failed" in m for m in messages) == 1  # logged on the change, not per check

    server.start()
    assert mon.check_once() == "standby"  # one healthy check is not enough
    assert mon.check_once() == "primary"
    assert reg.backend is primary and switches[-1][0] == "primary"
    assert reg.lookup("web", "a") == os.getpid()  # kept by the AOF across the SIGKILL
    status = mon.status()
    assert status["failovers"] == 1 and status["failbacks"] == 1
    assert status["backends"]["primary"]["failures"] == 3


def test_flapping_primary_does_not_switch(
    server: RedisServer, pair: tuple[shmreg.Registry, SharedMemoryBackend]
) -> None:
    reg, standby = pair
    mon = shmreg.BackendMonitor(reg, standby, fail_after=2, recover_after=2)
    for _ in range(3):
        server.kill()
        assert mon.check_once() == "primary"
        server.start()
        assert mon.check_once() == "primary"
    assert mon.figures.failovers == 0 and mon.status()["backends"]["primary"]["failures"] == 3


def test_the_thread_fails_over_and_metrics_show_it(
    server: RedisServer, pair: tuple[shmreg.Registry, SharedMemoryBackend]
) -> None:
    pytest.importorskip("prometheus_client")
    from shmreg.metrics import exposition

    reg, standby = pair
    with shmreg.BackendMonitor(reg, standby, interval=0.05, fail_after=2, recover_after=2) as mon:
        server.kill()
        deadline = time.monotonic() + 60
        while mon.active != "standby":
            assert time.monotonic() < deadline, mon.status()
            time.sleep(0.02)
        text = exposition(reg)
    assert f'shmreg_backend_active{{registry="{reg.name}",role="standby"}} 1.0' in text
    assert "shmreg_backend_failovers_total" in text


def test_bad_settings_are_refused(pair: tuple[shmreg.Registry, SharedMemoryBackend]) -> None:
    reg, standby = pair
    for kwargs in ({"fail_after": 0}, {"recover_after": 1.5}, {"interval": 0}, {"timeout": -1}):
        with pytest.raises(shmreg.InvalidArgument):
            shmreg.BackendMonitor(reg, standby, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(shmreg.InvalidArgument):
        shmreg.BackendMonitor(reg, object())  # type: ignore[arg-type]
