"""Assertion helpers for tests of code that registers processes.

Each reads the registry once, through the same public calls an application uses, and fails
with an ``AssertionError`` whose message says what the registry holds instead, so a failing
test shows the actual entry rather than ``assert None == 1234``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the registry is only a parameter type here: no import at run time
    from shmreg._registry import Registry
    from shmreg._types import Metadata, Service

__all__ = ["assert_metadata_equals", "assert_not_registered", "assert_registered"]

#: "Any pid": ``assert_registered`` checks the owner only when given one.
_ANY: Any = object()


def _name(namespace: str, service: Service) -> str:
    return f"({namespace!r}, {service!r})"


def assert_registered(
    registry: Registry,
    namespace: str,
    service: Service,
    *,
    pid: int | None = _ANY,
    metadata: Metadata | None = None,
) -> tuple[int, Metadata]:
    """Fail unless ``service`` is registered (to ``pid`` and with exactly ``metadata``, when
    given; ``pid=None`` means this process); return its ``(pid, metadata)``.

        pid, meta = assert_registered(reg, "workers", "w1", metadata={"role": "io"})
    """
    found = registry.lookup_with_metadata(namespace, service)
    if found is None:
        others = sorted(map(repr, registry.list_services(namespace)))[:10]
        raise AssertionError(
            f"{_name(namespace, service)} is not registered in {registry.name!r}; "
            f"the namespace holds {', '.join(others) or 'nothing'}"
        )
    if pid is not _ANY:
        want = os.getpid() if pid is None else pid
        if found[0] != want:
            raise AssertionError(
                f"{_name(namespace, service)} is registered to pid {found[0]}, not {want}"
            )
    if metadata is not None and found[1] != metadata:
        raise AssertionError(_metadata_message(namespace, service, found[1], metadata))
    return found


def assert_not_registered(registry: Registry, namespace: str, service: Service) -> None:
    """Fail if ``service`` has a live registration in ``namespace``."""
    found = registry.lookup_with_metadata(namespace, service)
    if found is not None:
        raise AssertionError(
            f"{_name(namespace, service)} is registered to pid {found[0]} "
            f"with metadata {found[1]!r}"
        )


def assert_metadata_equals(
    registry: Registry, namespace: str, service: Service, expected: Metadata
) -> None:
    """Fail unless ``service`` is registered with metadata equal to ``expected`` (the whole
    dict, not a subset: a stray field is a difference too)."""
    found = registry.lookup_with_metadata(namespace, service)
    if found is None:
        raise AssertionError(f"{_name(namespace, service)} is not registered")
    if found[1] != expected:
        raise AssertionError(_metadata_message(namespace, service, found[1], expected))


def _metadata_message(namespace: str, service: Service, got: Metadata, want: Metadata) -> str:
    lines = [f"metadata of {_name(namespace, service)} differs:"]
    for field in sorted(set(got) | set(want)):
        if field not in want:
            lines.append(f"  unexpected {field!r}: {got[field]!r}")
        elif field not in got:
            lines.append(f"  missing {field!r}: expected {want[field]!r}")
        elif got[field] != want[field]:
            lines.append(f"  {field!r}: {got[field]!r}, expected {want[field]!r}")
    return "\n".join(lines)
