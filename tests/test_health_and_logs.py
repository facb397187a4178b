"""``shmreg health`` exit codes and reasons; the log lines of dead removals and growth."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

import shmreg
from tests.test_damaged import _flip


def health(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmreg", "health", name, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _with_dead(reg: shmreg.Registry, mine: int, theirs: int) -> None:
    """``mine`` entries of this process and ``theirs`` of a child that then exits."""
    reg.register_many("ns", [(f"m{i}", None, None) for i in range(mine)])
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        reg.register_many("ns", [(f"d{i}", child.pid, None) for i in range(theirs)])
    finally:
        child.communicate(timeout=60)


def test_health_exit_codes_and_reasons(registry: shmreg.Registry) -> None:
    registry.register("ns", "a")
    ok = health(registry.name)
    assert ok.returncode == 0 and ok.stdout.startswith("healthy:"), ok
    assert len(ok.stdout.strip().splitlines()) == 1

    _with_dead(registry, 84, 15)  # 15 of 100 dead: degraded
    degraded = health(registry.name)
    assert degraded.returncode == 1 and degraded.stdout.startswith("degraded:"), degraded
    assert "15 of 100" in degraded.stdout and "sweep" in degraded.stdout

    registry.sweep()
    _flip(registry, 1, seed=5)
    bad = health(registry.name, "--json")
    assert bad.returncode == 2, bad
    data = json.loads(bad.stdout)
    assert data["status"] == "unhealthy" and data["exit_code"] == 2 and data["damaged"] == 1
    assert f"fsck --repair {registry.name}" in data["reason"]


def test_health_of_a_missing_registry_is_unhealthy(reg_name: str) -> None:
    missing = health(reg_name)
    assert missing.returncode == 2 and "RegistryNotFound" in missing.stderr


@pytest.mark.parametrize("backend", ["shm", "memory", "redis"])
def test_dead_removals_are_logged_with_their_reason(
    reg_name: str, backend: str, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    if backend == "redis":
        from shmreg.testing.redis import redis_server_binary

        if redis_server_binary() is None:
            pytest.skip("no redis-server")
        url = request.getfixturevalue("redis_server").url  # type: ignore[attr-defined]
        reg = shmreg.Registry.create(reg_name, url=url, capacity=64)
    else:
        reg = shmreg.Registry.create(reg_name, backend=backend, capacity=64)
    try:
        _with_dead(reg, 1, 3)
        with caplog.at_level(logging.INFO, logger="shmreg"):
            assert reg.sweep() == 3
        lines = [r.getMessage() for r in caplog.records if r.name == "shmreg.liveness"]
        assert len(lines) == 1 and "removed 3 entries of dead pid" in lines[0], lines
        assert lines[0].endswith("(gone)") or lines[0].endswith("(zombie)"), lines
    finally:
        reg.destroy()


def test_growth_is_logged(reg_name: str, caplog: pytest.LogCaptureFixture) -> None:
    reg = shmreg.Registry.create(reg_name, capacity=16)
    try:
        with caplog.at_level(logging.INFO, logger="shmreg"):
            reg.register_many("ns", [(i, None, None) for i in range(100)])
        lines = [r.getMessage() for r in caplog.records if r.name == "shmreg.store"]
        assert lines and "grew to generation" in lines[0], lines
    finally:
        reg.destroy()


def test_the_library_configures_no_output() -> None:
    handlers = logging.getLogger("shmreg").handlers
    assert all(type(h) is logging.NullHandler for h in handlers), handlers


def test_recovery_after_a_dead_writer_is_logged(
    registry: shmreg.Registry, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.helpers import child_env

    code = "import sys, shmreg; shmreg.Registry.attach(sys.argv[1]).register('ns', 'x')"
    child = subprocess.run(
        [sys.executable, "-c", code, registry.name],
        env=child_env(SHMREG_CRASH_AT="lock.owner_set"),
        capture_output=True,
        timeout=120,
    )
    assert child.returncode == -9, child  # SIGKILLed holding the writer lock
    with caplog.at_level(logging.WARNING, logger="shmreg"):
        registry.register("ns", "y")  # takes the lock: repairs first
    lines = [r.getMessage() for r in caplog.records if r.name == "shmreg.store"]
    assert len(lines) == 1, lines
    assert "recovered after writer pid" in lines[0] and "died holding the lock" in lines[0]
