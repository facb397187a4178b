"""Shared fixtures: unique registry names, and a session guard against leaked segments."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

import shmreg
from shmreg._engine.segment import list_segments, unlink_segment

TEST_PREFIX = "t-"


def _ours() -> set[str]:
    return {s for s in list_segments(f"shmreg-{TEST_PREFIX}")}


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Fail the run if a test leaves a registry segment behind (and remove it)."""
    before = _ours()
    yield
    # Under xdist every worker runs this; each only judges segments created by its own pid
    # tag so one worker's finished session does not blame another's live registries.
    tag = f"-{os.getpid()}-"
    leaked = sorted(s for s in _ours() - before if tag in s)
    for seg in leaked:
        unlink_segment(seg)
    assert not leaked, f"tests left shared-memory segments behind: {leaked}"


@pytest.fixture
def reg_name() -> str:
    """A registry name unique to this test (carries the worker pid for the leak guard)."""
    return f"{TEST_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["shm", "memory"])
def any_registry(request: pytest.FixtureRequest, reg_name: str) -> Iterator[shmreg.Registry]:
    """A fresh registry on each backend in turn, destroyed afterwards."""
    reg = shmreg.Registry.create(reg_name, backend=request.param, capacity=1024)
    try:
        yield reg
    finally:
        reg.destroy()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[object]:
    """One private redis-server for the session (``shmreg.testing.redis``), stopped after."""
    from shmreg.testing.redis import RedisServer

    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def registry(reg_name: str) -> Iterator[shmreg.Registry]:
    reg = shmreg.Registry.create(reg_name, capacity=1024)
    try:
        yield reg
    finally:
        try:
            shmreg.Registry.attach(reg_name).destroy()
        except shmreg.RegistryNotFound:
            pass
        reg.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run the soak and stress tests (bounded by SHMREG_SOAK_SECONDS, default 20)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def soak_seconds() -> float:
    """How long a soak or stress test may run (CI keeps the default)."""
    return float(os.environ.get("SHMREG_SOAK_SECONDS", "20"))
