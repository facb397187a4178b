"""The shmreg pytest plugin (entry point ``pytest11``): isolated registries for tests.

Installing shmreg loads this module into every pytest run in that environment, so it does
nothing at load but define fixtures: no hooks, no options, no registry until a test asks
for a fixture (``tests/test_plugin.py`` holds it to that). Fixtures come in one block per
topic; a new topic adds a block.

Registries:

``shmreg_registry``
    a fresh shared-memory registry with a unique name, destroyed after the test;
``shmreg_namespace``
    a unique ``test:<hex>`` namespace in that registry; its entries are removed after.

Assertion helpers live in ``shmreg.testing``::

    from shmreg.testing import assert_metadata_equals, assert_not_registered, assert_registered

    def test_worker_registers(shmreg_registry, shmreg_namespace):
        shmreg_registry.register(shmreg_namespace, "w1", metadata={"role": "io"})
        assert_registered(shmreg_registry, shmreg_namespace, "w1", pid=None)
        assert_metadata_equals(shmreg_registry, shmreg_namespace, "w1", {"role": "io"})
        shmreg_registry.unregister(shmreg_namespace, "w1")
        assert_not_registered(shmreg_registry, shmreg_namespace, "w1")
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported by the fixtures when a test uses them, not at plugin load
    from shmreg._registry import Registry

# ------------------------------------------------------------------------------ registries

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
    from shmreg._errors import RegistryNotFound
    from shmreg._registry import Registry

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
