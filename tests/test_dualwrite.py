"""DualWriteBackend: the conformance suite, mirroring with generations, a real secondary outage."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import pytest

import shmreg
from shmreg.backends._dualwrite import DualWriteBackend
from shmreg.backends._memory import MemoryBackend
from shmreg.backends._shm import SharedMemoryBackend
from shmreg.migration import validate
from shmreg.testing import check_backend
from shmreg.testing.redis import RedisServer


def _name() -> str:
    return f"t-{os.getpid()}-dual-{uuid.uuid4().hex[:10]}"


def test_dual_write_backend_passes_the_conformance_suite() -> None:
    def make() -> DualWriteBackend:
        return DualWriteBackend(SharedMemoryBackend(_name(), capacity=16), MemoryBackend())

    check_backend(make)


@pytest.fixture
def dual(reg_name: str) -> Iterator[shmreg.Registry]:
    url = f"dual+shm://{reg_name}?secondary=memory://{reg_name}-2"
    reg = shmreg.Registry.create(reg_name, url=url)
    try:
        yield reg
    finally:
        reg.destroy()


def test_every_write_is_mirrored_with_its_generation(dual: shmreg.Registry) -> None:
    backend = dual.backend
    assert isinstance(backend, DualWriteBackend)
    primary, secondary = backend.primary, backend.secondary
    gen = dual.register("jobs", "a", metadata={"v": 1})
    assert secondary.lookup_entry("jobs", "a") == (os.getpid(), gen, {"v": 1})
    dual.update_metadata("jobs", "a", {"w": 2}, merge=True, generation=gen)
    assert secondary.lookup_entry("jobs", "a") == (os.getpid(), gen, {"v": 1, "w": 2})
    dual.register_many("jobs", [("b", None, {}), (("t", 1), None, {"x": [1]})])
    assert validate(primary, secondary).ok
    assert dual.unregister("jobs", "a", generation=gen)
    assert secondary.lookup("jobs", "a") is None
    assert backend.failures == 0 and backend.location.startswith("dual+shm://")


def test_a_dual_registry_pickles_by_its_location(dual: shmreg.Registry) -> None:
    dual.register("jobs", "p")
    again = pickle.loads(pickle.dumps(dual))
    try:
        assert isinstance(again.backend, DualWriteBackend)
        assert again.lookup("jobs", "p") == os.getpid()
    finally:
        again.close()


def test_reads_fall_back_to_the_secondary(dual: shmreg.Registry) -> None:
    backend = dual.backend
    assert isinstance(backend, DualWriteBackend)
    backend.secondary.register("old", "only-there", shmreg._identity.self_identity(), {"k": 1})
    assert dual.lookup("old", "only-there") == os.getpid()
    assert dual.get_metadata("old", "only-there") == {"k": 1}
    assert dual.list_services("old") == ["only-there"]
    assert "old" in backend.namespaces()


def test_a_secondary_outage_never_fails_a_primary_write(
    reg_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A real redis-server, stopped with SIGSTOP: every secondary call times out. The timeout
    # is a second, not less: a call before the outage must not time out on a loaded machine.
    server = RedisServer()
    reg = None
    try:
        url = f"dual+shm://{reg_name}?secondary={server.url}?timeout=1#{_name()}"
        reg = shmreg.Registry.create(reg_name, url=url)
        backend = reg.backend
        assert isinstance(backend, DualWriteBackend)
        reg.register("jobs", "before")
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with caplog.at_level(logging.WARNING, logger="shmreg.migration"):
                for i in range(3):
                    reg.register("jobs", f"during-{i}", metadata={"i": i})
                reg.unregister("jobs", "before")
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert sorted(reg.list_services("jobs")) == ["during-0", "during-1", "during-2"]
        assert backend.failures == 4 and backend.pending == 4
        assert reg.stats().extra["dual"]["secondary_failures"] == 4
        assert any("kept for reconcile" in r.getMessage() for r in caplog.records)
        assert not validate(backend.primary, backend.secondary).ok
        assert backend.reconcile() == 4 and backend.pending == 0
        assert validate(backend.primary, backend.secondary).ok
        assert backend.reconcile(full=True) == 0
        # Once more, repaired by the monitor this time (it reconciles with each sweep).
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            reg.register("jobs", "second-outage")
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert backend.pending == 1
        with reg.monitor(sweep_interval=0.05):
            deadline = time.monotonic() + 120
            while backend.pending and time.monotonic() < deadline:
                time.sleep(0.02)
        assert backend.pending == 0 and validate(backend.primary, backend.secondary).ok
    finally:
        if reg is not None:
            reg.destroy()
        server.stop()


_WRITER = textwrap.dedent(
    """
    import sys, shmreg
    reg = shmreg.Registry(sys.argv[1], url=sys.argv[2])
    w = sys.argv[3]
    for i in range(200):
        reg.register("jobs", f"{w}-{i % 20}", metadata={"i": i})
        if i % 7 == 0:
            reg.unregister("jobs", f"{w}-{(i * 3) % 20}")
        reg.register("shared", i % 10, metadata={"by": w, "i": i}, pid=int(sys.argv[4]))
    print("ok", flush=True)
    """
)


def test_writers_in_many_processes_leave_both_sides_equal(reg_name: str) -> None:
    sleeper = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(600)"])
    url = f"dual+shm://{reg_name}?secondary=shm://{reg_name}-2"
    reg = shmreg.Registry.create(reg_name, url=url)
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _WRITER, reg_name, url, f"w{n}", str(sleeper.pid)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for n in range(3)
        ]
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0 and out.strip() == "ok"
        backend = reg.backend
        assert isinstance(backend, DualWriteBackend)
        # The writers exited: their own entries read as dead on both sides alike, and the
        # sleeper's "shared" names must agree to the generation.
        assert validate(backend.primary, backend.secondary).ok
        assert len(backend.secondary.export_entries("shared")) == 10
    finally:
        sleeper.kill()
        sleeper.wait()
        reg.destroy()
