"""Layout versions: an older registry is refused naming ``shmreg upgrade``, which upgrades it."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest
from helpers import wait_until

import shmreg
from shmreg._engine import layout as L


def _stamp(reg: shmreg.Registry, version: int) -> None:
    # What an older (or newer) shmreg would have left in the root's version word.
    reg.backend.store.rq[L.R_VERSION] = version  # type: ignore[attr-defined]


def _shmreg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmreg", *args], capture_output=True, text=True, timeout=300
    )


def test_an_older_layout_is_refused_then_upgraded_in_place(registry: shmreg.Registry) -> None:
    for i in range(50):
        registry.register("jobs", f"j{i}", metadata={"i": i})
    gens = {i: registry.generation("jobs", f"j{i}") for i in range(50)}
    data_gen = registry.backend.store.gen  # type: ignore[attr-defined]
    _stamp(registry, 0)
    with pytest.raises(shmreg.IncompatibleRegistry) as refused:
        shmreg.Registry.attach(registry.name)
    assert f"shmreg upgrade {registry.name}" in str(refused.value)
    done = _shmreg("upgrade", registry.name, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "from": 0,
        "to": L.LAYOUT_VERSION,
        "upgraded": True,
        "entries": 50,
    }
    with shmreg.Registry.attach(registry.name) as again:
        assert again.backend.store.gen > data_gen  # type: ignore[attr-defined]
        for i in range(50):
            assert again.get_metadata("jobs", f"j{i}") == {"i": i}
            assert again.generation("jobs", f"j{i}") == gens[i]
        again.register("jobs", "after")  # writable at the new layout
    # The handle attached before the upgrade follows the swap, as it follows growth.
    assert registry.lookup("jobs", "after") is not None
    assert (
        _shmreg("upgrade", registry.name).stdout.strip() == f"already at layout {L.LAYOUT_VERSION}"
    )


def test_a_newer_layout_is_refused_and_not_upgraded(registry: shmreg.Registry) -> None:
    _stamp(registry, L.LAYOUT_VERSION + 1)
    try:
        with pytest.raises(shmreg.IncompatibleRegistry, match="upgrade shmreg"):
            shmreg.Registry.attach(registry.name)
        done = _shmreg("upgrade", registry.name)
        assert done.returncode == 2 and "IncompatibleRegistry" in done.stderr
    finally:
        _stamp(registry, L.LAYOUT_VERSION)  # so the fixture can destroy it


def _as_layout_1(reg: shmreg.Registry) -> None:
    """What a layout-1 shmreg (writer lock: flock) left: the version, no mutex bytes."""
    store = reg.backend.store  # type: ignore[attr-defined]
    store._root.buf[L.R_MUTEX_OFFSET : L.R_MUTEX_OFFSET + L.R_MUTEX_BYTES] = bytes(L.R_MUTEX_BYTES)
    _stamp(reg, 1)


def test_a_flock_layout_is_refused_then_upgraded_to_the_mutex(registry: shmreg.Registry) -> None:
    for i in range(20):
        registry.register("jobs", f"j{i}", metadata={"i": i})
    data_gen = registry.backend.store.gen  # type: ignore[attr-defined]
    # A layout-1 writer died inside a change: the upgrade recovers under the new lock.
    dead = subprocess.Popen(["true"])
    dead.wait()
    registry.backend.store.rq[L.R_OWNER_PID] = dead.pid  # type: ignore[attr-defined]
    _as_layout_1(registry)
    with pytest.raises(shmreg.IncompatibleRegistry) as refused:
        shmreg.Registry.attach(registry.name)
    assert f"shmreg upgrade {registry.name}" in str(refused.value)
    done = _shmreg("upgrade", registry.name, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"from": 1, "to": 2, "upgraded": True, "entries": 20}
    store = registry.backend.store  # type: ignore[attr-defined]
    assert store.gen == data_gen  # the data was laid out right already: no swap
    assert store.rq[L.R_OWNER_PID] == 0 and store.rq[L.R_RECOVERIES] == 1
    assert store.lock.problem() is None  # initialised: robust, process-shared
    with shmreg.Registry.attach(registry.name) as again:
        again.register("jobs", "after")
        assert again.get_metadata("jobs", "j7") == {"i": 7}
    assert registry.lookup("jobs", "after") is not None


def _blocked_in_flock(pid: int) -> bool:
    """Whether ``pid`` waits for a flock (``/proc/locks`` lists waiters with ``->``)."""
    with open("/proc/locks") as fh:
        return any("->" in line and "FLOCK" in line and f" {pid} " in line for line in fh)


def test_the_upgrade_waits_for_the_old_flock(registry: shmreg.Registry) -> None:
    _as_layout_1(registry)
    fd = os.open(f"/dev/shm/{L.root_name(registry.name)}", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a layout-1 writer inside a change
        upgrading = subprocess.Popen(
            [sys.executable, "-m", "shmreg", "upgrade", registry.name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # It waits for the flock, and has stamped nothing meanwhile.
            wait_until(lambda: _blocked_in_flock(upgrading.pid), "the upgrade to wait")
            assert upgrading.poll() is None
            assert registry.backend.store.rq[L.R_VERSION] == 1  # type: ignore[attr-defined]
        except BaseException:
            upgrading.kill()
            upgrading.wait()
            raise
    finally:
        os.close(fd)  # the old writer is done
    _, err = upgrading.communicate(timeout=300)
    assert upgrading.returncode == 0, err
    assert registry.backend.store.rq[L.R_VERSION] == L.LAYOUT_VERSION  # type: ignore[attr-defined]
    registry.register("jobs", "after")
