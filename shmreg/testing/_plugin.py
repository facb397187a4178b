"""The shmreg pytest plugin (entry point ``pytest11``): isolated registries for tests.

Fixtures:

``shmreg_registry``
    a fresh shared-memory registry with a unique name, destroyed after the test;
``shmreg_namespace``
    a unique ``test:<hex>`` namespace in that registry; its live owners are cleaned up after.

Assertion helpers live in ``shmreg.testing``: ``assert_registered``,
``assert_not_registered``, ``assert_metadata_equals``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from shmreg._errors import RegistryNotFound
from shmreg._registry import Registry

# Agent fixtures live in a module of their own; importing them here registers them.
from shmreg.testing._agent_fixtures import (  # noqa: F401
    agent_load_set,
    agent_supervisor,
    coordination_agent_config,
    ml_agent_config,
    worker_agent_config,
)


@pytest.fixture
def shmreg_registry() -> Iterator[Registry]:
    """A registry of its own for one test, removed for every process afterwards."""
    name = f"pytest-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    reg = Registry.create(name, capacity=1024)
    try:
        yield reg
    finally:
        try:
            Registry.attach(name).destroy()
        except RegistryNotFound:
            pass
        reg.close()


@pytest.fixture
def shmreg_namespace(shmreg_registry: Registry) -> Iterator[str]:
    """A namespace no other test uses; its entries are removed afterwards."""
    namespace = f"test:{uuid.uuid4().hex[:12]}"
    try:
        yield namespace
    finally:
        for service in shmreg_registry.list_services(namespace):
            shmreg_registry.unregister(namespace, service)
