"""Every backend against the conformance suite, check by check and as a whole.

Also the part of the contract the protocol cannot express: opening a registry by name
(a second handle sees the same data; settings are checked on attach) and the handle lifecycle
(close is per handle, destroy reaches every handle).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import shmreg
from shmreg._engine.segment import list_segments
from shmreg._identity import self_identity
from shmreg.backends import Backend, MemoryBackend, SharedMemoryBackend
from shmreg.testing import CHECKS, ConformanceFailure, check_backend

KINDS = ["shm", "memory", "redis"]



def _unique() -> str:
    # The worker pid in the name lets the session guard in conftest.py spot a leaked segment.
    return f"t-{os.getpid()}-conf-{uuid.uuid4().hex[:10]}"


def _segments(name: str) -> list[str]:
    root = f"shmreg-{name}"
    return [s for s in list_segments(root) if s == root or s.startswith(root + ".")]


_REDIS_URL: list[str] = []  # the session's server, set by _redis_url for redis cases


@pytest.fixture(autouse=True)
def _redis_url(request: pytest.FixtureRequest) -> None:
    if "redis" in request.node.name:
        _REDIS_URL[:] = [request.getfixturevalue("redis_server").url]


def _open(kind: str, name: str, url: str | None = None, **settings: object) -> Backend:
    if kind == "redis":
        from shmreg.backends import RedisBackend

        return RedisBackend(name, url or _REDIS_URL[0], **settings)  # type: ignore[arg-type]
    if kind == "shm":
        return SharedMemoryBackend(name, **settings)  # type: ignore[arg-type]
    return MemoryBackend.named(name, **settings)  # type: ignore[arg-type]


@pytest.fixture
def factory(request: pytest.FixtureRequest) -> Iterator[Callable[[], Backend]]:
    """Fresh empty backends of one kind; afterwards, proof that none left a segment behind."""
    kind: str = request.param
    names: list[str] = []

    def make() -> Backend:
        names.append(_unique())
        # A small capacity on purpose: the checks then also run through table growth.
        return _open(kind, names[-1], capacity=16)

    yield make
    for name in names:
        assert _segments(name) == [], f"backend {name} left segments behind"


def _params() -> list[object]:
    params: list[object] = []
    for kind in KINDS:
        for name, check in CHECKS:
            params.append(pytest.param(kind, check, id=f"{kind}-{name}"))
    return params


@pytest.mark.parametrize(("factory", "check"), _params(), indirect=["factory"])
def test_check(factory: Callable[[], Backend], check: Callable[[Backend], None]) -> None:
    backend = factory()
    try:
        check(backend)
    finally:
        backend.destroy()


@pytest.mark.parametrize("factory", KINDS, indirect=True)
def test_check_backend_whole(factory: Callable[[], Backend]) -> None:
    check_backend(factory)


def test_checks_have_unique_names() -> None:
    names = [name for name, _ in CHECKS]
    assert len(names) == len(set(names)) and len(names) >= 30


def test_check_backend_reports_every_failure() -> None:
    class Forgetful(MemoryBackend):
        """Loses every write: most checks must fail, and all must be named."""

        def register(self, *args: object, **kwargs: object) -> int:
            return 1

    with pytest.raises(ConformanceFailure) as info:
        check_backend(Forgetful)
    assert "register_returns_generation" in info.value.failures
    assert len(info.value.failures) > len(CHECKS) // 2
    assert isinstance(info.value, AssertionError)


def test_memory_backend_with_a_small_ring_passes() -> None:
    # The ring checks read the ring size from ``ring_events``: with 100 events, reading past
    # the ring's end is exercised at another size than the shared ring's.
    check_backend(lambda: MemoryBackend(ring_events=100))


def test_memory_ring_counts_lost_events() -> None:
    backend = MemoryBackend(ring_events=4)
    try:
        me = self_identity()
        backend.register("ns", "svc", me, None)
        for n in range(5):
            backend.update_metadata("ns", "svc", {"n": n})
        assert backend.last_event_seq() == 6
        for after, lost, seqs in ((0, 2, [3, 4, 5, 6]), (1, 1, [3, 4, 5, 6]), (2, 0, [3, 4, 5, 6]),
                                  (4, 0, [5, 6]), (6, 0, []), (9, 0, [])):
            events, got = backend.read_events(after)
            assert (got, [e.seq for e in events]) == (lost, seqs), after
        events, got = backend.read_events(0, limit=1)
        assert (got, [e.seq for e in events]) == (2, [3])
    finally:
        backend.destroy()


def test_memory_ring_events_setting(name: str) -> None:
    with pytest.raises(shmreg.InvalidBackendConfig):
        MemoryBackend(ring_events=0)
    first = MemoryBackend.named(name, ring_events=64)
    try:
        assert first.ring_events == 64
        with pytest.raises(shmreg.IncompatibleRegistry) as info:
            MemoryBackend.named(name, ring_events=128)
        assert (info.value.setting, info.value.expected, info.value.actual) == (
            "ring_events", 128, 64)
        assert MemoryBackend.named(name).ring_events == 64
    finally:
        first.close()


# --------------------------------------------------------------------- opening by name


@pytest.fixture
def name() -> Iterator[str]:
    name = _unique()
    yield name
    for kind in KINDS:  # whatever a test left open, remove it
        if kind == "redis" and not _REDIS_URL:
            continue  # no Redis test has run in this worker: none can have left a registry
        try:
            _open(kind, name, create=False).destroy()
        except shmreg.RegistryNotFound:
            pass
    assert _segments(name) == []


@contextmanager
def _handles(kind: str, name: str, count: int = 2) -> Iterator[list[Backend]]:
    """Handles on one registry, closed whatever the test does (a handle left open would keep
    its mapping until the garbage collector finds it)."""
    handles: list[Backend] = []
    try:
        for _ in range(count):
            handles.append(_open(kind, name))
        yield handles
    finally:
        for handle in handles:
            handle.close()


@pytest.mark.parametrize("kind", KINDS)
def test_second_handle_shares_data(kind: str, name: str) -> None:
    with _handles(kind, name, 1) as (first,):
        second = _open(kind, name, create=False)
        try:
            first.register("ns", "svc", self_identity(), {"a": 1})
            assert second.lookup_with_metadata("ns", "svc") == (os.getpid(), {"a": 1})
        finally:
            second.close()


@pytest.mark.parametrize("kind", KINDS)
def test_attach_to_missing_name(kind: str, name: str) -> None:
    with pytest.raises(shmreg.RegistryNotFound):
        _open(kind, name, create=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("setting", "created", "asked"),
                         [("capacity", 16, 32), ("max_metadata_bytes", 1024, 2048)])
def test_disagreeing_setting_names_both_values(kind: str, name: str, setting: str,
                                               created: int, asked: int) -> None:
    backend = _open(kind, name, **{setting: created})
    try:
        with pytest.raises(shmreg.IncompatibleRegistry) as info:
            _open(kind, name, **{setting: asked})
        err = info.value
        assert (err.setting, err.expected, err.actual) == (setting, asked, created)
        assert str(created) in str(err) and str(asked) in str(err)
        _open(kind, name, **{setting: created}).close()  # the agreeing value attaches
    finally:
        backend.close()


@pytest.mark.parametrize("kind", KINDS)
def test_close_is_per_handle(kind: str, name: str) -> None:
    with _handles(kind, name) as (first, second):
        first.register("ns", "svc", self_identity(), None)
        first.close()
        first.close()  # idempotent
        calls: list[Callable[[], object]] = [
            lambda: first.lookup("ns", "svc"), lambda: first.list_services("ns"), first.count,
            first.stats]
        for call in calls:
            with pytest.raises(shmreg.RegistryClosed):
                call()
        assert second.lookup("ns", "svc") == os.getpid()


@pytest.mark.parametrize("kind", KINDS)
def test_closed_handle_refuses_writes(kind: str, name: str) -> None:
    with _handles(kind, name) as (first, _):
        first.close()
        calls: list[Callable[[], object]] = [
            lambda: first.register("ns", "svc", self_identity(), None),
            lambda: first.unregister("ns", "svc"), first.sweep]
        for call in calls:
            with pytest.raises(shmreg.RegistryClosed):
                call()


@pytest.mark.parametrize("kind", KINDS)
def test_destroy_reaches_every_handle(kind: str, name: str) -> None:
    with _handles(kind, name) as (first, second):
        first.register("ns", "svc", self_identity(), None)
        first.destroy()
        with pytest.raises(shmreg.RegistryDestroyed):
            second.lookup("ns", "svc")
        with pytest.raises(shmreg.RegistryDestroyed):
            second.register("ns", "svc", self_identity(), None)
    with pytest.raises(shmreg.RegistryNotFound):
        _open(kind, name, create=False)
    with _handles(kind, name, 1) as (fresh,):  # the name is free again, and empty
        assert fresh.count() == 0


def test_registry_facade_shares_memory_backend_by_name(name: str) -> None:
    with shmreg.Registry(name, backend="memory") as first, \
            shmreg.Registry(name, backend="memory") as second:
        first.register("ns", "svc", metadata={"a": 1})
        assert second.get_metadata("ns", "svc") == {"a": 1}
        assert isinstance(second.backend, MemoryBackend) and second.backend.kind == "memory"
        first.close()
        assert second.lookup("ns", "svc") == os.getpid()  # close detached only the first
        second.destroy()
    with pytest.raises(shmreg.RegistryNotFound):
        shmreg.Registry.attach(name, backend="memory")


def test_backends_package_exports() -> None:
    import shmreg.backends as backends
    import shmreg.testing as testing

    assert sorted(backends.__all__) == [
        "Backend",
        "BackendBase",
        "DualWriteBackend",
        "MemoryBackend",
        "SharedMemoryBackend",
    ]
    for public in backends.__all__:
        assert getattr(backends, public).__module__ == "shmreg.backends"
    assert {"CHECKS", "check_backend"} <= set(testing.__all__)
    assert isinstance(MemoryBackend(), Backend)
