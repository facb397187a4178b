"""The pytest plugin shmreg installs (entry point ``pytest11``): its fixtures work."""

from __future__ import annotations

import shmreg
from shmreg._segment import list_segments


def test_shmreg_registry_is_fresh_and_writable(shmreg_registry: shmreg.Registry) -> None:
    assert shmreg_registry.count() == 0
    shmreg_registry.register("ns", "x", metadata={"a": 1})
    assert shmreg_registry.get_metadata("ns", "x") == {"a": 1}
    assert list_segments(f"shmreg-{shmreg_registry.name}")


def test_shmreg_namespace_is_unique_and_in_that_registry(
    shmreg_registry: shmreg.Registry, shmreg_namespace: str
) -> None:
    assert shmreg_namespace.startswith("test:")
    with shmreg_registry.register_self(shmreg_namespace, "me") as generation:
        assert generation > 0
        assert shmreg_registry.list_services(shmreg_namespace) == ["me"]
