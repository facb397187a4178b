"""Pytest fixtures for agents, imported by the shmreg pytest plugin.

``agent_supervisor``
    a ``Supervisor`` on ``shmreg_registry`` in a namespace of its own; closed afterwards
    (every agent stopped, none left running);
``worker_agent_config``, ``ml_agent_config``, ``coordination_agent_config``
    configs for the programs in ``shmreg.testing.agents``;
``agent_load_set``
    a function ``n -> [n worker configs]``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported by the fixtures when a test uses them, not at plugin load
    from shmreg._registry import Registry
    from shmreg.agents import Supervisor


@pytest.fixture
def agent_supervisor(shmreg_registry: Registry, tmp_path: Path) -> Iterator[Supervisor]:
    """A supervisor of its own for one test (agent logs under ``tmp_path``); every agent is
    stopped afterwards."""
    from shmreg.agents import Supervisor

    sup = Supervisor(
        shmreg_registry, namespace=f"agents-{uuid.uuid4().hex[:8]}", log_dir=str(tmp_path)
    )
    try:
        yield sup
    finally:
        sup.close(timeout=5.0)


@pytest.fixture
def worker_agent_config() -> dict[str, Any]:
    from shmreg.testing import agents as programs

    return programs.worker_config("worker-1")


@pytest.fixture
def ml_agent_config() -> dict[str, Any]:
    from shmreg.testing import agents as programs

    return programs.ml_config("ml-1")


@pytest.fixture
def coordination_agent_config() -> dict[str, Any]:
    from shmreg.testing import agents as programs

    return programs.coordination_config("coordinator-1")


@pytest.fixture
def agent_load_set() -> Callable[[int], list[dict[str, Any]]]:
    from shmreg.testing import agents as programs

    return lambda count: programs.load_set(count)
